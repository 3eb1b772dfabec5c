-- A reader's timeline policy (0006, plain PostgreSQL) asked "does a visible
-- block use this timeline?" as an EXISTS over reading_blocks. PostgreSQL 18
-- turns that EXISTS into a hashed subplan: once per query it read every block
-- of the organization, in every month partition, whatever the range asked.
-- Cheap on a test database, minutes on a fleet with a year of history.
--
-- Now the question is a function the planner cannot flatten: for each
-- timeline row left after the range predicates (which are leakproof, so they
-- run first), one probe of the (block_start, timeline) index of that hour's
-- partition, joined to the reader's organization. The function runs as its
-- owner (it must see blocks past their policy to answer) and says only yes or
-- no, for the calling reader's own organization: called directly, it tells a
-- reader nothing about another organization's blocks.
-- (On a Citus coordinator a timeline carries its series, 0009: unchanged.)
DO $rls$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    CREATE FUNCTION haltless_reader_sees_timeline(p_start timestamptz, p_id bigint)
    RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $f$
        SELECT EXISTS (SELECT 1 FROM reading_blocks b
                       JOIN series s ON s.id = b.series_id
                       JOIN machines m ON m.id = s.machine_id
                       WHERE b.block_start = p_start AND b.timeline = p_id
                         AND m.org_id = (SELECT r.org_id FROM reader_roles r
                                         WHERE r.role_name = session_user))
    $f$;
    DROP POLICY reader_org ON reading_timelines;
    CREATE POLICY reader_org ON reading_timelines FOR SELECT
        USING ((SELECT haltless_reader_org()) IS NULL
               OR haltless_reader_sees_timeline(block_start, id));
END $rls$;
