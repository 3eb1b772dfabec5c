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
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.ref cimport PyObject
from cpython.datetime cimport (
    import_datetime, datetime_year, datetime_month, datetime_day, datetime_hour,
    datetime_minute, datetime_second, datetime_microsecond, datetime_tzinfo,
)
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy

import datetime as _datetime
import os as _os

from msgspec import Raw


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object)
    void* PyUnicode_DATA(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member


cdef extern from "structmember.h":
    int T_OBJECT_EX

cdef extern from "Python.h":
    double PyOS_string_to_double(const char* s, char** endptr, PyObject* overflow_exception) except? -1.0


cdef extern from *:
    """
    /* wyhash's mix: the 128-bit product folded to 64 bits. */
    static inline uint64_t haltless_mix(uint64_t a, uint64_t b) {
        __uint128_t r = (__uint128_t)a * b;
        return (uint64_t)r ^ (uint64_t)(r >> 64);
    }
    /* How many bytes from p (of n) are plain string text: printable ASCII
       other than the quote and the backslash. Eight at a time: a byte's high
       bit is set in each mask where it is >= 0x80, < 0x20, '"' or '\\'
       (false positives only above the first true one; the lowest counts). */
    static inline Py_ssize_t haltless_plain_run(const unsigned char* p, Py_ssize_t n) {
        const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
        Py_ssize_t i = 0;
        while (i + 8 <= n) {
            uint64_t w, q, b, m;
            memcpy(&w, p + i, 8);
            q = w ^ (ones * 0x22);
            b = w ^ (ones * 0x5C);
            m = (w & highs) | ((w - ones * 0x20) & ~w & highs)
                | ((q - ones) & ~q & highs) | ((b - ones) & ~b & highs);
            if (m)
                return i + (__builtin_ctzll(m) >> 3);
            i += 8;
        }
        while (i < n && p[i] >= 0x20 && p[i] < 0x80 && p[i] != 0x22 && p[i] != 0x5C)
            i++;
        return i;
    }
    /* ---- one reading object's JSON text, read in place (see "raw readings") */
    typedef struct {
        const unsigned char* text[5];  /* machine_identifier, timestamp, metric_name, unit, raw_tag */
        Py_ssize_t size[5];            /* bytes; absent or null: "" */
        Py_ssize_t chars[5];           /* code points */
        double value;
        const unsigned char* slow;     /* a number left to Python's dtoa: its digits, */
        Py_ssize_t slow_size;          /* unsigned, */
        int slow_neg, slow_integer;    /* and how to apply the sign */
    } haltless_scanned;

    static const double haltless_p10[23] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9,
        1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

    #define HL_WS(c) ((c) == 0x20 || (c) == 0x0A || (c) == 0x0D || (c) == 0x09)

    /* The bytes of the valid UTF-8 sequence at s (RFC 3629), or 0. */
    static inline int haltless_utf8(const unsigned char* s, Py_ssize_t room) {
        unsigned char b = s[0];
        int k;
        if (b >= 0xC2 && b <= 0xDF) k = 2;
        else if (b >= 0xE0 && b <= 0xEF) k = 3;
        else if (b >= 0xF0 && b <= 0xF4) k = 4;
        else return 0;
        if (room < k) return 0;
        if (b == 0xE0 && s[1] < 0xA0) return 0;
        if (b == 0xED && s[1] > 0x9F) return 0;
        if (b == 0xF0 && s[1] < 0x90) return 0;
        if (b == 0xF4 && s[1] > 0x8F) return 0;
        for (int j = 1; j < k; j++)
            if ((s[j] & 0xC0) != 0x80) return 0;
        return k;
    }

    /* p points past an opening quote: the closing quote, the code points
       before it in *chars; NULL for an escape, a control byte, bad UTF-8. */
    static inline const unsigned char* haltless_string(const unsigned char* p,
            const unsigned char* e, Py_ssize_t* chars) {
        Py_ssize_t c = 0;
        for (;;) {
            Py_ssize_t run = haltless_plain_run(p, e - p);
            p += run;
            c += run;
            if (p >= e) return NULL;
            if (*p == 0x22) { *chars = c; return p; }
            if (*p < 0x80) return NULL;
            int k = haltless_utf8(p, e - p);
            if (!k) return NULL;
            p += k;
            c++;
        }
    }

    /* A JSON number: where it ends (NULL if it is not one or is longer than 63
       characters unsigned). Clinger's fast path (m < 10**15 < 2**53 exact,
       |e| <= 22) gives the correctly rounded value; else r->slow is set. */
    static inline const unsigned char* haltless_number(const unsigned char* p,
            const unsigned char* e, haltless_scanned* r) {
        int neg = 0, integer = 1, exact = 1, digits = 0, frac = 0, ex = 0, esign = 1;
        uint64_t m = 0;
        const unsigned char* start;
        if (p < e && *p == '-') { neg = 1; p++; }
        start = p;
        if (p >= e) return NULL;
        if (*p == '0') p++;
        else if (*p >= '1' && *p <= '9') {
            for (; p < e && *p >= '0' && *p <= '9'; p++) {
                if (digits < 19) { m = m * 10 + (*p - '0'); digits++; } else exact = 0;
            }
        } else return NULL;
        if (p < e && *p == '.') {
            integer = 0;
            p++;
            if (p >= e || *p < '0' || *p > '9') return NULL;
            for (; p < e && *p >= '0' && *p <= '9'; p++) {
                if (digits < 19) { m = m * 10 + (*p - '0'); digits++; frac++; } else exact = 0;
            }
        }
        if (p < e && (*p == 'e' || *p == 'E')) {
            integer = 0;
            p++;
            if (p < e && (*p == '+' || *p == '-')) { esign = *p == '-' ? -1 : 1; p++; }
            if (p >= e || *p < '0' || *p > '9') return NULL;
            for (; p < e && *p >= '0' && *p <= '9'; p++)
                if (ex < 100000) ex = ex * 10 + (*p - '0');
        }
        if (p - start > 63) return NULL;
        ex = esign * ex - frac;
        r->slow = NULL;
        if (exact && digits <= 15 && ex >= -22 && ex <= 22) {
            double v = ex >= 0 ? (double)m * haltless_p10[ex] : (double)m / haltless_p10[-ex];
            r->value = neg ? ((integer && v == 0.0) ? 0.0 : -v) : v;
        } else {
            r->slow = start;
            r->slow_size = p - start;
            r->slow_neg = neg;
            r->slow_integer = integer;
        }
        return p;
    }

    /* Past `name"` at *pp when the text there is exactly that: idx, else -1. */
    static inline int haltless_key(const unsigned char** pp, const unsigned char* e,
                                   const char* name, Py_ssize_t n, int idx) {
        const unsigned char* p = *pp;
        if (e - p > n && memcmp(p, name, n) == 0 && p[n] == 0x22) {
            *pp = p + n + 1;
            return idx;
        }
        return -1;
    }

    /* The fields of one reading object: 1, or 0 for RECHECK. */
    static int haltless_scan(const unsigned char* p, Py_ssize_t n, haltless_scanned* r) {
        const unsigned char* e = p + n;
        const unsigned char* end;
        Py_ssize_t chars;
        int seen = 0, f;
        for (int k = 0; k < 5; k++) { r->text[k] = (const unsigned char*)""; r->size[k] = 0; r->chars[k] = 0; }
        r->slow = NULL;
        while (p < e && HL_WS(*p)) p++;
        if (p >= e || *p != '{') return 0;
        p++;
        for (;;) {
            while (p < e && HL_WS(*p)) p++;
            if (p >= e || *p != '"') return 0;
            /* A key is one of six names, each followed by its closing quote:
               compared whole (fixed lengths the compiler inlines), never
               scanned. Any other key, escaped or not, is RECHECK. */
            p++;
            switch (*p) {
                case 'm': f = haltless_key(&p, e, "machine_identifier", 18, 0);
                          if (f < 0) f = haltless_key(&p, e, "metric_name", 11, 2);
                          break;
                case 't': f = haltless_key(&p, e, "timestamp", 9, 1); break;
                case 'u': f = haltless_key(&p, e, "unit", 4, 3); break;
                case 'r': f = haltless_key(&p, e, "raw_tag", 7, 4); break;
                case 'v': f = haltless_key(&p, e, "value", 5, 5); break;
                default: f = -1;
            }
            if (f < 0 || (seen & (1 << f))) return 0;
            seen |= 1 << f;
            while (p < e && HL_WS(*p)) p++;
            if (p >= e || *p != ':') return 0;
            p++;
            while (p < e && HL_WS(*p)) p++;
            if (p >= e) return 0;
            if (f == 5) {
                p = haltless_number(p, e, r);
                if (!p) return 0;
            } else if (*p == '"') {
                end = haltless_string(p + 1, e, &chars);
                if (!end) return 0;
                r->text[f] = p + 1;
                r->size[f] = end - p - 1;
                r->chars[f] = chars;
                p = end + 1;
            } else if (f >= 3 && e - p >= 4 && memcmp(p, "null", 4) == 0) {
                p += 4;
            } else return 0;
            while (p < e && HL_WS(*p)) p++;
            if (p < e && *p == ',') { p++; continue; }
            if (p < e && *p == '}') break;
            return 0;
        }
        p++;
        while (p < e && HL_WS(*p)) p++;
        return p == e && (seen & 0x27) == 0x27;  /* machine_identifier, timestamp, metric_name, value */
    }
    /* wyhash's secret primes */
    #define HALTLESS_P0 0xa0761d6478bd642fULL
    #define HALTLESS_P1 0xe7037ed1a0b428dbULL
    #define HALTLESS_P2 0x8ebc6af09c88c6e3ULL
    #define HALTLESS_P3 0x589965cc75374cc3ULL
    #define HALTLESS_P4 0x1d8e4e27c47d124fULL
    """
    uint64_t haltless_mix(uint64_t a, uint64_t b) noexcept nogil
    Py_ssize_t haltless_plain_run(const unsigned char* p, Py_ssize_t n) noexcept nogil
    ctypedef struct haltless_scanned:
        const unsigned char* text[5]
        Py_ssize_t size[5]
        Py_ssize_t chars[5]
        double value
        const unsigned char* slow
        Py_ssize_t slow_size
        int slow_neg, slow_integer
    int haltless_scan(const unsigned char* p, Py_ssize_t n, haltless_scanned* r) noexcept nogil
    const uint64_t HALTLESS_P0, HALTLESS_P1, HALTLESS_P2, HALTLESS_P3, HALTLESS_P4

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
RECHECK = 4

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


# ------------------------------------------------------------ RFC 3339 text

cdef int _DAYS[13]
_DAYS[:] = [0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


cdef inline int _digits(const unsigned char* p, int n) noexcept nogil:
    """n ASCII digits as a number, or -1."""
    cdef int v = 0, k
    for k in range(n):
        if p[k] < 48 or p[k] > 57:
            return -1
        v = v * 10 + (p[k] - 48)
    return v


cdef bint _parse_rfc3339(const unsigned char* s, Py_ssize_t n, int64_t* out) noexcept nogil:
    """Unix µs of YYYY-MM-DDTHH:MM:SS[.f{1,6}][Z|+HH:MM|-HH:MM] (no zone: UTC):
    a strict subset of what msgspec's datetime takes, giving the same instant.
    False for anything else; the twin's parse_timestamp is the same rule."""
    cdef int y, mo, d, h, mi, sec, oh, om, k
    cdef int64_t frac = 0, off = 0, scale
    cdef Py_ssize_t i = 19
    if n < 19 or s[4] != 45 or s[7] != 45 or s[10] != 84 or s[13] != 58 or s[16] != 58:
        return False
    y = _digits(s, 4)
    mo = _digits(s + 5, 2)
    d = _digits(s + 8, 2)
    h = _digits(s + 11, 2)
    mi = _digits(s + 14, 2)
    sec = _digits(s + 17, 2)
    if y < 1 or mo < 1 or mo > 12 or d < 1 or h < 0 or h > 23 or mi < 0 or mi > 59 \
            or sec < 0 or sec > 59:
        return False
    if d > _DAYS[mo] + (mo == 2 and y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)):
        return False
    if i < n and s[i] == 46:  # '.'
        i += 1
        scale = 100000
        k = 0
        while i < n and 48 <= s[i] <= 57:
            if k == 6:
                return False  # msgspec rounds beyond microseconds: its decode decides
            frac += (s[i] - 48) * scale
            scale //= 10
            k += 1
            i += 1
        if k == 0:
            return False
    if i < n:
        if s[i] == 90 and i + 1 == n:  # 'Z'
            pass
        elif (s[i] == 43 or s[i] == 45) and i + 6 == n and s[i + 3] == 58:
            oh = _digits(s + i + 1, 2)
            om = _digits(s + i + 4, 2)
            if oh < 0 or oh > 23 or om < 0 or om > 59:
                return False
            off = (oh * 60 + om) * <int64_t>60000000
            if s[i] == 45:
                off = -off
        else:
            return False
    out[0] = ((_days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec) * <int64_t>1000000
              + frac - off)
    return True


def parse_timestamp(str text):
    """See ``_validate_py.parse_timestamp``: Unix µs, or None."""
    cdef int64_t us
    if not PyUnicode_IS_ASCII(text):
        return None
    if _parse_rfc3339(<const unsigned char*>PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text), &us):
        return us
    return None


# ------------------------------------------------------------ series index

ctypedef struct Slot:
    uint64_t hash   # 0: empty
    int32_t sid
    uint32_t off    # where the key is in the arena
    uint32_t size   # its bytes: 4 lengths (uint16) then the 4 fields' UTF-8

cdef struct Key:
    const unsigned char* p[4]
    Py_ssize_t n[4]

cdef enum:
    MAX_PROBE = 32  # a longer run on insert: a new seed and a bigger table


cdef inline int _field(Key* k, int j, object f) except -1:
    cdef Py_ssize_t size
    if f is None:
        k.p[j] = <const unsigned char*>b""
        k.n[j] = 0
    elif PyUnicode_IS_ASCII(f):
        k.p[j] = <const unsigned char*>PyUnicode_DATA(f)
        k.n[j] = PyUnicode_GET_LENGTH(f)
    else:
        k.p[j] = <const unsigned char*>PyUnicode_AsUTF8AndSize(f, &size)
        k.n[j] = size
    return k.n[j] > 65535


cdef inline int _key_of(Key* k, object machine, object metric, object unit, object raw) except -1:
    """The UTF-8 of the four fields (None: ""); 1 when a field is too long for
    the table (more than 65,535 bytes: never a series, whose fields are
    bounded to 200 characters), else 0."""
    return (_field(k, 0, machine) | _field(k, 1, metric) | _field(k, 2, unit)
            | _field(k, 3, raw))


cdef inline uint64_t _hash(const Key* k, uint64_t seed) noexcept nogil:
    cdef uint64_t h = seed, w
    cdef Py_ssize_t i, n
    cdef int j
    cdef const unsigned char* p
    for j in range(4):
        p = k.p[j]
        n = k.n[j]
        h = haltless_mix(h ^ <uint64_t>n ^ HALTLESS_P0, HALTLESS_P1)
        i = 0
        while i + 8 <= n:
            memcpy(&w, p + i, 8)
            h = haltless_mix(h ^ w, HALTLESS_P2)
            i += 8
        if i < n:
            w = 0
            memcpy(&w, p + i, n - i)
            h = haltless_mix(h ^ w, HALTLESS_P3)
    h = haltless_mix(h, HALTLESS_P4)
    return h | 1  # 0 marks an empty slot


cdef class SeriesIndex:
    """See ``_validate_py.SeriesIndex``: the same map, as an open-addressing
    table of seeded hashes over the fields' UTF-8 bytes, so a lookup makes no
    tuple and hashes no str (measured: ~280 of ~390 ns a reading went to
    the dict lookup of a fresh 4-tuple of fresh strings). The seed is random
    per table and changes if an insert probes too long, so keys chosen to
    collide cannot make it quadratic."""

    cdef Slot* slots
    cdef Py_ssize_t mask, count  # count: slots in use, forgotten keys too (they keep theirs)
    cdef Py_ssize_t live         # keys that map to a series (len)
    cdef unsigned char* arena
    cdef Py_ssize_t used, room
    cdef uint64_t seed

    def __cinit__(self):
        self.slots = <Slot*>calloc(1024, sizeof(Slot))
        self.arena = <unsigned char*>malloc(65536)
        if self.slots == NULL or self.arena == NULL:
            raise MemoryError()
        self.mask = 1023
        self.room = 65536
        self.count = self.used = self.live = 0
        self.seed = int.from_bytes(_os.urandom(8), "little")

    def __dealloc__(self):
        free(self.slots)
        free(self.arena)

    def __len__(self):
        return self.live

    def clear(self):
        cdef Slot* fresh = <Slot*>calloc(1024, sizeof(Slot))
        if fresh == NULL:
            raise MemoryError()
        free(self.slots)
        self.slots = fresh
        self.mask = 1023
        self.count = self.used = self.live = 0

    cdef inline bint _same(self, const Slot* s, const Key* k) noexcept nogil:
        cdef const unsigned char* q = self.arena + s.off
        cdef const uint16_t* lens = <const uint16_t*>q
        cdef int j
        q += 8
        for j in range(4):
            if lens[j] != k.n[j] or memcmp(q, k.p[j], k.n[j]) != 0:
                return False
            q += k.n[j]
        return True

    cdef inline int32_t find(self, const Key* k) noexcept nogil:
        """The series id of ``k``, or -1."""
        cdef uint64_t h = _hash(k, self.seed)
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>self.mask)
        while self.slots[i].hash != 0:
            if self.slots[i].hash == h and self._same(&self.slots[i], k):
                return self.slots[i].sid
            i = (i + 1) & self.mask
        return -1

    cdef int _place(self, Slot* slots, Py_ssize_t mask, uint64_t h, int32_t sid, uint32_t off,
                    uint32_t size) noexcept nogil:
        """Put an entry into ``slots``; its probe length."""
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>mask)
        cdef int probe = 0
        while slots[i].hash != 0:
            i = (i + 1) & mask
            probe += 1
        slots[i].hash = h
        slots[i].sid = sid
        slots[i].off = off
        slots[i].size = size
        return probe

    cdef int _rebuild(self, Py_ssize_t capacity) except -1:
        """Rehash every entry into ``capacity`` slots under a new seed (until no
        run is longer than MAX_PROBE)."""
        cdef Slot* fresh
        cdef Slot* old = self.slots
        cdef Py_ssize_t i, oldn = self.mask + 1
        cdef Key k
        cdef const unsigned char* q
        cdef const uint16_t* lens
        cdef int j, worst
        while True:
            fresh = <Slot*>calloc(capacity, sizeof(Slot))
            if fresh == NULL:
                raise MemoryError()
            self.seed = int.from_bytes(_os.urandom(8), "little")
            worst = 0
            for i in range(oldn):
                if old[i].hash == 0:
                    continue
                q = self.arena + old[i].off
                lens = <const uint16_t*>q
                q += 8
                for j in range(4):
                    k.p[j] = q
                    k.n[j] = lens[j]
                    q += lens[j]
                worst = max(worst, self._place(fresh, capacity - 1, _hash(&k, self.seed),
                                               old[i].sid, old[i].off, old[i].size))
            if worst <= MAX_PROBE or capacity >= (oldn << 4):
                break
            free(fresh)
            capacity *= 2
        free(old)
        self.slots = fresh
        self.mask = capacity - 1
        return 0

    def add(self, machine_identifier, metric_name, unit, raw_tag, int series_id):
        cdef Key k
        cdef Py_ssize_t size, i
        cdef uint16_t lens[4]
        cdef unsigned char* arena
        cdef int j
        if series_id < 0:
            raise ValueError(f"series id {series_id} is negative; series ids start at 1")
        if _key_of(&k, machine_identifier, metric_name, unit, raw_tag):
            raise ValueError("a series field is longer than 65,535 bytes")
        cdef uint64_t h = _hash(&k, self.seed)
        i = <Py_ssize_t>(h & <uint64_t>self.mask)
        while self.slots[i].hash != 0:
            if self.slots[i].hash == h and self._same(&self.slots[i], &k):
                if self.slots[i].sid < 0:
                    self.live += 1
                self.slots[i].sid = series_id
                return
            i = (i + 1) & self.mask
        self.live += 1
        size = 8 + k.n[0] + k.n[1] + k.n[2] + k.n[3]
        if self.used + size > self.room:
            arena = <unsigned char*>realloc(self.arena, max(self.room * 2, self.used + size))
            if arena == NULL:
                raise MemoryError()
            self.arena = arena
            self.room = max(self.room * 2, self.used + size)
        for j in range(4):
            lens[j] = <uint16_t>k.n[j]
        memcpy(self.arena + self.used, lens, 8)
        i = self.used + 8
        for j in range(4):
            memcpy(self.arena + i, k.p[j], k.n[j])
            i += k.n[j]
        if self._place(self.slots, self.mask, h, series_id, <uint32_t>self.used,
                       <uint32_t>size) > MAX_PROBE or (self.count + 1) * 2 > self.mask + 1:
            self.used += size
            self.count += 1
            self._rebuild((self.mask + 1) * 2 if (self.count * 2 > self.mask + 1)
                          else self.mask + 1)
            return
        self.used += size
        self.count += 1

    def get(self, machine_identifier, metric_name, unit, raw_tag):
        cdef Key k
        if _key_of(&k, machine_identifier, metric_name, unit, raw_tag):
            return None
        cdef int32_t sid = self.find(&k)
        return None if sid < 0 else sid

    def forget(self, machine_identifier, metric_name, unit, raw_tag):
        """Drop a key (get, and so encode_batch, miss it again). Its slot stays,
        with id -1, which find already reports as absent: no tombstones to skip
        in a probe, and a later add of the key takes the slot back."""
        cdef Key k
        cdef uint64_t h
        cdef Py_ssize_t i
        if _key_of(&k, machine_identifier, metric_name, unit, raw_tag):
            return
        h = _hash(&k, self.seed)
        i = <Py_ssize_t>(h & <uint64_t>self.mask)
        while self.slots[i].hash != 0:
            if self.slots[i].hash == h and self._same(&self.slots[i], &k):
                if self.slots[i].sid >= 0:
                    self.slots[i].sid = -1
                    self.live -= 1
                return
            i = (i + 1) & self.mask


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


# ------------------------------------------------------------ reading fields

# A reading's six fields, in this order, read by offset: msgspec Structs keep
# their fields as slots (member descriptors) at fixed offsets, and a getattr
# through the type costs ~20 ns, ~120 ns a reading (measured), where a load
# at the offset costs about one. The offsets come from the type's own
# descriptors, checked to be object slots; a type whose fields are not (or
# an unset slot) is read with getattr, so nothing but speed depends on it.
cdef tuple FIELDS = ("machine_identifier", "timestamp", "metric_name", "value", "unit",
                     "raw_tag")
cdef dict _layouts = {}  # type -> tuple of 6 offsets, or None: use getattr


cdef object _layout_of(type tp):
    found = _layouts.get(tp, False)
    if found is not False:
        return found
    offsets = []
    for name in FIELDS:
        desc = None
        for base in tp.__mro__:
            if name in base.__dict__:
                desc = base.__dict__[name]
                break
        if type(desc).__name__ != "member_descriptor" \
                or (<PyMemberDescrObject*>desc).d_member.type != T_OBJECT_EX:
            offsets = None
            break
        offsets.append((<PyMemberDescrObject*>desc).d_member.offset)
    found = tuple(offsets) if offsets is not None else None
    _layouts[tp] = found
    return found


cdef inline object _slot(object r, Py_ssize_t off, int j):
    cdef PyObject* v = (<PyObject**>((<char*><PyObject*>r) + off))[0]
    if v == NULL:
        return getattr(r, FIELDS[j])  # raises AttributeError, as getattr would
    return <object>v


def _reading_fields(r):
    """The six fields of ``r`` as encode_batch reads them (for the tests)."""
    layout = _layout_of(type(r))
    if layout is None:
        return tuple(getattr(r, name) for name in FIELDS)
    return tuple(_slot(r, layout[j], j) for j in range(6))


# ------------------------------------------------------------ raw readings

# The fast path hands the kernel each reading as msgspec.Raw: the JSON text of
# one reading object, which msgspec has checked to be well-formed JSON but
# not decoded (decoding five strings, a float and a Struct was ~2,000 of
# ~3,500 instructions a reading). The kernel reads the six known fields from
# it in place. Anything it does not read exactly as msgspec would decode it
# into a Reading is RECHECK: an escape in a string, an unknown or repeated
# key, a non-string where a string belongs, a number out of range or of
# more than 64 characters, invalid UTF-8.

cdef bint _scan_reading(const unsigned char* p, Py_ssize_t n, haltless_scanned* r) except -1:
    """Read a reading object's fields from its JSON text; False: RECHECK. A
    number off Clinger's fast path goes through Python's dtoa (correctly
    rounded, as msgspec is); out of range is RECHECK."""
    cdef char buf[64]
    cdef double v
    if not haltless_scan(p, n, r):
        return False
    if r.slow != NULL:
        memcpy(buf, r.slow, r.slow_size)
        buf[r.slow_size] = 0
        v = PyOS_string_to_double(buf, NULL, NULL)  # NULL: overflow is +-inf, no error
        if not isfinite(v):
            return False
        r.value = (0.0 if r.slow_integer and v == 0.0 else -v) if r.slow_neg else v
    return True


def encode_batch(list readings, SeriesIndex index, int64_t now_us, oldest_us=None):
    """See ``_validate_py.encode_batch``: same contract, same output bytes."""
    cdef Py_ssize_t n = len(readings), i, ngood = 0
    cdef int64_t hi = now_us + FUTURE_LIMIT_US, ts
    cdef int64_t lo = now_us - PAST_LIMIT_US if oldest_us is None else <int64_t>oldest_us
    cdef double v
    cdef unsigned char* out
    cdef int32_t sid
    cdef bint recheck = False
    cdef Key k
    cdef Py_ssize_t o_machine = 0, o_ts = 0, o_metric = 0, o_value = 0, o_unit = 0, o_raw = 0
    cdef type kind = None
    cdef bint by_offset = False
    # The last text timestamp parsed: a batch repeats each one (an agent's
    # machine sends all its metrics per tick; a live poll one for all).
    cdef const unsigned char* last_text = NULL
    cdef Py_ssize_t last_len = -1, tlen
    cdef int64_t last_ts = 0
    cdef const unsigned char* tp
    cdef Py_buffer view
    cdef haltless_scanned sc
    cdef bint ok
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
            if type(r) is Raw:
                PyObject_GetBuffer(r, &view, PyBUF_SIMPLE)
                try:
                    ok = _scan_reading(<const unsigned char*>view.buf, view.len, &sc)
                    if ok:
                        tlen = sc.size[1]
                        if tlen == last_len and memcmp(sc.text[1], last_text, tlen) == 0:
                            ts = last_ts
                        elif _parse_rfc3339(sc.text[1], tlen, &ts):
                            # readings[i] keeps the text alive
                            last_text, last_len, last_ts = sc.text[1], tlen, ts
                        else:
                            ok = False
                    ok = (ok and 1 <= sc.chars[0] <= 200 and 1 <= sc.chars[2] <= 200
                          and sc.chars[3] <= 64 and sc.chars[4] <= 200)
                    if ok:
                        if ts < lo:
                            errors.append((i, TOO_OLD))
                            continue
                        if ts > hi:
                            errors.append((i, TOO_NEW))
                            continue
                        k.p[0], k.n[0] = sc.text[0], sc.size[0]
                        k.p[1], k.n[1] = sc.text[2], sc.size[2]
                        k.p[2], k.n[2] = sc.text[3], sc.size[3]
                        k.p[3], k.n[3] = sc.text[4], sc.size[4]
                        sid = index.find(&k)
                        if sid < 0:
                            missing.append(i)
                        else:
                            _put_record(out + ngood * RECORD, sid, ts, sc.value)
                            ngood += 1
                        continue
                finally:
                    PyBuffer_Release(&view)
                errors.append((i, RECHECK))
                recheck = True
                continue
            if type(r) is not kind:
                kind = type(r)
                layout = _layout_of(kind)
                by_offset = layout is not None
                if by_offset:
                    o_machine, o_ts, o_metric, o_value, o_unit, o_raw = layout
            if by_offset:
                machine = _slot(r, o_machine, 0)
                t = _slot(r, o_ts, 1)
                metric = _slot(r, o_metric, 2)
                value = _slot(r, o_value, 3)
                unit = _slot(r, o_unit, 4)
                raw = _slot(r, o_raw, 5)
            else:
                machine = r.machine_identifier
                t = r.timestamp
                metric = r.metric_name
                value = r.value
                unit = r.unit
                raw = r.raw_tag
            if type(t) is str:
                # Text: a FastReading, whose decoder bounded nothing.
                if PyUnicode_IS_ASCII(t):
                    tp = <const unsigned char*>PyUnicode_DATA(t)
                    tlen = PyUnicode_GET_LENGTH(t)
                    if tlen == last_len and memcmp(tp, last_text, tlen) == 0:
                        ts = last_ts
                    elif _parse_rfc3339(tp, tlen, &ts):
                        last_text, last_len, last_ts = tp, tlen, ts  # readings[i] keeps it
                    else:
                        tlen = -1
                else:
                    tlen = -1
                if (tlen < 0
                        or not 1 <= PyUnicode_GET_LENGTH(machine) <= 200
                        or not 1 <= PyUnicode_GET_LENGTH(metric) <= 200
                        or (unit is not None and PyUnicode_GET_LENGTH(unit) > 64)
                        or (raw is not None and PyUnicode_GET_LENGTH(raw) > 200)):
                    errors.append((i, RECHECK))
                    recheck = True
                    continue
            else:
                ts = _timestamp_us(t)
            v = value
            if not isfinite(v):
                errors.append((i, NOT_FINITE))
                continue
            if ts < lo:
                errors.append((i, TOO_OLD))
                continue
            if ts > hi:
                errors.append((i, TOO_NEW))
                continue
            _key_of(&k, machine, metric, unit, raw)
            sid = index.find(&k)
            if sid < 0:
                missing.append(i)
                continue
            _put_record(out + ngood * RECORD, sid, ts, v)
            ngood += 1
        if missing or recheck:
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
