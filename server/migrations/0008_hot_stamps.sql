-- Hot timestamps as bytes (README "Storage"): reading_chunks.ts becomes a
-- bytea of n big-endian Unix microseconds (8 bytes each) instead of a
-- timestamptz[]. PostgreSQL receives and sends an array element by element
-- (a length word and a function call per element); a bytea is one copy. So
-- a group commit's COPY, compaction's COPY out and the read API's fetch of
-- hot rows all cost less per reading (bench/README "Storage"), and a row of
-- one reading is 29 bytes smaller. `vals` stays a float8[]: SQL has no cast
-- from 64 bits to a float8, so bytes there would make every plain-SQL read
-- of hot data decode floats arithmetically (~10 µs each).
--
-- Plain SQL keeps reading them through haltless_chunk_readings(ts, vals),
-- as it reads blocks through haltless_block_readings(ts, vals).

DROP VIEW readings;
DROP FUNCTION readings_in(timestamptz, timestamptz);
DROP FUNCTION readings_between(integer, timestamptz, timestamptz);
-- DDL on reading_chunks goes through EXECUTE: on a Citus coordinator it is
-- sent to the shards as its query string, which must be one statement.
DO $$ BEGIN EXECUTE 'DROP INDEX reading_chunks_series_bucket_last'; END $$;

-- The i-th (1-based) timestamp of a chunk as Unix µs. PostgreSQL 18 casts
-- 8 bytes to a bigint directly; older servers go through the codec's helper.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        CREATE FUNCTION haltless_chunk_us(p_ts bytea, i integer) RETURNS bigint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN substring(p_ts FROM i * 8 - 7 FOR 8)::bigint;
    ELSE
        CREATE FUNCTION haltless_chunk_us(p_ts bytea, i integer) RETURNS bigint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN haltless_codec_be(p_ts, i * 8 - 8, 8, true);
    END IF;
END $$;

-- A chunk's ts from timestamps (what this migration converts with; kept
-- for writing hot rows by hand, as the tests do).
CREATE FUNCTION haltless_chunk_stamps(p_ts timestamptz[]) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(string_agg(int8send((extract(epoch FROM t) * 1000000)::int8), ''::bytea
                               ORDER BY o), ''::bytea)
    FROM unnest(p_ts) WITH ORDINALITY AS u (t, o)
$$;
DO $$ BEGIN
    EXECUTE 'ALTER TABLE reading_chunks ALTER COLUMN ts TYPE bytea USING haltless_chunk_stamps(ts)';
END $$;

-- The newest reading of a chunk (the kernel writes them sorted by time):
-- "the newest reading of series S" stays one backward index probe per slot.
CREATE FUNCTION haltless_chunk_last(p_ts bytea) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN haltless_chunk_us(p_ts, length(p_ts) / 8);
DO $$ BEGIN
    EXECUTE 'CREATE INDEX reading_chunks_series_bucket_last'
            ' ON reading_chunks (series_id, bucket, haltless_chunk_last(ts))';
END $$;

-- The readings of one hot row, in order: plain SQL over its columns.
CREATE FUNCTION haltless_chunk_readings(p_ts bytea, p_vals float8[])
RETURNS TABLE (ts timestamptz, value float8)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT timestamptz 'epoch' + haltless_chunk_us(p_ts, i) * interval '1 microsecond', p_vals[i]
    FROM generate_series(1, cardinality(p_vals)) AS i
$$;

-- readings_in, readings_between and the view as in 0005, reading hot rows
-- through haltless_chunk_readings; written once for both kinds of server.
-- On a Citus coordinator (0007) blocks join their timeline on the
-- distribution column as well, and the functions are PL/pgSQL, because
-- Citus cannot plan a SQL function's parameterized query over distributed
-- tables.
DO $fns$
DECLARE
    citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
    tl text := CASE WHEN citus THEN 't.series_id = b.series_id AND ' ELSE '' END;
    q_in text;
    q_between text;
BEGIN
    q_in := format($q$
        SELECT c.series_id, c.bucket, u.ts, u.value
        FROM reading_chunks c CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
        WHERE c.bucket >= date_trunc('hour', p_from) AND c.bucket < p_to
          AND u.ts >= p_from AND u.ts < p_to
        UNION ALL
        SELECT b.series_id, b.block_start, d.ts, d.value
        FROM reading_blocks b
        JOIN reading_timelines t ON %s t.block_start = b.block_start AND t.id = b.timeline
        CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
        WHERE b.block_start >= date_trunc('hour', p_from) AND b.block_start < p_to
          AND t.block_start >= date_trunc('hour', p_from) AND t.block_start < p_to
          AND d.ts >= p_from AND d.ts < p_to$q$, tl);
    q_between := format($q$
        SELECT x.ts, x.value FROM (
            SELECT u.ts, u.value
            FROM reading_chunks c
            CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
            WHERE c.series_id = p_series
              AND c.bucket >= date_trunc('hour', p_from) AND c.bucket <= p_to
            UNION ALL
            SELECT d.ts, d.value
            FROM reading_blocks b
            JOIN reading_timelines t ON %s t.block_start = b.block_start AND t.id = b.timeline
            CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
            WHERE b.series_id = p_series %s
              AND b.block_start >= date_trunc('hour', p_from) AND b.block_start <= p_to
              AND t.block_start >= date_trunc('hour', p_from) AND t.block_start <= p_to
        ) x
        WHERE x.ts >= p_from AND x.ts <= p_to
        ORDER BY x.ts$q$, tl, CASE WHEN citus THEN 'AND t.series_id = p_series' ELSE '' END);
    EXECUTE format(
        'CREATE FUNCTION readings_in(p_from timestamptz, p_to timestamptz)'
        ' RETURNS TABLE (series_id integer, bucket timestamptz, ts timestamptz, value float8)'
        ' LANGUAGE %s STABLE AS %L', CASE WHEN citus THEN 'plpgsql' ELSE 'sql' END,
        CASE WHEN citus THEN E'#variable_conflict use_column\nBEGIN RETURN QUERY '
                             || q_in || '; END' ELSE q_in END);
    EXECUTE format(
        'CREATE FUNCTION readings_between(p_series integer, p_from timestamptz, p_to timestamptz)'
        ' RETURNS TABLE (ts timestamptz, value float8) LANGUAGE %s STABLE AS %L',
        CASE WHEN citus THEN 'plpgsql' ELSE 'sql' END,
        CASE WHEN citus THEN E'#variable_conflict use_column\nBEGIN RETURN QUERY '
                             || q_between || '; END' ELSE q_between END);
    EXECUTE format($q$
        CREATE VIEW readings AS
        SELECT m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
               s.metric_name, NULLIF(s.unit, '') AS unit, NULLIF(s.raw_tag, '') AS raw_tag,
               r.ts AS "timestamp", r.value, r.bucket
        FROM (
            SELECT c.series_id, c.bucket, u.ts, u.value
            FROM reading_chunks c CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
            UNION ALL
            SELECT b.series_id, b.block_start, d.ts, d.value
            FROM reading_blocks b
            JOIN reading_timelines t ON %s t.block_start = b.block_start AND t.id = b.timeline
            CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
        ) r
        JOIN series s ON s.id = r.series_id
        JOIN machines m ON m.id = s.machine_id$q$, tl);
END $fns$;

-- As 0006: the view runs with the reader's rights (PostgreSQL 15+), and
-- the reader roles registered so far keep their grant on the new view.
DO $$
DECLARE
    r record;
BEGIN
    IF current_setting('server_version_num')::int >= 150000 THEN
        ALTER VIEW readings SET (security_invoker = true);
        FOR r IN SELECT role_name FROM reader_roles
                 WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) LOOP
            EXECUTE format('GRANT SELECT ON readings TO %I', r.role_name);
        END LOOP;
    END IF;
END $$;
