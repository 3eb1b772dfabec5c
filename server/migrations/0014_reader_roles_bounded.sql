-- Reader roles are bounded (README "Reader roles are bounded").

-- The limits of each reader role (`haltless grafana-role` flags), kept where
-- the reader cannot change them: its statement_timeout and the like are
-- session settings it may SET, so haltless serve terminates a reader's
-- backend that outlasts these (server/reader_limits.py). Rows from before
-- this migration get the defaults (server/reader_roles.py DEFAULT_LIMITS;
-- a test checks that both say the same), and their roles below the same
-- limits.
-- In a DO block, like every ALTER TABLE of a migration that may run on a
-- Citus coordinator: Citus sends an ALTER TABLE's query text on to the
-- shards, and a migration's text holds many statements.
DO $$
DECLARE
    r record;
    citus constant boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
BEGIN
    ALTER TABLE reader_roles
        ADD COLUMN connection_limit integer NOT NULL DEFAULT 10,
        ADD COLUMN statement_timeout_s integer NOT NULL DEFAULT 60,
        ADD COLUMN idle_in_transaction_timeout_s integer NOT NULL DEFAULT 30,
        ADD COLUMN transaction_timeout_s integer NOT NULL DEFAULT 300,
        ADD COLUMN work_mem_mb integer NOT NULL DEFAULT 64;
    FOR r IN SELECT rr.* FROM reader_roles rr JOIN pg_roles p ON p.rolname = rr.role_name LOOP
        -- On Citus a session that queries holds two connections as the
        -- reader on the coordinator (server/reader_roles.py): twice the
        -- limit, and one connection per session to each worker.
        EXECUTE format('ALTER ROLE %I CONNECTION LIMIT %s', r.role_name,
                       r.connection_limit * CASE WHEN citus THEN 2 ELSE 1 END);
        IF citus THEN
            EXECUTE format('ALTER ROLE %I SET citus.max_adaptive_executor_pool_size = 1',
                           r.role_name);
        END IF;
        EXECUTE format('ALTER ROLE %I SET work_mem = %L', r.role_name, r.work_mem_mb || 'MB');
        EXECUTE format('ALTER ROLE %I SET statement_timeout = %L', r.role_name,
                       r.statement_timeout_s || 's');
        EXECUTE format('ALTER ROLE %I SET idle_in_transaction_session_timeout = %L',
                       r.role_name, r.idle_in_transaction_timeout_s || 's');
        IF current_setting('server_version_num')::int >= 170000 THEN
            EXECUTE format('ALTER ROLE %I SET transaction_timeout = %L', r.role_name,
                           r.transaction_timeout_s || 's');
        END IF;
    END LOOP;
END $$;

-- What no reader may do, whatever it SETs: take advisory locks (compaction,
-- leases and migrations coordinate with them; a reader holding one, or
-- filling the shared lock table with them, would stop those), burn
-- transaction ids (txid_current() in a loop forces wraparound vacuums),
-- create large objects (a write, allowed to PUBLIC), create temporary
-- tables or functions in pg_temp (TEMPORARY), or create anything in a
-- schema. PUBLIC loses those rights on this database (pg_catalog's
-- functions are per database); the role that owns haltless's tables keeps
-- them. Only a superuser can revoke rights on pg_catalog's functions: run
-- by another role, this does what it may and returns what PUBLIC can still
-- do, which `haltless grafana-role` prints with the statement to run as a
-- superuser (`SELECT haltless_reader_lockdown();`). On a Citus coordinator
-- it does the same on every worker (the coordinator runs a reader's shard
-- queries there as the reader).
CREATE FUNCTION haltless_reader_lockdown() RETURNS text[]
LANGUAGE plpgsql SET client_min_messages = error AS $f$
DECLARE
    owner text := (SELECT pg_get_userbyid(relowner) FROM pg_class
                   WHERE oid = 'reading_chunks'::regclass);
    risky constant text := $r$
        p.pronamespace = 'pg_catalog'::regnamespace
        AND (p.proname LIKE 'pg\_%advisory\_%'
             OR p.proname IN ('txid_current', 'pg_current_xact_id', 'lo_creat', 'lo_create',
                              'lo_from_bytea', 'lo_import', 'lo_put', 'lowrite',
                              'lo_truncate', 'lo_truncate64'))$r$;
    stmts text[] := '{}';
    s text;
    gaps text[];
BEGIN
    FOR s IN EXECUTE 'SELECT p.oid::regprocedure::text FROM pg_proc p WHERE ' || risky
                     || ' ORDER BY 1' LOOP
        stmts := stmts || format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', s)
                       || format('GRANT EXECUTE ON FUNCTION %s TO %I', s, owner);
    END LOOP;
    stmts := stmts
        || format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database())
        || format('GRANT TEMPORARY ON DATABASE %I TO %I', current_database(), owner)
        || 'REVOKE CREATE ON SCHEMA public FROM PUBLIC'::text;
    FOREACH s IN ARRAY stmts LOOP
        BEGIN
            EXECUTE s;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;  -- not ours to revoke: reported below
        END;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')
       AND (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        IF citus_is_coordinator() THEN
            -- The rights on pg_catalog's functions, which are each node's
            -- own (Citus carries those on the database and schemas over by
            -- itself, and refuses them on a worker), in one command: a DO.
            PERFORM run_command_on_workers('DO $lockdown$ BEGIN ' || (
                SELECT string_agg(format('EXECUTE %L;', x), ' ') FROM unnest(stmts) x
                WHERE x LIKE '% ON FUNCTION %') || ' END $lockdown$');
        END IF;
    END IF;
    EXECUTE 'SELECT coalesce(array_agg(g ORDER BY g), ''{}'') FROM ('
        || ' SELECT ''EXECUTE ON FUNCTION '' || p.oid::regprocedure::text AS g FROM pg_proc p'
        || ' WHERE ' || risky || ' AND has_function_privilege(''public'', p.oid, ''EXECUTE'')'
        || ' UNION ALL SELECT format(''TEMPORARY ON DATABASE %I'', current_database())'
        || ' WHERE has_database_privilege(''public'', current_database(), ''TEMPORARY'')'
        || ' UNION ALL SELECT format(''CREATE ON SCHEMA %I'', n.nspname) FROM pg_namespace n'
        || ' WHERE has_schema_privilege(''public'', n.oid, ''CREATE'')'
        || '   AND n.nspname NOT LIKE ''pg\_temp\_%'' AND n.nspname NOT LIKE ''pg\_toast\_temp\_%'''
        || ') x' INTO gaps;
    RETURN gaps;
END $f$;

DO $$ BEGIN PERFORM haltless_reader_lockdown(); END $$;
