"""haltless.fast.data_changes: OPC-UA DataChangeNotification bodies read off
the wire, against what asyncua decodes from the same bytes, on both twins."""
from __future__ import annotations

import datetime as dt
import math
import random
import struct

import pytest
from asyncua import ua
from asyncua.ua.ua_binary import struct_to_binary

from haltless.pollers.opcua_subscription import _decode_slowly
from helpers import twins

PY, C, IMPLS = twins("_opcua")
UTC = dt.timezone.utc
T1 = dt.datetime(2026, 11, 28, 12, 30, 15, 123456, tzinfo=UTC)
T2 = dt.datetime(2026, 11, 28, 12, 30, 16, 654321, tzinfo=UTC)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def us(t: dt.datetime) -> int:
    d = t - EPOCH
    return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds


def body(*values: ua.DataValue, handles=None) -> bytes:
    items = [ua.MonitoredItemNotification(ClientHandle=h, Value=v)
             for h, v in zip(handles or range(len(values)), values)]
    return struct_to_binary(ua.DataChangeNotification(MonitoredItems=items))


def dv(value, vtype=None, **kw) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, vtype) if vtype is not None else ua.Variant(value), **kw)


NUMBERS = [
    (True, ua.VariantType.Boolean, 1.0), (False, ua.VariantType.Boolean, 0.0),
    (-5, ua.VariantType.SByte, -5.0), (250, ua.VariantType.Byte, 250.0),
    (-30000, ua.VariantType.Int16, -30000.0), (60000, ua.VariantType.UInt16, 60000.0),
    (-2_000_000_000, ua.VariantType.Int32, -2e9), (4_000_000_000, ua.VariantType.UInt32, 4e9),
    (-(2 ** 62), ua.VariantType.Int64, float(-(2 ** 62))),
    (2 ** 64 - 1, ua.VariantType.UInt64, float(2 ** 64 - 1)),
    (0.1, ua.VariantType.Float, float(struct.unpack("<f", struct.pack("<f", 0.1))[0])),
    (72.125, ua.VariantType.Double, 72.125),
]


@pytest.mark.parametrize("kernel", IMPLS)
def test_every_numeric_type_reads_as_its_number_with_both_timestamps(kernel):
    values = [dv(v, t, SourceTimestamp=T1, ServerTimestamp=T2) for v, t, _ in NUMBERS]
    b = body(*values)
    got = kernel.data_changes(b, 0, len(b))
    assert got == [(i, want, 0, us(T1), t.value) for i, (_, t, want) in enumerate(NUMBERS)]
    assert got == _decode_slowly(b)


@pytest.mark.parametrize("kernel", IMPLS)
def test_the_server_timestamp_stands_in_for_a_missing_source_timestamp_and_then_none(kernel):
    b = body(dv(1.0, ua.VariantType.Double, ServerTimestamp=T2),
             dv(2.0, ua.VariantType.Double),
             # servers send the 1601 epoch for "no timestamp"
             dv(3.0, ua.VariantType.Double, SourceTimestamp=dt.datetime(1601, 1, 1, tzinfo=UTC),
                ServerTimestamp=T2))
    got = kernel.data_changes(b, 0, len(b))
    assert [g[3] for g in got] == [us(T2), None, us(T2)]
    assert got == _decode_slowly(b)


@pytest.mark.parametrize("kernel", IMPLS)
def test_status_codes_and_values_that_are_not_numbers_are_reported_as_such(kernel):
    b = body(dv(1.0, ua.VariantType.Double, StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure)),
             dv("P-101", ua.VariantType.String, SourceTimestamp=T1),
             dv(None),
             dv([1.0, 2.0, 3.0], ua.VariantType.Double),
             dv(["a", "bb"], ua.VariantType.String),
             dv(T1, ua.VariantType.DateTime),
             dv(b"\x00\x01", ua.VariantType.ByteString),
             dv(ua.StatusCode(ua.StatusCodes.BadTimeout), ua.VariantType.StatusCode))
    got = kernel.data_changes(b, 0, len(b))
    assert got == _decode_slowly(b)
    assert got[0] == (0, 1.0, ua.StatusCodes.BadSensorFailure, None, 11)
    assert [(g[1], g[4]) for g in got[1:]] == [(None, 12), (None, 0), (None, 0x8B), (None, 0x8C),
                                                (None, 13), (None, 15), (None, 19)]


@pytest.mark.parametrize("kernel", IMPLS)
def test_structured_values_and_diagnostics_are_left_to_asyncua(kernel):
    text = body(dv(ua.LocalizedText("hot"), ua.VariantType.LocalizedText))
    assert kernel.data_changes(text, 0, len(text)) is None
    assert _decode_slowly(text)[0][1:] == (None, 0, None, ua.VariantType.LocalizedText.value)
    note = ua.DataChangeNotification(
        MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=1, Value=dv(1.0, ua.VariantType.Double))],
        DiagnosticInfos=[ua.DiagnosticInfo(SymbolicId=1)])
    b = struct_to_binary(note)
    assert kernel.data_changes(b, 0, len(b)) is None


@pytest.mark.parametrize("kernel", IMPLS)
def test_picoseconds_are_stepped_over_in_the_specifications_order(kernel):
    # asyncua writes SourcePicoseconds after ServerTimestamp; Part 6 (and
    # open62541) after SourceTimestamp: built by hand here.
    ticks = lambda t: us(t) * 10 + 116_444_736_000_000_000  # noqa: E731
    item = (struct.pack("<IB", 7, 0x01 | 0x04 | 0x08 | 0x10 | 0x20) + struct.pack("<Bd", 11, 2.5)
            + struct.pack("<qH", ticks(T1), 123) + struct.pack("<qH", ticks(T2), 456))
    b = struct.pack("<i", 1) + item + struct.pack("<i", -1)
    assert kernel.data_changes(b, 0, len(b)) == [(7, 2.5, 0, us(T1), 11)]


@pytest.mark.parametrize("kernel", IMPLS)
def test_far_future_timestamps_are_clamped_and_the_window_is_respected(kernel):
    far = (2 ** 63 - 1)
    item = struct.pack("<IB", 1, 0x05) + struct.pack("<Bd", 11, 1.0) + struct.pack("<q", far)
    b = b"junk" + struct.pack("<i", 1) + item + struct.pack("<i", 0) + b"more"
    assert kernel.data_changes(b, 4, len(b) - 4) == [(1, 1.0, 0, kernel.MAX_US, 11)]
    with pytest.raises(ValueError):
        kernel.data_changes(b, 4, len(b) + 1)


@pytest.mark.parametrize("kernel", IMPLS)
def test_nan_and_infinity_come_through_for_the_caller_to_refuse(kernel):
    b = body(dv(math.nan, ua.VariantType.Double), dv(math.inf, ua.VariantType.Float))
    got = kernel.data_changes(b, 0, len(b))
    assert math.isnan(got[0][1]) and got[1][1] == math.inf


def test_both_twins_agree_on_every_cut_and_every_flipped_byte():
    """Truncated or garbled bodies: never an exception, never a read past
    the end, the same answer from both (None, or items)."""
    if C is None:
        pytest.skip("extension not built")
    rnd = random.Random(7)
    values = [dv(v, t, SourceTimestamp=T1, ServerTimestamp=T2) for v, t, _ in NUMBERS]
    values += [dv(["x", "yy"], ua.VariantType.String), dv([1, 2], ua.VariantType.Int32)]
    b = body(*values)
    for end in range(len(b)):
        assert C.data_changes(b, 0, end) == PY.data_changes(b, 0, end)
    for _ in range(3000):
        garbled = bytearray(b)
        for _ in range(rnd.randint(1, 4)):
            garbled[rnd.randrange(len(garbled))] = rnd.randrange(256)
        garbled = bytes(garbled)
        c, p = C.data_changes(garbled, 0, len(garbled)), PY.data_changes(garbled, 0, len(garbled))
        assert repr(c) == repr(p)  # repr: NaN compares unequal to itself
