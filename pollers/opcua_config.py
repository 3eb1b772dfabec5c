"""The config of an OPC-UA source (the ``config`` of an ingest source, and
``[source.opcua]`` of the edge agent's TOML): the msgspec types, their
defaults and the checks msgspec cannot express. Data only: no device
library is imported here, so the HTTP workers validate configs without
loading asyncua (the poll reader is ``pollers/opcua.py``, the subscriber
``pollers/opcua_subscription.py``).

``mode`` "poll" (the default) reads every node each poll interval.
``mode`` "subscribe" creates one subscription with a monitored item per
node: the server samples each node every ``sampling_interval_ms`` and sends
what changed every ``publishing_interval_ms``. In subscribe mode:

* ``publishing_interval_ms`` defaults to the source's poll interval
  (``poll_interval_seconds``, the agent's ``poll_interval``): that is all
  the poll interval means there, how often the server sends what changed;
* ``sampling_interval_ms`` defaults to the publishing interval;
* ``deadband_absolute`` (a change smaller than this is not sent) or
  ``deadband_percent`` (of the node's EURange, which the node must have);
* ``queue_size`` (samples the server keeps per node between two publishes)
  defaults to twice the samples of one publishing interval, at most 1,000,
  so that every sample arrives, not just the last of each interval.
"""
from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta


Milliseconds = Annotated[float, Meta(ge=0, le=86_400_000)]


class OpcuaNode(msgspec.Struct, forbid_unknown_fields=True):
    node_id: Annotated[str, Meta(min_length=1, max_length=512)]
    metric_name: Annotated[str, Meta(min_length=1, max_length=200)]
    unit: Annotated[str, Meta(max_length=64)] | None = None
    # mode "subscribe" only
    sampling_interval_ms: Milliseconds | None = None  # 0: the server's fastest rate
    deadband_absolute: Annotated[float, Meta(ge=0)] | None = None
    deadband_percent: Annotated[float, Meta(gt=0, le=100)] | None = None
    queue_size: Annotated[int, Meta(ge=1, le=10_000)] | None = None


SUBSCRIBE_NODE_KEYS = ("sampling_interval_ms", "deadband_absolute", "deadband_percent", "queue_size")


class OpcuaConfig(msgspec.Struct, forbid_unknown_fields=True):
    nodes: Annotated[list[OpcuaNode], Meta(min_length=1, max_length=20000)]
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    security_policy: Literal["Basic256Sha256"] = "Basic256Sha256"
    username: Annotated[str, Meta(max_length=256)] | None = None
    password: Annotated[str, Meta(max_length=256)] | None = None
    # hex SHA-256 of the server certificate (DER); None = trust on first use
    server_certificate_sha256: str | None = None
    timeout_seconds: Annotated[float, Meta(gt=0, le=60)] = 5.0
    mode: Literal["poll", "subscribe"] = "poll"
    publishing_interval_ms: Annotated[float, Meta(ge=10, le=86_400_000)] | None = None


_NODE_ID_HELP = "use ns=<n>;i=<number>, ns=<n>;s=<string>, ns=<n>;g=<guid>, or ns=<n>;b=<base64>"
_NODE_ID_RE = re.compile(r"(?:ns=([0-9]{1,5});)?([isgb])=(.+)", re.DOTALL)
_GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def node_id_parts(text: str) -> tuple[int, str, int | str | uuid.UUID | bytes]:
    """(namespace index, kind "i"/"s"/"g"/"b", identifier) of one of the four
    node id formats; a missing ``ns=<n>;`` means ns=0. ValueError says what
    is wrong. (asyncua's ``ua.NodeId.from_string`` takes malformed base64
    as raw bytes: another node.)"""
    m = _NODE_ID_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a node id; {_NODE_ID_HELP}")
    ns, kind, ident = int(m.group(1) or 0), m.group(2), m.group(3)
    if ns > 65535:
        raise ValueError(f"{text!r}: namespace index {ns} is out of range (0-65535)")
    if kind == "i":
        if not re.fullmatch(r"[0-9]{1,10}", ident) or int(ident) > 0xFFFFFFFF:
            raise ValueError(f"{text!r}: a numeric identifier must be a whole number 0-4294967295")
        return ns, kind, int(ident)
    if kind == "s":
        return ns, kind, ident
    if kind == "g":
        if not _GUID_RE.fullmatch(ident):
            raise ValueError(f"{text!r}: a GUID identifier looks like 09087e75-8e5e-499b-954f-f2a9603db28a")
        return ns, kind, uuid.UUID(ident)
    try:
        raw = base64.b64decode(ident, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    # only canonical base64 round-trips; that also keeps raw_tag() collision-free
    if not raw or base64.b64encode(raw).decode("ascii") != ident:
        raise ValueError(f"{text!r}: an opaque identifier must be non-empty, padded base64 "
                         "(like M/RbKBsRVkePCePcx24oRA==)")
    return ns, kind, raw


def raw_tag(node_id: str) -> str:
    """A reading's raw_tag: the node id exactly as configured, every '=' dropped
    and every ';' replaced by '_'.

    ``ns=2;i=1001`` -> ``ns2_i1001``; ``ns=2;s=Temperature.Value`` ->
    ``ns2_sTemperature.Value``; ``ns=2;g=09087e75-...`` -> ``ns2_g09087e75-...``;
    ``ns=2;b=M/RbKBsRVkePCePcx24oRA==`` -> ``ns2_bM/RbKBsRVkePCePcx24oRA``;
    ``i=85`` -> ``i85`` (no ns is added). Dropping base64 padding loses nothing
    (its length implies it); only string ids that themselves contain '=' or ';'
    can collide (``s=a=b`` and ``s=ab``).
    """
    return node_id.replace("=", "").replace(";", "_")


_ONLY_SUBSCRIBE = ("takes effect only with mode \"subscribe\" (polling reads every value each "
                   "interval); set mode to \"subscribe\" or remove it")


def validate_opcua_config(cfg: OpcuaConfig) -> None:
    """Checks msgspec cannot express; raises ValueError naming the field path."""
    for i, node in enumerate(cfg.nodes):
        try:
            node_id_parts(node.node_id)
        except ValueError as exc:
            raise ValueError(f"nodes[{i}].node_id: {exc}") from None
        if cfg.mode == "poll":
            for key in SUBSCRIBE_NODE_KEYS:
                if getattr(node, key) is not None:
                    raise ValueError(f"nodes[{i}].{key}: {_ONLY_SUBSCRIBE}")
        if node.deadband_absolute is not None and node.deadband_percent is not None:
            raise ValueError(f"nodes[{i}].deadband_percent: set deadband_absolute or deadband_percent, "
                             "not both")
        if node.deadband_absolute is not None and not math.isfinite(node.deadband_absolute):
            raise ValueError(f"nodes[{i}].deadband_absolute: must be a finite number")
    if cfg.mode == "poll" and cfg.publishing_interval_ms is not None:
        raise ValueError(f"publishing_interval_ms: {_ONLY_SUBSCRIBE}")
    if (cfg.username is None) != (cfg.password is None):
        given, missing = ("username", "password") if cfg.password is None else ("password", "username")
        raise ValueError(f"{missing}: required when {given} is set")
    if cfg.username == "":
        raise ValueError("username: must not be empty")
    if cfg.username is not None and cfg.security_mode == "None":
        raise ValueError("username: needs security_mode 'Sign' or 'SignAndEncrypt'; with 'None' the password "
                         "would travel in clear text over the network")
    pin = cfg.server_certificate_sha256
    if pin is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pin):
        raise ValueError(f"server_certificate_sha256: {pin!r} must be 64 hex characters "
                         "(the SHA-256 of the server certificate in DER form)")
    if pin is not None and cfg.security_mode == "None":
        raise ValueError("server_certificate_sha256: a pin only takes effect with security_mode 'Sign' or "
                         "'SignAndEncrypt'; with 'None' the server certificate is not used")


def publishing_interval_ms(cfg: OpcuaConfig, poll_interval_s: float) -> float:
    """The publishing interval of a subscribe-mode source: its own, else its poll interval."""
    return cfg.publishing_interval_ms if cfg.publishing_interval_ms is not None else poll_interval_s * 1000


def sampling_interval_ms(node: OpcuaNode, publishing_ms: float) -> float:
    return node.sampling_interval_ms if node.sampling_interval_ms is not None else publishing_ms


def queue_size(node: OpcuaNode, publishing_ms: float) -> int:
    """Samples the server keeps per node between publishes: twice those of an
    interval (one publish may be late), at most 1,000, unless configured."""
    if node.queue_size is not None:
        return node.queue_size
    sampling = sampling_interval_ms(node, publishing_ms)
    return max(1, min(1000, 2 * math.ceil(publishing_ms / max(sampling, 1.0))))


def endpoint_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"opc.tcp://{host}:{port}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``opc.tcp://host:port[/path]`` -> (host, port)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"endpoint {endpoint!r} {why}; use opc.tcp://host:port, e.g. opc.tcp://192.168.1.20:4840")

    parts = urlsplit(endpoint.strip())
    if parts.scheme.lower() != "opc.tcp":
        raise bad("is not an opc.tcp:// URL")
    if "@" in parts.netloc:
        raise bad("contains credentials (set username/password in the config instead)")
    try:
        port = parts.port
    except ValueError:
        raise bad("has an invalid port") from None
    if not parts.hostname:
        raise bad("has no host")
    if not port:
        raise bad("has no port")
    return parts.hostname, port
