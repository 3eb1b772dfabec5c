"""Block codec for compacted readings (pure-Python twin of ``_blocks.pyx``).

A block is one series' readings of one hour or so: int64 timestamps (Unix µs)
and float64 values, stored as two byte strings. Every field is whole bytes,
big-endian, at an offset computable from the header, so PostgreSQL can decode
a block in plain SQL (``get_byte``/``substring`` + window sums, migration
``0004_codec.sql``) with no extension installed. Bit-packing would save a
little more and lose that.

Packed ints (timestamps; the decimal mantissas of mode D)::

    [0] order: 1 = deltas, 2 = delta-of-deltas, 3 = distances from a line
    [1] w: bytes per residual, one of 0, 1, 2, 4, 8 (order 3: at most 4)
    [2:6] n (uint32)   [6:14] first value (int64)   order 2: [14:22] first delta
    then n-1 (order 1) or n-2 (order 2) residuals, w bytes each, two's complement
    order 3: [6:14] base, [14:22] step (int64), then n residuals r, and
    v[i] = base + i * step + r[i] (no running sum)

All differences are taken modulo 2**64 (and summed back modulo 2**64), so any
int64 sequence round-trips, even when a true difference would overflow. The
encoder takes the smaller of the two orders (a tie goes to order 1) with the
smallest w that holds every residual: timestamps at 1 s with ±500 µs of
jitter take order 2 at w = 2 (2.0 bytes each), where their deltas of ~1e6 µs
would need w = 4.

Order 3 (a line and each value's distance from it: frame of reference when
the step is 0) is taken when it is at most 16 bytes larger than the smaller of
orders 1 and 2, because each value decodes on its own: in SQL a running sum
costs ~3x an element. The line is the flat one or the one through the first
and last values (step = (last - first) / (n - 1), rounded half away from
zero), whichever gives narrower residuals (a tie is flat), and base is the
midrange of v[i] - i * step (rounded up). It is only used when every
|v| < 2**61, (n - 1) * |step| < 2**61 and w <= 4, so that base + i * step + r
never leaves int64 (a decoder refuses |base| >= 2**62 or (n-1)*|step| >= 2**62):
jittered timestamps at 1 s take it at w = 2 like order 2, a gauge that wanders
around a setpoint at w = 1 where its deltas need 2.

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

from array import array
from itertools import accumulate
from math import copysign

from ._shared_py import MAX_COUNT, as_bytes, check_count, from_be, to_be

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_MASK64 = (1 << 64) - 1
_TWO53 = float(1 << 53)
_P10 = [float(10 ** d) for d in range(18)]  # exact: 10**d = 5**d * 2**d, 5**d < 2**53
_SIGNED = {1: "b", 2: "h", 4: "i", 8: "q"}
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



def _as_array(values, typecode: str) -> array:
    if type(values) is array and values.typecode == typecode:
        return values
    try:
        return array(typecode, values)
    except OverflowError as exc:
        kind = "int64" if typecode == "q" else "float64"
        raise ValueError(f"a value does not fit {kind}: {exc}") from None


_LINEAR_LIMIT = 1 << 61  # order 3: |v| and (n-1)|step| below this
_LINEAR_CHECK = 1 << 62  # what a decoder accepts (the sum stays in int64)
_LINEAR_SLACK = 16  # bytes order 3 may exceed orders 1 and 2 by (it decodes without running sums)


def _linear(v: list[int], step: int) -> tuple[int, int]:
    """(width, base) of the residuals v[i] - i*step - base, base their
    midrange rounded up (256 values fit a byte as -128..127); width -1 when
    they need more than 4 bytes."""
    r = [x - i * step for i, x in enumerate(v)]
    lo, hi = min(r), max(r)
    base = lo + (hi - lo + 1) // 2
    w = _signed_width([lo - base, hi - base])
    return (w if w <= 4 else -1), base


def _pack_int_list(v) -> bytes:
    n = len(v)
    check_count(n)
    head = bytearray(b"\x01\x00")
    head += n.to_bytes(4, "big") + (v[0] if n else 0).to_bytes(8, "big", signed=True)
    if n < 2:
        return bytes(head)
    d = _wrap([b - a for a, b in zip(v, v[1:])])
    w1 = _signed_width(d)
    dd = _wrap([b - a for a, b in zip(d, d[1:])])
    w2 = _signed_width(dd)
    order, w, size = 1, w1, 14 + (n - 1) * w1
    if n >= 3 and 22 + (n - 2) * w2 < size:
        order, w, size = 2, w2, 22 + (n - 2) * w2
    if all(-_LINEAR_LIMIT < x < _LINEAR_LIMIT for x in v):
        diff = v[-1] - v[0]
        step = (abs(diff) + (n - 1) // 2) // (n - 1) * (-1 if diff < 0 else 1)
        w3, base = _linear(v, 0)
        if step and abs(step) < _LINEAR_LIMIT // (n - 1):
            ws, bs = _linear(v, step)
            if ws >= 0 and (w3 < 0 or ws < w3):
                w3, base = ws, bs
            else:
                step = 0
        else:
            step = 0
        if w3 >= 0 and 22 + n * w3 <= size + _LINEAR_SLACK:
            res = [x - i * step - base for i, x in enumerate(v)]
            return (bytes((3, w3)) + n.to_bytes(4, "big") + base.to_bytes(8, "big", signed=True)
                    + step.to_bytes(8, "big", signed=True)
                    + (to_be(_SIGNED[w3], res) if w3 else b""))
    if order == 2:
        head[0:2] = bytes((2, w2))
        return bytes(head) + d[0].to_bytes(8, "big", signed=True) + (
            to_be(_SIGNED[w2], dd) if w2 else b"")
    head[1] = w1
    return bytes(head) + (to_be(_SIGNED[w1], d) if w1 else b"")


def pack_ints(values) -> bytes:
    """Encode int64s (``array('q')`` or any sequence of ints) as packed ints."""
    return _pack_int_list(_as_array(values, "q").tolist())


def _unpack_int_list(data: bytes, what: str) -> list[int]:
    size = len(data)
    if size < 14:
        raise ValueError(f"{what}: {size} bytes is shorter than the 14-byte header; "
                         "the block is truncated")
    order, w = data[0], data[1]
    n = int.from_bytes(data[2:6], "big")
    if order not in (1, 2, 3):
        raise ValueError(f"{what}: order {order} at byte 0 is not 1, 2 or 3; "
                         "the block is corrupt")
    if w not in ((0, 1, 2, 4) if order == 3 else (0, 1, 2, 4, 8)):
        raise ValueError(f"{what}: width {w} at byte 1 is not 0, 1, 2, 4"
                         f"{'' if order == 3 else ' or 8'}; the block is corrupt")
    check_count(n)
    if order == 2 and n < 2:
        raise ValueError(f"{what}: order 2 needs at least 2 values, the header says {n}; "
                         "the block is corrupt")
    head = 14 if order == 1 else 22
    need = head + (n * w if order == 3 else max(n - order, 0) * w)
    if size != need:
        raise ValueError(f"{what}: {size} bytes where the header (n={n}, order={order}, "
                         f"width={w}) needs {need}; the block is truncated or corrupt")
    if order == 3:
        base = int.from_bytes(data[6:14], "big", signed=True)
        step = int.from_bytes(data[14:22], "big", signed=True)
        lim = _LINEAR_CHECK // (n - 1) if n > 1 else _LINEAR_CHECK
        if not (-_LINEAR_CHECK < base < _LINEAR_CHECK and -lim < step < lim):
            raise ValueError(f"{what}: order 3 line (base {base}, step {step}, n={n}) leaves "
                             "the range of int64; the block is corrupt")
        res = from_be(_SIGNED[w], data[22:]).tolist() if w else [0] * n
        return [base + i * step + r for i, r in enumerate(res)]
    if n == 0:
        return []
    first = int.from_bytes(data[6:14], "big", signed=True)
    if n == 1:
        return [first]
    res = from_be(_SIGNED[w], data[head:]).tolist() if w else [0] * (n - order)
    if order == 2:
        res = list(accumulate(res, initial=int.from_bytes(data[14:22], "big", signed=True)))
    v = list(accumulate(res, initial=first))
    return _wrap(v)


def unpack_ints(data: bytes) -> array:
    """Decode packed ints; ValueError when the block is truncated or corrupt."""
    return array("q", _unpack_int_list(as_bytes(data, "packed ints"), "packed ints"))


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
    check_count(n)
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
        be = to_be("Q", xs)
        for j in range(wx):  # byte j of each residual is byte 8-wx+j of its uint64
            out[14 + j::wx] = be[8 - wx + j::8]
    return bytes(out)


def unpack_values(data: bytes) -> array:
    """Decode a values block; ValueError when it is truncated or corrupt."""
    data = as_bytes(data, "values")
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
    check_count(n)
    need = 14 + max(n - 1, 0) * w
    if size != need:
        raise ValueError(f"values: {size} bytes where the header (n={n}, width={w}) needs "
                         f"{need}; the block is truncated or corrupt")
    if n == 0:
        return array("d")
    be = bytearray(8 * (n - 1))
    for j in range(w):
        be[8 - w + j::8] = data[14 + j::w]
    xs = from_be("Q", be)
    bits = array("Q", accumulate(xs, int.__xor__, initial=int.from_bytes(data[6:14], "big")))
    return array("d", bits.tobytes())



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


# ------------------------------------------------------------- summaries

def summarize(ts: array, vals: array, interval_us: int = 60_000_000) -> tuple:
    """Summaries of a block's readings (sorted by time) per ``interval_us``
    aligned to the Unix epoch, stored with the block for the rollups:
    ``(d, starts, count, fields)``, one entry per non-empty interval, and in
    ``fields`` five per interval: sum, min, max, first, last.

    When every value is a decimal k / 10**d (the test of mode D) and every
    interval's sum of k fits int64, ``d`` is that exponent and ``fields`` is
    ``array('q')`` of k: the sums are exact. Else ``d`` is -1 and ``fields`` is
    ``array('d')`` of the values, the sums added in time order (as
    ``aggregate``). An empty block gives -1 and empty arrays."""
    if type(ts) is not array or ts.typecode != "q":
        raise TypeError("summarize: ts must be an array('q')")
    if type(vals) is not array or vals.typecode != "d":
        raise TypeError("summarize: vals must be an array('d')")
    if interval_us < 1:
        raise ValueError(f"summarize: interval_us must be at least 1, got {interval_us}")
    n = len(ts)
    if n != len(vals):
        raise ValueError(f"summarize: {n} timestamps but {len(vals)} values")
    t = ts.tolist()
    for i in range(1, n):
        if t[i] < t[i - 1]:
            raise ValueError(f"summarize: timestamps are not sorted at index {i}; "
                             "sort_by_time first")
    starts, count = array("q"), array("q")
    bounds = []
    for i, x in enumerate(t):
        q = x // interval_us
        if not starts or q * interval_us != starts[-1]:
            starts.append(q * interval_us)
            count.append(0)
            bounds.append(i)
        count[-1] += 1
    bounds.append(n)
    v = vals.tolist()
    dec = _decimal_exponent(v) if n else None
    if dec is not None:
        d, ks = dec
        fields = []
        for a, b in zip(bounds, bounds[1:]):
            part = ks[a:b]
            total = sum(part)
            if not _INT64_MIN <= total <= _INT64_MAX:
                break
            fields += [total, min(part), max(part), part[0], part[-1]]
        else:
            return d, starts, count, array("q", fields)
    fields = array("d")
    for a, b in zip(bounds, bounds[1:]):
        part = v[a:b]
        total = lo = hi = part[0]  # (not 0.0 + first: -0.0 stays -0.0, as in aggregate)
        for x in part[1:]:  # < and >, as aggregate: the first of equal values stays
            total += x
            if x < lo:
                lo = x
            if x > hi:
                hi = x
        fields.extend((total, lo, hi, part[0], part[-1]))
    return -1, starts, count, fields
