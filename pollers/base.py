"""The one small interface every protocol reader implements.

A reader owns one connection to one device (a Modbus TCP slave or an OPC-UA
server) and reads the configured points of one source. Two runners use it:
the cloud poller (``server/direct.py``, writes to PostgreSQL) and the edge
agent (``pollers/agent.py``, pushes over HTTP). There is exactly one reader
implementation per protocol.
"""
from __future__ import annotations

import datetime as _dt
from typing import NamedTuple, Protocol


class Sample(NamedTuple):
    """One value read from a device, ready to become a reading."""

    metric_name: str
    unit: str | None
    raw_tag: str
    value: float
    timestamp: _dt.datetime  # timezone-aware UTC


class PointError(NamedTuple):
    """A configured point that could not be read this time (the rest were)."""

    raw_tag: str
    metric_name: str
    message: str


class ReadResult(NamedTuple):
    samples: list[Sample]
    errors: list[PointError]


class Reader(Protocol):
    async def connect(self) -> None:
        """Open the connection; raise ReaderError with an actionable message."""

    async def read(self) -> ReadResult:
        """Read every configured point once; raise ReaderError if the
        connection is unusable (the runner then closes and reconnects)."""

    async def close(self) -> None:
        """Close cleanly; never raises."""


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)
