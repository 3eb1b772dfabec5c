-- The read side (README "Reading data"): latest values by index, and
-- read-only roles limited to one organization by row-level security.

-- Latest values. A hot row's readings are sorted by time (the kernel writes
-- them so), so ts[n] is its newest: with it in the index, "the newest
-- reading of series S" is one backward index probe per slot instead of a
-- scan of every row of the current hour (3,600 rows per series when a
-- poller commits once a second). It replaces (series_id, bucket), which it
-- serves as a prefix: writers still maintain one index per row.
CREATE INDEX reading_chunks_series_bucket_last ON reading_chunks (series_id, bucket, (ts[n]));
DROP INDEX reading_chunks_series_bucket;

-- The value at t_last, written by compaction; NULL on blocks written before
-- this migration (readers decode those).
ALTER TABLE reading_blocks ADD COLUMN v_last float8;

-- Which blocks use a timeline: the row-level security policy of
-- reading_timelines below, and compaction's sweep of unused timelines.
CREATE INDEX reading_blocks_timeline ON reading_blocks (block_start, timeline);

-- Read-only roles (`haltless grafana-role`): each login role registered here
-- sees the rows of one organization only. Roles not registered (the
-- application, superusers, owners) are not affected. No foreign key: a role
-- outlives its organization and then sees nothing.
CREATE TABLE reader_roles (
    role_name   text PRIMARY KEY,
    org_id      uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION haltless_reader_org() RETURNS uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT org_id FROM reader_roles WHERE role_name = session_user
$$;

CREATE FUNCTION haltless_reader_series() RETURNS integer[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT coalesce(array_agg(s.id), '{}')
    FROM series s JOIN machines m ON m.id = s.machine_id
    WHERE m.org_id = (SELECT org_id FROM reader_roles WHERE role_name = session_user)
$$;

-- Scalar subqueries: evaluated once per query (an InitPlan), not per row.
-- Not on a Citus coordinator: Citus refuses subqueries in the policies of
-- the tables migration 0007 distributes; migration 0009 puts policies of
-- the same meaning in place there.
DO $rls$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON organizations FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL OR id = (SELECT haltless_reader_org()));
    ALTER TABLE machines ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON machines FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL OR org_id = (SELECT haltless_reader_org()));
    ALTER TABLE series ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON series FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL OR id = ANY ((SELECT haltless_reader_series())::integer[]));
    ALTER TABLE reading_chunks ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON reading_chunks FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL
               OR series_id = ANY ((SELECT haltless_reader_series())::integer[]));
    ALTER TABLE reading_blocks ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON reading_blocks FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL
               OR series_id = ANY ((SELECT haltless_reader_series())::integer[]));
    -- Timelines carry no series: one is visible when a visible block uses it
    -- (the subquery is itself filtered by reading_blocks' policy).
    ALTER TABLE reading_timelines ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON reading_timelines FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL OR EXISTS (
            SELECT 1 FROM reading_blocks b
            WHERE b.block_start = reading_timelines.block_start AND b.timeline = reading_timelines.id));
    -- Only SELECT is ever granted to reader roles; every other command keeps
    -- working for everyone else (a table with RLS and no policy for a command
    -- refuses it to roles that do not own the table).
    CREATE POLICY writer_all ON organizations USING ((SELECT haltless_reader_org()) IS NULL);
    CREATE POLICY writer_all ON machines USING ((SELECT haltless_reader_org()) IS NULL);
    CREATE POLICY writer_all ON series USING ((SELECT haltless_reader_org()) IS NULL);
    CREATE POLICY writer_all ON reading_chunks USING ((SELECT haltless_reader_org()) IS NULL);
    CREATE POLICY writer_all ON reading_blocks USING ((SELECT haltless_reader_org()) IS NULL);
    CREATE POLICY writer_all ON reading_timelines USING ((SELECT haltless_reader_org()) IS NULL);
END $rls$;

-- A view runs with its owner's rights unless it is security_invoker
-- (PostgreSQL 15+): without it, a reader role would read `readings` as the
-- owner, past every policy above. On older servers reader roles get no
-- access to the view (`haltless grafana-role` says so).
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 150000 THEN
        ALTER VIEW readings SET (security_invoker = true);
    END IF;
END $$;
