"""The Cython kernel and its pure-Python twin, on the same cases."""
from __future__ import annotations

import datetime as dt
import math
import random
import struct

import pytest

from conftest import twins
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


def R(ts=NOW, value=1.0, machine="M", metric="t", unit=None, raw_tag=None):
    return Reading(machine, ts, metric, value, unit, raw_tag)


SERIES = {("M", "t", "", ""): 1, ("M", "u", "c", "ns2_i1"): 2, ("N", "t", "", ""): 3}


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


def test_good_readings_become_one_chunk_per_series_and_hour_sorted_by_time(k):
    t0 = NOW.replace(hour=11, minute=30)
    rs = [R(t0 + dt.timedelta(seconds=5), 2.0), R(t0, 1.0), R(t0, 9.0, machine="N"),
          R(t0 - dt.timedelta(hours=1), 0.5), R(t0, 3.0, metric="u", unit="c", raw_tag="ns2_i1")]
    payload, accepted, errors, missing = k.encode_batch(rs, SERIES, NOW_US)
    assert (accepted, errors, missing) == (5, [], [])
    rows = parse_rows(k.encode_chunks(payload))
    assert rows == [
        (1, t0.replace(minute=0) - dt.timedelta(hours=1), [(t0 - dt.timedelta(hours=1), 0.5)]),
        (1, t0.replace(minute=0), [(t0, 1.0), (t0 + dt.timedelta(seconds=5), 2.0)]),
        (2, t0.replace(minute=0), [(t0, 3.0)]),
        (3, t0.replace(minute=0), [(t0, 9.0)]),
    ]


def test_records_of_many_requests_merge_into_one_chunk_per_series_and_hour(k):
    """The live shape: each request carries one reading of many series; the
    group-commit writer concatenates their records and writes one row per
    series, not one per reading."""
    t0 = NOW.replace(hour=11, minute=10)
    requests = [[R(t0 + dt.timedelta(seconds=s), float(s)),
                 R(t0 + dt.timedelta(seconds=s), -float(s), machine="N")] for s in (2, 0, 1)]
    records = b"".join(k.encode_batch(rs, SERIES, NOW_US)[0] for rs in requests)
    assert len(records) == 6 * k.RECORD_SIZE
    rows = parse_rows(k.encode_chunks(records))
    assert [(sid, len(readings)) for sid, _, readings in rows] == [(1, 3), (3, 3)]
    assert [v for _, v in rows[0][2]] == [0.0, 1.0, 2.0]


def test_a_retention_cutoff_refuses_older_readings_as_too_old(k):
    cutoff = NOW - dt.timedelta(days=30)
    rs = [R(cutoff), R(cutoff - dt.timedelta(microseconds=1))]
    _, accepted, errors, _ = k.encode_batch(rs, SERIES, NOW_US, k.timestamp_us(cutoff))
    assert accepted == 1 and errors == [(1, k.TOO_OLD)]


def test_chunks_refuse_a_torn_record(k):
    with pytest.raises(ValueError, match="multiple of 20"):
        k.encode_chunks(b"x" * 21)
    assert k.encode_chunks(b"") == b""


def test_non_finite_values_are_rejected(k):
    rs = [R(value=math.nan), R(value=math.inf), R(value=-math.inf), R(value=1e308), R(value=-0.0)]
    payload, accepted, errors, missing = k.encode_batch(rs, SERIES, NOW_US)
    assert accepted == 2 and missing == []
    assert errors == [(i, k.NOT_FINITE) for i in range(3)]


def test_timestamp_window_edges_3650_days_past_to_5_minutes_future(k):
    past = NOW - dt.timedelta(days=3650)
    future = NOW + dt.timedelta(minutes=5)
    us = dt.timedelta(microseconds=1)
    rs = [R(past), R(past - us), R(future), R(future + us)]
    _, accepted, errors, _ = k.encode_batch(rs, SERIES, NOW_US)
    assert accepted == 2
    assert errors == [(1, k.TOO_OLD), (3, k.TOO_NEW)]


def test_offsets_and_naive_timestamps_are_converted_to_utc(k):
    plus = dt.timezone(dt.timedelta(hours=5, minutes=30))
    minus = dt.timezone(-dt.timedelta(hours=3))
    for t in (NOW.astimezone(plus), NOW.astimezone(minus), NOW.replace(tzinfo=None),
              NOW.replace(microsecond=999_999) - dt.timedelta(seconds=1)):
        want = t if t.tzinfo else t.replace(tzinfo=UTC)
        assert k.timestamp_us(t) == round(want.timestamp() * 1_000_000)
        payload, *_ = k.encode_batch([R(t)], SERIES, NOW_US)
        assert parse_rows(k.encode_chunks(payload))[0][2][0][0] == want


def test_unknown_series_are_reported_as_missing_without_a_payload(k):
    rs = [R(), R(machine="X"), R(value=math.nan, machine="X"), R(metric="new")]
    payload, accepted, errors, missing = k.encode_batch(rs, SERIES, NOW_US)
    assert payload is None and accepted == 0
    assert missing == [1, 3]
    assert errors == [(2, k.NOT_FINITE)]  # invalid readings are not looked up


def test_readings_the_caller_rejected_are_skipped(k):
    payload, accepted, errors, missing = k.encode_batch([None, R(), None], SERIES, NOW_US)
    assert (accepted, errors, missing) == (1, [], [])


def test_empty_batch(k):
    assert k.encode_batch([], SERIES, NOW_US) == (b"", 0, [], [])


def test_python_twin_and_cython_kernel_give_identical_bytes_on_random_batches():
    if _validate_c is None:
        pytest.skip("extension not built")
    rnd = random.Random(7)
    series = {(f"M{m}", f"x{x}", "", ""): m * 100 + x + 1 for m in range(5) for x in range(7)}
    for _ in range(200):
        rs = []
        for _ in range(rnd.randint(0, 300)):
            ts = NOW - dt.timedelta(seconds=rnd.randint(-400, 86400 * 4000),
                                    microseconds=rnd.randint(0, 999_999))
            v = rnd.choice([rnd.uniform(-1e6, 1e6), math.nan, math.inf, 0.0, 1.0])
            rs.append(None if rnd.random() < 0.05 else
                      R(ts, v, machine=f"M{rnd.randint(0, 5)}", metric=f"x{rnd.randint(0, 6)}"))
        c = _validate_c.encode_batch(rs, series, NOW_US)
        assert c == _validate_py.encode_batch(rs, series, NOW_US)
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


def test_a_series_hour_of_more_than_max_row_readings_becomes_several_rows(k):
    t0 = NOW.replace(minute=0)
    n = 2 * k.MAX_ROW + 7
    rs = [R(t0 + dt.timedelta(milliseconds=i), float(i)) for i in range(n)]
    payload, accepted, errors, missing = k.encode_batch(rs, SERIES, NOW_US)
    rows = parse_rows(k.encode_chunks(payload))
    assert [len(r[2]) for r in rows] == [k.MAX_ROW, k.MAX_ROW, 7]
    assert {r[:2] for r in rows} == {(1, t0)}
    assert [v for r in rows for _, v in r[2]] == [float(i) for i in range(n)]
    # 500 readings make a row of 8,072 bytes on disk: under the hot tables' toast_tuple_target.
    assert k.MAX_ROW == 500
