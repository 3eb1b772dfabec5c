"""Reader roles are bounded (`haltless grafana-role`): a connection limit, and
statement, idle-in-transaction and transaction timeouts (flags, defaults,
kept on a rerun); readers together never take the connections kept for
haltless; no advisory locks, temporary tables, functions or writes of any
kind, also with `default_transaction_read_only` turned off; a reader that
lifts its own timeouts is ended by `haltless serve` all the same; and on an
external PostgreSQL whose haltless role is not a superuser, grafana-role
says what it could not do and a superuser's `haltless_reader_lockdown()`
closes it."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid

import asyncpg
import pytest

from haltless.server import db
from haltless.server.reader_limits import end_overdue_readers
from haltless.server.reader_roles import (DATABASES_ELSEWHERE, DEFAULT_LIMITS, LIMIT_COLUMNS,
                                           READER_SHARE)
from helpers import fetch, fetchval, haltless, make_tenant, post, reading, run, wait_for
from test_storage import compact


def grafana_role(dsn, org, *flags, check=True):
    return haltless("grafana-role", "--org", org, *flags, env={"HALTLESS_DATABASE_URL": dsn},
                    check=check)


def role_of(url: str) -> str:
    return url.split("//")[1].split(":")[0]


def role_settings(dsn, role) -> dict:
    rows = fetch(dsn, "SELECT unnest(d.setconfig) FROM pg_db_role_setting d JOIN pg_roles r"
                 " ON r.oid = d.setrole WHERE r.rolname = $1", role)
    return dict(r[0].split("=", 1) for r in rows)


@contextlib.asynccontextmanager
async def connections(url, n=1):
    held = []
    try:
        for _ in range(n):
            held.append(await asyncpg.connect(url))
        yield held
    finally:
        for c in held:
            with contextlib.suppress(Exception):
                await c.close()


def test_a_reader_role_takes_its_limits_from_flags_or_defaults_and_keeps_them(pg_dsn):
    t = make_tenant(pg_dsn)
    out = grafana_role(pg_dsn, t.name)
    url = out.stdout.strip()
    role = role_of(url)
    password = url.split(":")[2].split("@")[0]
    assert "at most 10 connections, statements of 60 s, 30 s idle in a transaction, " \
           "transactions of 300 s, work_mem 64 MB" in out.stderr, out.stderr
    assert password not in out.stderr
    # No warning, but for other databases of the server open to PUBLIC (on
    # HALTLESS_DATABASE_URL's server: another test run's database, say).
    others = [r[0] for r in fetch(pg_dsn, DATABASES_ELSEWHERE, role)]
    warnings = [ln for ln in out.stderr.splitlines() if "warning" in ln]
    if others:
        assert len(warnings) == 1 and warnings[0].startswith(
            f"haltless: warning: {role} may connect to the database(s) {', '.join(others)} too"), \
            out.stderr
    else:
        assert warnings == [], out.stderr
    assert fetchval(pg_dsn, "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", role) == 10
    assert role_settings(pg_dsn, role) == {
        "default_transaction_read_only": "on", "statement_timeout": "60s",
        "idle_in_transaction_session_timeout": "30s", "transaction_timeout": "300s",
        "work_mem": "64MB", "temp_file_limit": "1GB"}
    # The defaults are said twice, in Python and in migration 0014: the same.
    defaults = {r[0]: int(r[1]) for r in fetch(
        pg_dsn, "SELECT column_name, column_default FROM information_schema.columns"
        " WHERE table_name = 'reader_roles' AND column_name = ANY($1::text[])",
        list(LIMIT_COLUMNS))}
    assert defaults == {c: getattr(DEFAULT_LIMITS, c) for c in LIMIT_COLUMNS}

    grafana_role(pg_dsn, t.name, "--connection-limit", "3", "--statement-timeout", "5",
                 "--idle-in-transaction-timeout", "7", "--transaction-timeout", "9",
                 "--work-mem", "128")
    again = grafana_role(pg_dsn, t.name)  # a new password; the limits stay
    assert "at most 3 connections, statements of 5 s, 7 s idle in a transaction, " \
           "transactions of 9 s, work_mem 128 MB" in again.stderr, again.stderr
    assert fetchval(pg_dsn, "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", role) == 3
    assert role_settings(pg_dsn, role)["statement_timeout"] == "5s"
    assert role_settings(pg_dsn, role)["work_mem"] == "128MB"
    assert fetch(pg_dsn, "SELECT connection_limit, statement_timeout_s,"
                 " idle_in_transaction_timeout_s, transaction_timeout_s, work_mem_mb"
                 " FROM reader_roles WHERE role_name = $1", role)[0] == (3, 5, 7, 9, 128)

    share = fetchval(pg_dsn, READER_SHARE)
    for flags, says in ((("--connection-limit", "0"), "must be at least 1"),
                        (("--connection-limit", str(share + 1)),
                         f"--connection-limit {share + 1}: expected 1 to {share}"),
                        (("--statement-timeout", "86401"),
                         "--statement-timeout 86401: expected 1 to 86400 seconds"),
                        (("--transaction-timeout", "soon"), "'soon' is not a whole number"),
                        (("--work-mem", "4097"), "--work-mem 4097: expected 1 to 4096 MB"),
                        (("--work-mem", "0"), "must be at least 1")):
        bad = grafana_role(pg_dsn, t.name, *flags, check=False)
        assert bad.returncode == 2 and says in bad.stderr, (flags, bad.stderr)
        assert "Traceback" not in bad.stderr and bad.stdout == ""
    assert fetchval(pg_dsn, "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", role) == 3
    # A reader role that was given a power meanwhile is not passed on as a reader.
    fetch(pg_dsn, f"ALTER ROLE {role} BYPASSRLS")
    bad = grafana_role(pg_dsn, t.name, check=False)
    assert bad.returncode == 2 and f"role {role} has BYPASSRLS" in bad.stderr, bad.stderr
    assert bad.stdout == ""
    fetch(pg_dsn, f"ALTER ROLE {role} NOBYPASSRLS")


def test_a_readers_sorts_stay_in_memory_with_its_work_mem(pg_dsn):
    """A sort of ~25 MB, as a Grafana panel's ORDER BY time over many rows:
    in memory (quicksort) for a reader role, where PostgreSQL's stock 4 MB
    of work_mem would spill it to temporary files (external merge)."""
    t = make_tenant(pg_dsn)
    url = grafana_role(pg_dsn, t.name).stdout.strip()
    sort = ("EXPLAIN (ANALYZE, FORMAT JSON) SELECT g, md5(g::text) FROM"
            " generate_series(1, 300000) g ORDER BY 2")

    def method(plan) -> str:
        return json.loads(plan)[0]["Plan"]["Sort Method"]

    async def go():
        c = await asyncpg.connect(url)
        try:
            mem = await c.fetchval("SHOW work_mem")
            as_reader = method(await c.fetchval(sort))
            await c.execute("SET work_mem = '4MB'")
            stock = method(await c.fetchval(sort))
            return mem, as_reader, stock
        finally:
            await c.close()

    assert run(go()) == ("64MB", "quicksort", "external merge")


def test_a_reader_cannot_open_more_connections_than_its_limit(pg_dsn):
    t = make_tenant(pg_dsn)
    url = grafana_role(pg_dsn, t.name, "--connection-limit", "2").stdout.strip()

    async def go():
        async with connections(url, 2):
            with pytest.raises(asyncpg.TooManyConnectionsError,
                               match="too many connections for role"):
                await asyncpg.connect(url)
        async with connections(url, 2):  # given back: open again
            pass
    run(go())


def test_readers_together_never_take_the_connections_kept_for_haltless(server, pg_dsn):
    """Two reader roles whose limits add up to more than readers may have:
    they open connections until the server refuses them; then haltless still
    connects, ingests and compacts."""
    share = fetchval(pg_dsn, READER_SHARE)
    assert share < fetchval(pg_dsn, "SELECT current_setting('max_connections')::int")
    t = make_tenant(pg_dsn)
    urls = [grafana_role(pg_dsn, t.name, "--role", f"many_{i}_{uuid.uuid4().hex[:6]}",
                         "--connection-limit", str(share - 10)).stdout.strip() for i in (1, 2)]

    async def go():
        held, refusal = [], None
        try:
            while refusal is None:
                try:
                    held.append(await asyncpg.connect(urls[len(held) % 2]))
                except asyncpg.TooManyConnectionsError as exc:
                    refusal = str(exc)
                assert len(held) <= share, "readers opened more than their share"
            in_use = await held[0].fetchval("SELECT count(*) FROM pg_stat_activity"
                                            " WHERE backend_type = 'client backend'")
            # While readers hold all they can get: haltless still has
            # connections, for a new process too, and ingests and compacts.
            owner = await asyncpg.connect(pg_dsn)
            await owner.close()
            r = await asyncio.to_thread(post, server, t.key, {"readings": [reading()]})
            assert r.status_code == 207 and r.json()["accepted_count"] == 1, r.text
            out = await asyncio.to_thread(compact, pg_dsn)
            assert "compacted" in out.stdout
            return refusal, len(held), in_use
        finally:
            await asyncio.gather(*(c.close() for c in held), return_exceptions=True)

    refusal, opened, in_use = run(go())
    assert 'reserved for roles with privileges of the "pg_use_reserved_connections"' in refusal
    assert opened > share - 40, (opened, share)  # they did get most of their share
    assert in_use <= share + 1, (in_use, share)  # the kept slots stayed free (+1: ours)
    assert t.count(pg_dsn) == 1


# Every relation a reader may SELECT (catalogs too), each with its indexes
# (the planner opens them), locked until the transaction ends: the most
# heavyweight locks one reader session can hold.
LOCK_ALL = """
DO $$
DECLARE r regclass;
BEGIN
    FOR r IN SELECT c.oid FROM pg_class c WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
             AND has_table_privilege(c.oid, 'SELECT') LOOP
        BEGIN
            EXECUTE format('SELECT 1 FROM %s LIMIT 0', r);
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
    END LOOP;
END $$"""


def test_readers_holding_every_lock_they_can_never_delay_ingest_or_compaction(server, pg_dsn):
    """Readers on every connection they may have, each in a transaction that
    holds all the relation locks it can take (advisory locks are refused:
    below): the server's lock table, which every session shares, still has
    room for haltless, which ingests and compacts as fast as before."""
    share = fetchval(pg_dsn, READER_SHARE)
    t = make_tenant(pg_dsn)
    urls = [grafana_role(pg_dsn, t.name, "--role", f"locks_{i}_{uuid.uuid4().hex[:6]}",
                         "--connection-limit", str(share // 2 + 1),
                         "--idle-in-transaction-timeout", "600",
                         "--transaction-timeout", "600").stdout.strip() for i in (1, 2)]
    roles = [role_of(u) for u in urls]
    assert post(server, t.key, {"readings": [reading()]}).status_code == 207
    # Whatever else is connected (the server's pools, other test files'
    # servers when files run in another order) takes from the same slots.
    others = fetchval(pg_dsn, "SELECT count(*) FROM pg_stat_activity"
                      " WHERE backend_type = 'client backend'") - 1

    async def go():
        held = []
        try:
            while True:
                try:
                    held.append(await asyncpg.connect(urls[len(held) % 2]))
                except asyncpg.TooManyConnectionsError:
                    break
            for i in range(0, len(held), 20):
                await asyncio.gather(*(c.execute("BEGIN; " + LOCK_ALL)
                                       for c in held[i:i + 20]))
            locks = await asyncio.to_thread(
                fetchval, pg_dsn, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a"
                " USING (pid) WHERE a.usename = ANY($1::text[])", roles)
            loop = asyncio.get_running_loop()
            began = loop.time()
            r = await asyncio.to_thread(post, server, t.key, {"readings": [reading()]})
            assert r.status_code == 207 and r.json()["accepted_count"] == 1, r.text
            out = await asyncio.to_thread(compact, pg_dsn)
            assert "compacted" in out.stdout, out
            took = loop.time() - began
            # And room to spare: as many locks again as a stock server's whole
            # table, in one transaction of haltless's.
            spare = await asyncio.to_thread(
                fetchval, pg_dsn, "SELECT count(pg_advisory_xact_lock(g))"
                " FROM generate_series(1, 64 * 336) g")
            assert spare == 64 * 336
            assert all(await asyncio.gather(*(c.fetchval("SELECT true") for c in held)))
            return len(held), locks, took
        finally:
            await asyncio.gather(*(c.close() for c in held), return_exceptions=True)

    opened, locks, took = run(go())
    assert opened >= share - others - 5, (opened, share, others)
    # More than the lock table of a stock PostgreSQL of this size holds
    # (max_locks_per_transaction 64 x ~336 backends): it would be full.
    assert locks > 64 * 336, locks
    assert took < 30, took
    assert t.count(pg_dsn) == 2


WRITES = [  # with default_transaction_read_only off: every one refused by privileges
    "SELECT pg_advisory_lock(7291845002)",            # compaction's lock
    "SELECT pg_try_advisory_lock(7291845002)",
    "SELECT pg_advisory_xact_lock(291845003, 1)",     # a Citus shard group's
    "SELECT pg_advisory_lock_shared(1)",
    "SELECT txid_current()",
    "SELECT pg_current_xact_id()",
    "SELECT lo_from_bytea(0, 'x')",
    "SELECT lo_create(0)",
    "CREATE TEMP TABLE mine (a int)",
    "CREATE FUNCTION pg_temp.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE FUNCTION public.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE TABLE public.mine (a int)",
    "CREATE SCHEMA mine",
    "INSERT INTO organizations (name) VALUES ('mine now')",
    "UPDATE machines SET name = 'x'",
    "DELETE FROM reading_chunks",
    "TRUNCATE reading_chunks",
    "SELECT * FROM machines FOR SHARE",
    "SELECT * FROM reading_blocks FOR UPDATE",
    "LOCK TABLE reading_chunks IN EXCLUSIVE MODE",
    "SELECT nextval('series_id_seq')",
    "SELECT haltless_block_partitions(now() + interval '30 years', now() + interval '30 years')",
]


def test_a_reader_cannot_lock_write_or_create_anything_even_with_read_only_off(server, pg_dsn):
    t = make_tenant(pg_dsn)
    assert post(server, t.key, {"readings": [reading()]}).status_code == 207
    url = grafana_role(pg_dsn, t.name).stdout.strip()
    before = fetch(pg_dsn, "SELECT (SELECT count(*) FROM organizations),"
                   " (SELECT count(*) FROM pg_largeobject_metadata),"
                   " (SELECT count(*) FROM pg_proc WHERE proname = 'mine'),"
                   " (SELECT count(*) FROM pg_class WHERE relname = 'mine')")[0]

    async def go():
        c = await asyncpg.connect(url)
        try:
            await c.execute("SET default_transaction_read_only = off")
            refused = {}
            for sql in WRITES:
                async with c.transaction(readonly=False):
                    try:
                        async with c.transaction():  # a savepoint per attempt
                            await c.execute(sql)
                        refused[sql] = None
                    except asyncpg.PostgresError as exc:
                        refused[sql] = type(exc).__name__
            # What a reader may do: read, and hold ACCESS SHARE like any SELECT.
            async with c.transaction(readonly=False):
                await c.execute("LOCK TABLE reading_chunks IN ACCESS SHARE MODE")
                seen = await c.fetchval("SELECT count(*) FROM readings")
            return refused, seen
        finally:
            await c.close()

    refused, seen = run(go())
    assert {sql: why for sql, why in refused.items()
            if why != "InsufficientPrivilegeError"} == {}, refused
    assert seen == 1
    assert fetch(pg_dsn, "SELECT (SELECT count(*) FROM organizations),"
                 " (SELECT count(*) FROM pg_largeobject_metadata),"
                 " (SELECT count(*) FROM pg_proc WHERE proname = 'mine'),"
                 " (SELECT count(*) FROM pg_class WHERE relname = 'mine')")[0] == before
    # Nor in the server's other databases, where the lockdown does not hold
    # (advisory locks there fill the same lock table): it cannot connect.
    for other in ("postgres", "template1"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError,
                           match=f'permission denied for database "{other}"'):
            run(asyncpg.connect(url.replace(f"/{db.DB_NAME}?", f"/{other}?")))
    # haltless itself still takes its advisory locks.
    assert fetchval(pg_dsn, "SELECT pg_try_advisory_xact_lock(42)") is True
    assert "compacted" in compact(pg_dsn).stdout


def test_serve_ends_a_reader_that_lifts_its_own_timeouts(server, pg_dsn):
    """PostgreSQL cancels a reader's statement at its statement_timeout (the
    session stays); one that SETs its timeouts away, or ALTERs its own role
    defaults, is ended by the server's check once past its role's limit:
    one long statement, idle in a transaction, or a transaction kept open
    by short statements."""
    t = make_tenant(pg_dsn)
    url = grafana_role(pg_dsn, t.name, "--statement-timeout", "1",
                       "--idle-in-transaction-timeout", "1",
                       "--transaction-timeout", "4").stdout.strip()
    role = role_of(url)
    lifted = ("SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0;"
              " SET transaction_timeout = 0")

    async def kept_its_timeout(c):
        try:
            with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
                await c.execute("SELECT pg_sleep(60)")
            return await c.fetchval("SELECT 1")  # cancelled, not ended
        finally:
            await c.close()

    async def ended(c, work) -> str:
        """What ended the session; the work would go on for minutes otherwise."""
        try:
            await asyncio.wait_for(work(c), 90)
        except (asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError,
                asyncpg.InterfaceError) as exc:
            return type(exc).__name__
        finally:
            await c.close()
        return "not ended"

    async def one_statement(c):
        await c.execute(lifted)
        await c.execute("SELECT pg_sleep(600)")

    async def idle_in_transaction(c):
        await c.execute(lifted)
        pid = c.get_server_pid()
        async with c.transaction():
            await c.fetchval("SELECT count(*) FROM readings")
            # Idle: only a look from outside tells when it has been ended.
            while await asyncio.to_thread(fetchval, pg_dsn, "SELECT count(*) FROM"
                                          " pg_stat_activity WHERE pid = $1", pid):
                await asyncio.sleep(0.2)
            await c.fetchval("SELECT 1")

    async def short_statements(c):
        await c.execute(lifted)
        async with c.transaction():
            while True:
                await c.fetchval("SELECT pg_sleep(0.3)")

    async def its_own_defaults(c):
        await c.execute("SET default_transaction_read_only = off")
        for name in ("statement_timeout", "idle_in_transaction_session_timeout",
                     "transaction_timeout"):
            await c.execute(f"ALTER ROLE CURRENT_USER SET {name} = 0")
        fresh = await asyncpg.connect(url)
        try:
            await fresh.execute("SELECT pg_sleep(600)")
        finally:
            await fresh.close()

    async def go():
        return await asyncio.gather(
            kept_its_timeout(await asyncpg.connect(url)),
            ended(await asyncpg.connect(url), one_statement),
            ended(await asyncpg.connect(url), idle_in_transaction),
            ended(await asyncpg.connect(url), short_statements),
            ended(await asyncpg.connect(url), its_own_defaults))

    kept, *others = run(go())
    assert kept == 1
    assert "not ended" not in others, others
    log = wait_for(lambda: (text := server.log()).count(f"reader role {role}: backend") >= 4
                   and text, timeout=10, what="the server's log lines")
    for what in ("in one statement", "idle in a transaction", "in one transaction"):
        assert re.search(rf"reader role {role}: backend \d+ was {what} for \d+ s, past its "
                         r"limit of \d+ s; its session was ended", log), (what, log[-3000:])
    assert fetchval(pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    role) == 0


def test_an_owner_that_is_not_a_superuser_is_told_what_to_ask_and_then_bounds_hold(pg_dsn):
    """An external PostgreSQL where haltless's role owns its database but is
    not a superuser: migrations and grafana-role work, the rights they
    cannot take from PUBLIC are named with the statement that does it, and
    once a superuser has run it, readers lose them while haltless keeps
    them; its check ends readers' sessions all the same (it is made a member
    of each reader role)."""
    if not fetchval(pg_dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("needs a superuser to create the external database's owner")
    n = uuid.uuid4().hex[:8]
    owner, dbname = f"hl_owner_{n}", f"hl_ext_{n}"
    fetch(pg_dsn, f"CREATE ROLE {owner} LOGIN CREATEROLE")
    fetch(pg_dsn, f"CREATE DATABASE {dbname} OWNER {owner}")
    base, _, query = pg_dsn.partition("?")
    ext = re.sub(r"//[^@]*@", f"//{owner}@", base).rsplit("/", 1)[0] + f"/{dbname}?{query}"
    su_ext = base.rsplit("/", 1)[0] + f"/{dbname}?{query}"
    reader = None
    try:
        haltless("migrate", env={"HALTLESS_DATABASE_URL": ext})
        out = grafana_role(ext, "default", "--statement-timeout", "1",
                           "--idle-in-transaction-timeout", "1")
        url = out.stdout.strip()
        reader = role_of(url)
        warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("haltless: warning:")]
        assert any("may still take advisory locks" in w and "SELECT haltless_reader_lockdown();"
                   in w for w in warnings), out.stderr
        assert any(f"GRANT pg_use_reserved_connections TO {owner}" in w for w in warnings)
        assert any(f"ALTER ROLE {reader} SET temp_file_limit" in w for w in warnings)
        assert not any("cannot end" in w for w in warnings), out.stderr
        # The suite's own database on the same server: open to PUBLIC, as
        # every database is by default.
        elsewhere = [w for w in warnings if f"{reader} may connect to the database(s)" in w]
        assert len(elsewhere) == 1 and db.DB_NAME in elsewhere[0], out.stderr
        revokes = re.findall(r"REVOKE CONNECT, TEMPORARY ON DATABASE \S+ FROM PUBLIC",
                             elsewhere[0])
        assert revokes

        async def reader_may_lock():
            c = await asyncpg.connect(url)
            try:
                return await c.fetchval("SELECT pg_try_advisory_lock(1)")
            except asyncpg.InsufficientPrivilegeError:
                return "refused"
            finally:
                await c.close()
        assert run(reader_may_lock()) is True  # the gap grafana-role named

        # The superuser does what it said.
        assert fetchval(su_ext, "SELECT haltless_reader_lockdown()") == []
        fetch(su_ext, f"GRANT pg_use_reserved_connections TO {owner}")
        fetch(su_ext, f"ALTER ROLE {reader} SET temp_file_limit = '1GB'")
        for sql in revokes:
            fetch(su_ext, sql)
        again = grafana_role(ext, "default")
        assert "warning" not in again.stderr, again.stderr
        url = again.stdout.strip()
        assert run(reader_may_lock()) == "refused"
        assert fetchval(ext, "SELECT pg_try_advisory_xact_lock(1)") is True  # haltless keeps it
        assert "compacted" in haltless("compact", env={"HALTLESS_DATABASE_URL": ext}).stdout

        async def ended_by_the_owner():
            c = await asyncpg.connect(url)
            await c.execute("SET statement_timeout = 0")
            sleeping = asyncio.ensure_future(c.execute("SELECT pg_sleep(600)"))
            o = await asyncpg.connect(ext)
            try:
                deadline = asyncio.get_running_loop().time() + 30
                ended = []
                while not ended and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.5)
                    ended = await end_overdue_readers(o, grace=0)
                with pytest.raises((asyncpg.AdminShutdownError,
                                    asyncpg.ConnectionDoesNotExistError)):
                    await asyncio.wait_for(sleeping, 30)
                return ended
            finally:
                await o.close()
                await c.close()
        ended = run(ended_by_the_owner())
        assert [(e.role, e.what) for e in ended] == [(reader, "statement")]
    finally:
        fetch(pg_dsn, f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        if reader:
            fetch(pg_dsn, f"DROP ROLE IF EXISTS {reader}")
        fetch(pg_dsn, f"DROP ROLE IF EXISTS {owner}")


def test_reader_roles_from_before_the_bounds_get_the_defaults_when_migrated(pg_dsn):
    """A database at the version before migration 0014 with a reader role:
    migrating gives the role the default limits, as its recorded row says."""
    name = f"rb_{uuid.uuid4().hex[:8]}"
    role = f"old_reader_{name[3:]}"
    base, _, query = pg_dsn.partition("?")
    dsn = base.rsplit("/", 1)[0] + "/" + name + (("?" + query) if query else "")
    fetch(pg_dsn, f'CREATE DATABASE "{name}"')

    async def go():
        c = await asyncpg.connect(dsn)
        try:
            await c.execute("CREATE TABLE haltless_schema (version integer PRIMARY KEY,"
                            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            for version, mname, sql in db._migrations():
                if version < 14:
                    await c.execute(sql)
                    await c.execute("INSERT INTO haltless_schema (version, name)"
                                    " VALUES ($1, $2)", version, mname)
            org = await c.fetchval("INSERT INTO organizations (name) VALUES ('o') RETURNING id")
            await c.execute(f"CREATE ROLE {role} LOGIN")
            await c.execute("INSERT INTO reader_roles (role_name, org_id) VALUES ($1, $2)",
                            role, org)
            assert await db.migrate(c) == db.LATEST_VERSION
            return (await c.fetchval("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1",
                                     role),
                    await c.fetchval("SELECT has_function_privilege($1,"
                                     " 'pg_advisory_lock(bigint)', 'EXECUTE')", role))
        finally:
            await c.close()

    try:
        limit, may_lock = run(go())
        assert limit == DEFAULT_LIMITS.connection_limit and may_lock is False
        settings = role_settings(dsn, role)
        assert {k: settings[k] for k in ("statement_timeout", "idle_in_transaction_session_timeout",
                                         "transaction_timeout", "work_mem")} == {
            "statement_timeout": f"{DEFAULT_LIMITS.statement_timeout_s}s",
            "idle_in_transaction_session_timeout":
                f"{DEFAULT_LIMITS.idle_in_transaction_timeout_s}s",
            "transaction_timeout": f"{DEFAULT_LIMITS.transaction_timeout_s}s",
            "work_mem": f"{DEFAULT_LIMITS.work_mem_mb}MB"}
    finally:
        fetch(pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        fetch(pg_dsn, f"DROP OWNED BY {role}")
        fetch(pg_dsn, f"DROP ROLE IF EXISTS {role}")
