"""Organizations, machines and API keys: the few queries the CLI and the
management API share. Every query that touches tenant data takes org_id."""
from __future__ import annotations

import base64
import hashlib
import secrets
import uuid

import asyncpg

from ..core.errors import Conflict, NotFound, Unprocessable

KEY_PREFIX = "hk_"


def new_api_key() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _check_name(what: str, value: str | None, limit: int = 200, required: bool = True) -> None:
    if value is None:
        if required:
            raise Unprocessable(f"{what}: required")
        return
    if not value or not value.strip():
        raise Unprocessable(f"{what}: must not be empty")
    if len(value) > limit:
        raise Unprocessable(f"{what}: at most {limit} characters, got {len(value)}")


# ------------------------------------------------------------ organizations

async def create_org(conn: asyncpg.Connection, name: str) -> asyncpg.Record:
    _check_name("organization name", name, 100)
    try:
        return await conn.fetchrow(
            "INSERT INTO organizations (name) VALUES ($1) RETURNING id, name, created_at", name)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"organization {name!r} already exists") from None


async def list_orgs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, name, is_default, created_at FROM organizations ORDER BY created_at, name")


async def org_id(conn: asyncpg.Connection, name: str | None) -> uuid.UUID:
    """The organization's id by name; None means the default organization."""
    if name is None:
        row = await conn.fetchval("SELECT id FROM organizations WHERE is_default")
    else:
        row = await conn.fetchval("SELECT id FROM organizations WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no organization named {name!r}; `haltless orgs list` shows them")
    return row


# ------------------------------------------------------------------ machines

async def create_machine(conn: asyncpg.Connection, org: uuid.UUID, identifier: str,
                         name: str | None = None) -> asyncpg.Record:
    _check_name("machine_identifier", identifier)
    _check_name("name", name, required=False)
    try:
        return await conn.fetchrow(
            "INSERT INTO machines (org_id, machine_identifier, name) VALUES ($1, $2, $3)"
            " RETURNING id, machine_identifier, name, created_at", org, identifier, name)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"machine {identifier!r} already exists in this organization") from None


async def list_machines(conn: asyncpg.Connection, org: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, machine_identifier, name, created_at FROM machines WHERE org_id = $1"
        " ORDER BY machine_identifier", org)


async def existing_machines(conn: asyncpg.Connection, org: uuid.UUID,
                            identifiers: list[str]) -> set[str]:
    """Which of ``identifiers`` the organization has."""
    rows = await conn.fetch(
        "SELECT machine_identifier FROM machines"
        " WHERE org_id = $1 AND machine_identifier = ANY($2::text[])", org, identifiers)
    return {r[0] for r in rows}


async def get_machine(conn: asyncpg.Connection, org: uuid.UUID,
                      machine_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT id, machine_identifier, name, created_at FROM machines"
        " WHERE org_id = $1 AND id = $2", org, machine_id)
    if row is None:
        raise NotFound(f"no machine {machine_id} in this organization")
    return row


# ------------------------------------------------------------------ API keys

async def create_key(conn: asyncpg.Connection, org: uuid.UUID,
                     name: str | None = None) -> tuple[str, asyncpg.Record]:
    """Returns the key itself (shown once, never stored) and its record."""
    _check_name("key name", name, required=False)
    key = new_api_key()
    row = await conn.fetchrow(
        "INSERT INTO api_keys (org_id, name, prefix, key_hash) VALUES ($1, $2, $3, $4)"
        " RETURNING id, name, prefix, created_at", org, name, key[:10], hash_api_key(key))
    return key, row


async def list_keys(conn: asyncpg.Connection, org: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, name, prefix, created_at, revoked_at FROM api_keys WHERE org_id = $1"
        " ORDER BY created_at", org)


async def revoke_key(conn: asyncpg.Connection, org: uuid.UUID, key_id: uuid.UUID) -> None:
    status = await conn.execute(
        # least(), not coalesce(): Citus refuses now() inside COALESCE in an
        # UPDATE of a reference table; least() skips the NULL just the same.
        "UPDATE api_keys SET revoked_at = least(revoked_at, now())"
        " WHERE org_id = $1 AND id = $2", org, key_id)
    if status == "UPDATE 0":
        raise NotFound(f"no API key {key_id} in this organization; `haltless keys list` shows them")


async def org_for_key(conn: asyncpg.Connection, key: str) -> uuid.UUID | None:
    """The organization of a live (not revoked) key, else None."""
    return await conn.fetchval(
        "SELECT org_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        hash_api_key(key))
