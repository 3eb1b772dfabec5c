"""ISO 8601 text of Unix microseconds (pure-Python twin of ``_iso.pyx``).

Every timestamp is written in UTC with six fraction digits and ``Z``, 27
characters: ``2026-11-28T00:45:59.000213Z``, for the years 1 to 9999 (what
``datetime`` can represent); a timestamp outside them is a ValueError.
"""
from __future__ import annotations

import datetime as _dt
from array import array

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
