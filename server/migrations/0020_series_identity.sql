-- Series identity (README "Series identity"): a series is (machine, metric).
-- Until now it was (machine, metric, unit, raw_tag), so one metric sent with
-- and without a unit (or under two raw tags) became several series: two
-- answers for metric_name=temperature, several plots of it on the fleet
-- page. unit and raw_tag are now attributes of the series: the latest
-- non-empty value sent wins (an empty one changes nothing), and each change
-- is a row of series_attribute_changes. The ingest catalog
-- (server/catalog.py) writes only when a reading brings a non-empty unit or
-- raw_tag different from the series' own.
--
-- Existing duplicates (several series of one machine and metric) are merged
-- into the oldest (lowest id) by haltless_merge_series_duplicates() below,
-- before the unique key becomes (machine_id, metric_name). Every reading
-- stays, exactly once: hot rows are re-pointed; the compressed blocks of
-- the other series go back to hot rows of the kept one (decoded with the
-- SQL decoders of 0012), so the next compaction merges them into the kept
-- series' blocks as it merges late data. Rollups stay exact meanwhile: a
-- compacted hour with hot rows is aggregated from its readings (0013), and
-- compaction writes a new summary when it merges them.

CREATE TABLE series_attribute_changes (
    series_id    integer NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT now(),
    old_unit     text NOT NULL,
    new_unit     text NOT NULL,
    old_raw_tag  text NOT NULL,
    new_raw_tag  text NOT NULL
);
CREATE INDEX series_attribute_changes_series ON series_attribute_changes (series_id, changed_at);

-- As 0007 for series: a reference table on a Citus coordinator (written only
-- when an attribute changes), its foreign key added once it is one.
DO $citus$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
        PERFORM create_reference_table('series_attribute_changes');
    END IF;
    ALTER TABLE series_attribute_changes ADD CONSTRAINT series_attribute_changes_series_id_fkey
        FOREIGN KEY (series_id) REFERENCES series (id) ON DELETE CASCADE;
END $citus$;

-- Merge every group of series of one (machine_id, metric_name) into its
-- lowest id; returns how many series were merged away. Kept in the schema
-- (a no-op once the unique key below holds) so that it can be run on a copy
-- made the old way. One statement per duplicate with its ids as constants:
-- on a Citus coordinator each is a router query on the series' shard (hot
-- rows cannot be UPDATEd to another series there: series_id is the
-- distribution column, so they are inserted again and deleted).
CREATE FUNCTION haltless_merge_series_duplicates() RETURNS integer
LANGUAGE plpgsql AS $merge$
DECLARE
    citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
    -- The hot slot writers fill now (server/hot.py): the moved readings are
    -- compacted with the rest of this hour's.
    hot integer := (floor(extract(epoch FROM now()) / 3600))::bigint % 2;
    g record;
    s record;
    keep integer;
    dup integer;
    newest timestamptz;
    hot_newest timestamptz;
    best_unit text;
    best_unit_at timestamptz;
    best_raw text;
    best_raw_at timestamptz;
    old_unit text;
    old_raw text;
    starts timestamptz[];
    tls bigint[];
    merged integer := 0;
BEGIN
    FOR g IN SELECT machine_id, metric_name, array_agg(id ORDER BY id) AS ids
             FROM series GROUP BY machine_id, metric_name HAVING count(*) > 1
             ORDER BY machine_id, metric_name LOOP
        keep := g.ids[1];
        -- The attributes: the latest non-empty unit and raw_tag, "latest" by
        -- the newest reading of each series (then by id, the newer series).
        best_unit := NULL; best_unit_at := NULL; best_raw := NULL; best_raw_at := NULL;
        FOR s IN SELECT id, unit, raw_tag FROM series WHERE id = ANY (g.ids) ORDER BY id LOOP
            EXECUTE format('SELECT max(t_last) FROM reading_blocks WHERE series_id = %s', s.id)
                INTO newest;
            EXECUTE format('SELECT timestamptz ''epoch'' + max(haltless_chunk_last(ts))'
                           ' * interval ''1 microsecond'' FROM reading_chunks WHERE series_id = %s',
                           s.id) INTO hot_newest;
            newest := coalesce(greatest(newest, hot_newest), timestamptz '-infinity');
            IF s.unit <> '' AND (best_unit_at IS NULL OR newest >= best_unit_at) THEN
                best_unit := s.unit; best_unit_at := newest;
            END IF;
            IF s.raw_tag <> '' AND (best_raw_at IS NULL OR newest >= best_raw_at) THEN
                best_raw := s.raw_tag; best_raw_at := newest;
            END IF;
        END LOOP;
        FOREACH dup IN ARRAY g.ids[2:] LOOP
            -- Hot rows: the same rows, under the kept series.
            EXECUTE format('INSERT INTO reading_chunks (slot, series_id, bucket, n, ts, vals)'
                           ' SELECT slot, %s, bucket, n, ts, vals FROM reading_chunks'
                           ' WHERE series_id = %s', keep, dup);
            EXECUTE format('DELETE FROM reading_chunks WHERE series_id = %s', dup);
            -- Blocks: their readings as hot rows of the kept series, in time
            -- order, at most 500 a row as the kernel writes them (0011).
            EXECUTE format($q$
                INSERT INTO reading_chunks (slot, series_id, bucket, n, ts, vals)
                SELECT %1$s, %2$s, x.block_start, count(*),
                       haltless_chunk_stamps(array_agg(x.ts ORDER BY x.o)),
                       array_agg(x.value ORDER BY x.o)
                FROM (SELECT b.block_start, d.ts, d.value, d.o
                      FROM reading_blocks b
                      JOIN reading_timelines t ON %3$s t.block_start = b.block_start
                           AND t.id = b.timeline
                      CROSS JOIN LATERAL unnest(haltless_stamps(t.ts), haltless_values(b.vals))
                           WITH ORDINALITY AS d (ts, value, o)
                      WHERE b.series_id = %4$s) AS x
                GROUP BY x.block_start, (x.o - 1) / 500$q$,
                hot, keep, CASE WHEN citus THEN format('t.series_id = %s AND', dup) ELSE '' END,
                dup);
            IF citus THEN  -- a timeline belongs to its block's series (0007)
                EXECUTE format('DELETE FROM reading_timelines WHERE series_id = %s', dup);
                EXECUTE format('DELETE FROM reading_blocks WHERE series_id = %s', dup);
            ELSE  -- shared timelines: delete those no block uses any more
                SELECT array_agg(block_start), array_agg(timeline) INTO starts, tls
                FROM reading_blocks WHERE series_id = dup;
                DELETE FROM reading_blocks WHERE series_id = dup;
                DELETE FROM reading_timelines t USING unnest(starts, tls) AS o (bs, id)
                WHERE t.block_start = o.bs AND t.id = o.id AND NOT EXISTS (
                    SELECT 1 FROM reading_blocks b WHERE b.block_start = t.block_start
                                                     AND b.timeline = t.id);
            END IF;
            UPDATE series_attribute_changes SET series_id = keep WHERE series_id = dup;
            DELETE FROM series WHERE id = dup;
            merged := merged + 1;
        END LOOP;
        SELECT unit, raw_tag INTO old_unit, old_raw FROM series WHERE id = keep;
        IF coalesce(best_unit, old_unit) <> old_unit OR coalesce(best_raw, old_raw) <> old_raw THEN
            UPDATE series SET unit = coalesce(best_unit, old_unit), raw_tag = coalesce(best_raw, old_raw)
            WHERE id = keep;
            INSERT INTO series_attribute_changes (series_id, old_unit, new_unit, old_raw_tag,
                                                  new_raw_tag)
            VALUES (keep, old_unit, coalesce(best_unit, old_unit), old_raw,
                    coalesce(best_raw, old_raw));
        END IF;
    END LOOP;
    RETURN merged;
END
$merge$;

DO $$
DECLARE
    old_key text;
BEGIN
    PERFORM haltless_merge_series_duplicates();
    -- The unique key of 0001, by what it covers (its name is PostgreSQL's choice).
    SELECT conname INTO old_key FROM pg_constraint
    WHERE conrelid = 'series'::regclass AND contype = 'u' AND cardinality(conkey) = 4;
    IF old_key IS NOT NULL THEN
        EXECUTE format('ALTER TABLE series DROP CONSTRAINT %I', old_key);
    END IF;
    EXECUTE 'ALTER TABLE series ADD CONSTRAINT series_machine_metric_key'
            ' UNIQUE (machine_id, metric_name)';
END $$;
