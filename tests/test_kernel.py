"""The Cython kernel and its pure-Python twin, on the same cases."""
from __future__ import annotations

import datetime as dt
import math
import random
import struct

import pytest

from helpers import twins
from haltless.core.wire import Reading

_validate_py, _validate_c, IMPLS = twins("_validate")

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
NOW_US = int(NOW.timestamp()) * 1_000_000
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=UTC)
UNIX_IN_PG_US = 946_684_800_000_000  # the Unix epoch is this many µs before PG_EPOCH


@pytest.fixture(params=IMPLS)
def k(request):
    return request.param


@pytest.fixture
def index(k):
    """The kernel's SeriesIndex of SERIES_IDS."""
    return index_of(k, SERIES_IDS)


def R(ts=NOW, value=1.0, machine="M", metric="t", unit=None, raw_tag=None):
    return Reading(machine, ts, metric, value, unit, raw_tag)


SERIES_IDS = {("M", "t", "", ""): 1, ("M", "u", "c", "ns2_i1"): 2, ("N", "t", "", ""): 3}


def index_of(k, ids: dict):
    index = k.SeriesIndex()
    for key, sid in ids.items():
        index.add(*key, sid)
    return index


def parse_rows(payload: bytes):
    """Decode the binary COPY rows back into (series_id, bucket, [(ts, value)])."""
    out, p = [], 0
    while p < len(payload):
        nf, = struct.unpack_from("!h", payload, p); p += 2
        assert nf == 5
        _, sid, _, bucket, _, n = struct.unpack_from("!iiiqii", payload, p); p += 4 + 4 + 4 + 8 + 4 + 4
        tlen, = struct.unpack_from("!i", payload, p); p += 4
        assert tlen == 8 * n  # bytea of big-endian Unix µs (migration 0008)
        ts = [struct.unpack_from("!q", payload, p + 8 * i)[0] - UNIX_IN_PG_US for i in range(n)]
        p += 8 * n
        alen, ndim, flags, oid, dim, lb = struct.unpack_from("!iiiiii", payload, p); p += 24
        assert (ndim, flags, oid, dim, lb) == (1, 0, 701, n, 1)
        vals = [struct.unpack_from("!id", payload, p + 12 * i)[1] for i in range(n)]; p += 12 * n
        to_dt = lambda us: PG_EPOCH + dt.timedelta(microseconds=us)  # noqa: E731
        out.append((sid, to_dt(bucket), [(to_dt(t), v) for t, v in zip(ts, vals)]))
    return out


def test_good_readings_become_one_chunk_per_series_and_hour_sorted_by_time(k, index):
    t0 = NOW.replace(hour=11, minute=30)
    rs = [R(t0 + dt.timedelta(seconds=5), 2.0), R(t0, 1.0), R(t0, 9.0, machine="N"),
          R(t0 - dt.timedelta(hours=1), 0.5), R(t0, 3.0, metric="u", unit="c", raw_tag="ns2_i1")]
    payload, accepted, errors, missing = k.encode_batch(rs, index, NOW_US)
    assert (accepted, errors, missing) == (5, [], [])
    rows = parse_rows(k.encode_chunks(payload))
    assert rows == [
        (1, t0.replace(minute=0) - dt.timedelta(hours=1), [(t0 - dt.timedelta(hours=1), 0.5)]),
        (1, t0.replace(minute=0), [(t0, 1.0), (t0 + dt.timedelta(seconds=5), 2.0)]),
        (2, t0.replace(minute=0), [(t0, 3.0)]),
        (3, t0.replace(minute=0), [(t0, 9.0)]),
    ]


def test_records_of_many_requests_merge_into_one_chunk_per_series_and_hour(k, index):
    """The live shape: each request carries one reading of many series; the
    group-commit writer concatenates their records and writes one row per
    series, not one per reading."""
    t0 = NOW.replace(hour=11, minute=10)
    requests = [[R(t0 + dt.timedelta(seconds=s), float(s)),
                 R(t0 + dt.timedelta(seconds=s), -float(s), machine="N")] for s in (2, 0, 1)]
    records = b"".join(k.encode_batch(rs, index, NOW_US)[0] for rs in requests)
    assert len(records) == 6 * k.RECORD_SIZE
    rows = parse_rows(k.encode_chunks(records))
    assert [(sid, len(readings)) for sid, _, readings in rows] == [(1, 3), (3, 3)]
    assert [v for _, v in rows[0][2]] == [0.0, 1.0, 2.0]


def test_a_retention_cutoff_refuses_older_readings_as_too_old(k, index):
    cutoff = NOW - dt.timedelta(days=30)
    rs = [R(cutoff), R(cutoff - dt.timedelta(microseconds=1))]
    _, accepted, errors, _ = k.encode_batch(rs, index, NOW_US, k.timestamp_us(cutoff))
    assert accepted == 1 and errors == [(1, k.TOO_OLD)]


def test_chunks_refuse_a_torn_record(k):
    with pytest.raises(ValueError, match="multiple of 20"):
        k.encode_chunks(b"x" * 21)
    assert k.encode_chunks(b"") == b""


def test_non_finite_values_are_rejected(k, index):
    rs = [R(value=math.nan), R(value=math.inf), R(value=-math.inf), R(value=1e308), R(value=-0.0)]
    payload, accepted, errors, missing = k.encode_batch(rs, index, NOW_US)
    assert accepted == 2 and missing == []
    assert errors == [(i, k.NOT_FINITE) for i in range(3)]


def test_timestamp_window_edges_3650_days_past_to_5_minutes_future(k, index):
    past = NOW - dt.timedelta(days=3650)
    future = NOW + dt.timedelta(minutes=5)
    us = dt.timedelta(microseconds=1)
    rs = [R(past), R(past - us), R(future), R(future + us)]
    _, accepted, errors, _ = k.encode_batch(rs, index, NOW_US)
    assert accepted == 2
    assert errors == [(1, k.TOO_OLD), (3, k.TOO_NEW)]


def test_offsets_and_naive_timestamps_are_converted_to_utc(k, index):
    plus = dt.timezone(dt.timedelta(hours=5, minutes=30))
    minus = dt.timezone(-dt.timedelta(hours=3))
    for t in (NOW.astimezone(plus), NOW.astimezone(minus), NOW.replace(tzinfo=None),
              NOW.replace(microsecond=999_999) - dt.timedelta(seconds=1)):
        want = t if t.tzinfo else t.replace(tzinfo=UTC)
        assert k.timestamp_us(t) == round(want.timestamp() * 1_000_000)
        payload, *_ = k.encode_batch([R(t)], index, NOW_US)
        assert parse_rows(k.encode_chunks(payload))[0][2][0][0] == want


def test_unknown_series_are_reported_as_missing_without_a_payload(k, index):
    rs = [R(), R(machine="X"), R(value=math.nan, machine="X"), R(metric="new")]
    payload, accepted, errors, missing = k.encode_batch(rs, index, NOW_US)
    assert payload is None and accepted == 0
    assert missing == [1, 3]
    assert errors == [(2, k.NOT_FINITE)]  # invalid readings are not looked up


def test_readings_the_caller_rejected_are_skipped(k, index):
    payload, accepted, errors, missing = k.encode_batch([None, R(), None], index, NOW_US)
    assert (accepted, errors, missing) == (1, [], [])


def test_empty_batch(k, index):
    assert k.encode_batch([], index, NOW_US) == (b"", 0, [], [])


def test_python_twin_and_cython_kernel_give_identical_bytes_on_random_batches():
    if _validate_c is None:
        pytest.skip("extension not built")
    rnd = random.Random(7)
    ids = {(f"M{m}", f"x{x}", "", ""): m * 100 + x + 1 for m in range(5) for x in range(7)}
    for _ in range(200):
        rs = []
        for _ in range(rnd.randint(0, 300)):
            ts = NOW - dt.timedelta(seconds=rnd.randint(-400, 86400 * 4000),
                                    microseconds=rnd.randint(0, 999_999))
            v = rnd.choice([rnd.uniform(-1e6, 1e6), math.nan, math.inf, 0.0, 1.0])
            rs.append(None if rnd.random() < 0.05 else
                      R(ts, v, machine=f"M{rnd.randint(0, 5)}", metric=f"x{rnd.randint(0, 6)}"))
        c = _validate_c.encode_batch(rs, index_of(_validate_c, ids), NOW_US)
        assert c == _validate_py.encode_batch(rs, index_of(_validate_py, ids), NOW_US)
        if c[0]:
            assert _validate_c.encode_chunks(c[0]) == _validate_py.encode_chunks(c[0])


def test_the_package_binds_the_compiled_kernel_unless_told_not_to():
    import subprocess
    import sys
    code = "import haltless.fast; print(haltless.fast.COMPILED)"
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"HALTLESS_NO_EXTENSIONS": "1", "PATH": ""}, check=True)
    assert forced.stdout.strip() == "False"
    if _validate_c is not None:
        normal = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={"PATH": ""}, check=True)
        assert normal.stdout.strip() == "True"


def test_a_series_hour_of_more_than_max_row_readings_becomes_several_rows(k, index):
    t0 = NOW.replace(minute=0)
    n = 2 * k.MAX_ROW + 7
    rs = [R(t0 + dt.timedelta(milliseconds=i), float(i)) for i in range(n)]
    payload, accepted, errors, missing = k.encode_batch(rs, index, NOW_US)
    rows = parse_rows(k.encode_chunks(payload))
    assert [len(r[2]) for r in rows] == [k.MAX_ROW, k.MAX_ROW, 7]
    assert {r[:2] for r in rows} == {(1, t0)}
    assert [v for r in rows for _, v in r[2]] == [float(i) for i in range(n)]
    # 500 readings make a row of 8,072 bytes on disk: under the hot tables' toast_tuple_target.
    assert k.MAX_ROW == 500


# ------------------------------------------------------------ text timestamps

def F(ts: str, value=1.0, machine="M", metric="t", unit=None, raw_tag=None):
    """A FastReading: what the fast path decodes (timestamp as text, no bounds)."""
    from haltless.core.wire import FastReading
    return FastReading(machine, ts, metric, value, unit, raw_tag)


STAMPS_KERNEL_TAKES = [
    "2026-11-27T11:30:00Z", "2026-11-27T11:30:00.1Z", "2026-11-27T11:30:00.123456Z",
    "2026-11-27T11:30:00", "2026-11-27T17:00:00+05:30", "2026-11-27T08:30:00-03:00",
    "2026-11-27T11:30:00-00:00", "2024-02-29T00:00:00Z", "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z", "2026-11-27T11:30:00.000001+23:59",
]
STAMPS_LEFT_TO_MSGSPEC = [  # valid for msgspec, or not at all: the strict decode decides
    "2026-11-27t11:30:00Z", "2026-11-27 11:30:00Z", "2026-11-27T11:30:00z",
    "2026-11-27T11:30:00.1234567Z", "2026-11-27T11:30:00+0100", "2026-11-27T11:30:00+01",
    "2026-02-29T00:00:00Z", "2026-11-27T24:00:00Z", "2026-11-27T11:60:00Z",
    "2026-11-27T11:30:60Z", "2026-13-01T00:00:00Z", "0000-01-01T00:00:00Z",
    "2026-11-27T11:30:00.Z", "2026-11-27T11:30:00+24:00", "2026-11-27T11:30Z", "",
    "2026-11-27T11:30:00Zjunk", "２０２６-11-27T11:30:00Z", "2026-1-27T11:30:00Z",
]


@pytest.mark.parametrize("text", STAMPS_KERNEL_TAKES)
def test_text_timestamps_the_kernel_parses_are_the_instant_msgspec_decodes(k, text):
    import msgspec
    want = msgspec.json.decode(f'"{text}"'.encode(), type=dt.datetime)
    assert k.parse_timestamp(text) == k.timestamp_us(want)


@pytest.mark.parametrize("text", STAMPS_LEFT_TO_MSGSPEC)
def test_other_text_timestamps_are_left_to_the_strict_decode(k, index, text):
    assert k.parse_timestamp(text) is None
    payload, accepted, errors, missing = k.encode_batch([F("2026-11-27T11:30:00Z"), F(text)],
                                                        index, NOW_US)
    assert (payload, accepted, errors, missing) == (None, 0, [(1, k.RECHECK)], [])


def test_random_text_timestamps_agree_with_msgspec_wherever_the_kernel_takes_one(k):
    import msgspec
    rnd = random.Random(11)
    digits = "0123456789"
    taken = 0
    for _ in range(4000):
        parts = [f"{rnd.randint(0, 9999):04d}", "-", f"{rnd.randint(0, 13):02d}", "-",
                 f"{rnd.randint(0, 32):02d}", rnd.choice("TTTt "), f"{rnd.randint(0, 25):02d}", ":",
                 f"{rnd.randint(0, 61):02d}", ":", f"{rnd.randint(0, 61):02d}"]
        if rnd.random() < 0.6:
            parts.append("." + "".join(rnd.choice(digits) for _ in range(rnd.randint(0, 8))))
        parts.append(rnd.choice(["", "Z", "z", f"+{rnd.randint(0, 25):02d}:{rnd.randint(0, 61):02d}",
                                 f"-{rnd.randint(0, 25):02d}:{rnd.randint(0, 61):02d}", "+0100"]))
        text = "".join(parts)
        mine = k.parse_timestamp(text)
        if mine is None:
            continue
        taken += 1
        want = msgspec.json.decode(f'"{text}"'.encode(), type=dt.datetime)  # must not raise
        assert mine == k.timestamp_us(want), text
    assert taken > 500


def test_text_and_datetime_readings_make_the_same_records(k, index):
    stamps = ["2026-11-27T11:30:00Z", "2026-11-27T13:00:00.250+01:30", "2026-11-27T11:59:59"]
    fast = [F(t, float(i), metric="u", unit="c", raw_tag="ns2_i1") for i, t in enumerate(stamps)]
    strict = [R(dt.datetime.fromisoformat(t.replace("Z", "+00:00")), float(i), metric="u",
                unit="c", raw_tag="ns2_i1") for i, t in enumerate(stamps)]
    assert k.encode_batch(fast, index, NOW_US) == k.encode_batch(strict, index, NOW_US)


@pytest.mark.parametrize("field, value", [
    ("machine", ""), ("machine", "m" * 201), ("metric", ""), ("metric", "x" * 201),
    ("unit", "u" * 65), ("raw_tag", "r" * 201)])
def test_text_readings_beyond_the_contracts_bounds_are_left_to_the_strict_decode(
        k, index, field, value):
    reading = F("2026-11-27T11:30:00Z", **{field: value})
    assert k.encode_batch([reading], index, NOW_US) == (None, 0, [(0, k.RECHECK)], [])


def test_text_readings_at_the_bounds_are_taken(k):
    ids = {("m" * 200, "é" * 200, "u" * 64, "r" * 200): 9}
    reading = F("2026-11-27T11:30:00Z", machine="m" * 200, metric="é" * 200, unit="u" * 64,
                raw_tag="r" * 200)
    assert k.encode_batch([reading], index_of(k, ids), NOW_US)[1:] == (1, [], [])


# ------------------------------------------------------------ the series index

def test_the_series_index_maps_four_fields_and_treats_none_as_empty(k):
    index = k.SeriesIndex()
    index.add("M", "t", None, None, 1)
    index.add("M", "t", "c", None, 2)
    index.add("M", "t", None, "ns2_i1", 3)
    index.add("Mt", "", None, None, 4)  # field boundaries count
    assert (index.get("M", "t", "", ""), index.get("M", "t", None, None)) == (1, 1)
    assert index.get("M", "t", "c", "") == 2 and index.get("M", "t", "", "ns2_i1") == 3
    assert index.get("Mt", "", "", "") == 4 and index.get("M", "", "t", "") is None
    index.add("M", "t", None, None, 7)  # a new id for a known key replaces it
    assert index.get("M", "t", None, None) == 7 and len(index) == 4
    index.clear()
    assert len(index) == 0 and index.get("M", "t", None, None) is None


def test_a_forgotten_key_misses_until_added_again_and_batches_report_it_missing(k):
    index = index_of(k, {("M", "t", "", ""): 1, ("M", "t", "C", ""): 1, ("N", "t", "", ""): 3})
    index.forget("M", "t", "C", None)
    index.forget("M", "t", "F", None)  # never added: nothing happens
    assert index.get("M", "t", "C", "") is None and index.get("M", "t", None, None) == 1
    assert len(index) == 2
    payload, accepted, errors, missing = k.encode_batch(
        [R(unit="C"), R(), R(machine="N")], index, NOW_US)
    assert (payload, missing) == (None, [0])
    index.add("M", "t", "C", None, 1)
    index.forget("M", "t", "C", None)
    index.forget("M", "t", "C", None)  # twice counts once
    index.add("M", "t", "C", None, 1)
    assert len(index) == 3 and index.get("M", "t", "C", None) == 1
    with pytest.raises(ValueError, match="negative"):
        index.add("M", "t", "K", None, -1)
    assert index.get("M", "t", "K", None) is None and len(index) == 3


def test_the_series_index_holds_many_keys_and_non_ascii_text(k):
    index = k.SeriesIndex()
    keys = [(f"CNC-{m:04d}", f"metric-{j}-ü°", "℃" if j % 2 else "", f"ns2_i{j}")
            for m in range(1000) for j in range(60)]
    for sid, key in enumerate(keys):
        index.add(*key, sid)
    assert len(index) == len(keys)
    assert all(index.get(*key) == sid for sid, key in enumerate(keys))
    assert index.get("CNC-0000", "metric-0-ü°", "", "ns2_i1") is None


def test_a_series_field_too_long_for_the_index_is_refused_on_add_and_absent_on_get():
    if _validate_c is None:
        pytest.skip("extension not built")
    index = _validate_c.SeriesIndex()
    with pytest.raises(ValueError, match="65,535 bytes"):
        index.add("x" * 70_000, "t", None, None, 1)
    assert index.get("x" * 70_000, "t", None, None) is None


def test_reading_fields_are_read_by_offset_exactly_as_getattr_reads_them():
    if _validate_c is None:
        pytest.skip("extension not built")
    from haltless.core.wire import FastReading, Reading
    for r in (Reading("M", NOW, "t", 1.5, None, "raw"), FastReading("Ä", "x", "m", -0.0, "u", None)):
        assert _validate_c._reading_fields(r) == (r.machine_identifier, r.timestamp, r.metric_name,
                                                 r.value, r.unit, r.raw_tag)

    class Other:  # not a Struct: no slots to read, so getattr
        machine_identifier, timestamp, metric_name, value, unit, raw_tag = "M", NOW, "t", 2.0, None, None
    assert _validate_c._reading_fields(Other())[3] == 2.0
    index = index_of(_validate_c, SERIES_IDS)
    assert _validate_c.encode_batch([Other()], index, NOW_US)[1] == 1


# ------------------------------------------------------------ raw readings (the fast path)

def raw(text: str):
    """One reading's JSON text as the fast path hands it to the kernel."""
    import msgspec
    return msgspec.json.decode(("[" + text + "]").encode(), type=list[msgspec.Raw])[0]


def strict(text: str):
    import msgspec
    from haltless.core.wire import Reading
    return msgspec.json.decode(text.encode(), type=Reading)


NUMBERS = ["72.5", "-0", "0", "-0.0", "0.0", "1e5", "1E-5", "-12.75e+2", "123456789012345678",
           "9007199254740993", "0.1", "0.30000000000000004", "2.2250738585072014e-308", "5e-324",
           "1.7976931348623157e308", "4.9406564584124654e-324", "1e-400", "123.4567890123456789",
           "100000000000000000000000", "7.0e22", "1e23", "8.98846567431158e307"]


@pytest.mark.parametrize("number", NUMBERS)
def test_a_raw_readings_value_is_the_float_msgspec_decodes(k, index, number):
    text = ('{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", '
            f'"metric_name": "t", "value": {number}}}')
    got = k.encode_batch([raw(text)], index, NOW_US)
    want = k.encode_batch([strict(text)], index, NOW_US)
    assert got == want and got[1] == 1
    assert struct.unpack("<iqd", got[0])[2].hex() == float(strict(text).value).hex()


def test_raw_and_strictly_decoded_readings_make_the_same_records_on_random_readings(k):
    import json
    rnd = random.Random(5)
    ids = {(f"M{m}-ä", f"x{x}", u, r): m * 100 + x * 4 + j + 1 for m in range(3) for x in range(4)
           for j, (u, r) in enumerate([("", ""), ("°C", ""), ("", "ns2_i1"), ("bar", "hr10")])}
    index = index_of(k, ids)
    for _ in range(400):
        (m, x, u, r), _sid = rnd.choice(list(ids.items()))
        fields = [("machine_identifier", m), ("metric_name", x),
                  ("timestamp", (NOW - dt.timedelta(seconds=rnd.randint(-200, 10**6),
                                                    microseconds=rnd.randint(0, 999999))
                                 ).isoformat().replace("+00:00", rnd.choice(["Z", "+00:00"]))),
                  ("value", rnd.choice([rnd.uniform(-1e6, 1e6), rnd.randint(-10**6, 10**6),
                                        round(rnd.gauss(50, 5), rnd.randint(0, 6))]))]
        if u or rnd.random() < 0.3:
            fields.append(("unit", u or None))
        if r or rnd.random() < 0.3:
            fields.append(("raw_tag", r or None))
        rnd.shuffle(fields)
        sep = rnd.choice([(",", ":"), (", ", ": "), (" ,\n", " :\t")])
        text = json.dumps(dict(fields), separators=sep, ensure_ascii=rnd.random() < 0.2)
        want = k.encode_batch([strict(text)], index, NOW_US)
        got = k.encode_batch([raw(text)], index, NOW_US)
        if "\\u" in text:  # an escape: the kernel leaves it to the strict decode
            assert got[2] == [(0, k.RECHECK)]
        else:
            assert got == want, text


@pytest.mark.parametrize("text", [
    '{"machine_identifier": "M\\u0041", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": 1}',
    '{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": 1, "x": 1}',
    '{"machine_identifier": "M", "machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": 1}',
    '{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t"}',
    '{"machine_identifier": null, "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": 1}',
    '{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": "1"}',
    '{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": true}',
    '{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": 1e400}',
    '{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": 1, "unit": 5}',
    '{"machine_identifier": "M", "timestamp": "2026-11-27t11:30:00Z", "metric_name": "t", "value": 1}',
    '{"machine_identifier": "", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": 1}',
    '{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00Z", "metric_name": "t", "value": '
    + "1" * 70 + "}",
    "{}", "[1]", '"text"', "1",
])
def test_raw_readings_the_kernel_does_not_read_exactly_are_rechecked(k, index, text):
    assert k.encode_batch([raw(text)], index, NOW_US) == (None, 0, [(0, k.RECHECK)], [])


def test_invalid_utf8_in_a_raw_reading_is_rechecked(k, index):
    import msgspec
    for bad in (b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82"):
        body = (b'[{"machine_identifier": "M' + bad + b'", "timestamp": "2026-11-27T11:30:00Z",'
                b' "metric_name": "t", "value": 1}]')
        item = msgspec.json.decode(body, type=list[msgspec.Raw])[0]
        assert k.encode_batch([item], index, NOW_US)[2] == [(0, k.RECHECK)], bad


def test_the_twins_read_mutated_raw_readings_alike():
    if _validate_c is None:
        pytest.skip("extension not built")
    import msgspec
    rnd = random.Random(3)
    base = ('{"machine_identifier": "M", "timestamp": "2026-11-27T11:30:00.5+01:00", '
            '"metric_name": "u", "value": -12.5e-1, "unit": "c", "raw_tag": "ns2_i1"}').encode()
    alphabet = b'{}[]":,. -+0123456789eEnulltrueMcu\\\t\n\xc3\xa4\xff'
    ic, ipy = index_of(_validate_c, SERIES_IDS), index_of(_validate_py, SERIES_IDS)
    checked = 0
    for _ in range(5000):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 3)):
            j = rnd.randrange(len(b))
            op = rnd.random()
            if op < 0.4:
                b[j] = rnd.choice(alphabet)
            elif op < 0.7:
                del b[j]
            else:
                b.insert(j, rnd.choice(alphabet))
        try:
            item = msgspec.json.decode(b"[" + bytes(b) + b"]", type=list[msgspec.Raw])[0]
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        checked += 1
        assert _validate_c.encode_batch([item], ic, NOW_US) == \
            _validate_py.encode_batch([item], ipy, NOW_US), bytes(b)
    assert checked > 1000
