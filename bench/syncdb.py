"""A synchronous handle on one asyncpg connection, for the benchmark drivers.

The drivers count rows, read sizes and WAL positions between steps that run
in other processes (servers, load generators, pollers), so they keep no event
loop running: each call runs one query to its end on a private loop.
"""
from __future__ import annotations

import asyncio
import time

import asyncpg


class DB:
    """One asyncpg connection, used synchronously; ``with DB(dsn) as h:`` closes it."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(dsn))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def val(self, sql: str, *args):
        return self.run(self.conn.fetchval(sql, *args))

    def fetch(self, sql: str, *args) -> list:
        return self.run(self.conn.fetch(sql, *args))

    def execute(self, sql: str, *args) -> str:
        return self.run(self.conn.execute(sql, *args))

    def drained(self, sql: str, settle: float = 0.5, timeout: float = 30.0) -> int:
        """The count ``sql`` returns once it stops moving (in-flight requests committed)."""
        last, end = self.val(sql), time.monotonic() + timeout
        while time.monotonic() < end:
            time.sleep(settle)
            now = self.val(sql)
            if now == last:
                return now
            last = now
        return last

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.close()

    def __enter__(self) -> DB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
