-- Storage that stays small whatever shape data arrives in (README "Storage").
--
-- Hot: reading_chunks, one row per (series, hour) of each group commit,
-- LIST-partitioned by `slot` = the arrival hour modulo 2. Writers COPY into
-- the slot of the current hour; compaction turns the other slot into blocks
-- and TRUNCATEs it, in one transaction, so hot data is never deleted row by
-- row. Late data simply lands in the current slot. (On Citus, migration
-- 0007: one transaction per shard of the slot, on its worker.)
--
-- Compacted: reading_blocks, one row per (series, hour), values packed by
-- the codec (haltless.fast, migration 0004), timestamps in reading_timelines,
-- shared by every series of that hour whose timestamps are identical (a
-- machine's metrics polled together). Both are range-partitioned by month,
-- so retention drops whole partitions.

DROP VIEW readings;
DROP FUNCTION readings_between(integer, timestamptz, timestamptz);
ALTER TABLE reading_chunks RENAME TO reading_chunks_v1;
ALTER INDEX reading_chunks_series_bucket RENAME TO reading_chunks_v1_series_bucket;

CREATE TABLE reading_chunks (
    slot       smallint NOT NULL,
    series_id  integer NOT NULL,
    bucket     timestamptz NOT NULL,
    n          integer NOT NULL,
    ts         timestamptz[] NOT NULL,
    vals       float8[] NOT NULL
) PARTITION BY LIST (slot);
CREATE TABLE reading_chunks_0 PARTITION OF reading_chunks FOR VALUES IN (0);
CREATE TABLE reading_chunks_1 PARTITION OF reading_chunks FOR VALUES IN (1);
-- Writers COPY into a slot's table directly, without the slot column.
ALTER TABLE reading_chunks_0 ALTER COLUMN slot SET DEFAULT 0;
ALTER TABLE reading_chunks_1 ALTER COLUMN slot SET DEFAULT 1;
CREATE INDEX reading_chunks_series_bucket ON reading_chunks (series_id, bucket);

-- What was stored before this migration is hot data of slot 0.
INSERT INTO reading_chunks (slot, series_id, bucket, n, ts, vals)
SELECT 0, series_id, bucket, n, ts, vals FROM reading_chunks_v1;
DROP TABLE reading_chunks_v1;
DROP FUNCTION haltless_ensure_partitions(integer);

CREATE TABLE reading_blocks (
    series_id    integer NOT NULL,
    block_start  timestamptz NOT NULL,
    n            integer NOT NULL,
    t_first      timestamptz NOT NULL,
    t_last       timestamptz NOT NULL,
    timeline     bigint NOT NULL,
    vals         bytea NOT NULL
) PARTITION BY RANGE (block_start);
CREATE UNIQUE INDEX reading_blocks_series_start ON reading_blocks (series_id, block_start);

CREATE TABLE reading_timelines (
    block_start  timestamptz NOT NULL,
    id           bigint NOT NULL,
    n            integer NOT NULL,
    ts           bytea NOT NULL,
    PRIMARY KEY (block_start, id)
) PARTITION BY RANGE (block_start);
CREATE SEQUENCE reading_timelines_id;

-- Who compacts, and what it did last (one row; the advisory lock decides who).
CREATE TABLE compaction_state (
    one            boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_run_at    timestamptz,
    last_readings  bigint NOT NULL DEFAULT 0,
    last_blocks    bigint NOT NULL DEFAULT 0
);
INSERT INTO compaction_state DEFAULT VALUES;

-- Monthly partitions of both block tables covering [p_from, p_to].
CREATE FUNCTION haltless_block_partitions(p_from timestamptz, p_to timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', p_from AT TIME ZONE 'UTC')::date;
    t text;
    created integer := 0;
BEGIN
    WHILE m <= (p_to AT TIME ZONE 'UTC')::date LOOP
        FOREACH t IN ARRAY ARRAY['reading_blocks', 'reading_timelines'] LOOP
            IF to_regclass(t || '_' || to_char(m, 'YYYYMM')) IS NULL THEN
                BEGIN
                    EXECUTE format(
                        'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                        t || '_' || to_char(m, 'YYYYMM'), t, (m::timestamp AT TIME ZONE 'UTC'),
                        ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
                    created := created + 1;
                EXCEPTION WHEN duplicate_table THEN
                    NULL;  -- another process made it first
                END;
            END IF;
        END LOOP;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END $$;

-- Retention: drop the monthly partitions that end at or before p_cutoff.
CREATE FUNCTION haltless_drop_blocks_before(p_cutoff timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent IN ('reading_blocks'::regclass, 'reading_timelines'::regclass)
          AND c.relname ~ '_[0-9]{6}$'
          AND (to_date(right(c.relname, 6), 'YYYYMM') + interval '1 month')::timestamp
              AT TIME ZONE 'UTC' <= p_cutoff
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$;

-- The readings of one block, in order: plain SQL over the codec.
CREATE FUNCTION haltless_block_readings(p_ts bytea, p_vals bytea)
RETURNS TABLE (ts timestamptz, value float8)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT timestamptz 'epoch' + t.v * interval '1 microsecond', v.value
    FROM haltless_unpack_ints(p_ts) t JOIN haltless_unpack_values(p_vals) v USING (i)
    ORDER BY t.i
$$;

-- Every reading in [p_from, p_to), hot or compacted, with its series: the
-- time range prunes block partitions and uses both indexes.
CREATE FUNCTION readings_in(p_from timestamptz, p_to timestamptz)
RETURNS TABLE (series_id integer, bucket timestamptz, ts timestamptz, value float8)
LANGUAGE sql STABLE AS $$
    SELECT c.series_id, c.bucket, u.ts, u.value
    FROM reading_chunks c CROSS JOIN LATERAL unnest(c.ts, c.vals) AS u (ts, value)
    WHERE c.bucket >= date_trunc('hour', p_from) AND c.bucket < p_to
      AND u.ts >= p_from AND u.ts < p_to
    UNION ALL
    SELECT b.series_id, b.block_start, d.ts, d.value
    FROM reading_blocks b
    JOIN reading_timelines t ON t.block_start = b.block_start AND t.id = b.timeline
    CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
    WHERE b.block_start >= date_trunc('hour', p_from) AND b.block_start < p_to
      AND t.block_start >= date_trunc('hour', p_from) AND t.block_start < p_to
      AND d.ts >= p_from AND d.ts < p_to
$$;

-- One series over [p_from, p_to] (both ends included), in time order.
CREATE FUNCTION readings_between(p_series integer, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (ts timestamptz, value float8)
LANGUAGE sql STABLE AS $$
    SELECT x.ts, x.value FROM (
        SELECT u.ts, u.value
        FROM reading_chunks c CROSS JOIN LATERAL unnest(c.ts, c.vals) AS u (ts, value)
        WHERE c.series_id = p_series
          AND c.bucket >= date_trunc('hour', p_from) AND c.bucket <= p_to
        UNION ALL
        SELECT d.ts, d.value
        FROM reading_blocks b
        JOIN reading_timelines t ON t.block_start = b.block_start AND t.id = b.timeline
        CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
        WHERE b.series_id = p_series
          AND b.block_start >= date_trunc('hour', p_from) AND b.block_start <= p_to
          AND t.block_start >= date_trunc('hour', p_from) AND t.block_start <= p_to
    ) x
    WHERE x.ts >= p_from AND x.ts <= p_to
    ORDER BY x.ts
$$;

-- Every reading, one row each, hot or compacted. `bucket` is the hour the
-- reading is stored under: a predicate on it (beside one on "timestamp")
-- prunes partitions and uses the indexes; readings_in() does both for you.
CREATE VIEW readings AS
SELECT m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
       s.metric_name, NULLIF(s.unit, '') AS unit, NULLIF(s.raw_tag, '') AS raw_tag,
       r.ts AS "timestamp", r.value, r.bucket
FROM (
    SELECT c.series_id, c.bucket, u.ts, u.value
    FROM reading_chunks c CROSS JOIN LATERAL unnest(c.ts, c.vals) AS u (ts, value)
    UNION ALL
    SELECT b.series_id, b.block_start, d.ts, d.value
    FROM reading_blocks b
    JOIN reading_timelines t ON t.block_start = b.block_start AND t.id = b.timeline
    CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
) r
JOIN series s ON s.id = r.series_id
JOIN machines m ON m.id = s.machine_id;
