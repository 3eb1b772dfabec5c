"""The group-commit writer: the last step of the ingest path.

    write(records) from many requests --> queued while the previous group
    commits --> one transaction: idempotency keys first, then the records of
    the whole group sorted into one reading_chunks row per (series, hour) by
    the kernel (encode_chunks) --> one binary COPY into the hot slot of the
    current hour (server/hot.py) --> COMMIT --> every request's future
    resolved: a 207 is sent only after this

One fsync serves many requests, and throughput does not hinge on one batch
= one transaction.
"""
from __future__ import annotations

import asyncio
import logging
import struct

import asyncpg

from ..core.errors import DatabaseUnavailable
from ..fast import encode_chunks
from .db import DB_DOWN
from .hot import hot_slot

log = logging.getLogger("haltless.writer")

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = b"\xff\xff"
COPY_COLUMNS = ["series_id", "bucket", "n", "ts", "vals"]


class GroupCommitWriter:
    """Merges concurrent writes into one COPY transaction.

    Each ``write(payload)`` queues a request's COPY rows and returns once they
    are committed. ``connections`` loops each take everything queued, COPY it
    in one transaction and commit; while one commits (waiting on the WAL
    flush), the next batch fills up behind it. So one fsync serves many
    requests, and throughput does not hinge on one batch = one transaction.
    """

    def __init__(self, pool: asyncpg.Pool, connections: int = 2,
                 timeout: float = 60.0, alive=None) -> None:
        self._pool = pool
        # alive(): False when a commit can no longer be trusted to last (the
        # embedded data dir was deleted): then nothing is acknowledged.
        self._alive = alive
        self._queue: list[tuple[tuple, asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._timeout = timeout
        self._tasks = [asyncio.create_task(self._run()) for _ in range(connections)]

    async def write(self, payload: bytes, idem: tuple | None = None) -> bool:
        """Commit ``payload``; with ``idem`` = (org_id, key, request_hash,
        response), record the key in the same transaction. Returns False, and
        writes nothing, when that key was already recorded."""
        if not payload and idem is None:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(((payload, idem), fut))
        self._wakeup.set()
        return await fut

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(DatabaseUnavailable("server shutting down"))
        self._queue = []

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            group, self._queue = self._queue, []
            self._wakeup.clear()
            if not group:
                continue
            try:
                self._check_alive()
                dups = await self._copy([item for item, _ in group])
                self._check_alive()
            except DatabaseUnavailable as exc:
                self._fail(group, exc)
            except DB_DOWN as exc:
                self._fail(group, DatabaseUnavailable(f"database unavailable: {exc}"))
            except asyncpg.PostgresError:
                # Should not happen (the kernel emits valid rows); keep one bad
                # payload from failing the requests merged with it.
                log.exception("group COPY failed; retrying the %d payloads one by one", len(group))
                for item, fut in group:
                    try:
                        dup = await self._copy([item])
                    except Exception as exc:  # noqa: BLE001 - reported to that request only
                        self._fail([(item, fut)], exc)
                    else:
                        self._done([(item, fut)], dup)
                continue
            except Exception as exc:  # noqa: BLE001 - never let the loop die
                log.exception("group COPY failed")
                self._fail(group, exc)
                continue
            self._done(group, dups)

    async def _copy(self, items: list[tuple]) -> set[int]:
        """One transaction: record idempotency keys first (a key already taken,
        even by a transaction still in flight, drops its payload), then COPY.
        Returns the positions of the items that were duplicates."""
        dups: set[int] = set()
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                keyed = [(i, idem) for i, (_, idem) in enumerate(items) if idem is not None]
                if keyed:
                    first: dict[tuple, int] = {}
                    for i, idem in keyed:
                        if (idem[0], idem[1]) in first:
                            dups.add(i)  # the same key twice in one group
                        else:
                            first[(idem[0], idem[1])] = i
                    rows = [items[i][1] for i in first.values()]
                    taken = await conn.fetch(
                        "INSERT INTO idempotency_keys (org_id, key, request_hash, response)"
                        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[])"
                        " ON CONFLICT DO NOTHING RETURNING org_id, key",
                        *map(list, zip(*rows)), timeout=self._timeout)
                    fresh = {(r[0], r[1]) for r in taken}
                    dups.update(i for k, i in first.items() if k not in fresh)
                records = [p for i, (p, _) in enumerate(items) if p and i not in dups]
                if records:
                    # All requests of the group merge: one row per (series, hour).
                    data = b"".join([COPY_HEADER, encode_chunks(b"".join(records)), COPY_TRAILER])
                    await conn.copy_to_table(f"reading_chunks_{hot_slot()}",
                                             source=memoryview(data), columns=COPY_COLUMNS,
                                             format="binary", timeout=self._timeout)
        return dups

    def _check_alive(self) -> None:
        if self._alive is not None and not self._alive():
            raise DatabaseUnavailable("the embedded PostgreSQL's data directory or postmaster "
                                      "is gone; nothing was acknowledged")

    @staticmethod
    def _done(group, dups) -> None:
        for i, (_, fut) in enumerate(group):
            if not fut.done():
                fut.set_result(i not in dups)

    @staticmethod
    def _fail(group, exc: Exception) -> None:
        for _, fut in group:
            if not fut.done():
                fut.set_exception(exc)
