"""The ``haltless`` command line: the parser, and the dispatch to a
command's code, imported only when that command runs (``haltless agent``
on an edge box loads no database driver; the database commands are in
``server/commands.py``).

Ctrl-C or SIGTERM before a command has its own way of stopping (a starting
``haltless serve``: initdb, migrations) ends it with one line and exit
130 / 143, the embedded PostgreSQL let go of as on any exit; the handler
is the first thing ``main`` does, and everything else, imports included,
runs after it (a Ctrl-C 0.1 s after start used to print a traceback from
an import).
"""
from __future__ import annotations

import signal
import sys

_STOPPED_BY = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}
from ..core.stopping import signalled as _signalled


def _on_stop_signal(signum, frame):
    _signalled.append(signum)
    raise KeyboardInterrupt


def _command(name: str):
    """``commands.<name>``, imported when the command runs."""
    def run(args):
        from . import commands
        return getattr(commands, name)(args)
    run.__name__ = name
    return run


MAX_TOKEN_TTL = 30 * 86_400


def _ttl(value: str) -> int:
    import argparse
    v = _positive_int(value)
    if v > MAX_TOKEN_TTL:
        raise argparse.ArgumentTypeError(
            f"{v} seconds is more than 30 days ({MAX_TOKEN_TTL}); issue shorter-lived tokens "
            "and create new ones as needed (`haltless token revoke` ends them early)")
    return v


def _positive_int(value: str) -> int:
    import argparse
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return v


def _setting(name: str, flag: str):
    """An argparse type that parses a flag as its setting does (same bounds)."""
    import argparse

    from ..core.config import VARIABLES
    from ..core.errors import ConfigError

    def parse(raw: str):
        try:
            return VARIABLES[name][1](flag, raw)
        except ConfigError as exc:
            msg = str(exc)
            raise argparse.ArgumentTypeError(msg.removeprefix(f"{flag}: ").removeprefix(f"{flag}=")) from None
    parse.__name__ = flag
    return parse


def _db_flags(parser, *, top: bool) -> None:
    # On the top parser and on each command, so they go before or after the
    # command name; SUPPRESS keeps a command's unset flag from hiding the top one.
    import argparse
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--data-dir", default=default, metavar="DIR",
                        help="data directory of the embedded PostgreSQL and the generated "
                             "secrets (HALTLESS_DATA_DIR, default ./haltless-data)")
    parser.add_argument("--database-url", default=default, metavar="URL",
                        type=_setting("database_url", "--database-url"),
                        help="use this PostgreSQL instead of the embedded one "
                             "(HALTLESS_DATABASE_URL)")
    parser.add_argument("--create-data-dir", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="make a new embedded database in the data dir if it has none "
                             "(serve and migrate do without being asked; other commands refuse, "
                             "so that one run from the wrong directory cannot start an empty "
                             "database there)")


def build_parser():
    import argparse
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
    sp.set_defaults(func=_command("cmd_serve"))

    sp = sub.add_parser("compact", parents=[common],
                        help="compact every committed reading into blocks now, then exit")
    sp.add_argument("--crash-at", help=argparse.SUPPRESS)  # tests: commands.cmd_compact checks it
    sp.set_defaults(func=_command("cmd_compact"))

    sp = sub.add_parser("db-url", parents=[common], help="print the PostgreSQL connection URL")
    sp.set_defaults(func=_command("cmd_db_url"))

    sp = sub.add_parser("psql", parents=[common],
                        help="open psql (the embedded PostgreSQL's) on the haltless database; "
                             "arguments after -- go to psql")
    sp.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="-- PSQL_ARGS")
    sp.set_defaults(func=_command("cmd_psql"))

    sp = sub.add_parser("grafana-role", parents=[common, org],
                        help="create a read-only database role that sees one organization "
                             "(row-level security); prints its connection URL")
    sp.add_argument("--role", help="role name (default: grafana_<organization>)")
    # Left out: the role's recorded value when it exists, else the default;
    # upper bounds are checked by server/reader_roles.py (ReaderLimits).
    sp.add_argument("--connection-limit", type=_positive_int, metavar="N",
                    help="connections the role may have open at once (default 10; at most "
                         "what the server leaves to roles without reserved connections)")
    sp.add_argument("--statement-timeout", type=_positive_int, metavar="SECONDS",
                    help="longest statement, at most 86400 (default 60)")
    sp.add_argument("--idle-in-transaction-timeout", type=_positive_int, metavar="SECONDS",
                    help="longest idle time inside a transaction, at most 86400 (default 30)")
    sp.add_argument("--transaction-timeout", type=_positive_int, metavar="SECONDS",
                    help="longest transaction, at most 86400 (default 300)")
    sp.add_argument("--work-mem", type=_positive_int, metavar="MB",
                    help="memory for each sort or hash of a query before it spills to "
                         "temporary files (work_mem), at most 4096 (default 64)")
    sp.set_defaults(func=_command("cmd_grafana_role"))

    sp = sub.add_parser("migrate", parents=[common], help="apply pending database migrations")
    sp.set_defaults(func=_command("cmd_migrate"))

    orgs = sub.add_parser("orgs", help="organizations").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = orgs.add_parser("create", parents=[common], help="create an organization")
    sp.add_argument("name", metavar="NAME")
    sp.set_defaults(func=_command("cmd_orgs_create"))
    sp = orgs.add_parser("list", parents=[common], help="list organizations")
    sp.set_defaults(func=_command("cmd_orgs_list"))

    machines = sub.add_parser("machines", help="machines").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = machines.add_parser("add", parents=[common, org], help="add a machine; prints its UUID")
    sp.add_argument("identifier", metavar="IDENTIFIER", help="machine_identifier, e.g. CNC-001")
    sp.add_argument("--name", help="display name")
    sp.set_defaults(func=_command("cmd_machines_add"))
    sp = machines.add_parser("list", parents=[common, org], help="list machines")
    sp.set_defaults(func=_command("cmd_machines_list"))

    keys = sub.add_parser("keys", help="API keys for POST /api/v1/ingest").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = keys.add_parser("create", parents=[common, org], help="create a key; prints it once")
    sp.add_argument("--name", help="what the key is for")
    sp.set_defaults(func=_command("cmd_keys_create"))
    sp = keys.add_parser("list", parents=[common, org], help="list keys (never the keys themselves)")
    sp.set_defaults(func=_command("cmd_keys_list"))
    sp = keys.add_parser("revoke", parents=[common, org], help="revoke a key by its id")
    sp.add_argument("key_id", metavar="KEY_ID")
    sp.set_defaults(func=_command("cmd_keys_revoke"))

    token = sub.add_parser("token", help="JWTs for the management API").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = token.add_parser("create", parents=[common, org], help="print a bearer token")
    sp.add_argument("--ttl", type=_ttl, default=3600,
                    help="lifetime in seconds (default 3600, at most 30 days: 2592000)")
    sp.set_defaults(func=_command("cmd_token_create"))
    sp = token.add_parser("revoke", parents=[common, org],
                          help="refuse every token of the organization issued until now")
    sp.set_defaults(func=_command("cmd_token_revoke"))

    sp = sub.add_parser("pollers", parents=[common],
                        help="poll the active ingest sources (direct ingestion)")
    sp.add_argument("--processes", type=_positive_int, default=1,
                    help="poller processes on this host (default 1)")
    sp.add_argument("--lease", type=float, default=3.0,
                    help="seconds a source stays with a process that stopped renewing "
                         "(default 3)")
    sp.add_argument("--stats-file", help="append a JSON status line here every 10 s")
    sp.set_defaults(func=_command("cmd_pollers"))

    sp = sub.add_parser("agent", help="edge agent: read devices on site, push over HTTP "
                        "with store-and-forward (uses no database: its state lives in the "
                        "TOML's state_dir)")
    sp.add_argument("--config", required=True, help="agent TOML file (the contract's format)")
    sp.add_argument("--check", action="store_true",
                    help="validate the file, then test the server and the key, each source's "
                         "machine and device once; one line per problem; exit 1 if any")
    sp.add_argument("--offline", action="store_true",
                    help="with --check: validate the file only (no server, no devices)")
    sp.set_defaults(func=cmd_agent)
    return p


def cmd_agent(args) -> None:
    from ..core.config import Settings
    from ..core.errors import ConfigError
    if args.data_dir or args.database_url or args.create_data_dir:
        raise ConfigError("the agent uses no database: --data-dir/--database-url do not apply; "
                          "its queue and certificates live in the TOML's state_dir")
    if args.offline and not args.check:
        raise ConfigError("--offline goes with --check: haltless agent --check --offline "
                          "--config FILE validates the file only")
    if args.check:
        from ..pollers.agent_check import main as check_main
        code = check_main(args.config, args.offline, Settings.from_env())
    else:
        from ..pollers.agent import main as agent_main
        code = agent_main(args.config, Settings.from_env())
    if code:
        sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in _STOPPED_BY}
    try:
        try:
            from ..core.errors import HaltlessError
            parser = build_parser()
            args = parser.parse_args(argv)
            if args.data_dir == "":
                parser.error("--data-dir: must not be empty")
            args.func(args)
            if _signalled:  # its KeyboardInterrupt was swallowed (stop_requested)
                raise KeyboardInterrupt
        except HaltlessError as exc:
            print(f"haltless: error: {exc}", file=sys.stderr)
            sys.exit(2)
    except (KeyboardInterrupt, Exception) as exc:
        # A signal can surface as another exception (one raised inside an
        # import while it unwound, a subprocess that it also killed): the
        # signal is what happened.
        if not _signalled and isinstance(exc, Exception):
            raise
        what, code = _STOPPED_BY[_signalled[0] if _signalled else signal.SIGINT]
        print(f"haltless: {what}", file=sys.stderr)
        # CPython marks a KeyboardInterrupt raised inside a string exec/eval
        # (dataclasses and namedtuple make their methods so, at import) as
        # unhandled even once caught, and `python -m` then ends by SIGINT
        # instead of our exit code (-2 for 143, 1 run in ~60 here). Every
        # string eval clears that mark as it begins: this one, caught by
        # nothing, leaves it clear.
        exec("None")  # noqa: S102
        sys.stderr.flush()
        sys.exit(code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
