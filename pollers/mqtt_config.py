"""The config of an MQTT source (the ``config`` of an ingest source with
``"protocol": "mqtt"``): the msgspec types, their defaults and the checks
msgspec cannot express. Data only: no device library is imported here, so
the HTTP workers validate configs without loading gmqtt or protobuf (the
subscriber is ``pollers/mqtt.py``, the Sparkplug host ``pollers/sparkplug.py``).

Two payload formats:

* ``sparkplug_b``: Sparkplug B 3.0 (``spBv1.0/<group_id>/<verb>/<edge node>[/<device>]``,
  protobuf payloads); haltless is a host application, the primary one when
  ``host_id`` is set.
* ``json``: the contract's ``{"readings": [...]}`` body on any topic of
  ``topics``, validated exactly as ``POST /api/v1/ingest`` validates it.
"""
from __future__ import annotations

import re
import ssl
import uuid
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

NAMESPACE = "spBv1.0"
DEFAULT_TOPICS = ("haltless/#",)

Topic = Annotated[str, Meta(min_length=1, max_length=1024)]
# Sparkplug ids are topic levels: spBv1.0/<group_id>/NDATA/<edge_node_id>/<device_id>.
SparkplugId = Annotated[str, Meta(min_length=1, max_length=200)]


class MqttTls(msgspec.Struct, forbid_unknown_fields=True):
    """TLS to the broker. ``{}`` verifies the broker's certificate against the
    system's trust store and the host name."""
    # PEM of the CA certificate(s) that signed the broker's certificate.
    ca_certificate: Annotated[str, Meta(min_length=1, max_length=65536)] | None = None
    # Hex SHA-256 of the broker's certificate (DER). With a pin and no
    # ca_certificate, only the pin is checked (self-signed brokers).
    server_certificate_sha256: str | None = None
    # The name the certificate must carry (and SNI); default: the source's host.
    server_name: Annotated[str, Meta(min_length=1, max_length=253)] | None = None


class MqttConfig(msgspec.Struct, forbid_unknown_fields=True):
    format: Literal["sparkplug_b", "json"]
    # json: the MQTT topic filters to subscribe to (default haltless/#).
    topics: Annotated[list[Topic], Meta(min_length=1, max_length=100)] | None = None
    # sparkplug_b: the Sparkplug group(s) to follow; left out, every group.
    group_id: SparkplugId | Annotated[list[SparkplugId], Meta(min_length=1, max_length=100)] | None = None
    # sparkplug_b: be the primary host application under this id (STATE messages).
    host_id: SparkplugId | None = None
    username: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    password: Annotated[str, Meta(max_length=256)] | None = None  # write-only
    tls: MqttTls | None = None
    # Default haltless-<12 hex of the source id>: the same in every poller
    # process, so a json source's persistent session follows its lease.
    client_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    qos: Literal[0, 1] = 1
    timeout_seconds: Annotated[float, Meta(gt=0, le=60)] = 5.0


def groups(cfg: MqttConfig) -> list[str] | None:
    """The Sparkplug groups followed; None = every group."""
    if cfg.group_id is None:
        return None
    return [cfg.group_id] if isinstance(cfg.group_id, str) else list(cfg.group_id)


def subscriptions(cfg: MqttConfig) -> list[str]:
    """The topic filters a source subscribes to. A primary host also
    subscribes to its own STATE topic (Sparkplug 3.0, host session
    establishment)."""
    if cfg.format == "json":
        return list(cfg.topics or DEFAULT_TOPICS)
    gs = groups(cfg)
    out = [f"{NAMESPACE}/#"] if gs is None else [f"{NAMESPACE}/{g}/#" for g in gs]
    if cfg.host_id is not None and gs is not None:
        out.append(state_topic(cfg.host_id))
    return out


def state_topic(host_id: str) -> str:
    return f"{NAMESPACE}/STATE/{host_id}"


def client_id(cfg: MqttConfig, source_id: uuid.UUID) -> str:
    return cfg.client_id or f"haltless-{source_id.hex[:12]}"


def check_filter(topic: str) -> None:
    """An MQTT topic filter (MQTT 5.0 4.7): '#' only as the whole last level,
    '+' only as a whole level; ValueError says what is wrong."""
    if "\x00" in topic:
        raise ValueError(f"{topic[:80]!r} contains a NUL character")
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        raise ValueError("a topic filter is at most 65,535 bytes")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{topic[:80]!r}: '#' must be a whole level and the last one "
                             "(sensors/#)")
        if "+" in level and level != "+":
            raise ValueError(f"{topic[:80]!r}: '+' must be a whole level (plant/+/temperature)")


_ID_FORBIDDEN = re.compile(r"[/+#\x00]")


def check_sparkplug_id(value: str) -> None:
    """Sparkplug 3.0 (topics): group, edge node, device and host ids are single
    topic levels, so they must not contain '/', '+' or '#'."""
    bad = _ID_FORBIDDEN.search(value)
    if bad:
        raise ValueError(f"{value[:80]!r} must not contain {bad.group()!r} (a Sparkplug id is "
                         "one topic level: no '/', '+' or '#')")


def validate_mqtt_config(cfg: MqttConfig) -> None:
    """Checks msgspec cannot express; raises ValueError naming the field path."""
    if cfg.format == "json":
        for name in ("group_id", "host_id"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"{name}: only for format 'sparkplug_b'; a json source reads "
                                 "the topics in 'topics'")
        for i, topic in enumerate(cfg.topics or ()):
            try:
                check_filter(topic)
            except ValueError as exc:
                raise ValueError(f"topics[{i}]: {exc}") from None
    else:
        if cfg.topics is not None:
            raise ValueError("topics: only for format 'json'; a Sparkplug source subscribes to "
                             "spBv1.0/<group_id>/# (set group_id, or leave it out for every group)")
        gs = groups(cfg) or []
        for i, g in enumerate(gs):
            try:
                check_sparkplug_id(g)
            except ValueError as exc:
                where = "group_id" if isinstance(cfg.group_id, str) else f"group_id[{i}]"
                raise ValueError(f"{where}: {exc}") from None
            if g == "STATE":
                raise ValueError("group_id: 'STATE' is the host applications' topic, not a group")
        if len(set(gs)) != len(gs):
            raise ValueError("group_id: a group is listed twice")
        if cfg.host_id is not None:
            try:
                check_sparkplug_id(cfg.host_id)
            except ValueError as exc:
                raise ValueError(f"host_id: {exc}") from None
    if cfg.password is not None and cfg.username is None:
        raise ValueError("username: required when password is set")
    if cfg.password is not None and cfg.tls is None:
        raise ValueError("password: needs tls; without it the password would travel in clear "
                         "text over the network (set \"tls\": {} and the broker's TLS port)")
    if cfg.tls is not None:
        pin = cfg.tls.server_certificate_sha256
        if pin is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pin):
            raise ValueError(f"tls.server_certificate_sha256: {pin[:80]!r} must be 64 hex "
                             "characters (the SHA-256 of the broker's certificate in DER form)")
        if cfg.tls.ca_certificate is not None:
            try:
                ssl.create_default_context(cadata=cfg.tls.ca_certificate)
            except (ssl.SSLError, ValueError, TypeError):  # TypeError: not ASCII
                raise ValueError("tls.ca_certificate: not a PEM certificate (-----BEGIN "
                                 "CERTIFICATE----- ...)") from None
