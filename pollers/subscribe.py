"""One device that sends what changed (an OPC-UA subscription): the loop
shared by the cloud poller and the edge agent, beside ``PollLoop``
(``schedule.py``) for devices read on a schedule. It owns the one
subscriber of its source - one session, never two: a new one is opened
only once the old one is closed - and repairs it by itself.

    make_subscriber() (connects) --> receive() ... --> sink(ReadResult)
          ^                              | ReaderError: lost
          +-- Backoff (backoff.py) <-- close()

Whatever ends a subscription (the server restarted, the TCP connection
dropped or went silent, the session expired, the subscription was deleted)
``receive`` raises ReaderError; the loop closes the subscriber, waits its
backoff (1 s doubling to 60 s with jitter, 10 s at most while nothing
answers at the address; reset after a minute of health) and subscribes
again, session, subscription and every monitored item, with no restart of
the process. What the device sampled meanwhile is gone; ``on_gap`` says
from when (the last publish received) to when (the first of the new
subscription).
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import random
from typing import Awaitable, Callable

from ..core.errors import DeviceUnreachable, ReaderError
from .backoff import Backoff
from .base import PointError, ReadResult, Subscriber, utcnow
from .schedule import GapCallback, raise_if_cancelled
from .stats import Stats

LEASE_RECHECK = 0.5  # seconds between looks at a lease that is not valid (yet)


class SubscribeLoop:
    """Keeps ``make_subscriber()``'s subscription alive and hands each batch
    of values it receives to ``sink`` (one sink call in flight at a time).

    ``on_error(message)`` hears of every failed subscribe and every loss;
    ``on_subscribed(errors)`` of each new subscription, with the points that
    could not be subscribed to; ``on_alive()`` of every publish received,
    keep-alives included; ``on_gap(since, until)`` as ``PollLoop``'s;
    ``may_deliver(now)`` is the cloud poller's lease check: values that
    arrive while it says no are dropped (counted in ``stats.dropped``), and
    no subscription is made.
    """

    def __init__(self, timeout: float,
                 make_subscriber: Callable[[], Awaitable[Subscriber]],
                 sink: Callable[[ReadResult], Awaitable[None]],
                 on_error: Callable[[str], None],
                 stats: Stats,
                 on_subscribed: Callable[[list[PointError]], None] = lambda errors: None,
                 on_alive: Callable[[], None] = lambda: None,
                 on_gap: GapCallback = lambda since, until: None,
                 may_deliver: Callable[[float], bool] = lambda now: True,
                 name: str = "source", spread: float = 1.0) -> None:
        self.timeout = timeout
        self.make_subscriber = make_subscriber
        self.sink = sink
        self.on_error = on_error
        self.on_subscribed = on_subscribed
        self.on_alive = on_alive
        self.on_gap = on_gap
        self.may_deliver = may_deliver
        self.stats = stats
        self.spread = spread
        self.backoff = Backoff()
        self.subscriber: Subscriber | None = None
        self.pending_sink: asyncio.Task | None = None
        self.next_due = 0.0  # no schedule for the next owner to keep (see server/direct.py)
        self.last_alive: _dt.datetime | None = None  # wall time of the last publish received
        self.gap_since: _dt.datetime | None = None
        self.task = asyncio.create_task(self.run(), name=name)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Spread the first connects of sources started together.
        await asyncio.sleep(random.uniform(0, self.spread))
        try:
            while True:
                raise_if_cancelled()
                if not self.may_deliver(loop.time()):
                    await asyncio.sleep(LEASE_RECHECK)
                    continue
                try:
                    # asyncio.timeout, not wait_for, which can drop a cancel (schedule.py)
                    async with asyncio.timeout(self.timeout):
                        self.subscriber = await self.make_subscriber()
                    raise_if_cancelled()
                except TimeoutError:
                    await self.failed(f"subscribe: no answer within {self.timeout:.0f} s")
                    continue
                except ReaderError as exc:
                    await self.failed(f"subscribe: {exc}", isinstance(exc, DeviceUnreachable))
                    continue
                self.backoff.connected()
                self.on_subscribed(list(self.subscriber.item_errors))
                try:
                    await self.deliver_until_lost(loop)
                except ReaderError as exc:
                    await self.close()
                    await self.failed(str(exc))
        finally:
            # The last values are on their way (to the database, or to the
            # agent's disk queue): let them land (see PollLoop.run).
            if self.pending_sink is not None and not self.pending_sink.done():
                await asyncio.gather(self.pending_sink, return_exceptions=True)
            await self.close()

    async def deliver_until_lost(self, loop) -> None:
        while True:
            res = await self.subscriber.receive()
            now = utcnow()
            self.last_alive = now
            if self.gap_since is not None:
                self.on_gap(self.gap_since, now)
                self.gap_since = None
            self.on_alive()
            if not res.samples and not res.errors:
                continue  # a keep-alive
            if not self.may_deliver(loop.time()):
                self.stats.dropped += len(res.samples)  # the lease lapsed: another owner may have it
                continue
            if self.pending_sink is not None and not self.pending_sink.done():
                await self.pending_sink  # one sink in flight per source: order and memory bounded
            self.pending_sink = asyncio.create_task(self.sink(res))

    async def failed(self, message: str, unreachable: bool = False) -> None:
        """Report, mark the gap, and wait out the backoff."""
        self.stats.failed += 1
        if self.gap_since is None and self.last_alive is not None:
            self.gap_since = self.last_alive
            self.on_gap(self.gap_since, None)
        self.on_error(message)
        await asyncio.sleep(self.backoff.failed(unreachable))

    async def close(self) -> None:
        if self.subscriber is not None:
            subscriber, self.subscriber = self.subscriber, None
            await subscriber.close()
