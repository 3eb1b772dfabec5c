"""Logging and signals, the same in every process of ours (HTTP workers,
pollers, the edge agent): one log format, device libraries kept quiet, and
``run_until_signal``, the one way a uvloop process of ours stops on
SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import signal


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Device libraries log per packet (pymodbus dumps every garbled frame in
    # hex); we report each source's state changes ourselves, once.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    # gmqtt logs every connection made and lost, and a warning for each
    # acknowledgement we withhold on purpose (pollers/mqtt.py: a message
    # whose commit failed is not acknowledged).
    logging.getLogger("gmqtt").setLevel(logging.ERROR)


def run_until_signal(main, log_level: str):
    """Run ``main(stop: asyncio.Event)`` on uvloop with our logging; SIGTERM
    and SIGINT set ``stop``. Returns what ``main`` returns."""
    import uvloop

    configure_logging(log_level)

    async def outer():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return uvloop.run(outer())
