-- A reader role's policies (0006, plain PostgreSQL) kept a row when
-- `series_id = ANY (the organization's series ids as an array)`. PostgreSQL
-- compares against such an array element by element, for every row: at
-- 2,000 series (100 machines x 20 metrics) ~18 us a row, 1.9 s per 100,000
-- rows (bench/rls.py), so every panel slowed down as the fleet grew
-- (bench/README "SQL read benchmark": 204-760 ms at 100 machines against
-- 10-108 ms at 20). `series_id IN (SELECT unnest(...))` is a hashed
-- subplan: the set is hashed once per query and each row is one lookup
-- (26 ms per 100,000 rows at 2,000 series, 92 ms at 20,000). The rows a
-- reader sees are the same.
-- (On a Citus coordinator the policies are functions, 0009: unchanged.)
DO $rls$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    DROP POLICY reader_org ON series;
    CREATE POLICY reader_org ON series FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL
               OR id IN (SELECT unnest(haltless_reader_series())));
    DROP POLICY reader_org ON reading_chunks;
    CREATE POLICY reader_org ON reading_chunks FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL
               OR series_id IN (SELECT unnest(haltless_reader_series())));
    DROP POLICY reader_org ON reading_blocks;
    CREATE POLICY reader_org ON reading_blocks FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL
               OR series_id IN (SELECT unnest(haltless_reader_series())));
END $rls$;
