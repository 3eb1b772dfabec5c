"""Unix microseconds, the unit of every stored timestamp (the kernel's
records, hot rows, blocks), and back to aware UTC datetimes."""
from __future__ import annotations

import datetime as _dt

EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
HOUR_US = 3_600_000_000


def to_dt(us: int) -> _dt.datetime:
    return EPOCH + _dt.timedelta(microseconds=us)


def to_us(t: _dt.datetime) -> int:
    return (t - EPOCH) // _dt.timedelta(microseconds=1)


def hour_of(us: int) -> int:
    return us - us % HOUR_US
