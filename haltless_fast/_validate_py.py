"""Pure-Python twin of ``_validate.pyx``: same signature, same results.

It runs when the extension is not built or ``HALTLESS_NO_EXTENSIONS`` is set,
and the test-suite runs every kernel case against both.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import struct

from msgspec import Raw

_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
_HOUR_US = 3_600_000_000
_PAST_LIMIT_US = 3650 * 86_400_000_000
_FUTURE_LIMIT_US = 5 * 60_000_000
_OID_FLOAT8 = 701

# Why a reading is refused: the codes encode_batch returns (the ingestor
# turns them into the contract's messages and the metrics' reasons).
NOT_FINITE = 1
TOO_OLD = 2
TOO_NEW = 3
RECHECK = 4

_row_head = struct.Struct("!hiiiqii")  # 5 fields; series_id; bucket; n
_array_head = struct.Struct("!iiiiii")  # byte length; ndim, flags, oid, dim, lbound
_ts_len = struct.Struct("!i")
_ts_elem = struct.Struct("!q")
_val_elem = struct.Struct("!id")


def timestamp_us(dt) -> int:
    """Microseconds since the Unix epoch; a naive datetime is taken as UTC."""
    off = dt.utcoffset()
    days = dt.toordinal() - 719_163  # date(1970, 1, 1).toordinal()
    us = ((days * 86_400 + dt.hour * 3600 + dt.minute * 60 + dt.second) * 1_000_000
          + dt.microsecond)
    if off is not None:
        us -= (off.days * 86_400 + off.seconds) * 1_000_000 + off.microseconds
    return us


_record = struct.Struct("<iqd")  # series id, Unix microseconds, value: 20 bytes
RECORD_SIZE = _record.size

# Readings per reading_chunks row at most: a row of 500 is 8,072 bytes on disk, under
# the hot tables' toast_tuple_target of 8,160 (migration 0011), so PostgreSQL
# never compresses a hot row (see _validate.pyx).
MAX_ROW = 500


class SeriesIndex:
    """The series ids an organization's readings map to, by (machine_identifier,
    metric_name, unit, raw_tag); None for unit or raw_tag is "". A series is
    (machine, metric) (README "Series identity"); the catalog adds only the
    keys whose unit and raw_tag agree with the series' current attributes
    (each "" or equal to it), so a reading that would change them misses here
    and reaches the catalog, and nothing else does. The compiled
    twin keeps the keys as UTF-8 in an open-addressing table with a seeded
    hash, so a lookup costs no tuple and no str hash; here it is a dict."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str, str, str], int] = {}

    def add(self, machine_identifier, metric_name, unit, raw_tag, series_id):
        if series_id < 0:
            raise ValueError(f"series id {series_id} is negative; series ids start at 1")
        self._ids[(machine_identifier, metric_name, unit or "", raw_tag or "")] = series_id

    def get(self, machine_identifier, metric_name, unit, raw_tag):
        return self._ids.get((machine_identifier, metric_name, unit or "", raw_tag or ""))

    def forget(self, machine_identifier, metric_name, unit, raw_tag):
        """Drop a key: get (and so encode_batch) misses it again."""
        self._ids.pop((machine_identifier, metric_name, unit or "", raw_tag or ""), None)

    def clear(self):
        self._ids.clear()

    def __len__(self):
        return len(self._ids)


# The timestamps the kernel parses itself: RFC 3339 as clients send it, a
# strict subset of what msgspec's datetime accepts (T and Z upper case, at
# most 6 fraction digits, an offset with a colon or none: UTC), giving the
# same instant. Anything else is RECHECK: decoded again by msgspec.
_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(?:\.([0-9]{1,6}))?(Z|[+-][0-9]{2}:[0-9]{2})?")
_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# Field lengths in characters, as the contract's Reading type bounds them
# (core/wire.py): machine_identifier and metric_name 1-200, unit 64, raw_tag 200.
_LIMITS = ((1, 200), (1, 200), (0, 64), (0, 200))


def parse_timestamp(text: str) -> int | None:
    """Unix microseconds of an RFC 3339 timestamp the kernel takes, else None."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    y, mo, d, h, mi, sec = (int(g) for g in m.groups()[:6])
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    if not (y >= 1 and 1 <= mo <= 12 and 1 <= d <= _DAYS[mo] + (mo == 2 and leap)
            and h <= 23 and mi <= 59 and sec <= 59):
        return None
    frac = int((m.group(7) or "0").ljust(6, "0"))
    off = 0
    zone = m.group(8)
    if zone and zone != "Z":
        oh, om = int(zone[1:3]), int(zone[4:6])
        if oh > 23 or om > 59:
            return None
        off = (oh * 60 + om) * 60_000_000 * (1 if zone[0] == "+" else -1)
    days = _dt.date(y, mo, d).toordinal() - 719_163
    return (days * 86_400 + h * 3600 + mi * 60 + sec) * 1_000_000 + frac - off


# The fields of a reading given as msgspec.Raw (the JSON text of one reading
# object), read as the compiled kernel reads them; None is RECHECK (see
# _validate.pyx, "raw readings", for the rules).
_WS = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"([^"\\\x00-\x1f]*)"')
_NUMBER = re.compile(rb"(-?)((?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?)")
_NAMES = ("machine_identifier", "timestamp", "metric_name", "unit", "raw_tag", "value")
_REQUIRED = {"machine_identifier", "timestamp", "metric_name", "value"}


def _raw_string(data: bytes, i: int):
    m = _STRING.match(data, i)
    if m is None:
        return None, i
    try:
        return m.group(1).decode("utf-8"), m.end()
    except UnicodeDecodeError:
        return None, i


def _scan_reading(data: bytes):
    """(machine_identifier, timestamp, metric_name, unit, raw_tag, value), with
    "" for an absent or null unit or raw_tag, or None (RECHECK)."""
    i = _WS.match(data, 0).end()
    if not data.startswith(b"{", i):
        return None
    i = _WS.match(data, i + 1).end()
    if data.startswith(b"}", i):
        return None
    fields = {"unit": "", "raw_tag": ""}
    seen = set()
    while True:
        key, i = _raw_string(data, i)
        if key not in _NAMES or key in seen:
            return None
        seen.add(key)
        i = _WS.match(data, i).end()
        if not data.startswith(b":", i):
            return None
        i = _WS.match(data, i + 1).end()
        if key == "value":
            m = _NUMBER.match(data, i)
            if m is None or len(m.group(2)) > 63:
                return None
            integer = m.group(3) is None and m.group(4) is None
            v = float(int(m.group(2))) if integer else float(m.group(2))
            if not math.isfinite(v):
                return None
            fields[key] = (0.0 if integer and v == 0.0 else -v) if m.group(1) else v
            i = m.end()
        elif data.startswith(b'"', i):
            fields[key], i = _raw_string(data, i)
            if fields[key] is None:
                return None
        elif key in ("unit", "raw_tag") and data.startswith(b"null", i):
            i += 4
        else:
            return None
        i = _WS.match(data, i).end()
        if data.startswith(b",", i):
            i = _WS.match(data, i + 1).end()
            continue
        if data.startswith(b"}", i):
            break
        return None
    if _WS.match(data, i + 1).end() != len(data) or not _REQUIRED <= seen:
        return None
    return tuple(fields[k] for k in _NAMES)


def encode_batch(readings, index, now_us, oldest_us=None):
    """Validate a decoded batch; pack the good readings as records.

    ``readings``: list of ``haltless.core.wire.Reading`` (timestamps as
    datetimes, lengths already bounded), or of ``FastReading`` (timestamps
    as text, lengths unchecked), or None for a reading the caller already
    rejected. ``index``: the organization's ``SeriesIndex``. ``now_us``:
    server clock. ``oldest_us`` (default: 3,650 days before ``now_us``) is the
    oldest timestamp accepted (a retention shorter than the contract's window).

    Returns ``(records, accepted, errors, missing)``: ``errors`` is a list of
    ``(index, code)``, the code NOT_FINITE, TOO_OLD (before ``oldest_us``),
    TOO_NEW (more than 5 minutes ahead of ``now_us``) or RECHECK (a text
    timestamp the kernel does not parse, or a field outside its length: the
    caller decodes the body again strictly, which says exactly what is
    wrong, or takes it); ``missing`` the indices of otherwise valid readings
    whose series is not in ``index``. ``records`` holds one 20-byte record
    (``RECORD_SIZE``) per good reading, in input order, for ``encode_chunks``;
    it is None when anything is missing or to recheck, because the caller
    resolves those and calls again.
    """
    errors = []
    missing = []
    good = []
    recheck = False
    lo = now_us - _PAST_LIMIT_US if oldest_us is None else oldest_us
    hi = now_us + _FUTURE_LIMIT_US
    for i, r in enumerate(readings):
        if r is None:
            continue
        if type(r) is Raw:
            fields = _scan_reading(bytes(r))
            ts = parse_timestamp(fields[1]) if fields is not None else None
            if ts is None or not all(a <= len(f) <= b for f, (a, b) in
                                     zip(fields[:1] + fields[2:5], _LIMITS)):
                errors.append((i, RECHECK))
                recheck = True
                continue
            if ts < lo:
                errors.append((i, TOO_OLD))
                continue
            if ts > hi:
                errors.append((i, TOO_NEW))
                continue
            sid = index.get(fields[0], fields[2], fields[3], fields[4])
            if sid is None:
                missing.append(i)
                continue
            good.append(_record.pack(sid, ts, fields[5]))
            continue
        t = r.timestamp
        if type(t) is str:
            fields = (r.machine_identifier, r.metric_name, r.unit or "", r.raw_tag or "")
            ts = parse_timestamp(t)
            if ts is None or not all(a <= len(f) <= b for f, (a, b) in zip(fields, _LIMITS)):
                errors.append((i, RECHECK))
                recheck = True
                continue
        else:
            ts = timestamp_us(t)
        v = r.value
        if not math.isfinite(v):
            errors.append((i, NOT_FINITE))
            continue
        if ts < lo:
            errors.append((i, TOO_OLD))
            continue
        if ts > hi:
            errors.append((i, TOO_NEW))
            continue
        sid = index.get(r.machine_identifier, r.metric_name, r.unit, r.raw_tag)
        if sid is None:
            missing.append(i)
            continue
        good.append(_record.pack(sid, ts, v))
    if missing or recheck:
        return None, 0, errors, missing
    return b"".join(good), len(good), errors, missing


def encode_chunks(records) -> bytes:
    """The binary COPY rows of ``reading_chunks`` for packed records (of one
    request or of many concatenated): one row per (series, hour) with the
    readings sorted by time, MAX_ROW readings at most (more make several
    rows), and no COPY header or trailer."""
    if len(records) % RECORD_SIZE:
        raise ValueError(f"records: {len(records)} bytes is not a multiple of {RECORD_SIZE}")
    good = sorted(_record.iter_unpack(records))
    return _encode_chunks(good)


def _encode_chunks(good):
    out = []
    n = len(good)
    start = 0
    while start < n:
        sid, ts0, _ = good[start]
        bucket = ts0 - ts0 % _HOUR_US
        end = start + 1
        while (end < n and end - start < MAX_ROW and good[end][0] == sid
               and good[end][1] - good[end][1] % _HOUR_US == bucket):
            end += 1
        k = end - start
        out.append(_row_head.pack(5, 4, sid, 8, bucket - _PG_EPOCH_US, 4, k))
        out.append(_ts_len.pack(8 * k))  # ts: bytea of k big-endian Unix µs
        out.extend(_ts_elem.pack(g[1]) for g in good[start:end])
        out.append(_array_head.pack(20 + 12 * k, 1, 0, _OID_FLOAT8, k, 1))
        out.extend(_val_elem.pack(8, g[2]) for g in good[start:end])
        start = end
    return b"".join(out)
