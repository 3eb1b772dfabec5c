-- On a Citus coordinator (README "Scaling", docs/scaling.md), distribute the
-- schema; on plain PostgreSQL this migration does nothing at all.
--
--   reference (a copy on every node, so that every worker joins them
--   locally): organizations, machines, api_keys, series. Small, read on
--   every request and by every query of readings; written rarely.
--   distributed by series_id, co-located (the same series on the same
--   worker in all three): reading_chunks (and its slot partitions, which
--   writers COPY into through the coordinator), reading_blocks,
--   reading_timelines. One series over a time range is one task on one
--   worker.
--   distributed by org_id: idempotency_keys (only (org_id, key) must be
--   unique; the key commits in the same distributed transaction as the
--   readings).
--   on the coordinator: ingest_sources (a Citus local table, because its
--   foreign keys point at reference tables) and poller_processes, so that
--   leases keep plain PostgreSQL's FOR UPDATE SKIP LOCKED; compaction_state
--   and haltless_schema.
--
-- Compaction (server/compact_citus.py, docs/scaling.md "Compaction and
-- retention"): per shard group (shard i of reading_chunks_0, _1,
-- reading_blocks and reading_timelines, all on one worker), in one local
-- transaction on that worker, under a coordinator advisory lock keyed by
-- the group's reading_chunks shard id; only that slot shard is truncated.
-- Retention drops monthly partitions through the coordinator.
--
-- Timelines: on one node a timeline is shared by every series of an hour
-- with identical timestamps (a machine's metrics polled together). Sharing
-- across series would join blocks and timelines on something other than
-- the distribution column, which Citus cannot do on the shards; so here
-- reading_timelines carries series_id (first in its key) and each block has
-- a timeline of its own. The cost is measured in bench/README "Citus".
DO $citus$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    -- Everything below runs in the migration's one transaction; sequential
    -- mode lets reference tables with foreign keys be created in it.
    SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

    -- A table cannot become a reference table while plain tables point at it:
    -- drop the foreign keys, distribute, put them back.
    ALTER TABLE machines DROP CONSTRAINT machines_org_id_fkey;
    ALTER TABLE api_keys DROP CONSTRAINT api_keys_org_id_fkey;
    ALTER TABLE series DROP CONSTRAINT series_machine_id_fkey;
    ALTER TABLE ingest_sources DROP CONSTRAINT ingest_sources_org_id_fkey;
    ALTER TABLE ingest_sources DROP CONSTRAINT ingest_sources_machine_id_fkey;
    ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_org_id_fkey;

    PERFORM create_reference_table('organizations');
    PERFORM create_reference_table('machines');
    PERFORM create_reference_table('api_keys');
    PERFORM create_reference_table('series');
    PERFORM create_distributed_table('idempotency_keys', 'org_id', colocate_with => 'none');
    PERFORM create_distributed_table('reading_chunks', 'series_id', colocate_with => 'none');
    PERFORM create_distributed_table('reading_blocks', 'series_id',
                                     colocate_with => 'reading_chunks');
    ALTER TABLE reading_timelines DROP CONSTRAINT reading_timelines_pkey;
    ALTER TABLE reading_timelines ADD COLUMN series_id integer NOT NULL;
    ALTER TABLE reading_timelines ADD PRIMARY KEY (series_id, block_start, id);
    PERFORM create_distributed_table('reading_timelines', 'series_id',
                                     colocate_with => 'reading_chunks');

    ALTER TABLE machines ADD CONSTRAINT machines_org_id_fkey
        FOREIGN KEY (org_id) REFERENCES organizations (id) ON DELETE CASCADE;
    ALTER TABLE api_keys ADD CONSTRAINT api_keys_org_id_fkey
        FOREIGN KEY (org_id) REFERENCES organizations (id) ON DELETE CASCADE;
    ALTER TABLE series ADD CONSTRAINT series_machine_id_fkey
        FOREIGN KEY (machine_id) REFERENCES machines (id) ON DELETE CASCADE;
    ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_org_id_fkey
        FOREIGN KEY (org_id) REFERENCES organizations (id) ON DELETE CASCADE;
    -- These two make ingest_sources a Citus local table on the coordinator.
    ALTER TABLE ingest_sources ADD CONSTRAINT ingest_sources_org_id_fkey
        FOREIGN KEY (org_id) REFERENCES organizations (id) ON DELETE CASCADE;
    ALTER TABLE ingest_sources ADD CONSTRAINT ingest_sources_machine_id_fkey
        FOREIGN KEY (machine_id) REFERENCES machines (id) ON DELETE CASCADE;

    -- A group commit COPYs into several shards on each worker. With Citus's
    -- default of one cached connection per worker and session, every commit
    -- opened (and forked) new ones: 239k readings/s, p99 2.2 s, against
    -- 798k, p99 0.22 s with 8 (bench/README "Citus"). New sessions get it.
    EXECUTE format('ALTER DATABASE %I SET citus.max_cached_conns_per_worker = 8',
                   current_database());

    -- Blocks join their timeline on the distribution column as well; the
    -- functions are PL/pgSQL because Citus cannot plan a SQL function's
    -- parameterized query over distributed tables.
    EXECUTE $sql$
    CREATE OR REPLACE FUNCTION readings_in(p_from timestamptz, p_to timestamptz)
    RETURNS TABLE (series_id integer, bucket timestamptz, ts timestamptz, value float8)
    LANGUAGE plpgsql STABLE AS $f$
    #variable_conflict use_column
    BEGIN
        RETURN QUERY
        SELECT c.series_id, c.bucket, u.ts, u.value
        FROM reading_chunks c CROSS JOIN LATERAL unnest(c.ts, c.vals) AS u (ts, value)
        WHERE c.bucket >= date_trunc('hour', p_from) AND c.bucket < p_to
          AND u.ts >= p_from AND u.ts < p_to
        UNION ALL
        SELECT b.series_id, b.block_start, d.ts, d.value
        FROM reading_blocks b
        JOIN reading_timelines t
          ON t.series_id = b.series_id AND t.block_start = b.block_start AND t.id = b.timeline
        CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
        WHERE b.block_start >= date_trunc('hour', p_from) AND b.block_start < p_to
          AND t.block_start >= date_trunc('hour', p_from) AND t.block_start < p_to
          AND d.ts >= p_from AND d.ts < p_to;
    END
    $f$ $sql$;
    EXECUTE $sql$
    CREATE OR REPLACE FUNCTION readings_between(p_series integer, p_from timestamptz,
                                                p_to timestamptz)
    RETURNS TABLE (ts timestamptz, value float8)
    LANGUAGE plpgsql STABLE AS $f$
    #variable_conflict use_column
    BEGIN
        RETURN QUERY
        SELECT x.ts, x.value FROM (
            SELECT u.ts, u.value
            FROM reading_chunks c CROSS JOIN LATERAL unnest(c.ts, c.vals) AS u (ts, value)
            WHERE c.series_id = p_series
              AND c.bucket >= date_trunc('hour', p_from) AND c.bucket <= p_to
            UNION ALL
            SELECT d.ts, d.value
            FROM reading_blocks b
            JOIN reading_timelines t
              ON t.series_id = b.series_id AND t.block_start = b.block_start AND t.id = b.timeline
            CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
            WHERE b.series_id = p_series AND t.series_id = p_series
              AND b.block_start >= date_trunc('hour', p_from) AND b.block_start <= p_to
              AND t.block_start >= date_trunc('hour', p_from) AND t.block_start <= p_to
        ) x
        WHERE x.ts >= p_from AND x.ts <= p_to
        ORDER BY x.ts;
    END
    $f$ $sql$;
    EXECUTE $sql$
    CREATE OR REPLACE VIEW readings AS
    SELECT m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
           s.metric_name, NULLIF(s.unit, '') AS unit, NULLIF(s.raw_tag, '') AS raw_tag,
           r.ts AS "timestamp", r.value, r.bucket
    FROM (
        SELECT c.series_id, c.bucket, u.ts, u.value
        FROM reading_chunks c CROSS JOIN LATERAL unnest(c.ts, c.vals) AS u (ts, value)
        UNION ALL
        SELECT b.series_id, b.block_start, d.ts, d.value
        FROM reading_blocks b
        JOIN reading_timelines t
          ON t.series_id = b.series_id AND t.block_start = b.block_start AND t.id = b.timeline
        CROSS JOIN LATERAL haltless_block_readings(t.ts, b.vals) AS d
    ) r
    JOIN series s ON s.id = r.series_id
    JOIN machines m ON m.id = s.machine_id
    $sql$;
END $citus$;
