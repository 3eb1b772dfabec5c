-- Readers never stop writers (README "Readers and writers"): no DDL that the
-- server runs on its own waits for a reader's lock, and reader roles are
-- bounded.
--
-- CREATE TABLE ... PARTITION OF takes ACCESS EXCLUSIVE on the parent: it
-- waits for every open reader of reading_blocks (a Grafana query, a stuck
-- transaction), and while it waits every new reader and writer queues
-- behind it. A table created on its own and then ATTACHed takes SHARE
-- UPDATE EXCLUSIVE on the parent, which readers (ACCESS SHARE) and writers
-- (ROW EXCLUSIVE) do not conflict with; ATTACH builds the parent's indexes
-- on it (the table is empty: instant). On a Citus coordinator partitions
-- stay created under their parent, which is how Citus distributes them.
CREATE OR REPLACE FUNCTION haltless_block_partitions(p_from timestamptz, p_to timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', p_from AT TIME ZONE 'UTC')::date;
    citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
    t text;
    part text;
    lo timestamptz;
    hi timestamptz;
    created integer := 0;
BEGIN
    WHILE m <= (p_to AT TIME ZONE 'UTC')::date LOOP
        FOREACH t IN ARRAY ARRAY['reading_blocks', 'reading_timelines'] LOOP
            part := t || '_' || to_char(m, 'YYYYMM');
            lo := m::timestamp AT TIME ZONE 'UTC';
            hi := (m + interval '1 month')::timestamp AT TIME ZONE 'UTC';
            IF to_regclass(part) IS NULL THEN
                BEGIN
                    IF citus THEN
                        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                                       part, t, lo, hi);
                    ELSE
                        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS)', part, t);
                        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                                       t, part, lo, hi);
                    END IF;
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

-- Retention on one node: the monthly partitions that end at or before
-- p_cutoff, and whether a DETACH ... CONCURRENTLY of it was interrupted
-- (then it is finished with DETACH ... FINALIZE). The server detaches them
-- CONCURRENTLY (it waits for older snapshots without blocking anyone) and
-- then drops them; haltless_drop_blocks_before (a DROP under the parent's
-- ACCESS EXCLUSIVE lock) stays for Citus, where partitions are distributed.
CREATE FUNCTION haltless_expired_block_partitions(p_cutoff timestamptz)
RETURNS TABLE (parent text, part text, pending boolean)
LANGUAGE sql STABLE AS $$
    SELECT p.relname::text, c.relname::text, i.inhdetachpending
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_class p ON p.oid = i.inhparent
    WHERE i.inhparent IN ('reading_blocks'::regclass, 'reading_timelines'::regclass)
      AND c.relname ~ '_[0-9]{6}$'
      AND (to_date(right(c.relname, 6), 'YYYYMM') + interval '1 month')::timestamp
          AT TIME ZONE 'UTC' <= p_cutoff
    ORDER BY c.relname
$$;
