"""The Sparkplug B schema and the host's state machine, without a broker:
the payload classes against bytes assembled by hand from the
specification's field numbers, and ``SparkplugHost`` fed payloads message
by message (the end-to-end tests with mosquitto are in test_mqtt_sources.py)."""
from __future__ import annotations

import datetime as dt
import struct

import pytest

from haltless.pollers import sparkplug_b as pb
from haltless.pollers.mqtt_config import MqttConfig, check_filter, subscriptions
from haltless.pollers.sparkplug import REBIRTH_FIRST, SparkplugHost, rebirth_request

T0 = 1_764_000_000_000  # ms, 2025-11-24


# ------------------------------------------------------------------ the schema

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, wire: int, data: bytes) -> bytes:
    return varint(number << 3 | wire) + data


def lendelim(number: int, data: bytes) -> bytes:
    return field(number, 2, varint(len(data)) + data)


def test_the_schema_reads_bytes_assembled_from_the_specs_field_numbers():
    """Field numbers and wire types written out by hand (Sparkplug 3.0
    payload section / Tahu's sparkplug_b.proto), not by our classes."""
    metric = (lendelim(1, b"Motor/Speed") + field(2, 0, varint(7)) + field(3, 0, varint(T0))
              + field(4, 0, varint(3)) + field(5, 0, varint(1))
              + field(10, 0, varint(0xFFFFFFFE)))
    double = lendelim(1, b"temp") + field(4, 0, varint(10)) + field(13, 1, struct.pack("<d", 21.5))
    flag = field(2, 0, varint(9)) + field(14, 0, varint(1))
    null = field(2, 0, varint(10)) + field(7, 0, varint(1))
    raw = (field(1, 0, varint(T0)) + lendelim(2, metric) + lendelim(2, double) + lendelim(2, flag)
           + lendelim(2, null) + field(3, 0, varint(200)))
    p = pb.Payload()
    p.ParseFromString(raw)
    assert p.timestamp == T0 and p.seq == 200 and len(p.metrics) == 4
    m = p.metrics[0]
    assert (m.name, m.alias, m.timestamp, m.datatype, m.is_historical) == ("Motor/Speed", 7, T0, 3, True)
    assert m.WhichOneof("value") == "int_value" and m.int_value == 0xFFFFFFFE
    assert p.metrics[1].double_value == 21.5 and p.metrics[2].boolean_value is True
    assert p.metrics[3].is_null and p.metrics[3].WhichOneof("value") is None
    assert p.SerializeToString() == raw  # and writes the same bytes back


def test_the_proto_reader_refuses_what_it_does_not_read():
    with pytest.raises(pb.ProtoSyntaxError, match="only proto2"):
        pb.parse('syntax = "proto3";')
    with pytest.raises(pb.ProtoSyntaxError, match="line 2"):
        pb.parse('syntax = "proto2";\nenum Kind { A = 0; }')
    with pytest.raises(pb.ProtoSyntaxError, match="unknown type 'Nope'"):
        pb.parse('syntax = "proto2"; package p; message M { optional Nope n = 1; }')
    fd = pb.parse('syntax = "proto2"; package p; message A { message B { optional uint32 x = 1; }'
                  ' oneof v { B b = 2; string s = 3; } extensions 4 to max; }')
    a = fd.message_type[0]
    assert [f.type_name for f in a.field if f.name == "b"] == [".p.A.B"]
    assert [f.oneof_index for f in a.field] == [0, 0]
    assert (a.extension_range[0].start, a.extension_range[0].end) == (4, 536870912)


# ------------------------------------------------------------------ the host

def payload(seq=None, ts=T0, metrics=()) -> bytes:
    p = pb.Payload(timestamp=ts)
    if seq is not None:
        p.seq = seq
    for m in metrics:
        p.metrics.add(**m)
    return p.SerializeToString()


def nbirth(seq=0, bd=0, metrics=()) -> bytes:
    return payload(seq, metrics=[{"name": "bdSeq", "datatype": 4, "long_value": bd},
                                 {"name": "Node Control/Rebirth", "datatype": 11,
                                  "boolean_value": False}, *metrics])


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def born(host: SparkplugHost, *metrics, seq=0) -> None:
    """NBIRTH, then a DBIRTH of device D with ``metrics``."""
    assert host.handle("spBv1.0/G/NBIRTH/N", nbirth(seq)) == ([], None)
    readings, ask = host.handle("spBv1.0/G/DBIRTH/N/D", payload((seq + 1) % 256, metrics=metrics))
    assert ask is None


@pytest.mark.parametrize("datatype, field, raw, value", [
    (1, "int_value", 0xFF, -1.0),             # Int8, in the width of the type
    (1, "int_value", 0xFFFFFFFF, -1.0),       # Int8 sign-extended to 32 bits by some encoders
    (1, "int_value", 0x7F, 127.0),
    (2, "int_value", 0x8000, -32768.0),
    (3, "int_value", 0xFFFFFFFE, -2.0),
    (4, "long_value", 2 ** 64 - 3, -3.0),
    (5, "int_value", 0xFF, 255.0),
    (7, "int_value", 0xFFFFFFFF, 4294967295.0),
    (8, "long_value", 2 ** 64 - 1, float(2 ** 64 - 1)),
    (9, "float_value", 1.5, 1.5),
    (10, "double_value", -0.0, -0.0),
    (11, "boolean_value", True, 1.0),
    (11, "boolean_value", False, 0.0),
])
def test_numbers_and_booleans_become_float_readings(datatype, field, raw, value):
    host = SparkplugHost()
    born(host, {"name": "x", "alias": 1, "datatype": datatype, field: raw})
    readings, ask = host.handle("spBv1.0/G/DDATA/N/D", payload(2, metrics=[{"alias": 1, field: raw}]))
    assert ask is None and [r.value for r in readings] == [value]
    assert str(readings[0].value) == str(value)  # -0.0 stays -0.0


def test_other_kinds_are_counted_and_skipped_and_null_is_no_reading():
    host = SparkplugHost()
    born(host, {"name": "s", "alias": 1, "datatype": 12, "string_value": "a"},
         {"name": "when", "alias": 2, "datatype": 13, "long_value": T0},
         {"name": "blob", "alias": 3, "datatype": 17, "bytes_value": b"x"},
         {"name": "arr", "alias": 4, "datatype": 22, "bytes_value": b"\x01"},
         {"name": "v", "alias": 5, "datatype": 10, "double_value": 1.0})
    readings, _ = host.handle("spBv1.0/G/DDATA/N/D", payload(2, metrics=[
        {"alias": 1, "string_value": "b"}, {"alias": 5, "is_null": True},
        {"alias": 5, "timestamp": T0 + 5}]))  # no value at all
    assert readings == []
    assert host.skipped == {"string": 2, "datetime": 1, "bytes": 1, "array": 1, "null": 1,
                            "no_value": 1}


def test_timestamps_are_the_metrics_then_the_payloads_then_the_receipts():
    host = SparkplugHost()
    born(host, {"name": "v", "alias": 1, "datatype": 10, "double_value": 0.0})
    readings, _ = host.handle("spBv1.0/G/DDATA/N/D", payload(2, ts=T0 + 1000, metrics=[
        {"alias": 1, "double_value": 1.0, "timestamp": T0 + 7},
        {"alias": 1, "double_value": 2.0}]))
    at = lambda ms: dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)  # noqa: E731
    assert [r.timestamp for r in readings] == [at(T0 + 7), at(T0 + 1000)]
    p = pb.Payload(seq=3)
    p.metrics.add(alias=1, double_value=3.0)
    readings, _ = host.handle("spBv1.0/G/DDATA/N/D", p.SerializeToString(), now=1_800_000_000.5)
    assert readings[0].timestamp == dt.datetime.fromtimestamp(1_800_000_000.5, dt.timezone.utc)


def test_the_sequence_wraps_from_255_to_0_and_a_gap_asks_for_a_rebirth():
    clock = Clock()
    host = SparkplugHost(clock=clock)
    born(host, {"name": "v", "alias": 1, "datatype": 10, "double_value": 0.0}, seq=254)
    data = lambda seq: payload(seq, metrics=[{"alias": 1, "double_value": 1.0}])  # noqa: E731
    assert host.handle("spBv1.0/G/DDATA/N/D", data(0))[1] is None  # 254 NBIRTH, 255 DBIRTH, 0
    readings, ask = host.handle("spBv1.0/G/DDATA/N/D", data(2))
    assert readings == [] and ask == "spBv1.0/G/NCMD/N"
    assert host.handle("spBv1.0/G/DDATA/N/D", data(3)) == ([], None)  # discarded, asked already
    assert (host.discarded, host.rebirths_requested) == (2, 1)
    clock.t += REBIRTH_FIRST
    assert host.handle("spBv1.0/G/NDATA/N", payload(4))[1] == "spBv1.0/G/NCMD/N"  # again, later
    clock.t += REBIRTH_FIRST  # the wait doubles
    assert host.handle("spBv1.0/G/NDATA/N", payload(5))[1] is None
    born(host, {"name": "v", "alias": 1, "datatype": 10, "double_value": 0.0}, seq=9)
    assert host.handle("spBv1.0/G/DDATA/N/D", data(11))[0]


def test_data_of_a_node_or_device_without_birth_or_with_an_unknown_metric_asks_for_a_rebirth():
    for first in ("spBv1.0/G/NDATA/N", "spBv1.0/G/DDATA/N/D", "spBv1.0/G/DBIRTH/N/D",
                  "spBv1.0/G/DDEATH/N/D"):
        assert SparkplugHost().handle(first, payload(1)) == ([], "spBv1.0/G/NCMD/N"), first
    host = SparkplugHost()
    born(host, {"name": "v", "alias": 1, "datatype": 10, "double_value": 0.0})
    assert host.handle("spBv1.0/G/DDATA/N/OTHER", payload(2))[1] == "spBv1.0/G/NCMD/N"
    host = SparkplugHost()
    born(host, {"name": "v", "datatype": 10, "double_value": 0.0})  # no aliases: names
    assert host.handle("spBv1.0/G/DDATA/N/D", payload(2, metrics=[
        {"name": "v", "double_value": 1.0}]))[0][0].value == 1.0
    assert host.handle("spBv1.0/G/DDATA/N/D", payload(3, metrics=[
        {"name": "w", "double_value": 1.0}]))[1] == "spBv1.0/G/NCMD/N"


def test_deaths_and_a_lost_connection_take_nodes_and_devices_offline():
    host = SparkplugHost()
    born(host, {"name": "v", "alias": 1, "datatype": 10, "double_value": 0.0})
    (node,) = host.state()
    assert node.online and node.devices["D"].online and node.bd_seq == 0
    host.handle("spBv1.0/G/DDEATH/N/D", payload(2))
    assert not node.devices["D"].online and node.online
    host.handle("spBv1.0/G/NDEATH/N", payload(metrics=[{"name": "bdSeq", "long_value": 5}]))
    assert node.online and host.skipped["stale_death"] == 1  # another session's will
    host.handle("spBv1.0/G/NDEATH/N", payload(metrics=[{"name": "bdSeq", "long_value": 0}]))
    assert not node.online
    born(host, {"name": "v", "alias": 1, "datatype": 10, "double_value": 0.0})
    host.connection_lost()
    assert not node.online and not node.devices["D"].online
    # what happened meanwhile is unknown: the next data asks for births
    assert host.handle("spBv1.0/G/DDATA/N/D", payload(2))[1] == "spBv1.0/G/NCMD/N"


def test_ids_and_names_that_cannot_be_stored_are_skipped_and_others_ignored():
    host = SparkplugHost()
    long_device = "D" * 201
    host.handle("spBv1.0/G/NBIRTH/N", nbirth())
    host.handle(f"spBv1.0/G/DBIRTH/N/{long_device}", payload(1, metrics=[
        {"name": "v", "alias": 1, "datatype": 10, "double_value": 1.0}]))
    readings, _ = host.handle("spBv1.0/G/DBIRTH/N/D", payload(2, metrics=[
        {"name": "bad\x00name", "alias": 1, "datatype": 10, "double_value": 1.0},
        {"name": "ok", "alias": 2, "datatype": 10, "double_value": 2.0}]))
    assert [r.metric_name for r in readings] == ["ok"]
    assert host.skipped["invalid_name"] == 2
    for topic in ("spBv1.0/STATE/scada", "spBv1.0/G/NCMD/N", "spBv1.0/G/DCMD/N/D",
                  "other/topic/x/y", "spAv1.0/G/NDATA/N"):
        assert host.handle(topic, b"\xff") == ([], None), topic
    assert host.handle("spBv1.0/G/NDATA/N/extra", payload(3)) == ([], None)
    assert host.handle("spBv1.0/G/NDATA/N", b"\xff\xff\xff") == ([], None)
    assert host.skipped["not_sparkplug"] == 1 and host.skipped["malformed"] == 1


def test_with_the_sources_machine_every_device_keeps_its_own_series_by_its_path():
    host = SparkplugHost(machine="LINE-1")
    host.handle("spBv1.0/G/NBIRTH/N", nbirth(metrics=[
        {"name": "v", "alias": 1, "datatype": 10, "double_value": 1.0}]))
    readings, _ = host.handle("spBv1.0/G/DBIRTH/N/D", payload(1, metrics=[
        {"name": "v", "alias": 2, "datatype": 10, "double_value": 2.0,
         "properties": {"keys": ["engUnit"], "values": [{"type": 12, "string_value": "bar"}]}}]))
    readings = host.handle("spBv1.0/G/NDATA/N", payload(2, metrics=[
        {"alias": 1, "double_value": 3.0}]))[0] + readings
    # A series is (machine, metric): the device's path in the metric's name
    # keeps the node's `v` and the device's `v` apart on the one machine.
    assert [(r.machine_identifier, r.metric_name, r.raw_tag, r.unit) for r in readings] == [
        ("LINE-1", "G/N/v", "G/N", None), ("LINE-1", "G/N/D/v", "G/N/D", "bar")]
    # Without the source's machine, each device is its own machine: names as sent.
    host = SparkplugHost()
    host.handle("spBv1.0/G/NBIRTH/N", nbirth(metrics=[
        {"name": "v", "alias": 1, "datatype": 10, "double_value": 1.0}]))
    readings, _ = host.handle("spBv1.0/G/DBIRTH/N/D", payload(1, metrics=[
        {"name": "v", "alias": 2, "datatype": 10, "double_value": 2.0}]))
    assert [(r.machine_identifier, r.metric_name) for r in readings] == [("D", "v")]
    # A path that makes the name too long is counted, not stored.
    host = SparkplugHost(machine="LINE-1")
    host.handle("spBv1.0/G/NBIRTH/N", nbirth(metrics=[
        {"name": "x" * 199, "alias": 1, "datatype": 10, "double_value": 1.0}]))
    assert host.skipped["invalid_name"] == 1


def test_a_rebirth_request_is_node_control_rebirth_true():
    p = pb.Payload()
    p.ParseFromString(rebirth_request(T0))
    assert p.timestamp == T0
    assert [(m.name, m.datatype, m.boolean_value) for m in p.metrics] == [
        ("Node Control/Rebirth", 11, True)]


# ------------------------------------------------------------------ config helpers

@pytest.mark.parametrize("good", ["#", "a/#", "+", "a/+/b", "+/+/#", "a//b", "/a", "$SYS/#"])
def test_topic_filters_that_mqtt_allows(good):
    check_filter(good)


@pytest.mark.parametrize("bad", ["a#", "a/#/b", "#/a", "a+", "a/b+/c", "+a", "a/\x00"])
def test_topic_filters_that_mqtt_refuses(bad):
    with pytest.raises(ValueError):
        check_filter(bad)


def test_the_subscriptions_of_each_format():
    assert subscriptions(MqttConfig("json")) == ["haltless/#"]
    assert subscriptions(MqttConfig("json", topics=["a/#", "b"])) == ["a/#", "b"]
    assert subscriptions(MqttConfig("sparkplug_b")) == ["spBv1.0/#"]
    assert subscriptions(MqttConfig("sparkplug_b", group_id=["A", "B"], host_id="h")) == [
        "spBv1.0/A/#", "spBv1.0/B/#", "spBv1.0/STATE/h"]
