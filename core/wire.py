"""Every shape that crosses the wire, as msgspec Structs, with the decoders
and encoders built once at import (msgspec perf tips: reuse them). The
OpenAPI document (``server/openapi.py``) is generated from these types.

The ingest body follows the public contract ("HTTP Push"): readings with
machine_identifier, timestamp, metric_name, value, and optional unit and
raw_tag. Bounds keep one request from pinning unbounded memory in caches.
The management bodies and answers follow "Direct ingestion"; a source's
``config`` is the protocol's config type (``pollers/modbus.py``,
``pollers/opcua.py``), checked after the protocol is known.
"""
from __future__ import annotations

import datetime as _dt
import uuid
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

MAX_READINGS = 1000
MAX_BODY_BYTES = 10 * 1024 * 1024

Identifier = Annotated[str, Meta(min_length=1, max_length=200)]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Unit = Annotated[str, Meta(max_length=64)]
RawTag = Annotated[str, Meta(max_length=200)]


class Reading(msgspec.Struct, gc=False):
    machine_identifier: Identifier
    timestamp: _dt.datetime
    metric_name: Name
    value: float
    unit: Unit | None = None
    raw_tag: RawTag | None = None


class IngestBatch(msgspec.Struct, gc=False):
    readings: Annotated[list[Reading], Meta(max_length=MAX_READINGS)]


class FastReading(msgspec.Struct, gc=False):
    """A reading the kernel read from its JSON text (RawBatch), decoded when
    its fields are needed as Python objects: a series the catalog has not
    seen, an error that echoes the machine_identifier. The timestamp stays
    text and the bounds are the kernel's (it checked them)."""
    machine_identifier: str
    timestamp: str
    metric_name: str
    value: float
    unit: str | None = None
    raw_tag: str | None = None


class RawBatch(msgspec.Struct, gc=False):
    """The batch as the ingest fast path decodes it: msgspec checks the whole
    body is well-formed JSON and splits it into each reading's JSON text,
    which the kernel reads in place (no str, float or Struct per reading)."""
    readings: Annotated[list[msgspec.Raw], Meta(max_length=MAX_READINGS)]


# The contract's per-reading error for a machine_identifier the key's
# organization does not have (the server answers it; the agent counts it).
ERR_MACHINE_NOT_FOUND = "Machine not found"


class ReadingError(msgspec.Struct, gc=False):
    index: int
    machine_identifier: str | None
    error: str


class IngestResult(msgspec.Struct, gc=False):
    accepted_count: int
    rejected_count: int
    errors: list[ReadingError]


class ErrorBody(msgspec.Struct):
    detail: str


MAX_MACHINE_CHECK = 100  # machine_identifier values per GET /api/v1/ingest/machines


class MachineCheck(msgspec.Struct):
    """GET /api/v1/ingest/machines: which of the asked machine identifiers the
    API key's organization has (``found``) and which it has not (``not_found``:
    readings for those would be "Machine not found"), in the order asked."""
    found: list[str]
    not_found: list[str]


# ------------------------------------------------------------------ management

Protocol = Literal["opcua", "modbus", "mqtt"]
Text200 = Annotated[str, Meta(min_length=1, max_length=200)]
Host = Annotated[str, Meta(min_length=1, max_length=253)]
Port = Annotated[int, Meta(ge=1, le=65535)]
PollInterval = Annotated[int, Meta(ge=1, le=86400)]


class MachineCreate(msgspec.Struct, forbid_unknown_fields=True):
    machine_identifier: Text200
    name: Text200 | None = None


class Machine(msgspec.Struct):
    id: uuid.UUID
    machine_identifier: str
    name: str | None
    created_at: _dt.datetime


class SourceCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Text200
    protocol: Protocol
    host: Host
    port: Port
    poll_interval_seconds: PollInterval
    config: dict[str, Any]
    # Required but for mqtt, where without it each Sparkplug device (or
    # edge node), or each JSON reading, names its machine.
    machine_id: uuid.UUID | None = None
    is_active: bool = True


class SourcePatch(msgspec.Struct, forbid_unknown_fields=True):
    machine_id: uuid.UUID | None | UnsetType = UNSET  # null: none (mqtt only)
    name: Text200 | UnsetType = UNSET
    host: Host | UnsetType = UNSET
    port: Port | UnsetType = UNSET
    poll_interval_seconds: PollInterval | UnsetType = UNSET
    config: dict[str, Any] | UnsetType = UNSET
    is_active: bool | UnsetType = UNSET


class SourceStatus(msgspec.Struct, omit_defaults=True):  # mqtt only for mqtt sources
    last_poll_at: _dt.datetime | None
    last_success_at: _dt.datetime | None
    last_error: str | None
    last_error_at: _dt.datetime | None
    readings_written: int
    points_failed: int
    polls_missed: int
    polled_by: str | None
    server_certificate_sha256: str | None
    # the last gap in the data (device or connection lost): when it began,
    # and when data came again (None while it lasts); always sent, null or not
    gap_started_at: _dt.datetime | None
    gap_ended_at: _dt.datetime | None
    mqtt: MqttStatus | None = None


class SparkplugDevice(msgspec.Struct):
    device_id: str
    online: bool
    since: _dt.datetime | None  # when it went online or offline


class SparkplugNode(msgspec.Struct):
    group_id: str
    edge_node_id: str
    online: bool
    since: _dt.datetime | None
    awaiting_rebirth: bool  # its data is discarded until its next NBIRTH
    bd_seq: int | None
    devices: list[SparkplugDevice]


class MqttStatus(msgspec.Struct):
    """What an MQTT source's subscription heard, since the source was created."""
    connected: bool
    messages: int
    discarded: int  # Sparkplug messages dropped while their node owed us a birth
    rebirths_requested: int
    # metrics not stored, by kind (string, dataset, template, null, ...), and
    # messages not taken (refused_message, stale_death, overload)
    skipped: dict[str, int]
    nodes: Annotated[list[SparkplugNode], Meta(description="at most 1,000 edge nodes")]
    nodes_total: int


class Source(msgspec.Struct):
    id: uuid.UUID
    machine_id: uuid.UUID | None
    name: str
    protocol: Protocol
    host: str
    port: int
    poll_interval_seconds: int
    is_active: bool
    config: dict[str, Any]
    created_at: _dt.datetime
    updated_at: _dt.datetime
    status: SourceStatus


class TestConnectionResult(msgspec.Struct):
    success: bool
    message: str
    latency_ms: int


# ------------------------------------------------------------ the read side
# GET /api/v1/readings, /readings/aggregate, /readings/latest (server/query.py).
# The Meta annotations only describe the answers for the API document; the
# encoder writes the same bytes with or without them.

IsoTime = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
IsoTimes = Annotated[msgspec.Raw, Meta(
    description="ISO 8601 UTC timestamps (Z, microseconds), in time order",
    extra_json_schema={"type": "array", "items": {"type": "string", "format": "date-time"}})]
# A bucket's sum of readings near the float64 limit can overflow; JSON has
# no infinity, so that bucket's sum is null (its mean is still computed).
Sums = Annotated[list[float | None], Meta(
    description="null where the bucket's sum overflows float64 (readings near ±1.8e308)")]


class SeriesReadings(msgspec.Struct, gc=False):
    machine_identifier: str
    metric_name: str
    unit: str | None
    raw_tag: str | None
    timestamps: IsoTimes  # a JSON array of ISO 8601 strings, written by the kernel (iso_json)
    values: Annotated[list[float], Meta(description="exactly as ingested; one per timestamp")]


class ReadingsPage(msgspec.Struct, gc=False):
    series: list[SeriesReadings]
    next_cursor: Annotated[str | None, Meta(
        description="null on the last page; else pass it back as cursor with the same query")]


class SeriesBuckets(msgspec.Struct, gc=False, omit_defaults=True):
    """One array per requested aggregate, index for index with buckets;
    empty buckets are left out."""
    machine_identifier: str
    metric_name: str
    unit: str | None
    raw_tag: str | None
    buckets: Annotated[list[IsoTime], Meta(
        description="bucket starts, aligned to the interval from the Unix epoch")]
    avg: list[float] | msgspec.UnsetType = msgspec.UNSET
    min: list[float] | msgspec.UnsetType = msgspec.UNSET
    max: list[float] | msgspec.UnsetType = msgspec.UNSET
    count: list[int] | msgspec.UnsetType = msgspec.UNSET
    sum: Sums | msgspec.UnsetType = msgspec.UNSET
    first: list[float] | msgspec.UnsetType = msgspec.UNSET
    last: list[float] | msgspec.UnsetType = msgspec.UNSET


class AggregatePage(msgspec.Struct, gc=False):
    interval_seconds: int
    series: list[SeriesBuckets]


class LatestReading(msgspec.Struct, gc=False):
    machine_identifier: str
    metric_name: str
    unit: str | None
    raw_tag: str | None
    timestamp: IsoTime
    value: float


class LatestPage(msgspec.Struct, gc=False):
    series: list[LatestReading]


class ReadCursor(msgspec.Struct, array_like=True):
    """Inside the opaque ``cursor``: the query it belongs to and where the next
    page starts: every series resumes at ``t`` (Unix µs), past the first
    ``given`` readings at ``t`` in the query's series order. Its size does
    not grow with the series (at 6,000 series, one per series was 112 KB)."""
    version: int
    query: str
    t: int
    given: int


batch_decoder = msgspec.json.Decoder(IngestBatch)
fast_decoder = msgspec.json.Decoder(RawBatch)
fast_reading_decoder = msgspec.json.Decoder(FastReading)
encoder = msgspec.json.Encoder()


def describe_validation_error(exc: msgspec.ValidationError, root: type | None = None) -> str:
    """Turn msgspec's "Expected `float`, got `str` - at `$.value`" into
    "value: expected a number (float), got a string" style text that names
    the field the way the API document does. Given the decoded ``root``
    type, a wrong enum value also lists the allowed ones."""
    msg = str(exc)
    where = ""
    if " - at `$" in msg:
        msg, _, path = msg.rpartition(" - at `$")
        where = path.rstrip("`").lstrip(".")
    msg = msg.replace("Object missing required field", "missing required field")
    if root is not None and msg.startswith("Invalid enum value"):
        allowed = _literal_values(root, where)
        if allowed:
            msg += f"; expected one of {', '.join(repr(v) for v in allowed)}"
    return f"{where}: {msg}" if where else msg


def _literal_values(root: type, path: str) -> tuple | None:
    """The values of the Literal type found at ``path`` ("source[0].opcua.x") in ``root``."""
    import re

    from msgspec import inspect

    t = inspect.type_info(root)
    for name, index in re.findall(r"(\w+)|\[(\d+)\]", path):
        while isinstance(t, inspect.UnionType):
            t = next((x for x in t.types if not isinstance(x, inspect.NoneType)), None)
        if index:
            t = getattr(t, "item_type", None)
        else:
            fields = {f.name: f.type for f in getattr(t, "fields", ())}
            t = fields.get(name)
        if t is None:
            return None
    while isinstance(t, inspect.UnionType):
        t = next((x for x in t.types if isinstance(x, inspect.LiteralType)), None)
    return tuple(t.values) if isinstance(t, inspect.LiteralType) else None
