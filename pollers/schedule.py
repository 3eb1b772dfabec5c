"""One device on a fixed schedule: the loop shared by the cloud poller and
the edge agent. It is the single owner of its connection's reconnects
(``backoff.py``: exponential with jitter), and a slow or dead device only
delays its own loop."""
from __future__ import annotations

import asyncio
import datetime as _dt
import random
from typing import Awaitable, Callable

from ..core.errors import DeviceUnreachable, ReaderError
from .backoff import Backoff
from .base import Reader, ReadResult, utcnow
from .stats import Stats

GapCallback = Callable[[_dt.datetime, "_dt.datetime | None"], None]


def raise_if_cancelled() -> None:
    """Raise the cancel that something this task awaited dropped. On Python
    3.11 asyncio.wait_for returns the result instead of raising when the
    cancel lands as the awaited call completes, and pymodbus awaits its
    connect and each request that way. A stopped PollLoop polled on, and the
    poller process that stopped it waited for it forever (in its rebalancing,
    or its exit on SIGTERM): test_pollers' handover test, about 1 run in 20."""
    if asyncio.current_task().cancelling():
        raise asyncio.CancelledError


class PollLoop:
    """Calls ``make_reader()`` (which connects) when there is no connection,
    reads every ``interval`` seconds, and hands each result to ``sink``.

    ``on_error(message)`` hears of every failed connect or read;
    ``on_missed(n)`` of poll slots skipped because a poll overran;
    ``on_gap(since, until)`` of a gap in the data: ``(last good read, None)``
    when a connection that had read fails, ``(since, first good read
    after)`` when reads come again;
    ``may_poll(now)`` can veto a poll (the cloud poller's lease check).
    """

    def __init__(self, interval: float, timeout: float,
                 make_reader: Callable[[], Awaitable[Reader]],
                 sink: Callable[[ReadResult], Awaitable[None]],
                 on_error: Callable[[str], None],
                 stats: Stats,
                 on_missed: Callable[[int], None] = lambda n: None,
                 may_poll: Callable[[float], bool] = lambda now: True,
                 name: str = "source", first_at: float | None = None,
                 on_gap: GapCallback = lambda since, until: None) -> None:
        self.interval = interval
        self.timeout = timeout
        self.make_reader = make_reader
        self.sink = sink
        self.on_error = on_error
        self.on_missed = on_missed
        self.on_gap = on_gap
        self.may_poll = may_poll
        self.stats = stats
        self.reader: Reader | None = None
        self.backoff = Backoff()
        self.reconnect_at = 0.0
        self.last_read: _dt.datetime | None = None  # wall time of the last good read
        self.gap_since: _dt.datetime | None = None  # data stopped then, not back yet
        self.pending_sink: asyncio.Task | None = None
        # Loop time before which the next poll must not start: one interval
        # after the last poll began. A process handing the source over passes
        # it on (``first_at`` of the next owner), so a handover never polls
        # twice within one interval.
        self.next_due = 0.0
        self._first_at = first_at
        self.task = asyncio.create_task(self.run(), name=name)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Spread first polls so many sources created at once do not fire together.
        next_t = loop.time() + random.uniform(0, min(self.interval, 1.0))
        if self._first_at is not None and self._first_at > loop.time():
            next_t = self._first_at  # the previous owner's schedule, kept
        try:
            while True:
                raise_if_cancelled()
                delay = next_t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = loop.time()
                if not self.may_poll(now):
                    next_t += self.interval
                    continue
                self.stats.lags.append(now - next_t)
                self.next_due = now + self.interval
                await self.poll_once()
                next_t += self.interval
                behind = loop.time() - next_t
                if behind > 0:  # a poll overran: skip the slots it ate, and say so
                    skipped = int(behind // self.interval) + 1
                    next_t += skipped * self.interval
                    self.stats.missed += skipped
                    self.on_missed(skipped)
        finally:
            # The last poll's readings are on their way (to the database, or
            # to the agent's disk queue): let them land instead of cancelling
            # a write that may complete anyway, unseen by the agent's flush.
            if self.pending_sink is not None and not self.pending_sink.done():
                await asyncio.gather(self.pending_sink, return_exceptions=True)
            await self.close()

    async def close(self) -> None:
        if self.reader is not None:
            reader, self.reader = self.reader, None
            await reader.close()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def poll_once(self) -> None:
        loop = asyncio.get_running_loop()
        self.stats.polls += 1
        if self.reader is None:
            if loop.time() < self.reconnect_at:
                return
            # asyncio.timeout, not wait_for, which can drop a cancel (see run()).
            try:
                async with asyncio.timeout(self.timeout):
                    self.reader = await self.make_reader()
                raise_if_cancelled()  # not on to a read the stop did not want
            except TimeoutError:
                self.fail(f"connect: no answer within {self.timeout:.0f} s")
                return
            except ReaderError as exc:
                self.fail(f"connect: {exc}", isinstance(exc, DeviceUnreachable))
                return
            self.backoff.connected()
        try:
            async with asyncio.timeout(self.timeout):  # not wait_for (see run())
                res = await self.reader.read()
        except (ReaderError, TimeoutError) as exc:
            await self.close()
            self.fail(str(exc) or f"read: no answer within {self.timeout:.0f} s")
            return
        self.last_read = utcnow()
        if self.gap_since is not None:
            self.on_gap(self.gap_since, self.last_read)
            self.gap_since = None
        if self.pending_sink is not None and not self.pending_sink.done():
            await self.pending_sink  # one sink in flight per source: order and memory bounded
        # The sink (a database write, a disk queue) runs beside the schedule,
        # so a slow write does not push the next poll back.
        self.pending_sink = asyncio.create_task(self.sink(res))

    def fail(self, message: str, unreachable: bool = False) -> None:
        self.reconnect_at = asyncio.get_running_loop().time() + self.backoff.failed(unreachable)
        self.stats.failed += 1
        if self.gap_since is None and self.last_read is not None:
            self.gap_since = self.last_read
            self.on_gap(self.gap_since, None)
        self.on_error(message)
