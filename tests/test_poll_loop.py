"""The poll loop that reads every device (pollers/schedule.py), in the cloud
pollers and in the edge agent: stopping it ends it, whatever it awaits."""
from __future__ import annotations

import asyncio

import pytest

from haltless.pollers.base import ReadResult
from haltless.pollers.schedule import PollLoop
from haltless.pollers.stats import Stats


async def awaited(fut: asyncio.Future, library_wait_for: bool):
    """``fut``'s result, awaited directly or, as pymodbus awaits its connect
    and each request, through asyncio.wait_for."""
    if library_wait_for:
        return await asyncio.wait_for(fut, 30)
    return await fut


class GatedReader:
    """A reader whose read() returns when the test resolves ``gate``."""

    def __init__(self, library_wait_for: bool) -> None:
        self.library_wait_for = library_wait_for
        self.reading = asyncio.Event()
        self.gate: asyncio.Future | None = None

    async def read(self) -> ReadResult:
        self.gate = asyncio.get_running_loop().create_future()
        self.reading.set()
        return await awaited(self.gate, self.library_wait_for)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("library_wait_for", [False, True], ids=["direct", "library-wait-for"])
@pytest.mark.parametrize("step", ["connect", "read"])
def test_a_stop_that_lands_as_a_connect_or_read_completes_still_ends_the_loop(step,
                                                                               library_wait_for):
    """The cancel and the completion in one loop iteration: on Python 3.11
    asyncio.wait_for returns the result and drops the cancel, whether the
    loop or the device library awaits with it, and the loop polled on (a
    poller process then hung stopping it)."""
    async def main():
        loop = asyncio.get_running_loop()
        reader = GatedReader(library_wait_for)
        connecting = asyncio.Event()
        connected = loop.create_future()

        async def make_reader():
            connecting.set()
            return await awaited(connected, library_wait_for)

        async def sink(res):
            pass

        if step == "read":
            connected.set_result(reader)
        poll = PollLoop(60.0, 30.0, make_reader, sink, on_error=lambda message: None,
                        stats=Stats(), first_at=loop.time() + 0.01)
        if step == "connect":
            await asyncio.wait_for(connecting.wait(), 10)
            connected.set_result(reader)       # the connect completes ...
        else:
            await asyncio.wait_for(reader.reading.wait(), 10)
            reader.gate.set_result(ReadResult([], []))  # the read completes ...
        poll.task.cancel()                     # ... as the loop is stopped
        done, _ = await asyncio.wait([poll.task], timeout=10)
        assert done, "the loop went on polling after it was cancelled"
        assert poll.task.cancelled()

    asyncio.run(main())
