"""Pure-Python twin of ``_validate.pyx``: same signature, same results.

It runs when the extension is not built or ``HALTLESS_NO_EXTENSIONS`` is set,
and the test-suite runs every kernel case against both.
"""
from __future__ import annotations

import math
import struct

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


def encode_batch(readings, series, now_us, oldest_us=None):
    """Validate a decoded batch; pack the good readings as records.

    ``readings``: list of ``haltless.core.wire.Reading`` (or None for a reading the
    caller already rejected). ``series``: ``{(machine_identifier, metric_name,
    unit or "", raw_tag or ""): series_id}``. ``now_us``: server clock.
    ``oldest_us`` (default: 3,650 days before ``now_us``) is the oldest
    timestamp accepted (a retention shorter than the contract's window).

    Returns ``(records, accepted, errors, missing)``: ``errors`` is a list of
    ``(index, code)``, the code NOT_FINITE, TOO_OLD (before ``oldest_us``)
    or TOO_NEW (more than 5 minutes ahead of ``now_us``); ``missing`` the indices of otherwise valid readings
    whose series is not in ``series``. ``records`` holds one 20-byte record
    (``RECORD_SIZE``) per good reading, in input order, for ``encode_chunks``;
    it is None when anything is missing, because the caller resolves those
    and calls again.
    """
    errors = []
    missing = []
    good = []
    lo = now_us - _PAST_LIMIT_US if oldest_us is None else oldest_us
    hi = now_us + _FUTURE_LIMIT_US
    for i, r in enumerate(readings):
        if r is None:
            continue
        v = r.value
        if not math.isfinite(v):
            errors.append((i, NOT_FINITE))
            continue
        ts = timestamp_us(r.timestamp)
        if ts < lo:
            errors.append((i, TOO_OLD))
            continue
        if ts > hi:
            errors.append((i, TOO_NEW))
            continue
        sid = series.get((r.machine_identifier, r.metric_name, r.unit or "", r.raw_tag or ""))
        if sid is None:
            missing.append(i)
            continue
        good.append(_record.pack(sid, ts, v))
    if missing:
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
