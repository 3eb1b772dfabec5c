"""Read-only database roles for one organization (``haltless grafana-role``),
for Grafana or any SQL client.

A reader role can SELECT the reading tables, the ``readings`` view, the
rollups ``readings_1m`` and ``readings_1h`` and the functions over them, and nothing else (no keys, no sources, no writes).
Row-level security (migration 0006) shows it one organization: machines
and organizations by ``org_id``; series, hot chunks and blocks by
``series_id`` against the organization's series; timelines when a visible
block uses them. The views are ``security_invoker`` so the policies apply to
the reader, not to the view's owner. On a Citus cluster migration 0009 puts
policies of the same meaning in place that Citus accepts (no subqueries)
and copies onto every shard; Citus creates the role and its grants on every
node, and the coordinator reads the workers as that role.
"""
from __future__ import annotations

import re
import secrets
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

from ..core.errors import Conflict, HaltlessError

READABLE = ("organizations", "machines", "series", "reading_chunks", "reading_blocks",
            "reading_timelines", "readings", "readings_1m", "readings_1h")


def default_role_name(org_name: str) -> str:
    return ("grafana_" + re.sub(r"[^a-z0-9_]+", "_", org_name.lower()).strip("_"))[:63]


async def create_reader_role(conn, org: uuid.UUID, org_name: str,
                             role: str | None = None) -> tuple[str, str]:
    """Create the role (or give an existing reader role of this organization a
    new password); returns (role name, password)."""
    if await conn.fetchval("SELECT current_setting('server_version_num')::int") < 150000:
        raise HaltlessError("reader roles need PostgreSQL 15 or newer (views with "
                            "security_invoker); the embedded PostgreSQL is 18")
    role = role or default_role_name(org_name)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise HaltlessError(f"--role {role!r}: use 1 to 63 lowercase letters, digits and _")
    password = secrets.token_urlsafe(24)
    async with conn.transaction():
        registered = await conn.fetchval("SELECT org_id FROM reader_roles WHERE role_name = $1",
                                         role)
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if registered is not None and registered != org:
            raise Conflict(f"role {role} reads another organization; choose another --role")
        if exists and registered is None:
            raise Conflict(f"role {role} exists and is not a haltless reader role; "
                           "choose another --role")
        verb = "ALTER" if exists else "CREATE"
        await conn.execute(await conn.fetchval(
            f"SELECT format('{verb} ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB "
            "NOCREATEROLE NOREPLICATION NOBYPASSRLS', $1::text, $2::text)", role, password))
        await conn.execute(await conn.fetchval(
            "SELECT format('ALTER ROLE %I SET default_transaction_read_only = on', $1::text)",
            role))
        await conn.execute(await conn.fetchval(
            "SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), $1::text)",
            role))
        await conn.execute(await conn.fetchval(
            "SELECT format('GRANT USAGE ON SCHEMA public TO %I', $1::text)", role))
        await conn.execute(await conn.fetchval(
            f"SELECT format('GRANT SELECT ON {', '.join(READABLE)} TO %I', $1::text)", role))
        await conn.execute(
            "INSERT INTO reader_roles (role_name, org_id) VALUES ($1, $2)"
            " ON CONFLICT (role_name) DO NOTHING", role, org)
    return role, password


def url_for_role(dsn: str, role: str, password: str) -> str:
    """The DSN with the reader's user name and password in place of the owner's."""
    u = urlsplit(dsn)
    host = u.netloc.rpartition("@")[2]
    return urlunsplit((u.scheme, f"{quote(role)}:{quote(password, safe='')}@{host}", u.path,
                       u.query, u.fragment))
