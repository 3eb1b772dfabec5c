"""One typed configuration, read from ``HALTLESS_*`` environment variables
(CLI flags override them), shared by the server, the pollers and the agent.

Every variable is named once, in ``VARIABLES`` below, with its parser; the
README's table lists the same rows. Parsing is strict: a bad value stops the
process at start with a message naming the variable, the value and what is
allowed. ``Settings.to_env()`` is the way back, for the child processes
(HTTP workers, pollers) that a parent has already prepared.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import ConfigError

MAX_WORKERS = 256


def _number(kind: type, lo, hi):
    what = "a whole number" if kind is int else "a number"

    def parse(name: str, raw: str):
        try:
            v = kind(raw)
        except ValueError:
            v = None
        if v is None or not lo <= v <= hi:
            raise ConfigError(f"{name}={raw!r}: expected {what} from {lo} to {hi}")
        return v
    return parse


def _int(lo: int, hi: int):
    return _number(int, lo, hi)


def _float(lo: float, hi: float):
    return _number(float, lo, hi)


def _text(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _choice(*allowed: str):
    def parse(name: str, raw: str) -> str:
        v = raw.lower()
        if v not in allowed:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
        return v
    return parse


def database_url(name: str, raw: str) -> str:
    """A postgresql:// URL, checked part by part so the message names the bad
    part (the password is never echoed)."""
    try:
        u = urlsplit(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: not a URL ({exc}); expected postgresql://USER@HOST:PORT/DATABASE") from None
    if u.scheme not in ("postgres", "postgresql"):
        shown = f"{u.scheme}://" if u.scheme else repr(raw.split("@")[-1][:40])
        raise ConfigError(f"{name}: the scheme is {shown}; expected a postgresql:// URL "
                          "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE)")
    try:
        port = u.port
    except ValueError:
        bad = u.netloc.rpartition("@")[2].rpartition(":")[2]
        raise ConfigError(f"{name}: port {bad!r} is not a port number (1-65535)") from None
    if port == 0:
        raise ConfigError(f"{name}: port 0 is not a port number (1-65535)")
    if not unquote(u.path.lstrip("/")) and "dbname=" not in u.query:
        raise ConfigError(f"{name}: no database name; expected postgresql://USER@HOST:PORT/DATABASE")
    return raw


def _jwt_secret(name: str, raw: str) -> str:
    if len(raw) < 32:
        raise ConfigError(f"{name}: must be at least 32 characters")
    return raw


def encryption_key(name: str, raw: str) -> bytes:
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{name}: expected base64 of 32 bytes, e.g. from `openssl rand -base64 32`")
    return key


def poll_allow(name: str, raw: str) -> tuple:
    nets = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not a CIDR like 10.0.0.0/8") from None
    return tuple(nets)


# field -> (environment variable, parser). The only place a variable is named.
VARIABLES = {
    "database_url": ("HALTLESS_DATABASE_URL", database_url),
    "data_dir": ("HALTLESS_DATA_DIR", _path),
    "host": ("HALTLESS_HOST", _text),
    "port": ("HALTLESS_PORT", _int(1, 65535)),
    "workers": ("HALTLESS_WORKERS", _int(1, MAX_WORKERS)),
    "writer_connections": ("HALTLESS_WRITER_CONNECTIONS", _int(1, 32)),
    "pool_size": ("HALTLESS_POOL_SIZE", _int(2, 200)),
    "auth_cache_seconds": ("HALTLESS_AUTH_CACHE_SECONDS", _float(0, 3600)),
    "jwt_secret": ("HALTLESS_JWT_SECRET", _jwt_secret),
    "encryption_key": ("HALTLESS_ENCRYPTION_KEY", encryption_key),
    "poll_allow": ("HALTLESS_POLL_ALLOW", poll_allow),
    "db_timeout": ("HALTLESS_DB_TIMEOUT", _float(0.1, 600)),
    "retention_days": ("HALTLESS_RETENTION_DAYS", _int(1, 36500)),
    "poll_flush_seconds": ("HALTLESS_POLL_FLUSH_SECONDS", _float(0, 60)),
    "mqtt_memory_mb": ("HALTLESS_MQTT_MEMORY_MB", _int(1, 1_000_000)),
    "rate_limit": ("HALTLESS_RATE_LIMIT", _float(0.001, 1e9)),
    "header_timeout": ("HALTLESS_HEADER_TIMEOUT", _float(0.5, 600)),
    "body_timeout": ("HALTLESS_BODY_TIMEOUT", _float(0.5, 600)),
    "send_timeout": ("HALTLESS_SEND_TIMEOUT", _float(0.5, 3600)),
    "body_memory_mb": ("HALTLESS_BODY_MEMORY_MB", _int(11, 1_000_000)),
    "max_connections": ("HALTLESS_MAX_CONNECTIONS", _int(16, 1_000_000)),
    "log_level": ("HALTLESS_LOG_LEVEL", _choice("debug", "info", "warning", "error")),
    "api_url": ("HALTLESS_API_URL", _text),
    "api_key": ("HALTLESS_API_KEY", _text),
    # Internal: set by `haltless serve` / `haltless pollers` for their children.
    "prepared": ("HALTLESS_PREPARED", _choice("embedded", "external")),
    "run_dir": ("HALTLESS_RUN_DIR", _path),
}


@dataclass(frozen=True)
class Settings:
    """Every setting; see VARIABLES for its environment variable.

    database_url       unset: the embedded PostgreSQL under data_dir/pg
    data_dir           ./haltless-data (embedded PostgreSQL, generated secrets, pki/)
    host, port         127.0.0.1, 8000
    workers            1 HTTP worker process (at most 256)
    writer_connections 1 COPY transaction in flight per worker (bigger groups)
    pool_size          8 connections per process, writers included
    auth_cache_seconds 2: API-key lookups are cached this long (a revoked key
                       stops working within this time)
    jwt_secret         unset: generated once into data_dir/jwt-secret
    encryption_key     unset: generated once into data_dir/encryption-key
                       (base64 of 32 bytes; seals write-only source secrets)
    poll_allow         unset: every address but loopback, link-local, metadata,
                       this host's own and non-unicast; else only these CIDRs
    db_timeout         10 s to connect / run a statement
    retention_days     unset: keep everything; else readings older than this
                       are refused and whole block partitions past it dropped
    poll_flush_seconds 10: `haltless pollers` commits what its sources polled
                       together this often (0: every poll as it comes)
    mqtt_memory_mb     64 MB of MQTT messages received and not yet committed per
                       poller process; QoS 0 data past it is dropped and counted
    rate_limit         unset: none; else readings/s per API key (429 beyond it)
    header_timeout     10 s for a connection to send its request headers
    body_timeout       10 s a request body may stall (408), 6x that in all
    send_timeout       30 s a streamed answer's chunk (CSV) may wait for the client
                       to read; then the stream ends and its connection is freed
    body_memory_mb     64 MB of request bodies held at once per worker (503 beyond)
    max_connections    10,000 open connections per worker
    log_level          info
    api_url, api_key   the edge agent's server and key (override its TOML)
    prepared           set by a parent process that already did runtime.prepare()
    run_dir            set by `haltless serve`: its private directory for what the
                       workers share (metrics, rate-limit buckets)
    """

    database_url: str | None = field(default=None, repr=False)
    data_dir: Path = Path("haltless-data")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    writer_connections: int = 1
    pool_size: int = 8
    auth_cache_seconds: float = 2.0
    jwt_secret: str | None = field(default=None, repr=False)
    encryption_key: bytes | None = field(default=None, repr=False)
    poll_allow: tuple | None = None
    db_timeout: float = 10.0
    retention_days: int | None = None
    poll_flush_seconds: float = 10.0
    mqtt_memory_mb: int = 64
    rate_limit: float | None = None
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    send_timeout: float = 30.0
    body_memory_mb: int = 64
    max_connections: int = 10_000
    log_level: str = "info"
    api_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    prepared: str | None = None
    run_dir: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        """Settings from ``env`` (default: the process environment); keyword
        overrides (CLI flags, already typed or as text) win over it."""
        env = os.environ if env is None else env
        kw: dict = {}
        for name, (var, parse) in VARIABLES.items():
            raw = env.get(var)
            if raw is not None and raw != "":
                kw[name] = parse(var, raw)
        unknown = set(overrides) - set(VARIABLES)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        for name, value in overrides.items():
            if value is None:
                continue
            var, parse = VARIABLES[name]
            kw[name] = parse(var, value) if isinstance(value, str) else value
        s = cls(**kw)
        if s.pool_size <= s.writer_connections:
            raise ConfigError("HALTLESS_POOL_SIZE must be larger than HALTLESS_WRITER_CONNECTIONS")
        return s

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child process these same settings."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or v == f.default:
                continue
            if f.name == "encryption_key":
                v = base64.b64encode(v).decode()
            elif f.name == "poll_allow":
                v = ",".join(map(str, v))
            out[VARIABLES[f.name][0]] = str(v)
        return out

    def but(self, **changes) -> "Settings":
        return replace(self, **changes)
