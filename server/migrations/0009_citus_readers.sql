-- Reader roles (`haltless grafana-role`, migration 0006) on a Citus
-- coordinator; on plain PostgreSQL this migration does nothing at all.
--
-- 0006's policies cannot be used there, for three reasons met in turn:
--   * scalar subqueries: "cannot create policy / Subqueries are not supported
--     in policies on distributed tables" (Citus checks every policy for a
--     sublink; commands/policy.c);
--   * a policy function that queries a Citus table (series, machines, even a
--     reference table): it runs on the workers inside the shard query, and
--     Citus stops it: "cannot execute a distributed query from a query on a
--     shard" (executor/multi_executor.c; the escape hatch it names,
--     citus.allow_nested_distributed_execution, comes "with possible
--     incorrectness");
--   * `f() IS NULL` in a policy on a Citus table fails with "unrecognized node
--     type: 15" (Citus 13 on PostgreSQL 18; `f(col)`, `col = f()` work).
--
-- So here every policy is one call of a boolean function of the row's own
-- column, and the functions read the shards of reference tables by name:
-- a reference table has one shard, with the same name on every node (the
-- coordinator included), which never moves, and which is an ordinary table
-- to the planner, so no distributed query is nested. reader_roles becomes a
-- reference table so that the workers can look the caller up too. Citus
-- propagates the functions, the policies (onto every shard) and the roles
-- with their grants to every node; the coordinator connects to the workers
-- as the reader role itself, so the workers must accept it (docs/scaling.md).
--
-- Cost: the functions run once per row read (chunk row, block, timeline,
-- series, machine), an index probe each, where 0006 looks the organization
-- up once per query: ~13 µs per row on the test cluster (3,600 hot rows of
-- one series: 54 ms as a reader, 8.4 ms as the owner; docs/scaling.md). Roles that are not readers (the application, owners)
-- are unaffected: owners bypass row-level security.
DO $citus$
DECLARE
    roles_shard text;
    series_shard text;
    machines_shard text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
    PERFORM create_reference_table('reader_roles');
    roles_shard := format('%s_%s', 'reader_roles', (SELECT shardid FROM pg_dist_shard
                          WHERE logicalrelid = 'reader_roles'::regclass));
    series_shard := format('%s_%s', 'series', (SELECT shardid FROM pg_dist_shard
                           WHERE logicalrelid = 'series'::regclass));
    machines_shard := format('%s_%s', 'machines', (SELECT shardid FROM pg_dist_shard
                             WHERE logicalrelid = 'machines'::regclass));

    -- true for a role that is not a reader, else whether its organization is p_org.
    EXECUTE format($f$
    CREATE FUNCTION haltless_reader_sees_org(p_org uuid) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $b$
        SELECT coalesce((SELECT r.org_id = p_org FROM %1$I r WHERE r.role_name = session_user),
                        true)
    $b$ $f$, roles_shard);
    -- true for a role that is not a reader, else whether p_series is its organization's.
    EXECUTE format($f$
    CREATE FUNCTION haltless_reader_sees_series(p_series integer) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $b$
        SELECT coalesce((SELECT EXISTS (SELECT 1 FROM %2$I s JOIN %3$I m ON m.id = s.machine_id
                                        WHERE s.id = p_series AND m.org_id = r.org_id)
                         FROM %1$I r WHERE r.role_name = session_user), true)
    $b$ $f$, roles_shard, series_shard, machines_shard);
    -- Whether the role is not a reader; the row's column it is given is not
    -- used. It is there because Citus, when it adds a node, creates the
    -- functions a table's policies call before the table only when the policy
    -- uses a column of the table (metadata_sync.c,
    -- GetDependentFunctionsWithRelation); without one, citus_add_node failed:
    -- "function public.haltless_not_reader() does not exist".
    EXECUTE format($f$
    CREATE FUNCTION haltless_not_reader(p_column anyelement) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $b$
        SELECT NOT EXISTS (SELECT 1 FROM %1$I r WHERE r.role_name = session_user)
    $b$ $f$, roles_shard);

    ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON organizations FOR SELECT USING (haltless_reader_sees_org(id));
    ALTER TABLE machines ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON machines FOR SELECT USING (haltless_reader_sees_org(org_id));
    ALTER TABLE series ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON series FOR SELECT USING (haltless_reader_sees_series(id));
    ALTER TABLE reading_chunks ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON reading_chunks FOR SELECT
        USING (haltless_reader_sees_series(series_id));
    ALTER TABLE reading_blocks ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON reading_blocks FOR SELECT
        USING (haltless_reader_sees_series(series_id));
    -- Here a timeline carries its series (0007), so no lookup through blocks.
    ALTER TABLE reading_timelines ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_org ON reading_timelines FOR SELECT
        USING (haltless_reader_sees_series(series_id));
    -- As in 0006: only SELECT is ever granted to readers; every other
    -- command keeps working for everyone else.
    CREATE POLICY writer_all ON organizations USING (haltless_not_reader(id));
    CREATE POLICY writer_all ON machines USING (haltless_not_reader(id));
    CREATE POLICY writer_all ON series USING (haltless_not_reader(id));
    CREATE POLICY writer_all ON reading_chunks USING (haltless_not_reader(series_id));
    CREATE POLICY writer_all ON reading_blocks USING (haltless_not_reader(series_id));
    CREATE POLICY writer_all ON reading_timelines USING (haltless_not_reader(series_id));
    -- As in 0006 (the view 0007 put in its place).
    ALTER VIEW readings SET (security_invoker = true);
END $citus$;
