# cython: language_level=3, cdivision=True
"""Validation kernel of the ingest hot path (twin: ``_validate_py.py``).

One pass over a decoded batch (``encode_batch``): finite values, the timestamp
window, series lookup; the good readings come out as packed (series, time,
value) records. ``encode_chunks`` turns the records of many requests at once
(the group-commit writer concatenates them) into the binary COPY rows of
``reading_chunks``: one row per (series, hour), sorted by time, so that a
group of requests that each carry one reading of 1,000 series still writes
one row per series, not one per reading.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.datetime cimport (
    import_datetime, datetime_year, datetime_month, datetime_day, datetime_hour,
    datetime_minute, datetime_second, datetime_microsecond, datetime_tzinfo,
)
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free, qsort
from libc.string cimport memcpy

import datetime as _datetime

import_datetime()

cdef object UTC = _datetime.timezone.utc

cdef int64_t PG_EPOCH_US = 946684800000000
cdef int64_t HOUR_US = 3600000000
cdef int64_t PAST_LIMIT_US = 3650 * 86400000000
cdef int64_t FUTURE_LIMIT_US = 5 * 60000000

# Why a reading is refused: the codes encode_batch returns (the ingestor
# turns them into the contract's messages and the metrics' reasons).
NOT_FINITE = 1
TOO_OLD = 2
TOO_NEW = 3

ctypedef struct Good:
    int32_t sid
    int64_t ts
    double value

# A packed record: int32 series id, int64 Unix microseconds, float64 value,
# little-endian, no padding (the twin writes the same with struct "<iqd").
DEF RECORD = 20
RECORD_SIZE = RECORD

# Readings per reading_chunks row at most: a row of 500 is 8,072 bytes on disk, under
# the hot tables' toast_tuple_target of 8,160 (migration 0011), so PostgreSQL
# never compresses a hot row (pglz took 300-480 ns a reading of a row of
# 150-400 readings, more than the COPY itself; bench/README "Ingest").
DEF MAX_ROW_READINGS = 500
MAX_ROW = MAX_ROW_READINGS


cdef int _cmp_good(const void* a, const void* b) noexcept nogil:
    cdef const Good* x = <const Good*>a
    cdef const Good* y = <const Good*>b
    if x.sid != y.sid:
        return -1 if x.sid < y.sid else 1
    if x.ts != y.ts:
        return -1 if x.ts < y.ts else 1
    if x.value != y.value:
        return -1 if x.value < y.value else 1
    return 0


cdef inline int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    # Howard Hinnant's days_from_civil: days since 1970-01-01, proleptic Gregorian.
    y -= m <= 2
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef int64_t _timestamp_us(object dt) except? -1:
    cdef int64_t us = (
        (_days_from_civil(datetime_year(dt), datetime_month(dt), datetime_day(dt)) * 86400
         + datetime_hour(dt) * 3600 + datetime_minute(dt) * 60 + datetime_second(dt))
        * 1000000 + datetime_microsecond(dt))
    tz = datetime_tzinfo(dt)
    if tz is None or tz is UTC:
        return us
    off = dt.utcoffset()
    return us - ((<int64_t>off.days * 86400 + off.seconds) * 1000000 + off.microseconds)


def timestamp_us(dt):
    """Microseconds since the Unix epoch; a naive datetime is taken as UTC."""
    return _timestamp_us(dt)


cdef inline unsigned char* _put16(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xff
    p[1] = v & 0xff
    return p + 2


cdef inline unsigned char* _put32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xff
    p[1] = (v >> 16) & 0xff
    p[2] = (v >> 8) & 0xff
    p[3] = v & 0xff
    return p + 4


cdef inline unsigned char* _put64(unsigned char* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v >> 32))
    _put32(p + 4, <uint32_t>v)
    return p + 8


cdef inline unsigned char* _put_array_head(unsigned char* p, int32_t k, uint32_t oid) noexcept nogil:
    p = _put32(p, <uint32_t>(20 + 12 * k))
    p = _put32(p, 1)      # ndim
    p = _put32(p, 0)      # has nulls
    p = _put32(p, oid)
    p = _put32(p, <uint32_t>k)
    return _put32(p, 1)   # lower bound


cdef Py_ssize_t _encode_chunks(Good* good, Py_ssize_t n, unsigned char* out) noexcept nogil:
    cdef Py_ssize_t start = 0, end, i
    cdef int32_t sid, k
    cdef int64_t bucket, b
    cdef double dv
    cdef unsigned char* p = out
    while start < n:
        sid = good[start].sid
        bucket = good[start].ts - (good[start].ts % HOUR_US + HOUR_US) % HOUR_US
        end = start + 1
        while end < n and good[end].sid == sid and end - start < MAX_ROW_READINGS:
            b = good[end].ts - (good[end].ts % HOUR_US + HOUR_US) % HOUR_US
            if b != bucket:
                break
            end += 1
        k = <int32_t>(end - start)
        p = _put16(p, 5)
        p = _put32(p, 4)
        p = _put32(p, <uint32_t>sid)
        p = _put32(p, 8)
        p = _put64(p, <uint64_t>(bucket - PG_EPOCH_US))
        p = _put32(p, 4)
        p = _put32(p, <uint32_t>k)
        p = _put32(p, <uint32_t>(8 * k))  # ts: bytea of k big-endian Unix µs
        for i in range(start, end):
            p = _put64(p, <uint64_t>good[i].ts)
        p = _put_array_head(p, k, 701)
        for i in range(start, end):
            p = _put32(p, 8)
            dv = good[i].value
            p = _put64(p, (<uint64_t*>&dv)[0])
        start = end
    return p - out


cdef inline void _put_record(unsigned char* p, int32_t sid, int64_t ts, double v) noexcept nogil:
    memcpy(p, &sid, 4)
    memcpy(p + 4, &ts, 8)
    memcpy(p + 12, &v, 8)


def encode_batch(list readings, dict series, int64_t now_us, oldest_us=None):
    """See ``_validate_py.encode_batch``: same contract, same output bytes."""
    cdef Py_ssize_t n = len(readings), i, ngood = 0
    cdef int64_t hi = now_us + FUTURE_LIMIT_US, ts
    cdef int64_t lo = now_us - PAST_LIMIT_US if oldest_us is None else <int64_t>oldest_us
    cdef double v
    cdef unsigned char* out
    errors = []
    missing = []
    if n == 0:
        return b"", 0, errors, missing
    out = <unsigned char*>malloc(n * RECORD)
    if out == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            r = readings[i]
            if r is None:
                continue
            v = r.value
            if not isfinite(v):
                errors.append((i, NOT_FINITE))
                continue
            ts = _timestamp_us(r.timestamp)
            if ts < lo:
                errors.append((i, TOO_OLD))
                continue
            if ts > hi:
                errors.append((i, TOO_NEW))
                continue
            unit = r.unit
            raw = r.raw_tag
            sid = series.get((r.machine_identifier, r.metric_name,
                              "" if unit is None else unit, "" if raw is None else raw))
            if sid is None:
                missing.append(i)
                continue
            _put_record(out + ngood * RECORD, <int32_t>sid, ts, v)
            ngood += 1
        if missing:
            return None, 0, errors, missing
        return PyBytes_FromStringAndSize(<char*>out, ngood * RECORD), ngood, errors, missing
    finally:
        free(out)


def encode_chunks(const unsigned char[::1] records):
    """See ``_validate_py.encode_chunks``: same contract, same output bytes."""
    cdef Py_ssize_t n = records.shape[0] // RECORD, i, size
    cdef Good* good
    cdef unsigned char* out
    cdef const unsigned char* p
    if records.shape[0] % RECORD:
        raise ValueError(f"records: {records.shape[0]} bytes is not a multiple of {RECORD}")
    if n == 0:
        return b""
    good = <Good*>malloc(n * sizeof(Good))
    if good == NULL:
        raise MemoryError()
    try:
        p = &records[0]
        for i in range(n):
            memcpy(&good[i].sid, p + i * RECORD, 4)
            memcpy(&good[i].ts, p + i * RECORD + 4, 8)
            memcpy(&good[i].value, p + i * RECORD + 12, 8)
        qsort(good, n, sizeof(Good), _cmp_good)
        # Upper bound: a row per reading, 58 bytes of row and array heads + 20 per reading.
        size = n * (78 + 24)
        out = <unsigned char*>malloc(size)
        if out == NULL:
            raise MemoryError()
        try:
            size = _encode_chunks(good, n, out)
            return PyBytes_FromStringAndSize(<char*>out, size)
        finally:
            free(out)
    finally:
        free(good)
