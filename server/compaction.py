"""When and where compaction runs, and which kind: the one place that picks
single-node compaction (``server/compact.py``) or per-shard-group
compaction on a Citus cluster (``server/compact_citus.py``); neither of
those imports the other or this module.

    haltless compact: compact_and_expire(wait=True), both slots
    haltless serve:   compact_forever in every worker: every EVERY seconds,
                      once the closed slot's hour is GRACE old,
                      compact_and_expire(wait=False), the closed slot only

One node: the compaction and the retention run under one advisory lock
(COMPACT_LOCK), one process at a time across workers and hosts. Citus:
every process compacts the shard groups nobody else holds (each group has
a lock of its own), and only the retention, DDL through the coordinator,
takes COMPACT_LOCK.
"""
from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from .compact import Compactor, record_run
from .compact_citus import compact_shards, is_distributed
from .db import DB_DOWN
from .hot import hot_slot

log = logging.getLogger("haltless.compact")

COMPACT_LOCK = 7_291_845_002  # pg_advisory_lock key: one compactor at a time
GRACE = 120.0       # seconds after its hour ends before a slot is compacted
EVERY = 30.0        # seconds between checks in haltless serve
RETENTION_WAIT = 10.0  # seconds a partition's detach waits for older readers per run


async def compact_all(conn, *, include_current: bool, retention_days: int | None = None,
                      crash_at: str | None = None, now: float | None = None,
                      dsn: str | None = None, wait: bool = True,
                      distributed: bool | None = None) -> tuple[int, int]:
    """Compact the closed slot (when it has rows), and with ``include_current``
    the slot being written as well. Returns (readings, blocks) written.

    On a Citus cluster (``dsn``: the coordinator's URL), per shard group, each
    under its own lock: with ``wait`` every group, waiting for the compactor
    that holds one, else only the groups nobody holds."""
    current = hot_slot(now)
    slots = (1 - current, current) if include_current else (1 - current,)
    if distributed is None:
        distributed = await is_distributed(conn)
    if distributed:
        readings, blocks = await compact_shards(conn, dsn, slots, retention_days=retention_days,
                                                crash_at=crash_at, wait=wait)
    else:
        c = Compactor(conn, retention_days, crash_at)
        for slot in slots:
            if await c.slot_has_rows(slot):
                await c.compact_slot(slot)
        await c.vacuum()
        readings, blocks = c.readings, c.blocks
    if blocks:
        await record_run(conn, readings, blocks)
    return readings, blocks


async def drop_expired(conn, retention_days: int | None, distributed: bool = False,
                       wait: float = RETENTION_WAIT) -> int:
    """Retention: drop the block partitions (whole months) that ended before
    the cutoff; the number dropped. On one node each is detached
    CONCURRENTLY first: that waits (up to ``wait`` seconds) for readers
    whose snapshot is older, without blocking any reader or writer
    meanwhile; a partition whose readers outlast the wait is left for the
    next run (one line in the log), its detach finished then."""
    if retention_days is None:
        return 0
    if distributed:
        return await conn.fetchval(
            "SELECT haltless_drop_blocks_before(now() - $1 * interval '1 day')", retention_days)
    dropped = 0
    waiting: set[str] = set()  # parents with a detach left pending: one at a time each
    for parent, part, pending in sorted(await conn.fetch(
            "SELECT parent, part, pending FROM haltless_expired_block_partitions("
            "now() - $1 * interval '1 day')", retention_days), key=lambda r: not r[2]):
        if parent in waiting:
            continue
        how = "FINALIZE" if pending else "CONCURRENTLY"
        await conn.execute(f"SET lock_timeout = '{int(wait * 1000)}ms'")
        try:
            await conn.execute(f'ALTER TABLE "{parent}" DETACH PARTITION "{part}" {how}')
        except asyncpg.LockNotAvailableError:
            log.warning("retention: %s waits for readers that began before it was detached; "
                        "dropped at a later run", part)
            waiting.add(parent)
            continue
        finally:
            await conn.execute("RESET lock_timeout")
        await conn.execute(f'DROP TABLE "{part}"')
        dropped += 1
    return dropped


async def compact_and_expire(conn, *, include_current: bool, wait: bool,
                             retention_days: int | None = None, dsn: str | None = None,
                             now: float | None = None, crash_at: str | None = None,
                             distributed: bool | None = None) -> tuple[int, int, int | None]:
    """One run: compact, then apply the retention. (readings, blocks, block
    partitions dropped); nothing done and dropped None when ``wait`` is
    false and another process holds COMPACT_LOCK (on Citus, the groups
    nobody held are compacted all the same)."""
    if distributed is None:
        distributed = await is_distributed(conn)
    readings = blocks = 0
    kw = dict(include_current=include_current, retention_days=retention_days, crash_at=crash_at,
              now=now, dsn=dsn, wait=wait, distributed=distributed)
    if distributed:
        readings, blocks = await compact_all(conn, **kw)
    if wait:
        await conn.execute("SELECT pg_advisory_lock($1)", COMPACT_LOCK)
    elif not await conn.fetchval("SELECT pg_try_advisory_lock($1)", COMPACT_LOCK):
        return readings, blocks, None
    try:
        if not distributed:
            readings, blocks = await compact_all(conn, **kw)
        dropped = await drop_expired(conn, retention_days, distributed)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", COMPACT_LOCK)
    return readings, blocks, dropped


async def compact_forever(pool, retention_days: int | None = None, every: float = EVERY,
                          clock=time.time, dsn: str | None = None) -> None:
    """Inside every `haltless serve` worker: compact the closed slot once its
    hour has ended (plus GRACE), and drop block partitions past the
    retention; see the module docstring for who does what."""
    distributed = None
    while True:
        await asyncio.sleep(every)
        now = clock()
        if now % 3600 < GRACE:
            continue  # writes stamped with the last hour may still be in flight
        try:
            async with pool.acquire() as conn:
                if distributed is None:
                    distributed = await is_distributed(conn)
                started = time.monotonic()
                readings, blocks, dropped = await compact_and_expire(conn, include_current=False, wait=False,
                                                retention_days=retention_days, dsn=dsn, now=now,
                                                distributed=distributed)
        except DB_DOWN as exc:
            log.warning("compaction skipped: %s", exc)
            continue
        except asyncpg.LockNotAvailableError:
            log.warning("compaction skipped: a writer of the slot held it past the lock "
                        "timeout; retrying at the next check")
            continue
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - retried at the next check; never end the loop
            log.exception("compaction failed; retrying later")
            continue
        if blocks:
            log.info("compacted %d readings into %d blocks in %.1f s", readings, blocks,
                     time.monotonic() - started)
        if dropped:
            log.info("retention: dropped %d block partitions", dropped)
