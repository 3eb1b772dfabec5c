"""The two small interfaces of the device side: a Reader, which the runner
asks for every point's value on its schedule, and a Subscriber, which waits
for the device to send what changed.

A reader owns one connection to one device (a Modbus TCP slave or an OPC-UA
server) and reads the configured points of one source; a subscriber owns
one session and one subscription (OPC-UA ``mode = "subscribe"``). Two
runners use them: the cloud poller (``server/direct.py``, writes to
PostgreSQL) and the edge agent (``pollers/agent.py``, pushes over HTTP),
through ``PollLoop`` (``schedule.py``) or ``SubscribeLoop``
(``subscribe.py``). There is exactly one reader implementation per protocol,
and one subscriber.
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


class Subscriber(Protocol):
    item_errors: list[PointError]  # what the last connect() returned
    publishing_interval: float     # seconds: the first values come at most this long after connect()

    async def connect(self) -> list[PointError]:
        """Open the session and subscribe to every point; raise ReaderError
        with an actionable message. Returns the points that could not be
        subscribed to (the others were)."""

    async def receive(self) -> ReadResult:
        """The next values the device sent (empty for a keep-alive: the
        subscription is alive and nothing changed); raise ReaderError once
        the subscription is lost (the runner then closes and reconnects)."""

    async def close(self) -> None:
        """Delete the subscription and close the session; never raises."""
