# cython: language_level=3
"""Block codec for compacted readings (twin: ``_blocks_py.py``, which documents
the format). Same functions, same bytes; here the loops run in C over the
buffers of ``array('q')``/``array('d')``, with no Python object per element.

The format is byte-aligned big-endian so that plain SQL can decode it
(migration ``0004_codec.sql``); int differences wrap modulo 2**64, which is
why the arithmetic below is on uint64_t.
"""
from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.math cimport fabs, rint
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy

# _shared.pxd, by its bare name (setup.py says why)
from _shared cimport MAX_COUNT as MAXN, as_bytes, check_count, from_bits, get_be, put_be, to_bits

import array

MAX_COUNT = MAXN
cdef double TWO53 = 9007199254740992.0
cdef int64_t INT64_MAX_ = 0x7FFFFFFFFFFFFFFF
cdef int64_t INT64_MIN_ = -INT64_MAX_ - 1
cdef double P10[18]
P10[:] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14,
          1e15, 1e16, 1e17]

cdef array.array _Q = array.array("q")
cdef array.array _D = array.array("d")

ctypedef struct IntPlan:
    int order
    int width
    Py_ssize_t size
    int64_t base  # order 3
    int64_t step  # order 3


ctypedef struct Reading:
    int64_t ts
    uint64_t bits


# ------------------------------------------------------------------ widths

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


cdef array.array _as_array(object values, array.array template):
    if type(values) is array.array and values.typecode == template.typecode:
        return values
    try:
        return array.array(template.typecode, values)
    except OverflowError as exc:
        kind = "int64" if template.typecode == "q" else "float64"
        raise ValueError(f"a value does not fit {kind}: {exc}") from None


# ------------------------------------------------------------ packed ints

cdef int64_t LINEAR_LIMIT = <int64_t>1 << 61  # order 3: |v| and (n-1)|step| below this
cdef int64_t LINEAR_CHECK = <int64_t>1 << 62  # what a decoder accepts (the sum stays in int64)
# Order 3 is taken when it is at most this many bytes larger than orders 1 and
# 2: it decodes without running sums, which in SQL cost ~3x an element.
cdef Py_ssize_t LINEAR_SLACK = 16


cdef inline int64_t _abs64(int64_t x) noexcept nogil:
    return -x if x < 0 else x


cdef int _linear_width(const int64_t* v, Py_ssize_t n, int64_t step, int64_t* base) noexcept nogil:
    """Width of the residuals v[i] - i*step - base (base: their midrange,
    rounded up, so 256 values fit a byte as -128..127), or -1 when they need
    more than 4 bytes. The caller checked the limits."""
    cdef int64_t r, lo, hi
    cdef Py_ssize_t i
    lo = hi = v[0]
    for i in range(1, n):
        r = v[i] - i * step
        if r < lo:
            lo = r
        elif r > hi:
            hi = r
    base[0] = lo + <int64_t>((<uint64_t>hi - <uint64_t>lo + 1) >> 1)
    cdef int w = _signed_width(_magnitude(<uint64_t>(hi - base[0]))
                               | _magnitude(<uint64_t>(lo - base[0])), hi != lo)
    return w if w <= 4 else -1


cdef IntPlan _plan_ints(const int64_t* v, Py_ssize_t n) noexcept nogil:
    cdef IntPlan plan
    cdef uint64_t d, prev = 0, dd, mag1 = 0, mag2 = 0
    cdef bint nz1 = False, nz2 = False, linear = True
    cdef Py_ssize_t i
    cdef int w1, w2, w0, ws
    cdef int64_t diff, step, b0 = 0, bs = 0
    plan.order, plan.width, plan.size, plan.base, plan.step = 1, 0, 14, 0, 0
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
    for i in range(n):
        if not (-LINEAR_LIMIT < v[i] < LINEAR_LIMIT):
            linear = False
            break
    w1 = _signed_width(mag1, nz1)
    w2 = _signed_width(mag2, nz2)
    plan.width, plan.size = w1, 14 + (n - 1) * w1
    if n >= 3 and 22 + (n - 2) * w2 < plan.size:
        plan.order, plan.width, plan.size = 2, w2, 22 + (n - 2) * w2
    if not linear:
        return plan
    # Order 3: residuals from a line, the line through the end points or a flat one.
    diff = v[n - 1] - v[0]
    step = (_abs64(diff) + (n - 1) // 2) // (n - 1)
    if diff < 0:
        step = -step
    w0 = _linear_width(v, n, 0, &b0)
    ws = -1
    if step != 0 and _abs64(step) < LINEAR_LIMIT // (n - 1):
        ws = _linear_width(v, n, step, &bs)
    if ws >= 0 and (w0 < 0 or ws < w0):
        w0, b0 = ws, bs
    else:
        step = 0
    if w0 >= 0 and 22 + n * w0 <= plan.size + LINEAR_SLACK:
        plan.order, plan.width, plan.size, plan.base, plan.step = 3, w0, 22 + n * w0, b0, step
    return plan


cdef void _write_ints(const int64_t* v, Py_ssize_t n, IntPlan plan,
                      unsigned char* p) noexcept nogil:
    cdef Py_ssize_t i
    cdef int w = plan.width
    cdef uint64_t d, prev
    p[0] = plan.order
    p[1] = w
    put_be(p + 2, <uint64_t>n, 4)
    if plan.order == 3:
        put_be(p + 6, <uint64_t>plan.base, 8)
        put_be(p + 14, <uint64_t>plan.step, 8)
        p += 22
        for i in range(n):
            put_be(p, <uint64_t>(v[i] - i * plan.step - plan.base), w)
            p += w
        return
    put_be(p + 6, <uint64_t>v[0] if n else 0, 8)
    if n < 2:
        return
    prev = <uint64_t>v[1] - <uint64_t>v[0]
    if plan.order == 1:
        p += 14
        for i in range(1, n):
            put_be(p, <uint64_t>v[i] - <uint64_t>v[i - 1], w)
            p += w
        return
    put_be(p + 14, prev, 8)
    p += 22
    for i in range(2, n):
        d = <uint64_t>v[i] - <uint64_t>v[i - 1]
        put_be(p, d - prev, w)
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
    check_count(n)
    return _pack_int64s(v, n, _plan_ints(v, n), NULL, 0)


cdef Py_ssize_t _check_ints(const unsigned char* p, Py_ssize_t size, str what) except -1:
    """Validate a packed-ints header against the size; return n."""
    if size < 14:
        raise ValueError(f"{what}: {size} bytes is shorter than the 14-byte header; "
                         "the block is truncated")
    cdef int order = p[0], w = p[1]
    cdef Py_ssize_t n = <Py_ssize_t>get_be(p + 2, 4)
    cdef int64_t base, step, lim
    if order < 1 or order > 3:
        raise ValueError(f"{what}: order {order} at byte 0 is not 1, 2 or 3; the block is corrupt")
    if w != 0 and w != 1 and w != 2 and w != 4 and (w != 8 or order == 3):
        raise ValueError(f"{what}: width {w} at byte 1 is not 0, 1, 2, 4"
                         f"{'' if order == 3 else ' or 8'}; the block is corrupt")
    check_count(n)
    if order == 2 and n < 2:
        raise ValueError(f"{what}: order 2 needs at least 2 values, the header says {n}; "
                         "the block is corrupt")
    cdef Py_ssize_t head = 14 if order == 1 else 22
    cdef Py_ssize_t need = head + (n * w if order == 3 else (n - order if n > order else 0) * w)
    if size != need:
        raise ValueError(f"{what}: {size} bytes where the header (n={n}, order={order}, "
                         f"width={w}) needs {need}; the block is truncated or corrupt")
    if order == 3:
        base = <int64_t>get_be(p + 6, 8)
        step = <int64_t>get_be(p + 14, 8)
        lim = LINEAR_CHECK // (n - 1) if n > 1 else LINEAR_CHECK
        if not (-LINEAR_CHECK < base < LINEAR_CHECK and -lim < step < lim):
            raise ValueError(f"{what}: order 3 line (base {base}, step {step}, n={n}) leaves "
                             "the range of int64; the block is corrupt")
    return n


cdef void _read_ints(const unsigned char* p, Py_ssize_t n, int64_t* out) noexcept nogil:
    """Decode a block that _check_ints accepted, modulo 2**64 like the encoder."""
    cdef int order = p[0], w = p[1]
    cdef Py_ssize_t i
    cdef uint64_t v, d
    cdef int64_t base, step
    if n == 0:
        return
    if order == 3:
        base = <int64_t>get_be(p + 6, 8)
        step = <int64_t>get_be(p + 14, 8)
        p += 22
        for i in range(n):
            out[i] = base + i * step + <int64_t>_sign_extend(get_be(p, w), w)
            p += w
        return
    v = get_be(p + 6, 8)
    out[0] = <int64_t>v
    if order == 1:
        p += 14
        for i in range(1, n):
            v += _sign_extend(get_be(p, w), w)
            out[i] = <int64_t>v
            p += w
        return
    d = get_be(p + 14, 8)
    v += d
    out[1] = <int64_t>v
    p += 22
    for i in range(2, n):
        d += _sign_extend(get_be(p, w), w)
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
    cdef const unsigned char[::1] b = as_bytes(data, "packed ints")
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
    return to_bits(<double>k[0] / P10[d]) == to_bits(x)


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
    check_count(n)
    for i in range(1, n):
        acc |= to_bits(v[i]) ^ to_bits(v[i - 1])
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
    put_be(p + 2, <uint64_t>n, 4)
    put_be(p + 6, to_bits(v[0]) if n else 0, 8)
    p += 14
    for i in range(1, n):
        put_be(p, to_bits(v[i]) ^ to_bits(v[i - 1]), wx)
        p += wx
    return out


def unpack_values(data):
    """Decode a values block; ValueError when it is truncated or corrupt."""
    cdef const unsigned char[::1] b = as_bytes(data, "values")
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
    n = <Py_ssize_t>get_be(p + 2, 4)
    if w > 8:
        raise ValueError(f"values: width {w} at byte 1 is above 8; the block is corrupt")
    check_count(n)
    cdef Py_ssize_t need = 14 + (n - 1 if n > 1 else 0) * w
    if size != need:
        raise ValueError(f"values: {size} bytes where the header (n={n}, width={w}) needs "
                         f"{need}; the block is truncated or corrupt")
    out = array.clone(_D, n, False)
    if n == 0:
        return out
    o = out.data.as_doubles
    bits = get_be(p + 6, 8)
    o[0] = from_bits(bits)
    p += 14
    for i in range(1, n):
        bits ^= get_be(p, w)
        o[i] = from_bits(bits)
        p += w
    return out


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
            if tp[i] < tp[i - 1] or (tp[i] == tp[i - 1] and to_bits(vp[i]) < to_bits(vp[i - 1])):
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
            r[i].bits = to_bits(v.data.as_doubles[i])
        qsort(r, n, sizeof(Reading), _cmp_reading)
        for i in range(n):
            (<int64_t*>t.data.as_longlongs)[i] = r[i].ts
            v.data.as_doubles[i] = from_bits(r[i].bits)
    free(r)


# ------------------------------------------------------------- summaries

def summarize(ts, vals, long long interval_us=60_000_000):
    """Summaries per ``interval_us`` for the rollups: ``(d, starts, count,
    fields)``; the twin documents them. Exact int64 sums of k for decimal
    blocks, float sums in time order otherwise."""
    if type(ts) is not array.array or ts.typecode != "q":
        raise TypeError("summarize: ts must be an array('q')")
    if type(vals) is not array.array or vals.typecode != "d":
        raise TypeError("summarize: vals must be an array('d')")
    if interval_us < 1:
        raise ValueError(f"summarize: interval_us must be at least 1, got {interval_us}")
    cdef array.array t = ts, v = vals
    cdef Py_ssize_t n = len(t), i, j, m = 0, a, b
    if n != len(v):
        raise ValueError(f"summarize: {n} timestamps but {len(v)} values")
    cdef const int64_t* tp = <int64_t*>t.data.as_longlongs
    cdef const double* vp = v.data.as_doubles
    for i in range(1, n):
        if tp[i] < tp[i - 1]:
            raise ValueError(f"summarize: timestamps are not sorted at index {i}; "
                             "sort_by_time first")
    cdef int64_t q, prev_start = 0, start
    for i in range(n):  # intervals first, to size the outputs
        q = tp[i] // interval_us
        if tp[i] % interval_us < 0:  # floor division, as Python's //
            q -= 1
        start = q * interval_us
        if i == 0 or start != prev_start:
            m += 1
            prev_start = start
    cdef array.array starts = array.clone(_Q, m, False), count = array.clone(_Q, m, False)
    cdef int64_t* sp = <int64_t*>starts.data.as_longlongs
    cdef int64_t* cp = <int64_t*>count.data.as_longlongs
    j = -1
    for i in range(n):
        q = tp[i] // interval_us
        if tp[i] % interval_us < 0:
            q -= 1
        start = q * interval_us
        if j < 0 or start != sp[j]:
            j += 1
            sp[j] = start
            cp[j] = 0
        cp[j] += 1
    cdef int64_t* k = NULL
    cdef int d = -1
    cdef int64_t total, lo, hi, x
    cdef array.array fq
    cdef int64_t* fp
    cdef bint ok
    if n:
        k = <int64_t*>malloc(n * sizeof(int64_t))
        if k == NULL:
            raise MemoryError()
    try:
        if n:
            d = _decimal_exponent(vp, n, k)
        if d >= 0:
            fq = array.clone(_Q, 5 * m, False)
            fp = <int64_t*>fq.data.as_longlongs
            ok = True
            a = 0
            for j in range(m):
                b = a + cp[j]
                total = 0
                lo = hi = k[a]
                for i in range(a, b):
                    x = k[i]
                    # |k| < 2**53: the sum leaves int64 only after many terms
                    if (x > 0 and total > INT64_MAX_ - x) or (x < 0 and total < INT64_MIN_ - x):
                        ok = False
                        break
                    total += x
                    if x < lo:
                        lo = x
                    if x > hi:
                        hi = x
                if not ok:
                    break
                fp[5 * j], fp[5 * j + 1], fp[5 * j + 2] = total, lo, hi
                fp[5 * j + 3], fp[5 * j + 4] = k[a], k[b - 1]
                a = b
            if ok:
                return d, starts, count, fq
    finally:
        free(k)
    cdef array.array fd = array.clone(_D, 5 * m, False)
    cdef double* fo = fd.data.as_doubles
    cdef double s, flo, fhi, y
    a = 0
    for j in range(m):
        b = a + cp[j]
        s = flo = fhi = vp[a]  # (not 0.0 + first: -0.0 stays -0.0, as in aggregate)
        for i in range(a + 1, b):
            y = vp[i]
            s += y
            if y < flo:
                flo = y
            if y > fhi:
                fhi = y
        fo[5 * j], fo[5 * j + 1], fo[5 * j + 2] = s, flo, fhi
        fo[5 * j + 3], fo[5 * j + 4] = vp[a], vp[b - 1]
        a = b
    return -1, starts, count, fd
