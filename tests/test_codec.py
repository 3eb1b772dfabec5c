"""The codec kernels (blocks, hot rows, aggregation, ISO text): each Cython
kernel and its pure-Python twin on the same cases, PostgreSQL's array_send
and COPY bytes into them, and the SQL decoders of migration 0004_codec.sql
on what the block codec wrote."""
from __future__ import annotations

import datetime as dt
import json
import math
import random
import struct
import subprocess
import sys
from array import array
from itertools import accumulate

import asyncpg
import pytest

from conftest import run, twins
blocks_py, blocks_c, BLOCKS = twins("_blocks")
chunks_py, chunks_c, CHUNKS = twins("_chunks")
aggregate_py, aggregate_c, AGGREGATE = twins("_aggregate")
iso_py, iso_c, ISO = twins("_iso")
needs_blocks_c = pytest.mark.skipif(blocks_c is None, reason="extension not built")

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
TINY = 5e-324  # the smallest subnormal
MIN_NORMAL = 2.2250738585072014e-308
MAX = 1.7976931348623157e308
HARD_FLOATS = [
    0.0, -0.0, TINY, -TINY, 2 * TINY, math.nextafter(MIN_NORMAL, 0), MIN_NORMAL,
    math.nextafter(MIN_NORMAL, 1), -MIN_NORMAL, MAX, -MAX, math.nextafter(MAX, 0),
    1.0, -1.0, 0.1, 1 / 3, 72.5, 1.15, 2.0 ** 53, 2.0 ** 53 + 2, 1e-300, 123456.789,
]
T0 = 1_795_780_800_000_000  # 2026-11-27T12:00:00Z in Unix µs


def implementations(name: str, params: list):
    """The fixture ``name``: each implementation of a kernel in turn."""
    @pytest.fixture(name=name, params=params)
    def fixture(request):
        return request.param
    return fixture


blocks = implementations("blocks", BLOCKS)
chunks = implementations("chunks", CHUNKS)
aggregation = implementations("aggregation", AGGREGATE)
iso = implementations("iso", ISO)


def same_bits(a, b) -> bool:
    return array("d", a).tobytes() == array("d", b).tobytes()


def finite_random_float(rnd: random.Random) -> float:
    while True:
        x = struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(x):
            return x


def jittered_timestamps(rnd: random.Random, n: int, gaps: bool = True) -> list[int]:
    ts, t = [], T0
    for i in range(n):
        t += 1_000_000 + (rnd.choice([0, 0, 60_000_000, 1_000]) if gaps and i % 500 == 499 else 0)
        ts.append(t + rnd.randint(-500, 500))
    return ts


def wrapping(n: int) -> list[int]:
    """Steps of 2**62 that leave the int64 range and wrap (order 2, w = 0)."""
    return [((i << 62) + (1 << 63)) % (1 << 64) - (1 << 63) for i in range(n)]


INT_CASES = {
    "empty": [], "one": [42], "two": [7, -7], "constant": [5] * 100,
    "extremes": [INT64_MIN, INT64_MAX, INT64_MIN, 0, -1, INT64_MAX],
    "wrapping": wrapping(12), "steady": list(range(0, 10 ** 8, 10 ** 6)),
    "negative_walk": [-(i * i) for i in range(300)],
}


# ------------------------------------------------------------- packed ints

@pytest.mark.parametrize("name", INT_CASES)
def test_ints_round_trip_exactly_including_int64_extremes_and_wrapping(blocks, name):
    v = INT_CASES[name]
    packed = blocks.pack_ints(array("q", v))
    out = blocks.unpack_ints(packed)
    assert type(out) is array and out.typecode == "q" and out.tolist() == v


BIG = 1 << 61  # a value this far from 0 keeps a block out of order 3


def test_ints_header_layout_for_every_order(blocks):
    assert blocks.pack_ints([BIG, BIG + 10, BIG + 15]) == bytes([1, 1, 0, 0, 0, 3]) \
        + BIG.to_bytes(8, "big") + bytes([10, 5])
    assert blocks.pack_ints([]) == bytes([1, 0, 0, 0, 0, 0]) + bytes(8)
    steady = blocks.pack_ints(range(BIG, BIG + 10 ** 7, 10 ** 6))  # constant step: no residuals
    assert steady == bytes([2, 0, 0, 0, 0, 10]) + BIG.to_bytes(8, "big") \
        + (10 ** 6).to_bytes(8, "big")
    assert blocks.pack_ints([-BIG, -BIG - 1])[14:] == b"\xff"  # two's complement, one byte
    # Order 3, flat: base 18 is the midrange (rounded up), residuals -8, 2, 7.
    assert blocks.pack_ints([10, 20, 25]) == bytes([3, 1, 0, 0, 0, 3]) + (18).to_bytes(8, "big") \
        + bytes(8) + bytes([256 - 8, 2, 7])
    # Order 3, on the line through the end points: no residuals at all.
    assert blocks.pack_ints(range(5, 75, 7)) == bytes([3, 0, 0, 0, 0, 10]) \
        + (5).to_bytes(8, "big") + (7).to_bytes(8, "big")


def test_order_3_is_taken_when_at_most_16_bytes_larger(blocks):
    rnd = random.Random(4)
    # A gauge around a setpoint: deltas need 2 bytes, distances from 720 one.
    gauge = [720 + rnd.randint(-100, 100) for _ in range(1000)]
    assert blocks.pack_ints(gauge)[:2] == bytes([3, 1])
    # A walk of +-1: one byte both ways, and order 3 wins the near-tie (+9 bytes).
    walk = list(accumulate(rnd.choice((-1, 0, 1)) for _ in range(1000)))
    assert max(walk) - min(walk) < 255 and blocks.pack_ints(walk)[:2] == bytes([3, 1])
    # A walk that wanders far: deltas of one byte beat distances of four.
    far = list(accumulate(rnd.choice((-100, 100)) for _ in range(1000)))
    assert blocks.pack_ints(far)[:2] == bytes([1, 1])
    # Residuals beyond 4 bytes never use order 3.
    assert blocks.pack_ints([0, 1 << 40, 0])[0] == 1


def test_ints_equal_sizes_go_to_order_1(blocks):
    # order 1: 14 + 4 deltas x 2 bytes = 22; order 2: 22 + 3 x 0 = 22
    assert blocks.pack_ints([BIG + 1000 * i for i in range(5)])[:2] == bytes([1, 2])
    assert blocks.pack_ints([BIG + 1000 * i for i in range(6)])[:2] == bytes([2, 0])


def test_ints_width_is_the_smallest_that_holds_every_residual(blocks):
    for delta, w in [(0, 0), (127, 1), (-128, 1), (128, 2), (-129, 2), (32767, 2), (-32768, 2),
                     (32768, 4), (-(1 << 31), 4), (1 << 31, 8), (INT64_MIN, 8)]:
        packed = blocks.pack_ints([BIG, BIG + delta])
        assert packed[:2] == bytes([1, w]), delta
        assert blocks.unpack_ints(packed).tolist() == [BIG, BIG + delta]
    for spread, w in [(0, 0), (255, 1), (256, 2), (65535, 2), (65536, 4), ((1 << 32) - 1, 4)]:
        v = [0, spread, 0, spread // 3]  # flat line, base (spread + 1) // 2
        packed = blocks.pack_ints(v)
        assert packed[:2] == bytes([3, w]), spread
        assert blocks.unpack_ints(packed).tolist() == v


def test_timestamps_at_1s_with_jitter_and_gaps_round_trip(blocks):
    rnd = random.Random(11)
    ts = jittered_timestamps(rnd, 3600)
    packed = blocks.pack_ints(ts)
    assert blocks.unpack_ints(packed).tolist() == ts and len(packed) < 4 * 3600
    steady = jittered_timestamps(rnd, 3600, gaps=False)
    assert blocks.pack_ints(steady)[:2] == bytes([3, 2])  # jitter distances < 2**15


def test_pack_ints_takes_sequences_and_refuses_what_is_not_int64(blocks):
    want = blocks.pack_ints(array("q", [1, 5, 9]))
    assert blocks.pack_ints([1, 5, 9]) == blocks.pack_ints((1, 5, 9)) == want
    assert blocks.pack_ints(range(1, 10, 4)) == want
    with pytest.raises(ValueError, match="does not fit int64"):
        blocks.pack_ints([0, 1 << 63])
    with pytest.raises(TypeError):
        blocks.pack_ints([1.5])


# ------------------------------------------------------------------ values

def test_hard_floats_round_trip_bit_exactly_alone_and_together(blocks):
    for x in HARD_FLOATS:
        for block in ([x], [x, x], [x, -x, x], [1.0, x, 0.5]):
            out = blocks.unpack_values(blocks.pack_values(block))
            assert same_bits(out, block), (x, block)
    assert same_bits(blocks.unpack_values(blocks.pack_values(HARD_FLOATS)), HARD_FLOATS)


def test_random_finite_bit_patterns_round_trip(blocks):
    rnd = random.Random(5)
    for n in (0, 1, 2, 3, 17, 1000):
        v = [finite_random_float(rnd) for _ in range(n)]
        packed = blocks.pack_values(array("d", v))
        assert packed[0] == 0x58 or n < 2
        assert same_bits(blocks.unpack_values(packed), v)


def test_decimal_mode_takes_the_smallest_exponent_and_small_ints(blocks):
    walk = blocks.pack_values([72.5, 72.6, 72.4, 72.5])
    assert walk[:2] == b"D\x01" and walk[2:4] == bytes([3, 1])
    assert blocks.unpack_ints(walk[2:]).tolist() == [725, 726, 724, 725]
    assert blocks.pack_values([1.15, 1.2, 1.25])[:2] == b"D\x02"
    assert blocks.pack_values([3.0, 4.0, 5.0, 7.0])[:2] == b"D\x00"
    assert blocks.pack_values([0.001, 0.002, 0.004])[:2] == b"D\x03"
    # -0.0 is never decimal: k = 0 decodes to +0.0
    assert blocks.pack_values([-0.0, 1.5, 2.5])[0] == 0x58
    assert blocks.pack_values([0.0, 1.5, 2.5])[:2] == b"D\x01"
    # 0.1 * 3 == 0.30000000000000004 is no 1-digit decimal (its 17 digits are)
    assert blocks.pack_values([0.1 * i for i in range(3600)])[0] == 0x58


def test_decimal_series_round_trip_with_small_widths(blocks):
    rnd = random.Random(3)
    walk, x = [], 1.0
    for _ in range(500):
        x = round(x + rnd.choice([-0.01, 0.0, 0.01]), 2)
        walk.append(x)
    cases = {  # values, then the head: mode, d, order and width of the packed ints
        "0.1 steps": ([round(20 + 0.1 * i, 1) for i in range(500)], b"D\x01\x03\x00"),
        "0.01 walk": (walk, b"D\x02\x03\x01"),
        "counter": ([float(1_000_000 + 7 * i) for i in range(500)], b"D\x00\x03\x00"),
        "constant": ([21.5] * 3600, b"X\x00"),  # X with w = 0 beats D by 2 bytes
        "1e-17 steps": ([1e-17, 2e-17, -3e-17, 4e-17], b"D\x11\x03\x01"),
    }
    for name, (v, head) in cases.items():
        packed = blocks.pack_values(v)
        assert packed.startswith(head), name
        assert same_bits(blocks.unpack_values(packed), v), name


def test_empty_one_and_two_values(blocks):
    for v in ([], [1.5], [1.5, -0.0], [TINY, MAX]):
        packed = blocks.pack_values(v)
        assert same_bits(blocks.unpack_values(packed), v)
    assert blocks.pack_values([]) == b"X\x00" + bytes(12)
    out = blocks.unpack_values(blocks.pack_values([]))
    assert type(out) is array and out.typecode == "d" and len(out) == 0


@needs_blocks_c
def test_cython_and_python_emit_identical_bytes_on_random_blocks():
    rnd = random.Random(7)
    for _ in range(300):
        n = rnd.choice([0, 1, 2, 3, 5, 64, 1000])
        kind = rnd.randrange(5)
        ints = {0: lambda: [rnd.randint(INT64_MIN, INT64_MAX) for _ in range(n)],
                1: lambda: jittered_timestamps(rnd, n),
                2: lambda: [rnd.randint(-(1 << rnd.randrange(63)), 1 << rnd.randrange(62))
                            for _ in range(n)],
                3: lambda: wrapping(n),
                4: lambda: [i * i * rnd.choice([1, 3, 1000]) for i in range(n)]}[kind]()
        assert blocks_c.pack_ints(ints) == blocks_py.pack_ints(ints)
        vals = {0: lambda: [finite_random_float(rnd) for _ in range(n)],
                1: lambda: [round(rnd.uniform(-100, 100), rnd.randrange(8)) for _ in range(n)],
                2: lambda: [rnd.choice(HARD_FLOATS + [math.nan, -math.inf]) for _ in range(n)],
                3: lambda: [rnd.gauss(0, 1) for _ in range(n)],
                4: lambda: [round(rnd.uniform(-1e6, 1e6)) / 10 ** rnd.randrange(18)
                            for _ in range(n)]}[kind]()
        packed = blocks_c.pack_values(vals)
        assert packed == blocks_py.pack_values(vals)
        assert blocks_c.unpack_values(packed).tobytes() == blocks_py.unpack_values(packed).tobytes()


# --------------------------------------------------------- corrupt input

def _valid_blocks(blocks):
    rnd = random.Random(2)
    return [("ints", blocks.pack_ints(v)) for v in ([], [1], [1, 300, 70000], wrapping(6),
                                                   jittered_timestamps(rnd, 40),
                                                   [BIG, BIG + 300, BIG + 7])] + \
           [("values", blocks.pack_values(v)) for v in ([], [1.5], [72.5, 72.6, 72.4],
                                                       HARD_FLOATS, [0.1 * i for i in range(9)])]


def _unpack(blocks, kind, data):
    return (blocks.unpack_ints if kind == "ints" else blocks.unpack_values)(data)


def _corrupt_blocks():
    big = (1 << 24) + 1
    return [
        ("ints", bytes([4, 0]) + bytes(12), "order 4"),
        ("ints", bytes([3, 8]) + bytes(20), "width 8 at byte 1 is not 0, 1, 2, 4;"),
        ("ints", bytes([3, 0, 0, 0, 0, 2]) + (1 << 62).to_bytes(8, "big") + bytes(8), "leaves"),
        ("ints", bytes([3, 0, 0, 0, 0, 3]) + bytes(8) + (1 << 61).to_bytes(8, "big"), "leaves"),
        ("ints", bytes([3, 1, 0, 0, 0, 3]) + bytes(16) + b"\x01\x02", "24 bytes where"),
        ("ints", bytes([1, 3]) + bytes(12), "width 3"),
        ("ints", bytes([2, 0, 0, 0, 0, 1]) + bytes(16), "order 2 needs"),
        ("ints", bytes([1, 0]) + big.to_bytes(4, "big") + bytes(8), "at most 16,777,216"),
        ("ints", bytes([1, 8, 0, 0, 0, 3]) + bytes(8 + 15), "needs 30"),
        ("values", b"Z\x00" + bytes(12), "mode byte 0x5a"),
        ("values", b"D\x12" + bytes(14), "exponent 18"),
        ("values", b"X\x09" + bytes(12), "width 9"),
        ("values", b"X\x00" + big.to_bytes(4, "big") + bytes(8), "at most 16,777,216"),
        ("values", b"X", "shorter than the 2-byte header"),
        ("values", b"D\x01\x01\x01\x00\x00\x00\x03" + bytes(8) + b"\x01", "15 bytes where"),
    ]


def test_truncated_extended_and_corrupt_blocks_raise_value_error(blocks):
    for kind, data in _valid_blocks(blocks):
        for cut in range(len(data)):
            with pytest.raises(ValueError, match="truncated"):
                _unpack(blocks, kind, data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            _unpack(blocks, kind, data + b"\x00")
    for kind, data, what in _corrupt_blocks():
        with pytest.raises(ValueError, match=what):
            _unpack(blocks, kind, data)
    with pytest.raises(TypeError):
        blocks.unpack_values("X")


def test_random_byte_flips_never_crash(blocks):
    rnd = random.Random(9)
    # Not the blocks of w = 0, where a flipped count is a valid block of up to
    # 16 M readings: slow to decode here and no test of robustness.
    for kind, data in _valid_blocks(blocks):
        if (data[3] if data[0] == 0x44 else data[1]) == 0:
            continue
        for _ in range(200):
            b = bytearray(data)
            b[rnd.randrange(len(b))] = rnd.randrange(256)
            try:
                _unpack(blocks, kind, bytes(b))
            except ValueError:
                pass


@needs_blocks_c
def test_both_implementations_give_the_same_error_messages():
    for kind, data, _ in _corrupt_blocks():
        msgs = []
        for impl in (blocks_py, blocks_c):
            with pytest.raises(ValueError) as info:
                _unpack(impl, kind, data)
            msgs.append(str(info.value))
        assert msgs[0] == msgs[1]


# ----------------------------------------------------------------- sorting

def test_sort_by_time_orders_by_timestamp_then_value_bits(blocks):
    rnd = random.Random(4)
    ts = array("q", [rnd.choice([T0, T0 + 1, T0 - 5, rnd.randint(0, 1 << 60)]) for _ in range(2000)])
    vals = array("d", [rnd.choice([0.0, -0.0, 1.5, -1.5, math.inf, rnd.random()])
                       for _ in range(2000)])
    bits = array("Q", vals.tobytes())
    want = sorted(zip(ts, bits))
    blocks.sort_by_time(ts, vals)
    assert list(zip(ts, array("Q", vals.tobytes()))) == want
    empty_t, empty_v = array("q"), array("d")
    blocks.sort_by_time(empty_t, empty_v)
    assert len(empty_t) == len(empty_v) == 0


def test_sort_by_time_refuses_mismatched_arrays(blocks):
    with pytest.raises(ValueError, match="2 timestamps but 1 values"):
        blocks.sort_by_time(array("q", [2, 1]), array("d", [1.0]))
    with pytest.raises(TypeError, match="ts must be an array"):
        blocks.sort_by_time([2, 1], array("d", [1.0, 2.0]))
    with pytest.raises(TypeError, match="vals must be an array"):
        blocks.sort_by_time(array("q", [2, 1]), array("f", [1.0, 2.0]))


def test_sort_by_time_leaves_ordered_input_alone_and_fixes_an_unordered_tie(blocks):
    ts = array("q", [1, 2, 2, 3])
    vals = array("d", [5.0, 1.0, 2.0, -1.0])
    blocks.sort_by_time(ts, vals)
    assert list(ts) == [1, 2, 2, 3] and list(vals) == [5.0, 1.0, 2.0, -1.0]
    ts, vals = array("q", [1, 2, 2]), array("d", [0.0, 2.0, 1.0])  # tie out of bit order
    blocks.sort_by_time(ts, vals)
    assert list(vals) == [0.0, 1.0, 2.0]


# ------------------------------------------------------------- aggregation

def test_aggregate_buckets_align_to_the_epoch_and_skip_empty_ones(aggregation):
    minute = 60_000_000
    ts = array("q", [-1, 0, 59_999_999, 60_000_000, 3 * minute + 5, 3 * minute + 6])
    vals = array("d", [7.0, 1.0, 3.0, -2.5, 0.1, 0.2])
    starts, count, s, lo, hi, first, last = aggregation.aggregate(ts, vals, minute)
    assert list(starts) == [-minute, 0, minute, 3 * minute]
    assert list(count) == [1, 2, 1, 2]
    assert list(s) == [7.0, 4.0, -2.5, 0.1 + 0.2]
    assert list(lo) == [7.0, 1.0, -2.5, 0.1] and list(hi) == [7.0, 3.0, -2.5, 0.2]
    assert list(first) == [7.0, 1.0, -2.5, 0.1] and list(last) == [7.0, 3.0, -2.5, 0.2]
    assert all(a.typecode == "q" for a in (starts, count))
    assert all(a.typecode == "d" for a in (s, lo, hi, first, last))
    assert [list(a) for a in aggregation.aggregate(array("q"), array("d"), minute)] == [[]] * 7


def test_aggregate_agrees_between_twins_on_random_data():
    if aggregate_c is None:
        pytest.skip("extension not built")
    rnd = random.Random(9)
    ts = array("q", sorted(rnd.randint(-10**12, 10**12) for _ in range(5000)))
    vals = array("d", [rnd.choice(HARD_FLOATS[:12]) for _ in range(5000)])
    for interval in (1, 999_983, 60_000_000, 86_400_000_000 * 31):
        a = aggregate_py.aggregate(ts, vals, interval)
        b = aggregate_c.aggregate(ts, vals, interval)
        assert [x.tobytes() for x in a] == [x.tobytes() for x in b]


def test_aggregate_refuses_unsorted_or_mismatched_input(aggregation):
    with pytest.raises(ValueError, match="not sorted at index 1"):
        aggregation.aggregate(array("q", [2, 1]), array("d", [1.0, 2.0]), 10)
    with pytest.raises(ValueError, match="2 timestamps but 1 values"):
        aggregation.aggregate(array("q", [1, 2]), array("d", [1.0]), 10)
    with pytest.raises(ValueError, match="interval_us must be at least 1"):
        aggregation.aggregate(array("q", [1]), array("d", [1.0]), 0)
    with pytest.raises(TypeError, match="ts must be an array"):
        aggregation.aggregate([1], array("d", [1.0]), 10)


# ---------------------------------------------------------------- ISO 8601

def test_iso_timestamps_match_datetime_from_year_1_to_9999(iso):
    rnd = random.Random(11)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    lo, hi = -62_135_596_800_000_000, 253_402_300_799_999_999
    us = [lo, hi, 0, -1, T0, T0 + 213, 951_782_400_000_000, 4_107_542_400_000_000]  # 2000-02-29, 2100-03-01
    us += [rnd.randint(lo, hi) for _ in range(3000)]
    want = [(epoch + dt.timedelta(microseconds=u)).isoformat(timespec="microseconds")
            .replace("+00:00", "Z") for u in us]
    assert iso.iso_timestamps(array("q", us)) == want
    assert iso.iso_timestamps(array("q", [T0 + 213])) == ["2026-11-27T12:00:00.000213Z"]
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        iso.iso_timestamps(array("q", [hi + 1]))
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        iso.iso_timestamps(array("q", [lo - 1]))
    with pytest.raises(TypeError, match="must be an array"):
        iso.iso_timestamps([0])
    assert iso.iso_json(array("q", us)) == json.dumps(want, separators=(",", ":")).encode()
    assert iso.iso_json(array("q")) == b"[]"
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        iso.iso_json(array("q", [0, hi + 1]))


# ------------------------------------------------------ PostgreSQL arrays

def pg(dsn, sql, *args):
    async def go():
        c = await asyncpg.connect(dsn)
        try:
            return await c.fetchrow(sql, *args)
        finally:
            await c.close()
    return run(go())


def test_from_chunk_reads_a_hot_row_of_real_postgres(chunks, pg_dsn):
    # ts as migration 0008 stores it (haltless_chunk_stamps), vals through array_send.
    utc = dt.timezone.utc
    stamps = [dt.datetime(2026, 11, 27, 12, 0, 0, 123456, utc), dt.datetime(1999, 12, 31, 23, 59,
              59, 999999, utc), dt.datetime(1970, 1, 1, tzinfo=utc), dt.datetime(1900, 5, 1, tzinfo=utc)]
    vals = HARD_FLOATS[:4]
    row = pg(pg_dsn, "SELECT haltless_chunk_stamps($1::timestamptz[]), array_send($2::float8[])",
             stamps, vals)
    ts, out = chunks.from_chunk(row[0], row[1])
    epoch = dt.datetime(1970, 1, 1, tzinfo=utc)
    assert ts.tolist() == [(s - epoch) // dt.timedelta(microseconds=1) for s in stamps]
    assert ts.typecode == "q" and out.typecode == "d" and same_bits(out, vals)
    # and PostgreSQL reads back what the kernel reads
    back = pg(pg_dsn, "SELECT array_agg(ts ORDER BY ts DESC) FROM haltless_chunk_readings($1, $2)",
              row[0], vals)[0]
    assert back == sorted(stamps, reverse=True)
    empty = pg(pg_dsn, "SELECT haltless_chunk_stamps('{}'), array_send('{}'::float8[])")
    assert [len(a) for a in chunks.from_chunk(empty[0], empty[1])] == [0, 0]


def test_from_chunk_refuses_what_is_not_a_hot_row(chunks, pg_dsn):
    good_ts, good_vals = pg(pg_dsn, "SELECT haltless_chunk_stamps(ARRAY[now(), now()]),"
                                    " array_send(ARRAY[1.0, 2.0]::float8[])")
    bad = pg(pg_dsn, "SELECT array_send(ARRAY[1, 2]::int8[]),"
                     " array_send(ARRAY[1.0, NULL]::float8[]),"
                     " array_send(ARRAY[[1.0], [2.0]]::float8[]),"
                     " array_send(ARRAY[1.0]::float8[])")
    for ts_bin, vals_bin, what in [
        (good_ts, bad[0], "oid 20, expected 701"),
        (good_ts, bad[1], "NULLs"),
        (good_ts, bad[2], "2 dimensions"),
        (good_ts, bad[3], "2 timestamps but 1 values"),
        (good_ts[:-1], good_vals, "not a whole number of 8-byte timestamps"),
        (good_ts, good_vals[:-1], "truncated"),
        (good_ts, good_vals[:10], "shorter than an array header"),
    ]:
        with pytest.raises(ValueError, match=what):
            chunks.from_chunk(ts_bin, vals_bin)


def test_group_chunks_joins_the_rows_of_each_series_and_hour_from_real_copy_out(chunks, pg_dsn):
    # Rows as the ingest kernel writes them (several group commits: rows of
    # one (series, hour) that overlap in time), COPYed into a scratch table
    # shaped like reading_chunks and COPYed out again, as compaction and the
    # read API do.
    from haltless.fast import RECORD_SIZE, encode_chunks
    rnd = random.Random(5)
    rec = struct.Struct("<iqd")
    assert rec.size == RECORD_SIZE
    hour = T0 - T0 % 3_600_000_000
    want: dict = {}
    commits = []
    for _ in range(6):
        recs = []
        for _ in range(300):
            sid = rnd.choice([3, 4, 70000])
            t = hour + rnd.randrange(-3_600_000_000, 2 * 3_600_000_000)
            v = rnd.choice(HARD_FLOATS) if rnd.random() < 0.3 else finite_random_float(rnd)
            recs.append(rec.pack(sid, t, v))
            want.setdefault((sid, t - t % 3_600_000_000), []).append((t, struct.pack(">d", v)))
        commits.append(encode_chunks(b"".join(recs)))

    async def round_trip():
        c = await asyncpg.connect(pg_dsn)
        try:
            await c.execute("CREATE TEMP TABLE gc (series_id int, bucket timestamptz, n int,"
                            " ts bytea, vals float8[])")
            for rows in commits:
                data = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0) + rows + b"\xff\xff"
                await c.copy_to_table("gc", source=memoryview(data), format="binary",
                                      columns=["series_id", "bucket", "n", "ts", "vals"])
            out = bytearray()

            async def sink(b):
                out.extend(b)
            await c.copy_from_query("SELECT series_id, bucket, ts, vals FROM gc"
                                    " ORDER BY series_id, bucket", output=sink, format="binary")
            return bytes(out)
        finally:
            await c.close()
    data = run(round_trip())
    groups = chunks.group_chunks(data)
    assert [(g[0], g[1]) for g in groups] == sorted(want)
    for sid, bucket, ts, vals in groups:
        assert ts.typecode == "q" and vals.typecode == "d"
        got = sorted(zip(ts.tolist(), (struct.pack(">d", v) for v in vals)))
        assert got == sorted(want[(sid, bucket)])
    for other in (chunks_py, chunks_c or chunks_py):  # the twins agree to the bit
        assert [(g[0], g[1], g[2].tolist(), g[3].tobytes()) for g in other.group_chunks(data)] == \
            [(g[0], g[1], g[2].tolist(), g[3].tobytes()) for g in groups]
    for bad, what in [(data[:-2], "truncated"), (b"PGCOPY\n\xff\r\n\x01" + data[11:], "signature"),
                      (data + b"x", "after the trailer")]:
        with pytest.raises(ValueError, match=what):
            chunks.group_chunks(bad)


# ----------------------------------------------------------- SQL decoders

def sql_decode(dsn, int_blocks, value_blocks):
    """Each block decoded by the migration's functions: ints as Python ints,
    values as their float8send bytes (bit-exact)."""
    async def go():
        c = await asyncpg.connect(dsn)
        try:
            ints = [[r["v"] for r in await c.fetch(
                "SELECT i, v FROM haltless_unpack_ints($1) ORDER BY i", b)] for b in int_blocks]
            vals = [b"".join(r["b"] for r in await c.fetch(
                "SELECT i, float8send(value) AS b FROM haltless_unpack_values($1) ORDER BY i", b))
                for b in value_blocks]
            return ints, vals
        finally:
            await c.close()
    return run(go())


def test_sql_decoders_match_the_encoder_in_every_order_and_both_modes(blocks, pg_dsn):
    rnd = random.Random(8)
    ints = list(INT_CASES.values()) + [jittered_timestamps(rnd, 3600)]
    for bits in (5, 13, 29, 61):  # every width in order 1 ([0, x, 0] far from 0), order 2
        ints.append([BIG, BIG + (1 << bits), BIG])  # (a trend) and order 3 (noise, flat or not)
        noise = 1 << (bits - 2)
        ints.append([BIG + (i << 50) + rnd.randint(-noise, noise) for i in range(30)])
        ints.append([rnd.randint(-noise, noise) for i in range(30)])
        ints.append([-(i << 20) + rnd.randint(-noise, noise) for i in range(30)])
    ints += [[-BIG + 1, BIG - 1], [7] * 40, list(range(-5, 500, 5))]
    int_blocks = [blocks.pack_ints(v) for v in ints]
    assert {b[:2] for b in int_blocks} >= {bytes([o, w]) for o, w in [
        (1, 0), (1, 1), (1, 2), (1, 4), (1, 8), (2, 0), (2, 1), (2, 2), (2, 4),
        (3, 0), (3, 1), (3, 2), (3, 4)]}
    vals = [[x] for x in HARD_FLOATS] + [HARD_FLOATS, [], [72.5, 72.6, 72.4],
                                         [round(20 + 0.1 * i, 1) for i in range(200)],
                                         [1e-17, 2e-17, -3e-17, 4e-17], [21.5] * 50,
                                         [float(10 ** 6 - 7 * i) for i in range(100)],
                                         [-1.5, -2.25, 3.75, -0.0625],
                                         [finite_random_float(rnd) for _ in range(300)],
                                         [-math.inf, math.inf, 0.0]]
    value_blocks = [blocks.pack_values(v) for v in vals]
    assert {b[:2] for b in value_blocks} >= {b"D\x00", b"D\x01", b"D\x11", b"X\x00", b"X\x08"}
    got_ints, got_vals = sql_decode(pg_dsn, int_blocks, value_blocks)
    assert got_ints == ints
    for v, got in zip(vals, got_vals):
        assert got == struct.pack(f">{len(v)}d", *v), v


def test_sql_rebuilds_every_exponent_and_subnormal_exactly(pg_dsn):
    rnd = random.Random(12)
    bits = []
    for e in range(2047):  # every finite exponent, with both signs
        for m in (0, 1, (1 << 52) - 1, rnd.getrandbits(52)):
            bits += [e << 52 | m, 1 << 63 | e << 52 | m]
    vals = list(struct.unpack(f"<{len(bits)}d", struct.pack(f"<{len(bits)}Q", *bits)))
    _, (got,) = sql_decode(pg_dsn, [], [blocks_py.pack_values(vals)])
    assert got == struct.pack(f">{len(vals)}d", *vals)


def test_sql_decoders_reject_corrupt_blocks(pg_dsn):
    async def go():
        c = await asyncpg.connect(pg_dsn)
        try:
            for kind, data, what in _corrupt_blocks() + [
                    ("ints", blocks_py.pack_ints([1, 2, 3])[:-1], "truncated"),
                    ("values", blocks_py.pack_values(HARD_FLOATS) + b"\x00", "truncated")]:
                fn = "haltless_unpack_ints" if kind == "ints" else "haltless_unpack_values"
                with pytest.raises(asyncpg.RaiseError, match=what.replace("0x5a", "90")):
                    await c.fetch(f"SELECT * FROM {fn}($1)", data)
        finally:
            await c.close()
    run(go())


# ------------------------------------------------------------------- size

def test_a_realistic_hour_compresses_to_well_under_4_bytes_per_reading(blocks, capsys):
    rnd = random.Random(2026)
    n = 3600
    ts = jittered_timestamps(rnd, n, gaps=False)
    temp, t = [], 65.0
    for _ in range(n):
        t = round(t + rnd.choice([-0.1, 0.0, 0.0, 0.1]), 1)
        temp.append(t)
    counter = [float(10_000 + i // 7) for i in range(n)]
    setpoint = [72.5] * n
    vibration = [rnd.gauss(0.0, 0.02) + 0.5 for _ in range(n)]
    sizes = {name: len(block) / n for name, block in [
        ("timestamps (1 s, +-500 us jitter)", blocks.pack_ints(ts)),
        ("temperature (0.1 walk)", blocks.pack_values(temp)),
        ("counter", blocks.pack_values(counter)),
        ("setpoint (constant)", blocks.pack_values(setpoint)),
        ("vibration (noisy float)", blocks.pack_values(vibration)),
    ]}
    with capsys.disabled():
        print("\n" + "\n".join(f"  {v:6.3f} B/value  {k}" for k, v in sizes.items()))
    assert sizes["setpoint (constant)"] <= 0.01
    assert sizes["temperature (0.1 walk)"] <= 1.1
    assert sizes["counter"] <= 1.1
    assert sizes["timestamps (1 s, +-500 us jitter)"] <= 2.1
    assert sizes["vibration (noisy float)"] <= 8.1
    # a reading of a slow decimal sensor: timestamp + value
    assert sizes["timestamps (1 s, +-500 us jitter)"] + sizes["temperature (0.1 walk)"] < 4


def test_the_package_binds_the_compiled_codec_unless_told_not_to():
    # one function of each codec kernel: where the package took it from
    code = ("import haltless.fast as f; print(f.CODEC_COMPILED, *(g.__module__ for g in"
            " (f.pack_ints, f.group_chunks, f.aggregate, f.iso_json)))")
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"HALTLESS_NO_EXTENSIONS": "1", "PATH": ""}, check=True)
    kernels = ["haltless.fast._blocks", "haltless.fast._chunks", "haltless.fast._aggregate",
               "haltless.fast._iso"]
    assert forced.stdout.split() == ["False", *(f"{k}_py" for k in kernels)]
    if None not in (blocks_c, chunks_c, aggregate_c, iso_c):
        normal = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={"PATH": ""}, check=True)
        assert normal.stdout.split() == ["True", *kernels]
