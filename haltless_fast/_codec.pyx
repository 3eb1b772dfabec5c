# cython: language_level=3
"""Block codec for compacted readings (twin: ``_codec_py.py``, which documents
the format). Same functions, same bytes; here the loops run in C over the
buffers of ``array('q')``/``array('d')``, with no Python object per element.

The format is byte-aligned big-endian so that plain SQL can decode it
(migration ``0004_codec.sql``); int differences wrap modulo 2**64, which is
why the arithmetic below is on uint64_t.
"""
cimport cython
from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.math cimport fabs, rint
from libc.stdint cimport int16_t, int32_t, int64_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy

import array

from ._codec_py import MAX_COUNT as _MAX_COUNT_PY

MAX_COUNT = _MAX_COUNT_PY
cdef Py_ssize_t MAXN = _MAX_COUNT_PY
cdef int64_t PG_EPOCH_US = 946684800000000
cdef int64_t INT64_MAX = <int64_t>(~(<uint64_t>0) >> 1)
cdef int64_t INT64_MIN = -INT64_MAX - 1
cdef double TWO53 = 9007199254740992.0
cdef double P10[18]
P10[:] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14,
          1e15, 1e16, 1e17]

cdef array.array _Q = array.array("q")
cdef array.array _D = array.array("d")


ctypedef struct IntPlan:
    int order
    int width
    Py_ssize_t size


ctypedef struct Reading:
    int64_t ts
    uint64_t bits


# ------------------------------------------------------------------ bytes

cdef inline uint64_t _get_be(const unsigned char* p, int w) noexcept nogil:
    cdef uint64_t x = 0
    cdef int j
    for j in range(w):
        x = (x << 8) | p[j]
    return x


cdef inline void _put_be(unsigned char* p, uint64_t x, int w) noexcept nogil:
    cdef int j
    for j in range(w - 1, -1, -1):
        p[j] = x & 0xff
        x >>= 8


cdef inline uint64_t _sign_extend(uint64_t x, int w) noexcept nogil:
    if 0 < w < 8 and (x >> (8 * w - 1)) & 1:
        x |= ~(<uint64_t>0) << (8 * w)
    return x


cdef inline uint64_t _magnitude(uint64_t r) noexcept nogil:
    # r as int64 fits w signed bytes iff this is below 2**(8w-1): r itself for
    # r >= 0, ~r for r < 0 (so -128 and 127 both fit one byte).
    return r ^ (<uint64_t>0 - (r >> 63))


cdef inline int _signed_width(uint64_t mag, bint nonzero) noexcept nogil:
    # mag is the OR of the residuals' magnitudes: below a power of two iff each is.
    if not nonzero:
        return 0
    if mag < 0x80:
        return 1
    if mag < 0x8000:
        return 2
    if mag < (<uint64_t>1 << 31):
        return 4
    return 8


cdef inline uint64_t _bits(double x) noexcept nogil:
    cdef uint64_t b
    memcpy(&b, &x, 8)
    return b


cdef inline double _double(uint64_t b) noexcept nogil:
    cdef double x
    memcpy(&x, &b, 8)
    return x


cdef int _check_count(Py_ssize_t n) except -1:
    if n > MAXN:
        raise ValueError(f"a block holds at most {MAX_COUNT:,} readings, got {n:,}; "
                         "compact into smaller blocks")
    return 0


cdef array.array _as_array(object values, array.array template):
    if type(values) is array.array and values.typecode == template.typecode:
        return values
    try:
        return array.array(template.typecode, values)
    except OverflowError as exc:
        kind = "int64" if template.typecode == "q" else "float64"
        raise ValueError(f"a value does not fit {kind}: {exc}") from None


cdef const unsigned char[::1] _bytes(object data, str what):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(data).__name__}")
    # A memoryview may be strided or of another item format: bytes() flattens it.
    return bytes(data) if isinstance(data, memoryview) else data


# ------------------------------------------------------------ packed ints

cdef IntPlan _plan_ints(const int64_t* v, Py_ssize_t n) noexcept nogil:
    cdef IntPlan plan
    cdef uint64_t d, prev = 0, dd, mag1 = 0, mag2 = 0
    cdef bint nz1 = False, nz2 = False
    cdef Py_ssize_t i
    cdef int w1, w2
    plan.order, plan.width, plan.size = 1, 0, 14
    if n < 2:
        return plan
    for i in range(1, n):
        d = <uint64_t>v[i] - <uint64_t>v[i - 1]
        mag1 |= _magnitude(d)
        nz1 |= d != 0
        if i >= 2:
            dd = d - prev
            mag2 |= _magnitude(dd)
            nz2 |= dd != 0
        prev = d
    w1 = _signed_width(mag1, nz1)
    w2 = _signed_width(mag2, nz2)
    plan.width, plan.size = w1, 14 + (n - 1) * w1
    if n >= 3 and 22 + (n - 2) * w2 < plan.size:
        plan.order, plan.width, plan.size = 2, w2, 22 + (n - 2) * w2
    return plan


cdef void _write_ints(const int64_t* v, Py_ssize_t n, IntPlan plan,
                      unsigned char* p) noexcept nogil:
    cdef Py_ssize_t i
    cdef int w = plan.width
    cdef uint64_t d, prev
    p[0] = plan.order
    p[1] = w
    _put_be(p + 2, <uint64_t>n, 4)
    _put_be(p + 6, <uint64_t>v[0] if n else 0, 8)
    if n < 2:
        return
    prev = <uint64_t>v[1] - <uint64_t>v[0]
    if plan.order == 1:
        p += 14
        for i in range(1, n):
            _put_be(p, <uint64_t>v[i] - <uint64_t>v[i - 1], w)
            p += w
        return
    _put_be(p + 14, prev, 8)
    p += 22
    for i in range(2, n):
        d = <uint64_t>v[i] - <uint64_t>v[i - 1]
        _put_be(p, d - prev, w)
        p += w
        prev = d


cdef bytes _pack_int64s(const int64_t* v, Py_ssize_t n, IntPlan plan,
                        const unsigned char* prefix, int np):
    out = PyBytes_FromStringAndSize(NULL, np + plan.size)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    if np:
        memcpy(p, prefix, np)
    _write_ints(v, n, plan, p + np)
    return out


def pack_ints(values):
    """Encode int64s (``array('q')`` or any sequence of ints) as packed ints."""
    cdef array.array a = _as_array(values, _Q)
    cdef const int64_t* v = <int64_t*>a.data.as_longlongs
    cdef Py_ssize_t n = len(a)
    _check_count(n)
    return _pack_int64s(v, n, _plan_ints(v, n), NULL, 0)


cdef Py_ssize_t _check_ints(const unsigned char* p, Py_ssize_t size, str what) except -1:
    """Validate a packed-ints header against the size; return n."""
    if size < 14:
        raise ValueError(f"{what}: {size} bytes is shorter than the 14-byte header; "
                         "the block is truncated")
    cdef int order = p[0], w = p[1]
    cdef Py_ssize_t n = <Py_ssize_t>_get_be(p + 2, 4)
    if order != 1 and order != 2:
        raise ValueError(f"{what}: order {order} at byte 0 is not 1 or 2; the block is corrupt")
    if w != 0 and w != 1 and w != 2 and w != 4 and w != 8:
        raise ValueError(f"{what}: width {w} at byte 1 is not 0, 1, 2, 4 or 8; "
                         "the block is corrupt")
    _check_count(n)
    if order == 2 and n < 2:
        raise ValueError(f"{what}: order 2 needs at least 2 values, the header says {n}; "
                         "the block is corrupt")
    cdef Py_ssize_t head = 14 if order == 1 else 22
    cdef Py_ssize_t need = head + (n - order if n > order else 0) * w
    if size != need:
        raise ValueError(f"{what}: {size} bytes where the header (n={n}, order={order}, "
                         f"width={w}) needs {need}; the block is truncated or corrupt")
    return n


cdef void _read_ints(const unsigned char* p, Py_ssize_t n, int64_t* out) noexcept nogil:
    """Decode a block that _check_ints accepted, modulo 2**64 like the encoder."""
    cdef int order = p[0], w = p[1]
    cdef Py_ssize_t i
    cdef uint64_t v, d
    if n == 0:
        return
    v = _get_be(p + 6, 8)
    out[0] = <int64_t>v
    if order == 1:
        p += 14
        for i in range(1, n):
            v += _sign_extend(_get_be(p, w), w)
            out[i] = <int64_t>v
            p += w
        return
    d = _get_be(p + 14, 8)
    v += d
    out[1] = <int64_t>v
    p += 22
    for i in range(2, n):
        d += _sign_extend(_get_be(p, w), w)
        v += d
        out[i] = <int64_t>v
        p += w


cdef array.array _unpack_int64s(const unsigned char* p, Py_ssize_t size, str what):
    cdef Py_ssize_t n = _check_ints(p, size, what)
    cdef array.array out = array.clone(_Q, n, False)
    _read_ints(p, n, <int64_t*>out.data.as_longlongs)
    return out


def unpack_ints(data):
    """Decode packed ints; ValueError when the block is truncated or corrupt."""
    cdef const unsigned char[::1] b = _bytes(data, "packed ints")
    if b.shape[0] == 0:
        return _unpack_int64s(NULL, 0, "packed ints")
    return _unpack_int64s(&b[0], b.shape[0], "packed ints")


# ------------------------------------------------------------------ values

cdef inline bint _decimal(double x, int d, int64_t* k) noexcept nogil:
    """x == k / 10**d exactly (same bits), with |k| < 2**53."""
    cdef double s = x * P10[d]
    if not (fabs(s) < TWO53):  # NaN and infinities fail here
        return False
    k[0] = <int64_t>rint(s)  # half-even, like Python's round()
    return _bits(<double>k[0] / P10[d]) == _bits(x)


cdef int _decimal_exponent(const double* v, Py_ssize_t n, int64_t* k) noexcept nogil:
    """The smallest d at which every value is decimal (filling k), or -1."""
    cdef int d = 0
    cdef Py_ssize_t i = 0
    while i < n:
        if _decimal(v[i], d, &k[i]):
            i += 1
            continue
        d += 1
        if d > 17:
            return -1
        i = 0  # every value again, at the new d
    return d


def pack_values(values):
    """Encode float64s (``array('d')`` or any sequence of floats), bit-exact."""
    cdef array.array a = _as_array(values, _D)
    cdef Py_ssize_t n = len(a), i, x_size
    cdef const double* v = a.data.as_doubles
    cdef uint64_t acc = 0
    cdef int wx = 0, d
    cdef IntPlan plan
    cdef int64_t* k
    cdef unsigned char head[2]
    cdef unsigned char* p
    _check_count(n)
    for i in range(1, n):
        acc |= _bits(v[i]) ^ _bits(v[i - 1])
    while acc:
        wx += 1
        acc >>= 8
    x_size = 14 + (n - 1 if n > 1 else 0) * wx
    k = <int64_t*>malloc((n if n else 1) * sizeof(int64_t))
    if k == NULL:
        raise MemoryError()
    try:
        d = _decimal_exponent(v, n, k)
        if d >= 0:
            plan = _plan_ints(k, n)
            if 2 + plan.size <= x_size:
                head[0], head[1] = 0x44, d
                return _pack_int64s(k, n, plan, head, 2)
    finally:
        free(k)
    out = PyBytes_FromStringAndSize(NULL, x_size)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0], p[1] = 0x58, wx
    _put_be(p + 2, <uint64_t>n, 4)
    _put_be(p + 6, _bits(v[0]) if n else 0, 8)
    p += 14
    for i in range(1, n):
        _put_be(p, _bits(v[i]) ^ _bits(v[i - 1]), wx)
        p += wx
    return out


def unpack_values(data):
    """Decode a values block; ValueError when it is truncated or corrupt."""
    cdef const unsigned char[::1] b = _bytes(data, "values")
    cdef Py_ssize_t size = b.shape[0], n, i
    cdef const unsigned char* p
    cdef int d, w
    cdef array.array out
    cdef double* o
    cdef uint64_t bits
    cdef int64_t k
    cdef double scale
    if size < 2:
        raise ValueError(f"values: {size} bytes is shorter than the 2-byte header; "
                         "the block is truncated")
    p = &b[0]
    if p[0] == 0x44:
        d = p[1]
        if d > 17:
            raise ValueError(f"values: decimal exponent {d} at byte 1 is above 17; "
                             "the block is corrupt")
        n = _check_ints(p + 2, size - 2, "values (mode D)")
        out = array.clone(_D, n, False)
        o = out.data.as_doubles
        # The int64s land in the output buffer, then become doubles in place.
        _read_ints(p + 2, n, <int64_t*>o)
        scale = P10[d]
        for i in range(n):
            memcpy(&k, &o[i], 8)
            o[i] = <double>k / scale
        return out
    if p[0] != 0x58:
        raise ValueError(f"values: mode byte 0x{p[0]:02x} is neither 'D' (0x44) nor 'X' (0x58); "
                         "the block is corrupt")
    if size < 14:
        raise ValueError(f"values: {size} bytes is shorter than the 14-byte header of mode X; "
                         "the block is truncated")
    w = p[1]
    n = <Py_ssize_t>_get_be(p + 2, 4)
    if w > 8:
        raise ValueError(f"values: width {w} at byte 1 is above 8; the block is corrupt")
    _check_count(n)
    cdef Py_ssize_t need = 14 + (n - 1 if n > 1 else 0) * w
    if size != need:
        raise ValueError(f"values: {size} bytes where the header (n={n}, width={w}) needs "
                         f"{need}; the block is truncated or corrupt")
    out = array.clone(_D, n, False)
    if n == 0:
        return out
    o = out.data.as_doubles
    bits = _get_be(p + 6, 8)
    o[0] = _double(bits)
    p += 14
    for i in range(1, n):
        bits ^= _get_be(p, w)
        o[i] = _double(bits)
        p += w
    return out


# --------------------------------------------------------- PostgreSQL arrays

cdef Py_ssize_t _pg_array(const unsigned char[::1] b, int oid, str what,
                          Py_ssize_t* head) except -1:
    """Check the array_send header; return the element count, set *head."""
    cdef Py_ssize_t size = b.shape[0], n, i
    if size < 12:
        raise ValueError(f"{what}: {size} bytes is shorter than an array header (12)")
    cdef const unsigned char* p = &b[0]
    cdef int ndim = <int>_get_be(p, 4), flags = <int>_get_be(p + 4, 4)
    cdef int elem = <int>_get_be(p + 8, 4)
    if elem != oid:
        raise ValueError(f"{what}: element type oid {elem}, expected {oid}; "
                         "send the column through array_send() unchanged")
    if flags != 0:
        raise ValueError(f"{what}: the array has NULLs (flag {flags}); a block cannot hold them")
    if ndim == 0:
        n, head[0] = 0, 12
    elif ndim == 1:
        if size < 20:
            raise ValueError(f"{what}: {size} bytes is shorter than a 1-D array header (20)")
        n, head[0] = <int>_get_be(p + 12, 4), 20
    else:
        raise ValueError(f"{what}: {ndim} dimensions; only 1-D arrays are blocks")
    if n < 0 or size != head[0] + 12 * n:
        raise ValueError(f"{what}: {size} bytes do not hold the {n} elements of 12 bytes "
                         "its header declares; the array is truncated or corrupt")
    _check_count(n)
    p += head[0]
    for i in range(n):
        if _get_be(p + 12 * i, 4) != 8:
            raise ValueError(f"{what}: element {i} is not 8 bytes long (NULL or corrupt)")
    return n


cdef Py_ssize_t _chunk_count(Py_ssize_t size, str what) except -1:
    if size % 8:
        raise ValueError(f"{what}: {size} bytes is not a whole number of 8-byte "
                         "timestamps; the column is truncated or corrupt")
    _check_count(size // 8)
    return size // 8


def from_chunk(ts_bin, vals_bin):
    """See ``_codec_py.from_chunk``: same contract, same results."""
    cdef const unsigned char[::1] tb = _bytes(ts_bin, "ts")
    cdef const unsigned char[::1] vb = _bytes(vals_bin, "float8[]")
    cdef Py_ssize_t hv, i
    cdef Py_ssize_t nt = _chunk_count(tb.shape[0], "ts")
    cdef Py_ssize_t nv = _pg_array(vb, 701, "float8[]", &hv)
    if nt != nv:
        raise ValueError(f"{nt} timestamps but {nv} values; a chunk pairs them one to one")
    cdef array.array ts = array.clone(_Q, nt, False)
    cdef array.array vals = array.clone(_D, nv, False)
    for i in range(nt):
        (<int64_t*>ts.data.as_longlongs)[i] = <int64_t>_get_be(&tb[8 * i], 8)
        vals.data.as_doubles[i] = _double(_get_be(&vb[hv + 12 * i + 4], 8))
    return ts, vals


# ------------------------------------------------------------------ sorting

cdef int _cmp_reading(const void* a, const void* b) noexcept nogil:
    cdef const Reading* x = <const Reading*>a
    cdef const Reading* y = <const Reading*>b
    if x.ts != y.ts:
        return -1 if x.ts < y.ts else 1
    if x.bits != y.bits:
        return -1 if x.bits < y.bits else 1
    return 0


def sort_by_time(ts, vals):
    """Sort both arrays in place by (timestamp, value bits as uint64): one
    deterministic order for merged data (not numeric order among equal times)."""
    if type(ts) is not array.array or ts.typecode != "q":
        raise TypeError("sort_by_time: ts must be an array('q')")
    if type(vals) is not array.array or vals.typecode != "d":
        raise TypeError("sort_by_time: vals must be an array('d')")
    cdef array.array t = ts, v = vals
    cdef Py_ssize_t n = len(t), i
    if n != len(v):
        raise ValueError(f"sort_by_time: {n} timestamps but {len(v)} values")
    if n < 2:
        return
    cdef int64_t* tp = <int64_t*>t.data.as_longlongs
    cdef const double* vp = v.data.as_doubles
    cdef bint ordered = True
    with nogil:  # merged pieces are mostly in order already: one pass says so
        for i in range(1, n):
            if tp[i] < tp[i - 1] or (tp[i] == tp[i - 1] and _bits(vp[i]) < _bits(vp[i - 1])):
                ordered = False
                break
    if ordered:
        return
    cdef Reading* r = <Reading*>malloc(n * sizeof(Reading))
    if r == NULL:
        raise MemoryError()
    with nogil:
        for i in range(n):
            r[i].ts = (<int64_t*>t.data.as_longlongs)[i]
            r[i].bits = _bits(v.data.as_doubles[i])
        qsort(r, n, sizeof(Reading), _cmp_reading)
        for i in range(n):
            (<int64_t*>t.data.as_longlongs)[i] = r[i].ts
            v.data.as_doubles[i] = _double(r[i].bits)
    free(r)


# ------------------------------------------------------------------ aggregation

def aggregate(ts, vals, long long interval_us):
    """Downsample readings sorted by time into buckets of ``interval_us``
    aligned to the Unix epoch: ``(starts, count, sum, min, max, first, last)``,
    one element per non-empty bucket (``array('q')`` for starts and count,
    ``array('d')`` for the rest)."""
    if type(ts) is not array.array or ts.typecode != "q":
        raise TypeError("aggregate: ts must be an array('q')")
    if type(vals) is not array.array or vals.typecode != "d":
        raise TypeError("aggregate: vals must be an array('d')")
    if interval_us < 1:
        raise ValueError(f"aggregate: interval_us must be at least 1, got {interval_us}")
    cdef array.array t = ts, v = vals
    cdef Py_ssize_t n = len(t), i, k = -1
    if n != len(v):
        raise ValueError(f"aggregate: {n} timestamps but {len(v)} values")
    cdef const int64_t* tp = <int64_t*>t.data.as_longlongs
    cdef const double* vp = v.data.as_doubles
    cdef int64_t b, q, cur = 0
    cdef double x
    for i in range(1, n):
        if tp[i] < tp[i - 1]:
            raise ValueError(f"aggregate: timestamps are not sorted at index {i}; "
                             "sort_by_time first")
    cdef Py_ssize_t m = 0
    for i in range(n):  # buckets first, so every output is allocated once
        q = tp[i] // interval_us if tp[i] >= 0 else -((-tp[i] - 1) // interval_us) - 1
        if i == 0 or q != cur:
            m += 1
            cur = q
    cdef array.array starts = array.clone(_Q, m, False), count = array.clone(_Q, m, False)
    cdef array.array s = array.clone(_D, m, False), lo = array.clone(_D, m, False)
    cdef array.array hi = array.clone(_D, m, False), first = array.clone(_D, m, False)
    cdef array.array last = array.clone(_D, m, False)
    cdef int64_t* sp = <int64_t*>starts.data.as_longlongs
    cdef int64_t* cp = <int64_t*>count.data.as_longlongs
    with nogil:
        for i in range(n):
            q = tp[i] // interval_us if tp[i] >= 0 else -((-tp[i] - 1) // interval_us) - 1
            x = vp[i]
            if k < 0 or q != cur:
                k += 1
                cur = q
                sp[k] = q * interval_us
                cp[k] = 1
                s.data.as_doubles[k] = x
                lo.data.as_doubles[k] = x
                hi.data.as_doubles[k] = x
                first.data.as_doubles[k] = x
            else:
                cp[k] += 1
                s.data.as_doubles[k] += x
                if x < lo.data.as_doubles[k]:
                    lo.data.as_doubles[k] = x
                if x > hi.data.as_doubles[k]:
                    hi.data.as_doubles[k] = x
            last.data.as_doubles[k] = x
    return starts, count, s, lo, hi, first, last


# ------------------------------------------------------------------ ISO 8601

cdef int64_t MIN_US = -62135596800000000  # 0001-01-01T00:00:00Z
cdef int64_t MAX_US = 253402300799999999  # 9999-12-31T23:59:59.999999Z
cdef int64_t DAY_US = 86400000000
cdef int64_t SECOND_US = 1000000


@cython.cdivision(True)  # operands are never negative here
cdef inline void _digits(char* p, int64_t v, int width) noexcept nogil:
    cdef int j
    for j in range(width - 1, -1, -1):
        p[j] = <char>(48 + v % 10)
        v //= 10


@cython.cdivision(True)  # us - MIN_US is never negative
cdef inline void _iso(char* buf, int64_t us) noexcept nogil:
    """27 characters of ``us`` (in [MIN_US, MAX_US]) as 2026-11-28T00:45:59.000213Z."""
    cdef int64_t days, secs, z, era, doe, yoe, y, doy, mp, d, m
    us -= MIN_US  # from 0001-01-01: non-negative, so C division floors
    days = us // DAY_US - 719162  # days since 1970-01-01
    secs = (us // SECOND_US) % 86400
    # civil_from_days (H. Hinnant), eras of 400 years from 0000-03-01
    z = days + 719468
    era = z // 146097  # z > 0 from year 1 on
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    _digits(buf, y, 4)
    buf[4] = 45
    _digits(buf + 5, m, 2)
    buf[7] = 45
    _digits(buf + 8, d, 2)
    buf[10] = 84
    _digits(buf + 11, secs // 3600, 2)
    buf[13] = 58
    _digits(buf + 14, (secs // 60) % 60, 2)
    buf[16] = 58
    _digits(buf + 17, secs % 60, 2)
    buf[19] = 46
    _digits(buf + 20, us % SECOND_US, 6)
    buf[26] = 90


cdef int _check_iso(const int64_t* tp, Py_ssize_t n) except -1:
    cdef Py_ssize_t i
    for i in range(n):
        if tp[i] < MIN_US or tp[i] > MAX_US:
            raise ValueError(f"iso_timestamps: {tp[i]} µs is outside the years 1 to 9999")
    return 0


def iso_timestamps(ts):
    """Unix µs (``array('q')``) as ISO 8601 strings in UTC with six fraction
    digits and ``Z``: ``2026-11-28T00:45:59.000213Z``."""
    if type(ts) is not array.array or ts.typecode != "q":
        raise TypeError("iso_timestamps: ts must be an array('q')")
    cdef array.array t = ts
    cdef Py_ssize_t n = len(t), i
    cdef const int64_t* tp = <int64_t*>t.data.as_longlongs
    cdef char buf[27]
    _check_iso(tp, n)
    out = [None] * n
    for i in range(n):
        _iso(buf, tp[i])
        out[i] = PyUnicode_DecodeASCII(buf, 27, NULL)
    return out


def iso_json(ts):
    """The JSON array of ``iso_timestamps(ts)``, as bytes, written in one
    buffer: 86,400 timestamps in ~1 ms instead of ~30 ms through str objects."""
    if type(ts) is not array.array or ts.typecode != "q":
        raise TypeError("iso_json: ts must be an array('q')")
    cdef array.array t = ts
    cdef Py_ssize_t n = len(t), i
    cdef const int64_t* tp = <int64_t*>t.data.as_longlongs
    _check_iso(tp, n)
    if n == 0:
        return b"[]"
    out = PyBytes_FromStringAndSize(NULL, 30 * n + 1)  # '["' 27 '",' ... '"]'
    cdef char* p = PyBytes_AS_STRING(out)
    with nogil:
        p[0] = 91
        for i in range(n):
            p[1 + 30 * i] = 34
            _iso(p + 2 + 30 * i, tp[i])
            p[29 + 30 * i] = 34
            p[30 + 30 * i] = 44
        p[30 * n] = 93
    return out


# ------------------------------------------------- reading_chunks, as COPY out

cdef Py_ssize_t _extend_stamps(const unsigned char[::1] b, Py_ssize_t off, Py_ssize_t size,
                               array.array dest) except -1:
    """Append the big-endian Unix µs of the bytea at b[off:off+size] to dest."""
    cdef Py_ssize_t n = _chunk_count(size, "ts"), i, base = len(dest)
    _check_count(base + n)
    array.resize(dest, base + n)
    for i in range(n):
        (<int64_t*>dest.data.as_longlongs)[base + i] = <int64_t>_get_be(&b[off + 8 * i], 8)
    return n


cdef Py_ssize_t _extend_from_pg(const unsigned char[::1] b, Py_ssize_t off, Py_ssize_t size,
                                int oid, str what, array.array dest) except -1:
    """Append the float8 elements of the array_send bytes at b[off:off+size] to dest."""
    cdef Py_ssize_t head, n, i, base = len(dest)
    n = _pg_array(b[off:off + size], oid, what, &head)
    _check_count(base + n)
    array.resize(dest, base + n)
    cdef const unsigned char* p = &b[off + head] if n else NULL
    for i in range(n):
        dest.data.as_doubles[base + i] = _double(_get_be(p + 12 * i + 4, 8))
    return n


def group_chunks(data):
    """See ``_codec_py.group_chunks``: same contract, same results."""
    cdef const unsigned char[::1] b = _bytes(data, "COPY data")
    cdef Py_ssize_t size = b.shape[0], p, k, flen[4], foff[4]
    cdef int nf
    cdef int32_t sid, cur_sid = 0
    cdef int64_t bucket, cur_bucket = 0
    cdef bint have = False
    cdef array.array ts = None, vals = None
    if size < 19 or bytes(b[:11]) != b"PGCOPY\n\xff\r\n\x00":
        raise ValueError("COPY data: not PostgreSQL's binary COPY format (bad signature)")
    p = 19 + <Py_ssize_t>_get_be(&b[15], 4)
    out = []
    while True:
        if p + 2 > size:
            raise ValueError("COPY data: truncated (no trailer)")
        nf = <int16_t>_get_be(&b[p], 2)
        p += 2
        if nf == -1:
            break
        if nf != 4:
            raise ValueError(f"COPY data: a row of {nf} fields, expected 4 "
                             "(series_id, bucket, ts, vals)")
        for k in range(4):
            if p + 4 > size:
                raise ValueError("COPY data: truncated inside a row")
            flen[k] = <int32_t>_get_be(&b[p], 4)
            if flen[k] < 0 or p + 4 + flen[k] > size:
                raise ValueError("COPY data: a NULL or truncated field")
            foff[k] = p + 4
            p += 4 + flen[k]
        if flen[0] != 4 or flen[1] != 8:
            raise ValueError("COPY data: series_id must be int4 and bucket timestamptz")
        sid = <int32_t>_get_be(&b[foff[0]], 4)
        bucket = <int64_t>_get_be(&b[foff[1]], 8) + PG_EPOCH_US
        if not have or sid != cur_sid or bucket != cur_bucket:
            have, cur_sid, cur_bucket = True, sid, bucket
            ts = array.clone(_Q, 0, False)
            vals = array.clone(_D, 0, False)
            out.append((sid, bucket, ts, vals))
        nt = _extend_stamps(b, foff[2], flen[2], ts)
        nv = _extend_from_pg(b, foff[3], flen[3], 701, "float8[]", vals)
        if nt != nv:
            raise ValueError(f"{nt} timestamps but {nv} values; a block pairs them one to one")
    if p != size:
        raise ValueError("COPY data: bytes after the trailer")
    return out
