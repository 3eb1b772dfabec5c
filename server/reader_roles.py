"""Read-only database roles for one organization (``haltless grafana-role``),
for Grafana or any SQL client, bounded so that no reader stops the system.

A reader role can SELECT the reading tables, the ``readings`` view, the
rollups ``readings_1m`` and ``readings_1h`` and the functions over them,
and nothing else (no keys, no sources, no writes).
Row-level security (migration 0006) shows it one organization: machines
and organizations by ``org_id``; series, hot chunks and blocks by
``series_id`` against the organization's series; timelines when a visible
block uses them. The views are ``security_invoker`` so the policies apply to
the reader, not to the view's owner. On a Citus cluster migration 0009 puts
policies of the same meaning in place that Citus accepts (no subqueries)
and copies onto every shard; Citus creates the role and its grants on every
node, and the coordinator reads the workers as that role.

Bounds (README "Reader roles are bounded"): a CONNECTION LIMIT below what the
server leaves to roles without reserved connections; statement,
idle-in-transaction and (PostgreSQL 17+) transaction timeouts as the role's
defaults, recorded in ``reader_roles`` too, from where ``haltless serve``
enforces them on readers that SET them away (``server/reader_limits.py``);
a ``work_mem`` (default 64 MB, so that Grafana's sorts stay in memory);
at most TEMP_FILE_LIMIT of temporary files per session (a superuser-only
setting, so the reader cannot raise it); and no advisory locks, transaction
ids, large objects, temporary tables or functions
(``haltless_reader_lockdown()``, migration 0014). ``reader_role_gaps`` says
what of this the database did not let us do.
"""
from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, fields, replace
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from ..core.errors import Conflict, HaltlessError

READABLE = ("organizations", "machines", "series", "reading_chunks", "reading_blocks",
            "reading_timelines", "readings", "readings_1m", "readings_1h")
TEMP_FILE_LIMIT = "1GB"  # per session; a sort or hash that spills more is cancelled
MAX_TIMEOUT_S = 86_400
MAX_WORK_MEM_MB = 4_096  # per sort or hash, per query node: more is a flag away from OOM


@dataclass(frozen=True)
class ReaderLimits:
    """A reader role's bounds; the defaults are also the column defaults of
    ``reader_roles`` (migration 0014)."""

    connection_limit: int = 10
    statement_timeout_s: int = 60
    idle_in_transaction_timeout_s: int = 30
    transaction_timeout_s: int = 300
    work_mem_mb: int = 64


DEFAULT_LIMITS = ReaderLimits()
LIMIT_COLUMNS = tuple(f.name for f in fields(ReaderLimits))

# Connections a role without pg_use_reserved_connections (or superuser) can
# ever have open: the server refuses it once fewer than the reserved slots
# are free.
# The server's other databases the role ($1) may connect to, quoted, in order.
DATABASES_ELSEWHERE = (
    "SELECT quote_ident(datname) FROM pg_database WHERE datname <> current_database()"
    " AND datallowconn AND has_database_privilege($1, oid, 'CONNECT') ORDER BY 1")

READER_SHARE = """
SELECT current_setting('max_connections')::int
       - current_setting('superuser_reserved_connections')::int
       - coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0)"""


def default_role_name(org_name: str) -> str:
    return ("grafana_" + re.sub(r"[^a-z0-9_]+", "_", org_name.lower()).strip("_"))[:63]


async def _format(conn, template: str, *args) -> str:
    """A statement built by PostgreSQL's format() (%I, %L quoting)."""
    return await conn.fetchval(f"SELECT format('{template}'" + "".join(
        f", ${i}::text" for i in range(1, len(args) + 1)) + ")", *map(str, args))


async def create_reader_role(conn, org: uuid.UUID, org_name: str, role: str | None = None,
                             **given: int | None) -> tuple[str, str]:
    """Create the role (or give an existing reader role of this organization a
    new password, and the limits in ``given``: ReaderLimits' fields; those
    not given keep the role's recorded value, or take the default); returns
    (role name, password)."""
    if await conn.fetchval("SELECT current_setting('server_version_num')::int") < 150000:
        raise HaltlessError("reader roles need PostgreSQL 15 or newer (views with "
                            "security_invoker); the embedded PostgreSQL is 18")
    role = role or default_role_name(org_name)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise HaltlessError(f"--role {role!r}: use 1 to 63 lowercase letters, digits and _")
    unknown = set(given) - set(LIMIT_COLUMNS)
    if unknown:
        raise TypeError(f"unknown limits: {sorted(unknown)}")
    password = secrets.token_urlsafe(24)
    async with conn.transaction():
        row = await conn.fetchrow(
            f"SELECT org_id, {', '.join(LIMIT_COLUMNS)} FROM reader_roles WHERE role_name = $1",
            role)
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if row is not None and row["org_id"] != org:
            raise Conflict(f"role {role} reads another organization; choose another --role")
        if exists and row is None:
            raise Conflict(f"role {role} exists and is not a haltless reader role; "
                           "choose another --role")
        base = ReaderLimits(**{c: row[c] for c in LIMIT_COLUMNS}) if row else DEFAULT_LIMITS
        limits = replace(base, **{k: v for k, v in given.items() if v is not None})
        for flag, value in (("--statement-timeout", limits.statement_timeout_s),
                            ("--idle-in-transaction-timeout",
                             limits.idle_in_transaction_timeout_s),
                            ("--transaction-timeout", limits.transaction_timeout_s)):
            if not 1 <= value <= MAX_TIMEOUT_S:
                raise HaltlessError(f"{flag} {value}: expected 1 to {MAX_TIMEOUT_S} seconds")
        if not 1 <= limits.work_mem_mb <= MAX_WORK_MEM_MB:
            raise HaltlessError(f"--work-mem {limits.work_mem_mb}: expected 1 to "
                                f"{MAX_WORK_MEM_MB} MB")
        citus = bool(await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'citus'"))
        # On Citus a reader's session that queries also holds a connection as
        # the reader to the coordinator itself and one to each worker (one:
        # citus.max_adaptive_executor_pool_size below), and every node applies
        # the role's CONNECTION LIMIT: twice the sessions it may have.
        per_session = 2 if citus else 1
        share = await conn.fetchval(READER_SHARE) // per_session
        if not 1 <= limits.connection_limit <= share:
            raise HaltlessError(
                f"--connection-limit {limits.connection_limit}: expected 1 to {share}, the "
                "connections this server lets roles without reserved connections have "
                "(max_connections minus superuser_reserved_connections and "
                "reserved_connections" + (", halved on Citus" if citus else "") +
                "); the rest are kept for haltless")
        role_limit = limits.connection_limit * per_session
        if exists:
            # Only a superuser may so much as name SUPERUSER in an ALTER ROLE:
            # check that the role has none of these instead.
            powers = await conn.fetchval(
                "SELECT array_remove(ARRAY[CASE WHEN rolsuper THEN 'SUPERUSER' END,"
                " CASE WHEN rolcreatedb THEN 'CREATEDB' END, CASE WHEN rolcreaterole"
                " THEN 'CREATEROLE' END, CASE WHEN rolreplication THEN 'REPLICATION' END,"
                " CASE WHEN rolbypassrls THEN 'BYPASSRLS' END], NULL)"
                " FROM pg_roles WHERE rolname = $1", role)
            if powers:
                raise Conflict(f"role {role} has {', '.join(powers)}, which a reader role must "
                               "not have; remove it (ALTER ROLE ... NO...) or choose another "
                               "--role")
            await conn.execute(await _format(conn, "ALTER ROLE %I LOGIN PASSWORD %L "
                                             "CONNECTION LIMIT %s", role, password, role_limit))
        else:
            await conn.execute(await _format(
                conn, "CREATE ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE "
                "NOREPLICATION NOBYPASSRLS CONNECTION LIMIT %s", role, password, role_limit))
        settings = {"default_transaction_read_only": "on",
                    "statement_timeout": f"{limits.statement_timeout_s}s",
                    "idle_in_transaction_session_timeout":
                        f"{limits.idle_in_transaction_timeout_s}s",
                    # Grafana's sorts and hashes (ORDER BY, GROUP BY time buckets) in
                    # memory instead of temporary files; the reader may SET it
                    # otherwise, within temp_file_limit and the time limits.
                    "work_mem": f"{limits.work_mem_mb}MB"}
        if await conn.fetchval("SELECT current_setting('server_version_num')::int") >= 170000:
            settings["transaction_timeout"] = f"{limits.transaction_timeout_s}s"
        if citus:
            # One connection per worker and session for its shard queries, so
            # that the role's limit holds on the workers too (a reader that
            # raises it fails its own queries, no one else's).
            settings["citus.max_adaptive_executor_pool_size"] = "1"
        for name, value in settings.items():
            await conn.execute(await _format(conn, f"ALTER ROLE %I SET {name} = %L", role, value))
        try:
            async with conn.transaction():  # a savepoint: superusers only (reader_role_gaps says)
                await conn.execute(await _format(conn, "ALTER ROLE %I SET temp_file_limit = %L",
                                                 role, TEMP_FILE_LIMIT))
        except asyncpg.InsufficientPrivilegeError:
            pass
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            # So that haltless serve may see and end this role's sessions
            # (server/reader_limits.py); the reader gains nothing from it.
            try:
                async with conn.transaction():
                    await conn.execute(await _format(conn, "GRANT %I TO CURRENT_USER", role))
            except asyncpg.InsufficientPrivilegeError:
                pass
        await conn.execute(await _format(
            conn, "GRANT CONNECT ON DATABASE %I TO %I", await conn.fetchval(
                "SELECT current_database()"), role))
        await conn.execute(await _format(conn, "GRANT USAGE ON SCHEMA public TO %I", role))
        await conn.execute(await _format(conn, f"GRANT SELECT ON {', '.join(READABLE)} TO %I",
                                         role))
        await conn.execute(
            f"INSERT INTO reader_roles (role_name, org_id, {', '.join(LIMIT_COLUMNS)})"
            " VALUES ($1, $2, " + ", ".join(f"${i}" for i in range(3, 3 + len(LIMIT_COLUMNS)))
            + ") ON CONFLICT (role_name) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in LIMIT_COLUMNS),
            role, org, *(getattr(limits, c) for c in LIMIT_COLUMNS))
        await conn.fetchval("SELECT haltless_reader_lockdown()")
    return role, password


async def reader_limits(conn, role: str) -> ReaderLimits:
    row = await conn.fetchrow(f"SELECT {', '.join(LIMIT_COLUMNS)} FROM reader_roles"
                              " WHERE role_name = $1", role)
    return ReaderLimits(**dict(row))


async def reader_role_gaps(conn, role: str) -> list[str]:
    """What of a reader role's bounds this database did not let haltless put in
    place (an external PostgreSQL where haltless's role is not a superuser),
    each with what to run to close it; empty when none."""
    gaps = []
    me = await conn.fetchrow(
        "SELECT current_user AS name, rolsuper AS super,"
        " rolsuper OR pg_has_role(current_user, $1, 'USAGE') AS watches,"
        " rolsuper OR CASE WHEN to_regrole('pg_use_reserved_connections') IS NULL THEN false"
        "  ELSE pg_has_role(current_user, 'pg_use_reserved_connections', 'USAGE') END AS reserved"
        " FROM pg_roles WHERE rolname = current_user", role)
    reserved = int(await conn.fetchval(
        "SELECT coalesce(nullif(current_setting('reserved_connections', true), ''), '0')"))
    if reserved == 0 or not me["reserved"]:
        gaps.append(
            "no connections are reserved for haltless: readers together can take all but "
            "superuser_reserved_connections. As a superuser: ALTER SYSTEM SET "
            "reserved_connections = 100 (then restart PostgreSQL) and GRANT "
            f"pg_use_reserved_connections TO {me['name']} (PostgreSQL 16 or newer)")
    public = await conn.fetchval("SELECT haltless_reader_lockdown()")
    if public:
        gaps.append("every role, readers included, may still " + _summary(public) +
                    ". As a superuser, in this database: SELECT haltless_reader_lockdown();")
    limit = await conn.fetchval(
        "SELECT s FROM pg_db_role_setting d JOIN pg_roles r ON r.oid = d.setrole,"
        " unnest(d.setconfig) s WHERE r.rolname = $1 AND s LIKE 'temp\\_file\\_limit=%'", role)
    if limit is None:
        gaps.append(f"{role}'s temporary files are not limited (a superuser-only setting): "
                    f"as a superuser, ALTER ROLE {role} SET temp_file_limit = '{TEMP_FILE_LIMIT}'")
    elsewhere = await conn.fetch(DATABASES_ELSEWHERE, role)
    if elsewhere:
        names = ", ".join(r[0] for r in elsewhere)
        gaps.append(f"{role} may connect to the database(s) {names} too (PUBLIC may), where "
                    "the lockdown does not hold: it could take advisory locks by the thousand "
                    "(in a lock table all databases share) or fill the disk with temporary "
                    "tables. As a superuser or each one's owner: " + "; ".join(
                        f"REVOKE CONNECT, TEMPORARY ON DATABASE {r[0]} FROM PUBLIC"
                        for r in elsewhere)
                    + " (then GRANT CONNECT to the roles that use it)")
    if not me["watches"]:
        gaps.append(f"haltless serve cannot end {role}'s sessions that outlast its limits: "
                    f"GRANT {role} TO {me['name']} (or pg_signal_backend and "
                    "pg_read_all_stats)")
    return gaps


def _summary(rights: list[str]) -> str:
    """haltless_reader_lockdown()'s list of rights, as what they let one do."""
    kinds = {"take advisory locks": 0, "write large objects": 0, "assign transaction ids": 0}
    rest = []
    for right in rights:
        name = right.removeprefix("EXECUTE ON FUNCTION ")
        if "advisory" in name:
            kinds["take advisory locks"] += 1
        elif name.startswith("lo"):
            kinds["write large objects"] += 1
        elif name != right:
            kinds["assign transaction ids"] += 1
        elif right.startswith("TEMPORARY"):
            rest.append("create temporary tables and functions (" + right + ")")
        else:
            rest.append("create objects (" + right + ")")
    return "; ".join([f"{what} ({n} functions)" for what, n in kinds.items() if n] + rest)


def url_for_role(dsn: str, role: str, password: str) -> str:
    """The DSN with the reader's user name and password in place of the owner's."""
    u = urlsplit(dsn)
    host = u.netloc.rpartition("@")[2]
    return urlunsplit((u.scheme, f"{quote(role)}:{quote(password, safe='')}@{host}", u.path,
                       u.query, u.fragment))
