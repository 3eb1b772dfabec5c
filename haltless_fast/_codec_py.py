"""Block codec for compacted readings (pure-Python twin of ``_codec.pyx``).

A block is one series' readings of one hour or so: int64 timestamps (Unix µs)
and float64 values, stored as two byte strings. Every field is whole bytes,
big-endian, at an offset computable from the header, so PostgreSQL can decode
a block in plain SQL (``get_byte``/``substring`` + window sums, migration
``0004_codec.sql``) with no extension installed. Bit-packing would save a
little more and lose that.

Packed ints (timestamps; the decimal mantissas of mode D)::

    [0] order: 1 = deltas, 2 = delta-of-deltas
    [1] w: bytes per residual, one of 0, 1, 2, 4, 8
    [2:6] n (uint32)   [6:14] first value (int64)   order 2: [14:22] first delta
    then n-1 (order 1) or n-2 (order 2) residuals, w bytes each, two's complement

All differences are taken modulo 2**64 (and summed back modulo 2**64), so any
int64 sequence round-trips, even when a true difference would overflow. The
encoder takes the smaller of the two orders (a tie goes to order 1) with the
smallest w that holds every residual: timestamps at 1 s with ±500 µs of
jitter take order 2 at w = 2 (2.0 bytes each), where their deltas of ~1e6 µs
would need w = 4.

Values::

    D (0x44) decimal: [1] d (0..17), then packed ints of k; value = k / 10**d
    X (0x58) XOR: [1] w (0..8), [2:6] n, [6:14] bits of the first value
                  (uint64), then n-1 residuals bits[i] ^ bits[i-1], low w bytes

Mode D (the idea of ALP, Afroozeh et al., SIGMOD 2023) is eligible when, for
the smallest d that works for every value, k = round-half-even(v * 10**d) has
|k| < 2**53 and float(k) / 10**d gives back the bits of v (so -0.0, NaN and
infinities are never decimal): 72.5 at d = 1 is k = 725, and a slow walk at
0.1 steps has deltas that fit one byte. The encoder writes D when it is
eligible and no larger than X, else X (an empty block is therefore X, n = 0).

Limits: a block holds at most MAX_COUNT readings, on both sides, so that a
corrupt count cannot make a decoder allocate gigabytes.
"""
from __future__ import annotations

import datetime as _dt
import sys
from array import array
from itertools import accumulate
from math import copysign

MAX_COUNT = 1 << 24  # 16,777,216: 4.6 hours at 1 kHz; a block is meant to be ~1 hour
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
OID_FLOAT8 = 701

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_MASK64 = (1 << 64) - 1
_TWO53 = float(1 << 53)
_P10 = [float(10 ** d) for d in range(18)]  # exact: 10**d = 5**d * 2**d, 5**d < 2**53
_SIGNED = {1: "b", 2: "h", 4: "i", 8: "q"}
_LITTLE = sys.byteorder == "little"
assert all(array(c).itemsize == w for w, c in _SIGNED.items()) and array("Q").itemsize == 8


def _wrap(xs: list[int]) -> list[int]:
    """Differences reduced to int64 modulo 2**64 (only if one left the range)."""
    if xs and (min(xs) < _INT64_MIN or max(xs) > _INT64_MAX):
        return [((x - _INT64_MIN) & _MASK64) + _INT64_MIN for x in xs]
    return xs


def _signed_width(xs: list[int]) -> int:
    if not xs:
        return 0
    lo, hi = min(xs), max(xs)
    if lo == hi == 0:
        return 0
    for w in (1, 2, 4):
        if -(1 << (8 * w - 1)) <= lo and hi < (1 << (8 * w - 1)):
            return w
    return 8


def _be(typecode: str, xs) -> bytes:
    a = array(typecode, xs)
    if _LITTLE:
        a.byteswap()
    return a.tobytes()


def _from_be(typecode: str, data) -> array:
    a = array(typecode)
    a.frombytes(data)
    if _LITTLE:
        a.byteswap()
    return a


def _check_count(n: int) -> None:
    if n > MAX_COUNT:
        raise ValueError(f"a block holds at most {MAX_COUNT:,} readings, got {n:,}; "
                         "compact into smaller blocks")


def _as_array(values, typecode: str) -> array:
    if type(values) is array and values.typecode == typecode:
        return values
    try:
        return array(typecode, values)
    except OverflowError as exc:
        kind = "int64" if typecode == "q" else "float64"
        raise ValueError(f"a value does not fit {kind}: {exc}") from None


def _pack_int_list(v) -> bytes:
    n = len(v)
    _check_count(n)
    head = bytearray(b"\x01\x00")
    head += n.to_bytes(4, "big") + (v[0] if n else 0).to_bytes(8, "big", signed=True)
    if n < 2:
        return bytes(head)
    d = _wrap([b - a for a, b in zip(v, v[1:])])
    w1 = _signed_width(d)
    dd = _wrap([b - a for a, b in zip(d, d[1:])])
    w2 = _signed_width(dd)
    if n >= 3 and 22 + (n - 2) * w2 < 14 + (n - 1) * w1:
        head[0:2] = bytes((2, w2))
        return bytes(head) + d[0].to_bytes(8, "big", signed=True) + (
            _be(_SIGNED[w2], dd) if w2 else b"")
    head[1] = w1
    return bytes(head) + (_be(_SIGNED[w1], d) if w1 else b"")


def pack_ints(values) -> bytes:
    """Encode int64s (``array('q')`` or any sequence of ints) as packed ints."""
    return _pack_int_list(_as_array(values, "q").tolist())


def _bytes(data, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(data).__name__}")
    return bytes(data)


def _unpack_int_list(data: bytes, what: str) -> list[int]:
    size = len(data)
    if size < 14:
        raise ValueError(f"{what}: {size} bytes is shorter than the 14-byte header; "
                         "the block is truncated")
    order, w = data[0], data[1]
    n = int.from_bytes(data[2:6], "big")
    if order not in (1, 2):
        raise ValueError(f"{what}: order {order} at byte 0 is not 1 or 2; the block is corrupt")
    if w not in (0, 1, 2, 4, 8):
        raise ValueError(f"{what}: width {w} at byte 1 is not 0, 1, 2, 4 or 8; "
                         "the block is corrupt")
    _check_count(n)
    if order == 2 and n < 2:
        raise ValueError(f"{what}: order 2 needs at least 2 values, the header says {n}; "
                         "the block is corrupt")
    head = 14 if order == 1 else 22
    need = head + max(n - order, 0) * w
    if size != need:
        raise ValueError(f"{what}: {size} bytes where the header (n={n}, order={order}, "
                         f"width={w}) needs {need}; the block is truncated or corrupt")
    if n == 0:
        return []
    first = int.from_bytes(data[6:14], "big", signed=True)
    if n == 1:
        return [first]
    res = _from_be(_SIGNED[w], data[head:]).tolist() if w else [0] * (n - order)
    if order == 2:
        res = list(accumulate(res, initial=int.from_bytes(data[14:22], "big", signed=True)))
    v = list(accumulate(res, initial=first))
    return _wrap(v)


def unpack_ints(data: bytes) -> array:
    """Decode packed ints; ValueError when the block is truncated or corrupt."""
    return array("q", _unpack_int_list(_bytes(data, "packed ints"), "packed ints"))


def _decimal_exponent(v: list[float]) -> tuple[int, list[int]] | None:
    """The smallest d at which every value is k / 10**d exactly, and the ks."""
    d = 0
    i = 0
    n = len(v)
    ks = [0] * n
    while i < n:
        x = v[i]
        s = x * _P10[d]
        if abs(s) < _TWO53:  # False for NaN and infinities
            k = round(s)  # half-even, like C rint()
            y = k / _P10[d]
            if y == x and (x != 0.0 or copysign(1.0, x) > 0):  # the same bits: not -0.0
                ks[i] = k
                i += 1
                continue
        d += 1
        if d > 17:
            return None
        i = 0  # every value again, at the new d
    return d, ks


def pack_values(values) -> bytes:
    """Encode float64s (``array('d')`` or any sequence of floats), bit-exact."""
    a = _as_array(values, "d")
    n = len(a)
    _check_count(n)
    bits = array("Q", a.tobytes()).tolist()
    xs = [b ^ p for p, b in zip(bits, bits[1:])]
    wx = (max(xs, default=0).bit_length() + 7) // 8
    x_size = 14 + max(n - 1, 0) * wx
    dec = _decimal_exponent(a.tolist())
    if dec is not None:
        d, ks = dec
        packed = _pack_int_list(ks)
        if 2 + len(packed) <= x_size:
            return b"D" + bytes((d,)) + packed
    out = bytearray(x_size)
    out[0:2] = b"X" + bytes((wx,))
    out[2:6] = n.to_bytes(4, "big")
    out[6:14] = (bits[0] if n else 0).to_bytes(8, "big")
    if wx and n > 1:
        be = _be("Q", xs)
        for j in range(wx):  # byte j of each residual is byte 8-wx+j of its uint64
            out[14 + j::wx] = be[8 - wx + j::8]
    return bytes(out)


def unpack_values(data: bytes) -> array:
    """Decode a values block; ValueError when it is truncated or corrupt."""
    data = _bytes(data, "values")
    size = len(data)
    if size < 2:
        raise ValueError(f"values: {size} bytes is shorter than the 2-byte header; "
                         "the block is truncated")
    mode = data[0]
    if mode == 0x44:
        d = data[1]
        if d > 17:
            raise ValueError(f"values: decimal exponent {d} at byte 1 is above 17; "
                             "the block is corrupt")
        p = _P10[d]
        return array("d", [k / p for k in _unpack_int_list(data[2:], "values (mode D)")])
    if mode != 0x58:
        raise ValueError(f"values: mode byte 0x{mode:02x} is neither 'D' (0x44) nor 'X' (0x58); "
                         "the block is corrupt")
    if size < 14:
        raise ValueError(f"values: {size} bytes is shorter than the 14-byte header of mode X; "
                         "the block is truncated")
    w = data[1]
    n = int.from_bytes(data[2:6], "big")
    if w > 8:
        raise ValueError(f"values: width {w} at byte 1 is above 8; the block is corrupt")
    _check_count(n)
    need = 14 + max(n - 1, 0) * w
    if size != need:
        raise ValueError(f"values: {size} bytes where the header (n={n}, width={w}) needs "
                         f"{need}; the block is truncated or corrupt")
    if n == 0:
        return array("d")
    be = bytearray(8 * (n - 1))
    for j in range(w):
        be[8 - w + j::8] = data[14 + j::w]
    xs = _from_be("Q", be)
    bits = array("Q", accumulate(xs, int.__xor__, initial=int.from_bytes(data[6:14], "big")))
    return array("d", bits.tobytes())


def _pg_array(data: bytes, oid: int, what: str) -> tuple[int, int]:
    """Check the array_send header; return (element count, offset of the first element)."""
    size = len(data)
    if size < 12:
        raise ValueError(f"{what}: {size} bytes is shorter than an array header (12)")
    ndim, flags, elem = (int.from_bytes(data[o:o + 4], "big", signed=True) for o in (0, 4, 8))
    if elem != oid:
        raise ValueError(f"{what}: element type oid {elem}, expected {oid}; "
                         "send the column through array_send() unchanged")
    if flags != 0:
        raise ValueError(f"{what}: the array has NULLs (flag {flags}); a block cannot hold them")
    if ndim == 0:
        n, head = 0, 12
    elif ndim == 1:
        if size < 20:
            raise ValueError(f"{what}: {size} bytes is shorter than a 1-D array header (20)")
        n, head = int.from_bytes(data[12:16], "big", signed=True), 20
    else:
        raise ValueError(f"{what}: {ndim} dimensions; only 1-D arrays are blocks")
    if n < 0 or size != head + 12 * n:
        raise ValueError(f"{what}: {size} bytes do not hold the {n} elements of 12 bytes "
                         "its header declares; the array is truncated or corrupt")
    _check_count(n)
    for i in range(n):
        if data[head + 12 * i:head + 12 * i + 4] != b"\x00\x00\x00\x08":
            raise ValueError(f"{what}: element {i} is not 8 bytes long (NULL or corrupt)")
    return n, head


def _chunk_stamps(ts_bin: bytes, what: str = "ts") -> array:
    """The bytea ``ts`` of a ``reading_chunks`` row: big-endian Unix µs, 8 bytes each."""
    if len(ts_bin) % 8:
        raise ValueError(f"{what}: {len(ts_bin)} bytes is not a whole number of 8-byte "
                         "timestamps; the column is truncated or corrupt")
    _check_count(len(ts_bin) // 8)
    return _from_be("q", ts_bin)


def from_chunk(ts_bin: bytes, vals_bin: bytes) -> tuple[array, array]:
    """Parse one ``reading_chunks`` row: ``ts`` as stored (bytea, big-endian
    Unix µs) and ``array_send(vals)`` (``float8[]``, 1-D, no NULLs), into
    ``array('q')`` and ``array('d')`` of the same length."""
    ts = _chunk_stamps(_bytes(ts_bin, "ts"))
    vals_bin = _bytes(vals_bin, "float8[]")
    nv, hv = _pg_array(vals_bin, OID_FLOAT8, "float8[]")
    if len(ts) != nv:
        raise ValueError(f"{len(ts)} timestamps but {nv} values; a chunk pairs them one to one")
    vals = array("d", _from_be("Q", b"".join(
        vals_bin[hv + 12 * i + 4:hv + 12 * i + 12] for i in range(nv))).tobytes())
    return ts, vals


def sort_by_time(ts: array, vals: array) -> None:
    """Sort both arrays in place by (timestamp, value bits as uint64): one
    deterministic order for merged data (not numeric order among equal times)."""
    if type(ts) is not array or ts.typecode != "q":
        raise TypeError("sort_by_time: ts must be an array('q')")
    if type(vals) is not array or vals.typecode != "d":
        raise TypeError("sort_by_time: vals must be an array('d')")
    if len(ts) != len(vals):
        raise ValueError(f"sort_by_time: {len(ts)} timestamps but {len(vals)} values")
    bits = array("Q", vals.tobytes())
    if all(a <= b for a, b in zip(zip(ts, bits), zip(ts[1:], bits[1:]))):
        return  # merged pieces are mostly in order already
    pairs = sorted(zip(ts, bits))
    ts[:] = array("q", [t for t, _ in pairs])
    vals[:] = array("d", array("Q", [b for _, b in pairs]).tobytes())


# ------------------------------------------------------------------ aggregation

def aggregate(ts: array, vals: array, interval_us: int) -> tuple:
    """Downsample readings sorted by time into buckets of ``interval_us``
    aligned to the Unix epoch: ``(starts, count, sum, min, max, first, last)``,
    one element per non-empty bucket (``array('q')`` for starts and count,
    ``array('d')`` for the rest)."""
    if type(ts) is not array or ts.typecode != "q":
        raise TypeError("aggregate: ts must be an array('q')")
    if type(vals) is not array or vals.typecode != "d":
        raise TypeError("aggregate: vals must be an array('d')")
    if interval_us < 1:
        raise ValueError(f"aggregate: interval_us must be at least 1, got {interval_us}")
    if len(ts) != len(vals):
        raise ValueError(f"aggregate: {len(ts)} timestamps but {len(vals)} values")
    for i in range(1, len(ts)):
        if ts[i] < ts[i - 1]:
            raise ValueError(f"aggregate: timestamps are not sorted at index {i}; "
                             "sort_by_time first")
    starts, count = array("q"), array("q")
    s, lo, hi, first, last = (array("d") for _ in range(5))
    cur = None
    for t, x in zip(ts, vals):
        q = t // interval_us
        if q != cur:
            cur = q
            starts.append(q * interval_us)
            count.append(1)
            s.append(x)
            lo.append(x)
            hi.append(x)
            first.append(x)
            last.append(x)
        else:
            count[-1] += 1
            s[-1] += x
            if x < lo[-1]:
                lo[-1] = x
            if x > hi[-1]:
                hi[-1] = x
            last[-1] = x
    return starts, count, s, lo, hi, first, last


# ------------------------------------------------------------------ ISO 8601

_EPOCH = _dt.datetime(1970, 1, 1)
_MIN_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z
_MAX_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z


def iso_timestamps(ts: array) -> list[str]:
    """Unix µs (``array('q')``) as ISO 8601 strings in UTC with six fraction
    digits and ``Z``: ``2026-11-28T00:45:59.000213Z``."""
    if type(ts) is not array or ts.typecode != "q":
        raise TypeError("iso_timestamps: ts must be an array('q')")
    out = []
    for us in ts:
        if not _MIN_US <= us <= _MAX_US:
            raise ValueError(f"iso_timestamps: {us} µs is outside the years 1 to 9999")
        out.append((_EPOCH + _dt.timedelta(microseconds=us)).isoformat(timespec="microseconds") + "Z")
    return out


def iso_json(ts: array) -> bytes:
    """The JSON array of ``iso_timestamps(ts)``, as bytes."""
    if type(ts) is not array or ts.typecode != "q":
        raise TypeError("iso_json: ts must be an array('q')")
    return ("[" + ",".join(f'"{s}"' for s in iso_timestamps(ts)) + "]").encode()


# ------------------------------------------------- reading_chunks, as COPY out

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def group_chunks(data) -> list:
    """Parse the binary COPY output of ``(series_id int4, bucket timestamptz,
    ts bytea, vals float8[])`` ordered by (series_id, bucket), and merge
    consecutive rows of one (series_id, bucket): a list of ``(series_id,
    bucket in Unix µs, ts array('q'), vals array('d'))``, readings in the
    order the rows held them (``sort_by_time`` orders them)."""
    data = _bytes(data, "COPY data")
    if data[:11] != COPY_SIGNATURE or len(data) < 19:
        raise ValueError("COPY data: not PostgreSQL's binary COPY format (bad signature)")
    p = 19 + int.from_bytes(data[15:19], "big")
    out: list = []
    key = None
    while True:
        if p + 2 > len(data):
            raise ValueError("COPY data: truncated (no trailer)")
        nf = int.from_bytes(data[p:p + 2], "big", signed=True)
        p += 2
        if nf == -1:
            break
        if nf != 4:
            raise ValueError(f"COPY data: a row of {nf} fields, expected 4 "
                             "(series_id, bucket, ts, vals)")
        fields = []
        for _ in range(4):
            if p + 4 > len(data):
                raise ValueError("COPY data: truncated inside a row")
            n = int.from_bytes(data[p:p + 4], "big", signed=True)
            if n < 0 or p + 4 + n > len(data):
                raise ValueError("COPY data: a NULL or truncated field")
            fields.append(data[p + 4:p + 4 + n])
            p += 4 + n
        if len(fields[0]) != 4 or len(fields[1]) != 8:
            raise ValueError("COPY data: series_id must be int4 and bucket timestamptz")
        sid = int.from_bytes(fields[0], "big", signed=True)
        bucket = int.from_bytes(fields[1], "big", signed=True) + PG_EPOCH_US
        ts, vals = from_chunk(fields[2], fields[3])
        if (sid, bucket) != key:
            key = (sid, bucket)
            out.append((sid, bucket, ts, vals))
        else:
            out[-1][2].extend(ts)
            out[-1][3].extend(vals)
            _check_count(len(out[-1][2]))
    if p != len(data):
        raise ValueError("COPY data: bytes after the trailer")
    return out
