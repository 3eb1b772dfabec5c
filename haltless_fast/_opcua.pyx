# cython: language_level=3
"""The items of an OPC-UA DataChangeNotification read from the wire bytes
(twin: ``_opcua_py.py``, which says what each tuple holds and why this
exists). Same tuples, same None for what it leaves to asyncua; here the
bytes are read in place, one tuple per item and no other object."""
cimport cython
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

MAX_US = 253402300799999999  # 9999-12-31T23:59:59.999999Z

cdef int64_t _MAX_US = 253402300799999999
cdef int64_t _EPOCH_TICKS = 116444736000000000
cdef int64_t _MIN_TICKS = 864000000000

# bytes of one element of each type it reads or steps over (index: type
# id); 0: a structured type it leaves to asyncua; -1: length-prefixed
cdef int _WIDTH[26]
_WIDTH[:] = [0, 1, 1, 1, 2, 2, 4, 4, 8, 8, 4, 8, -1, 8, 16, -1, -1, 0, 0, 4, 0, 0, 0, 0, 0, 0]


cdef inline uint64_t _le(const unsigned char* p, int w) noexcept nogil:
    cdef uint64_t x = 0
    cdef int j
    for j in range(w - 1, -1, -1):
        x = (x << 8) | p[j]
    return x


cdef inline object _us(int64_t ticks):
    if ticks < _MIN_TICKS:
        return None
    cdef int64_t us = (ticks - _EPOCH_TICKS) // 10
    return us if us < _MAX_US else _MAX_US


cdef inline double _number(const unsigned char* p, int t) noexcept nogil:
    cdef uint64_t raw = _le(p, _WIDTH[t])
    cdef uint32_t bits32
    cdef float f
    cdef double d
    if t == 1:
        return 1.0 if raw else 0.0
    if t == 2:
        return <double><int8_t>raw
    if t == 3 or t == 5 or t == 7:
        return <double>raw
    if t == 4:
        return <double><int16_t>raw
    if t == 6:
        return <double><int32_t>raw
    if t == 8:
        return <double><int64_t>raw
    if t == 9:
        return <double>raw
    if t == 10:
        bits32 = <uint32_t>raw
        memcpy(&f, &bits32, 4)
        return <double>f
    memcpy(&d, &raw, 8)
    return d


@cython.cdivision(True)
def data_changes(body, Py_ssize_t start, Py_ssize_t end):
    cdef const unsigned char[::1] view = body
    cdef Py_ssize_t size = view.shape[0]
    if not 0 <= start <= end <= size:
        raise ValueError(f"start {start} and end {end} do not fit a body of {size} bytes")
    if start == end:
        return None
    cdef const unsigned char* p = &view[0]
    cdef Py_ssize_t pos = start
    cdef int32_t count, n
    cdef int32_t k, j
    cdef uint32_t handle, status
    cdef uint8_t mask, enc
    cdef int t, width, vtype
    cdef object value, ts
    cdef list out
    if pos + 4 > end:
        return None
    count = <int32_t>_le(p + pos, 4)
    pos += 4
    if count > (end - pos) // 5:
        return None
    out = []
    for k in range(count if count > 0 else 0):
        if pos + 5 > end:
            return None
        handle = <uint32_t>_le(p + pos, 4)
        mask = p[pos + 4]
        pos += 5
        value = None
        vtype = 0
        status = 0
        ts = None
        if mask & 0x01:
            if pos + 1 > end:
                return None
            enc = p[pos]
            pos += 1
            t = enc & 0x3F
            width = _WIDTH[t] if t < 26 else 0
            if width == 0 and t != 0:
                return None
            if enc & 0x80:
                vtype = t | 0x80
                if pos + 4 > end:
                    return None
                n = <int32_t>_le(p + pos, 4)
                pos += 4
                if t == 0 and n > 0:
                    return None
                if width > 0:
                    if n > 0:
                        if <Py_ssize_t>n * width > end - pos:
                            return None
                        pos += <Py_ssize_t>n * width
                else:
                    for j in range(n if n > 0 else 0):
                        if pos + 4 > end:
                            return None
                        pos += 4 + max(<int32_t>_le(p + pos, 4), 0)
                        if pos > end:
                            return None
                if enc & 0x40:
                    if pos + 4 > end:
                        return None
                    n = <int32_t>_le(p + pos, 4)
                    if n > 0 and <Py_ssize_t>n * 4 > end - pos - 4:
                        return None
                    pos += 4 + 4 * <Py_ssize_t>(n if n > 0 else 0)
            elif t:
                vtype = t
                if width > 0:
                    if pos + width > end:
                        return None
                    if t <= 11:
                        value = _number(p + pos, t)
                    pos += width
                else:
                    if pos + 4 > end:
                        return None
                    pos += 4 + max(<int32_t>_le(p + pos, 4), 0)
                    if pos > end:
                        return None
        if mask & 0x02:
            if pos + 4 > end:
                return None
            status = <uint32_t>_le(p + pos, 4)
            pos += 4
        if mask & 0x04:
            if pos + 8 > end:
                return None
            ts = _us(<int64_t>_le(p + pos, 8))
            pos += 8
        if mask & 0x10:
            pos += 2
        if mask & 0x08:
            if pos + 8 > end:
                return None
            if ts is None:
                ts = _us(<int64_t>_le(p + pos, 8))
            pos += 8
        if mask & 0x20:
            pos += 2
        if pos > end:
            return None
        out.append((handle, value, status, ts, vtype))
    if pos + 4 > end:
        return None
    if <int32_t>_le(p + pos, 4) > 0:
        return None
    if pos + 4 != end:
        return None
    return out
