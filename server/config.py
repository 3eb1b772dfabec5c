"""One typed configuration, read from ``HALTLESS_*`` environment variables
(CLI flags override them), shared by the server, the pollers and the agent.

Parsing is strict: a bad value stops the process at start with a message
naming the variable, the value and what is allowed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number from {lo} to {hi}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"{name}={raw!r}: expected a whole number from {lo} to {hi}")
    return v


def _float(name: str, raw: str, lo: float, hi: float) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number from {lo} to {hi}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"{name}={raw!r}: expected a number from {lo} to {hi}")
    return v


@dataclass(frozen=True)
class Settings:
    """Every setting, its environment variable and its default.

    database_url      HALTLESS_DATABASE_URL  unset: embedded PostgreSQL under data_dir/pg
    data_dir          HALTLESS_DATA_DIR      ./haltless-data
    host, port        HALTLESS_HOST/PORT     127.0.0.1, 8000
    workers           HALTLESS_WORKERS       1 (HTTP worker processes)
    writer_connections HALTLESS_WRITER_CONNECTIONS 2 (COPY transactions in flight per worker)
    pool_size         HALTLESS_POOL_SIZE     8 (connections per worker, writers included)
    auth_cache_seconds HALTLESS_AUTH_CACHE_SECONDS 2 (API-key lookups cached this long;
                      a revoked key stops working within this time)
    jwt_secret        HALTLESS_JWT_SECRET    unset: generated once into data_dir/jwt-secret
    db_timeout        HALTLESS_DB_TIMEOUT    10 s to connect / run a statement
    log_level         HALTLESS_LOG_LEVEL     info
    """

    database_url: str | None = None
    data_dir: Path = Path("haltless-data")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    writer_connections: int = 2
    pool_size: int = 8
    auth_cache_seconds: float = 2.0
    jwt_secret: str | None = field(default=None, repr=False)
    db_timeout: float = 10.0
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        kw: dict = {}
        g = env.get
        if g("HALTLESS_DATABASE_URL"):
            url = g("HALTLESS_DATABASE_URL")
            if not url.startswith(("postgres://", "postgresql://")):
                raise ConfigError(
                    f"HALTLESS_DATABASE_URL={url.split('@')[-1]!r}: expected a postgresql:// URL")
            kw["database_url"] = url
        if g("HALTLESS_DATA_DIR"):
            kw["data_dir"] = Path(g("HALTLESS_DATA_DIR"))
        if g("HALTLESS_HOST"):
            kw["host"] = g("HALTLESS_HOST")
        if g("HALTLESS_PORT"):
            kw["port"] = _int("HALTLESS_PORT", g("HALTLESS_PORT"), 0, 65535)
        if g("HALTLESS_WORKERS"):
            kw["workers"] = _int("HALTLESS_WORKERS", g("HALTLESS_WORKERS"), 1, 256)
        if g("HALTLESS_WRITER_CONNECTIONS"):
            kw["writer_connections"] = _int(
                "HALTLESS_WRITER_CONNECTIONS", g("HALTLESS_WRITER_CONNECTIONS"), 1, 32)
        if g("HALTLESS_POOL_SIZE"):
            kw["pool_size"] = _int("HALTLESS_POOL_SIZE", g("HALTLESS_POOL_SIZE"), 2, 200)
        if g("HALTLESS_AUTH_CACHE_SECONDS") is not None and g("HALTLESS_AUTH_CACHE_SECONDS") != "":
            kw["auth_cache_seconds"] = _float(
                "HALTLESS_AUTH_CACHE_SECONDS", g("HALTLESS_AUTH_CACHE_SECONDS"), 0, 3600)
        if g("HALTLESS_JWT_SECRET"):
            secret = g("HALTLESS_JWT_SECRET")
            if len(secret) < 32:
                raise ConfigError("HALTLESS_JWT_SECRET: must be at least 32 characters")
            kw["jwt_secret"] = secret
        if g("HALTLESS_DB_TIMEOUT"):
            kw["db_timeout"] = _float("HALTLESS_DB_TIMEOUT", g("HALTLESS_DB_TIMEOUT"), 0.1, 600)
        if g("HALTLESS_LOG_LEVEL"):
            lvl = g("HALTLESS_LOG_LEVEL").lower()
            if lvl not in ("debug", "info", "warning", "error"):
                raise ConfigError(
                    f"HALTLESS_LOG_LEVEL={lvl!r}: expected debug, info, warning or error")
            kw["log_level"] = lvl
        kw.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        if kw.get("pool_size", cls.pool_size) <= kw.get("writer_connections", cls.writer_connections):
            raise ConfigError("HALTLESS_POOL_SIZE must be larger than HALTLESS_WRITER_CONNECTIONS")
        return cls(**kw)
