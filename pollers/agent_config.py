"""The edge agent's configuration: the contract's TOML ("Edge agent
configuration") as msgspec types, its defaults, and ``load_config``, which
checks the whole file and names the file and key of a mistake. The
protocol sections are the protocol configs (``pollers/opcua_config.py``,
``pollers/modbus_config.py``) plus where the device is and how often to
poll it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from ..core.config import Settings
from ..core.errors import ConfigError
from ..core.wire import describe_validation_error
from .modbus_config import ModbusConfig, validate_modbus_config
from .opcua_config import OpcuaConfig, validate_opcua_config

Interval = Annotated[float, Meta(ge=0.1, le=86400)]


class AgentOpcua(OpcuaConfig, forbid_unknown_fields=True, kw_only=True):
    endpoint: Annotated[str, Meta(min_length=1, max_length=512)]
    poll_interval: Interval = 10.0


class AgentModbus(ModbusConfig, forbid_unknown_fields=True, kw_only=True):
    host: Annotated[str, Meta(min_length=1, max_length=253)]
    port: Annotated[int, Meta(ge=1, le=65535)] = 502
    poll_interval: Interval = 10.0


class AgentSource(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    machine_identifier: Annotated[str, Meta(min_length=1, max_length=200)]
    protocol: Literal["opcua", "modbus"]
    opcua: AgentOpcua | None = None
    modbus: AgentModbus | None = None


class Buffer(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None
    max_readings: Annotated[int, Meta(ge=1000, le=100_000_000)] = 1_000_000
    when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    source: Annotated[list[AgentSource], Meta(min_length=1)]
    api_url: str | None = None
    api_key: str | None = None
    state_dir: str = "haltless-agent"
    status_interval: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    metrics_file: str | None = None  # default <state_dir>/metrics.prom; "" = none
    shutdown_flush_seconds: Annotated[float, Meta(ge=0, le=600)] = 10.0
    buffer: Buffer = msgspec.field(default_factory=Buffer)


def load_config(path: Path, env: dict | None = None) -> AgentConfig:
    """Parse and check the whole file; ConfigError names the file and key.
    api_url / api_key come from the file, else from the settings (``env``,
    default the process environment)."""
    settings = Settings.from_env(env)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        cfg = msgspec.toml.decode(raw, type=AgentConfig)
    except msgspec.ValidationError as exc:
        msg = describe_validation_error(exc, AgentConfig)
        raise ConfigError(f"{path}: {msg if not msg.startswith(':') else 'top level' + msg}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    names = set()
    for i, src in enumerate(cfg.source):
        at = f"{path}: source[{i}] ({src.name!r})"
        if src.name in names:
            raise ConfigError(f"{at}: name: another source is called {src.name!r}; names must differ")
        names.add(src.name)
        section = getattr(src, src.protocol)
        other = "modbus" if src.protocol == "opcua" else "opcua"
        if section is None:
            raise ConfigError(f"{at}: protocol is {src.protocol!r} but there is no "
                              f"[source.{src.protocol}] section")
        if getattr(src, other) is not None:
            raise ConfigError(f"{at}: protocol is {src.protocol!r} but it has a [source.{other}] "
                              "section; one source reads one device")
        try:
            reader_config(src)
        except ValueError as exc:
            raise ConfigError(f"{at}.{src.protocol}.{exc}") from None
    cfg.api_url = cfg.api_url or settings.api_url
    cfg.api_key = cfg.api_key or settings.api_key
    if not cfg.api_url:
        raise ConfigError(f"{path}: api_url: not set; put api_url = \"https://...\" in the file "
                          "or set HALTLESS_API_URL")
    parts = urlsplit(cfg.api_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: api_url: {cfg.api_url!r} is not an http(s) URL")
    if not cfg.api_key:
        raise ConfigError(f"{path}: api_key: not set; put api_key = \"hk_...\" in the file or set "
                          "HALTLESS_API_KEY")
    return cfg


def reader_config(src: AgentSource) -> OpcuaConfig | ModbusConfig:
    section = getattr(src, src.protocol)
    fields = msgspec.structs.asdict(section)
    if src.protocol == "opcua":
        cfg = OpcuaConfig(**{k: v for k, v in fields.items() if k not in ("endpoint", "poll_interval")})
        validate_opcua_config(cfg)
    else:
        cfg = ModbusConfig(**{k: v for k, v in fields.items() if k not in ("host", "port", "poll_interval")})
        validate_modbus_config(cfg)
    return cfg
