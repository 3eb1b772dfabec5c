"""A Sparkplug B host application's view of the edge nodes it hears
(Sparkplug 3.0): births, data, deaths, sequence numbers, aliases and rebirth
requests, as a state machine without I/O. ``pollers/mqtt.py`` feeds it the
messages of a subscription; it answers with the readings to store and the
rebirth requests to publish.

    topic + payload --handle()--> readings (core.wire.Reading), NCMD topic or None

* NBIRTH / DBIRTH give, per edge node and device, the metrics' names,
  datatypes and aliases (and their current values, which are stored).
  NDATA / DDATA may carry aliases only.
* Every message of an edge node but NDEATH carries ``seq``, +1 mod 256 from
  the NBIRTH's. Data of a node we have no birth of (we joined late, or
  reconnected), an alias or device its births did not declare, or a ``seq``
  out of order: its data is discarded (counted) until a new NBIRTH, and an
  NCMD ``Node Control/Rebirth`` = true asks for one (again after 10 s,
  doubling up to 5 min, while none comes). The reorder timeout is zero: a
  broker delivers one client's messages in order (MQTT 4.6), so on a single
  broker a gap is a loss, not a reordering.
* NDEATH (whose bdSeq matches the NBIRTH's) and DDEATH mark the node (with
  its devices) or the device offline.
* Values: integers (signed ones as two's complement of their width), floats
  and Boolean (1/0) are stored, ``is_historical`` ones too; ``is_null`` is no
  reading; strings, DateTime, bytes, arrays, datasets and templates are
  counted by kind in ``skipped`` and not stored. A metric's timestamp is the
  reading's, else the payload's, else the time of receipt (0 counts as
  none).
* The machine is the device id (or the edge node id for node metrics), and
  the metric its name. When the source names one machine, every device goes
  to it and the metric name is ``<group>/<edge node>[/<device>]/<metric>``:
  a series is a machine and a metric (README "Series identity"), so the
  devices' metrics of one name stay apart. raw_tag is
  ``<group>/<edge node>[/<device>]`` either way.
"""
from __future__ import annotations

import datetime as _dt
import time
from collections import Counter
from typing import NamedTuple

from ..core.wire import Reading
from . import sparkplug_b as pb
from .mqtt_config import NAMESPACE

UTC = _dt.timezone.utc
BOOLEAN = 11
SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}
NUMERIC = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, BOOLEAN}
# What a metric of each datatype is counted as when it is not stored.
SKIPPED_KIND = {12: "string", 14: "string", 15: "string", 13: "datetime", 16: "dataset",
                17: "bytes", 18: "bytes", 19: "template", 20: "property_set",
                21: "property_set", **{t: "array" for t in range(22, 35)}}
FIELD_KIND = {"string_value": "string", "bytes_value": "bytes", "dataset_value": "dataset",
              "template_value": "template", "extension_value": "extension"}
REBIRTH_METRIC = "Node Control/Rebirth"
REBIRTH_FIRST, REBIRTH_MAX = 10.0, 300.0  # seconds between rebirth requests to one node
MAX_TEXT = 200  # machine_identifier, metric_name and raw_tag (the contract's bounds)
MAX_UNIT = 64
MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z


# The field a value of each stored datatype travels in (Sparkplug 3.0 "Datatype Details").
VALUE_FIELD = {1: "int_value", 2: "int_value", 3: "int_value", 4: "long_value", 5: "int_value",
               6: "int_value", 7: "int_value", 8: "long_value", 9: "float_value",
               10: "double_value", 11: "boolean_value"}


class MetricDef(NamedTuple):
    name: str
    datatype: int
    unit: str | None
    skip: str | None  # why it is not stored (a kind, e.g. "string"), or None
    field: str = ""   # where its value travels
    bits: int = 0     # a signed integer's width


class Device:
    __slots__ = ("device_id", "online", "since", "by_alias", "by_name", "machine", "raw_tag")

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.online = False
        self.since: float | None = None
        self.by_alias: dict[int, MetricDef] | None = None  # None: no DBIRTH in this session
        self.by_name: dict[str, MetricDef] = {}
        self.machine: str | None = None
        self.raw_tag = ""


class Node:
    __slots__ = ("group", "node_id", "bd_seq", "next_seq", "online", "since", "by_alias",
                 "by_name", "devices", "awaiting", "rebirth_at", "rebirth_wait", "machine",
                 "raw_tag")

    def __init__(self, group: str, node_id: str) -> None:
        self.group = group
        self.node_id = node_id
        self.bd_seq: int | None = None
        self.next_seq: int | None = None
        self.online = False
        self.since: float | None = None
        self.by_alias: dict[int, MetricDef] | None = None  # None: no NBIRTH in this session
        self.by_name: dict[str, MetricDef] = {}
        self.devices: dict[str, Device] = {}
        self.awaiting = False  # data discarded until an NBIRTH
        self.rebirth_at = 0.0  # monotonic time the next rebirth request may go out
        self.rebirth_wait = REBIRTH_FIRST
        self.machine: str | None = None
        self.raw_tag = ""


class Discard(Exception):
    """This node's session is broken (why: str(exc)); wait for its rebirth."""


def _text_ok(v: str, limit: int = MAX_TEXT) -> bool:
    return 0 < len(v) <= limit and "\x00" not in v


def rebirth_request(now_ms: int | None = None) -> bytes:
    """The NCMD payload that asks an edge node for its births (Sparkplug 3.0
    "Node Control/Rebirth"): one Boolean metric, true."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    p = pb.Payload(timestamp=now_ms)
    p.metrics.add(name=REBIRTH_METRIC, timestamp=now_ms, datatype=BOOLEAN, boolean_value=True)
    return p.SerializeToString()


class SparkplugHost:
    """The edge nodes of one source's subscription and what became of their
    messages. ``machine``: every reading goes to this machine_identifier
    (the source's machine_id), else to the device (or edge node) id."""

    def __init__(self, machine: str | None = None, clock=time.monotonic) -> None:
        self.machine = machine
        self.clock = clock
        self.nodes: dict[tuple[str, str], Node] = {}
        self.messages = 0
        self.discarded = 0
        self.rebirths_requested = 0
        self.skipped: Counter[str] = Counter()

    # ------------------------------------------------------------------ entry point

    def handle(self, topic: str, payload: bytes, now: float | None = None
               ) -> tuple[list[Reading], str | None]:
        """One message: (readings to store, NCMD topic to send a rebirth request to or None).
        ``now`` is the time of receipt (Unix seconds)."""
        now = time.time() if now is None else now
        parts = topic.split("/") if isinstance(topic, str) else []
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE or parts[1] == "STATE":
            return [], None  # not Sparkplug data (STATE is handled by the subscriber)
        group, verb, node_id = parts[1], parts[2], parts[3]
        device_id = parts[4] if len(parts) == 5 else None
        if verb in ("NCMD", "DCMD"):
            return [], None  # commands, ours or another host's
        if verb not in _VERBS or (device_id is None) != (verb in _NODE_VERBS):
            self.skipped["not_sparkplug"] += 1
            return [], None
        self.messages += 1
        p = pb.Payload()
        try:
            p.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: malformed
            self.skipped["malformed"] += 1
            return [], None
        node = self.nodes.get((group, node_id))
        if node is None:
            node = self.nodes[(group, node_id)] = Node(group, node_id)
            node.machine = self._machine_for(node_id)
            node.raw_tag = f"{group}/{node_id}"
        try:
            if verb == "NBIRTH":
                return self._nbirth(node, p, now), None
            if verb == "NDEATH":
                self._ndeath(node, p, now)
                return [], None
            if node.by_alias is None or node.awaiting:
                raise Discard("no NBIRTH of this session")
            self._check_seq(node, p)
            if verb == "NDATA":
                return self._data(node.by_alias, node.by_name, node.machine, node.raw_tag, p,
                                  now), None
            device = node.devices.get(device_id)
            if verb == "DBIRTH":
                if device is None:
                    device = node.devices[device_id] = Device(device_id)
                    device.machine = self._machine_for(device_id)
                    device.raw_tag = f"{group}/{node_id}/{device_id}"
                return self._dbirth(device, p, now), None
            if device is None or device.by_alias is None:
                raise Discard(f"no DBIRTH of device {device_id!r}")
            if verb == "DDEATH":
                device.online, device.since, device.by_alias = False, now, None
                return [], None
            return self._data(device.by_alias, device.by_name, device.machine, device.raw_tag,
                              p, now), None
        except Discard:
            self.discarded += 1
            node.awaiting = True
            return [], self._rebirth(node)

    def state(self) -> list[Node]:
        return list(self.nodes.values())

    def connection_lost(self, now: float | None = None) -> None:
        """Our session to the broker ended: what was missed meanwhile is
        unknown, so every node needs a birth again (requested when its next
        message comes) and shows offline until then."""
        now = time.time() if now is None else now
        for node in self.nodes.values():
            node.by_alias, node.next_seq, node.awaiting = None, None, False
            node.rebirth_at, node.rebirth_wait = 0.0, REBIRTH_FIRST
            if node.online:
                node.online, node.since = False, now
            for d in node.devices.values():
                d.by_alias = None
                if d.online:
                    d.online, d.since = False, now

    # ------------------------------------------------------------------ messages

    def _nbirth(self, node: Node, p, now: float) -> list[Reading]:
        node.bd_seq = None
        node.next_seq = (p.seq + 1) % 256 if p.HasField("seq") else None
        node.online, node.since, node.awaiting = True, now, False
        node.rebirth_at, node.rebirth_wait = 0.0, REBIRTH_FIRST  # a new break asks at once
        for d in node.devices.values():  # a new session: every device births again
            d.by_alias = None
            if d.online:
                d.online, d.since = False, now
        for m in p.metrics:
            if m.name == "bdSeq":
                node.bd_seq = _integer(m)
        node.by_alias, node.by_name = self._births(p, self._prefix(node.raw_tag))
        return self._data(node.by_alias, node.by_name, node.machine, node.raw_tag, p, now)

    def _dbirth(self, device: Device, p, now: float) -> list[Reading]:
        device.by_alias, device.by_name = self._births(p, self._prefix(device.raw_tag))
        device.online, device.since = True, now
        return self._data(device.by_alias, device.by_name, device.machine, device.raw_tag, p, now)

    def _ndeath(self, node: Node, p, now: float) -> None:
        bd = next((_integer(m) for m in p.metrics if m.name == "bdSeq"), None)
        if node.bd_seq is not None and bd is not None and bd != node.bd_seq:
            # The will of an earlier session, delivered after the new NBIRTH.
            self.skipped["stale_death"] += 1
            return
        node.online, node.since = False, now
        node.by_alias, node.next_seq, node.awaiting = None, None, False
        for d in node.devices.values():
            d.by_alias = None
            if d.online:
                d.online, d.since = False, now

    def _check_seq(self, node: Node, p) -> None:
        if not p.HasField("seq"):
            return  # a node that sends none cannot be checked (Sparkplug requires it)
        if node.next_seq is not None and p.seq != node.next_seq:
            raise Discard(f"seq {p.seq}, expected {node.next_seq}")
        node.next_seq = (p.seq + 1) % 256

    def _rebirth(self, node: Node) -> str | None:
        mono = self.clock()
        if mono < node.rebirth_at:
            return None
        node.rebirth_at = mono + node.rebirth_wait
        node.rebirth_wait = min(REBIRTH_MAX, node.rebirth_wait * 2)
        self.rebirths_requested += 1
        return f"{NAMESPACE}/{node.group}/NCMD/{node.node_id}"

    # ------------------------------------------------------------------ metrics

    def _prefix(self, raw_tag: str) -> str:
        """What a metric's name starts with: the device's path when every
        device goes to the source's one machine, else nothing."""
        return "" if self.machine is None else raw_tag + "/"

    def _births(self, p, prefix: str = "") -> tuple[dict[int, MetricDef], dict[str, MetricDef]]:
        by_alias: dict[int, MetricDef] = {}
        by_name: dict[str, MetricDef] = {}
        for m in p.metrics:
            name = m.name
            if not m.HasField("name"):
                continue  # a birth names every metric; one without a name cannot be used
            dt = m.datatype
            skip = None
            if _control(name):
                skip = "control"
            elif not _text_ok(prefix + name):
                skip = "invalid_name"
            elif dt not in NUMERIC:
                skip = SKIPPED_KIND.get(dt, "unknown_type")
            unit = _unit(m) if skip is None else None
            d = MetricDef(prefix + name, dt, unit, skip, VALUE_FIELD.get(dt, ""),
                          SIGNED_BITS.get(dt, 0))
            by_name[name] = d
            if m.HasField("alias"):
                by_alias[m.alias] = d
        return by_alias, by_name

    def _data(self, by_alias, by_name, machine, raw_tag, p, now: float) -> list[Reading]:
        """The readings of a birth or data message; Discard when a metric is
        one its birth did not declare."""
        out: list[Reading] = []
        if machine is None:  # an id that cannot be a machine_identifier
            self.skipped["invalid_name"] += len(p.metrics)
            return out
        payload_ms = p.timestamp or None  # 0 is no time (1970 is no reading's)
        skipped = self.skipped
        last_ms, ts = -1, None
        zero = by_alias.get(0)  # alias 0 is valid, and also what an unset alias reads as
        for m in p.metrics:  # the hot loop: ~100 metrics a message, ~2 us each
            a = m.alias
            if a:
                d = by_alias.get(a)
                if d is None:
                    raise Discard(f"unknown alias {a}")
            elif zero is not None and m.HasField("alias"):
                d = zero
            else:
                d = by_name.get(m.name)
                if d is None:
                    if _control(m.name):
                        continue
                    raise Discard(f"unknown metric {m.name!r}")
            if d.skip is not None:
                if d.skip != "control":
                    skipped[d.skip] += 1
                continue
            # The field the datatype says: a value that reads non-zero is
            # there (a oneof holds one field, an unset one reads 0). Only a
            # zero asks which field is set (WhichOneof costs ~0.5 us).
            v = getattr(m, d.field)
            if v:
                if d.bits:
                    v &= (1 << d.bits) - 1
                    if v >= 1 << (d.bits - 1):
                        v -= 1 << d.bits
                value = float(v)
            else:
                field = m.WhichOneof("value")
                if field is None:  # is_null: no value, and no reading
                    skipped["null" if m.is_null else "no_value"] += 1
                    continue
                value = _value(m, d.datatype, field)
                if value is None:
                    skipped[FIELD_KIND.get(field, "no_value")] += 1
                    continue
            ms = m.timestamp or payload_ms
            if ms != last_ms:  # the metrics of a message mostly share one
                last_ms, ts = ms, self._timestamp(ms, now)
            if ts is None:
                skipped["bad_timestamp"] += 1
                continue
            out.append(Reading(machine, ts, d.name, value, d.unit, raw_tag))
        return out

    def _timestamp(self, ms: int | None, now: float) -> _dt.datetime | None:
        if ms is None:
            return _dt.datetime.fromtimestamp(now, UTC)
        if ms > MAX_MS:
            return None
        return _dt.datetime.fromtimestamp(ms / 1000, UTC)

    def _machine_for(self, ident: str) -> str | None:
        if self.machine is not None:
            return self.machine
        return ident if _text_ok(ident) else None


_VERBS = {"NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA"}
_NODE_VERBS = {"NBIRTH", "NDEATH", "NDATA"}


def _control(name: str) -> bool:
    """Sparkplug's own metrics, not process data: the birth/death counter and
    the commands a node or device accepts."""
    return name == "bdSeq" or name.startswith(("Node Control/", "Device Control/"))


def _unit(m) -> str | None:
    """The engineering unit of a birth metric: its "engUnit" property (the
    name Ignition and Tahu use), when it is a short string."""
    if not m.HasField("properties"):
        return None
    props = m.properties
    for key, v in zip(props.keys, props.values):
        if key == "engUnit" and v.WhichOneof("value") == "string_value":
            unit = v.string_value
            return unit if _text_ok(unit, MAX_UNIT) else None
    return None


def _integer(m) -> int | None:
    field = m.WhichOneof("value")
    if field == "long_value":
        v = m.long_value
        return v - (1 << 64) if v >= 1 << 63 else v
    if field == "int_value":
        return m.int_value
    return None


def _value(m, datatype: int, field: str) -> float | None:
    """A numeric or Boolean metric's value (in ``field``) as a float; None
    when it carries something else."""
    if field == "float_value":
        return m.float_value
    if field == "int_value" or field == "long_value":
        v = m.int_value if field == "int_value" else m.long_value
        bits = SIGNED_BITS.get(datatype)
        if bits is not None:  # two's complement of the type's width
            v &= (1 << bits) - 1
            if v >= 1 << (bits - 1):
                v -= 1 << bits
        return float(v)
    if field == "boolean_value":
        return 1.0 if m.boolean_value else 0.0
    if field == "double_value":
        return m.double_value
    return None
