"""Credentials: API keys for ingest (``X-API-Key``) and JWTs for the
management API (``Authorization: Bearer``). The two never stand in for
each other: a key is not a JWT, and a JWT is not a key."""
from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path

import asyncpg
import jwt

from ..core.errors import ConfigError, Unauthorized
from . import store
from .secretfile import secret_file

JWT_ALGORITHM = "HS256"  # pinned: tokens naming any other algorithm are refused
JWT_ISSUER = "haltless"
ORG_CLAIM = "org"


class ApiKeyCache:
    """Maps an API key (by its hash) to its organization for ``ttl`` seconds, so
    a hot ingest path does not query PostgreSQL per request. A revoked key is
    refused within ``ttl`` seconds; unknown keys are not cached."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._cache: dict[bytes, tuple[uuid.UUID, float]] = {}

    async def org_for(self, pool: asyncpg.Pool, key: str | None) -> uuid.UUID:
        if not key:
            raise Unauthorized("missing X-API-Key header; send the key `haltless keys create` printed")
        if not key.startswith(store.KEY_PREFIX) or len(key) > 128:
            raise Unauthorized("invalid API key")
        h = store.hash_api_key(key)
        now = time.monotonic()
        hit = self._cache.get(h)
        if hit is not None and hit[1] > now:
            return hit[0]
        async with pool.acquire() as conn:
            org = await store.org_for_key(conn, key)
        if org is None:
            self._cache.pop(h, None)
            raise Unauthorized("invalid or revoked API key")
        if self.ttl > 0:
            if len(self._cache) > 10_000:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            self._cache[h] = (org, now + self.ttl)
        return org


# ------------------------------------------------------------------ JWT

def jwt_secret(secret: str | None, data_dir: Path) -> str:
    """The configured secret, or one generated once and kept in data_dir."""
    if secret:
        return secret
    path = data_dir / "jwt-secret"
    value = secret_file(path, lambda: secrets.token_urlsafe(48).encode()).decode().strip()
    if len(value) < 32:
        raise ConfigError(f"{path}: JWT secret is shorter than 32 characters")
    return value


def issue_token(secret: str, org_id: uuid.UUID, ttl_seconds: int) -> str:
    now = int(time.time())
    claims = {"iss": JWT_ISSUER, ORG_CLAIM: str(org_id), "iat": now, "exp": now + ttl_seconds,
              "jti": secrets.token_hex(8)}
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def verify_token(secret: str, authorization: str | None) -> uuid.UUID:
    """The organization of a valid bearer token; Unauthorized otherwise."""
    return verify_claims(secret, authorization)[0]


def verify_claims(secret: str, authorization: str | None) -> tuple[uuid.UUID, int]:
    """(organization, issued at in Unix seconds) of a valid bearer token;
    Unauthorized otherwise."""
    if not authorization:
        raise Unauthorized("missing Authorization header; send `Authorization: Bearer <JWT>` "
                           "from `haltless token create`")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization header must be `Bearer <JWT>`")
    token = token.strip()
    if token.startswith(store.KEY_PREFIX):
        raise Unauthorized("an API key is not a management token; use `haltless token create`")
    try:
        claims = jwt.decode(token, secret, algorithms=[JWT_ALGORITHM], issuer=JWT_ISSUER,
                            options={"require": ["exp", "iat", "iss", ORG_CLAIM]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired; issue a new one with `haltless token create`") from None
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise Unauthorized("invalid token") from None
    org = claims[ORG_CLAIM]
    try:
        if not isinstance(org, str) or not isinstance(claims["iat"], int):
            raise ValueError
        return uuid.UUID(org), claims["iat"]
    except ValueError:
        raise Unauthorized("invalid token: its org claim is not an organization id (a UUID "
                           "string); issue a new one with `haltless token create`") from None
