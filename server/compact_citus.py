"""Compaction on a Citus cluster: one shard group at a time, on the worker
that holds it, with no lock that spans the cluster (docs/scaling.md
"Compaction and retention").

A shard group is the co-located shards of one hash range: a shard of
``reading_chunks_0``, of ``reading_chunks_1``, of ``reading_blocks`` (with its
monthly partitions' shards under it) and of ``reading_timelines``, all on one
worker. Compacting a slot of one group:

    worker: are the group's slot shards empty? then nothing more (no lock)
    coordinator: pg_try_advisory_lock(SHARD_LOCK, the group's reading_chunks
    shard id), a session lock: another compactor (another API host) takes
    another group meanwhile; `haltless compact` waits for it instead
    worker, pre-check: the months of the slot shard's hot rows -> the
    coordinator creates their block partitions (DDL on every shard, so before
    the worker transaction, which would otherwise wait for itself)
    coordinator, a transaction open until the worker's has committed:
        lock_shard_metadata(ShareLock) on the group's shards - a shard move
        (which takes ExclusiveLock) waits for it, or it for the move - and
        check that the placements are still on that worker
    worker, ONE local transaction (no two-phase commit: one node):
        LOCK the slot's shard (a late writer of that shard waits)
        Compactor.compact_slot on the shards: COPY out, group, merge, pack,
        write blocks and timelines into the group's shards, TRUNCATE the
        slot's shard
        COMMIT

A kill at any point aborts the worker's transaction: nothing lost or
written twice, and the next run does the same work again. Only one shard
is truncated, so writers of the other shards never notice; hot data is
never deleted row by row. The compactor connects to the workers with the
coordinator URL's user and password (pg_dist_node gives host and port).
"""
from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from .compact import SERIES_PER_BATCH, Compactor
from .db import DB_DOWN

log = logging.getLogger("haltless.compact")

SHARD_LOCK = 291_845_003  # pg_advisory_lock(int, int) class: (SHARD_LOCK, group's shard id)
SHARE_LOCK = 5            # lock_shard_metadata's ShareLock; a shard move takes ExclusiveLock

GROUPS = """
SELECT s.logicalrelid::text AS rel, s.shardid, s.shardminvalue::int AS lo,
       shard_name(s.logicalrelid, s.shardid) AS name, n.nodename AS host, n.nodeport AS port
FROM pg_dist_shard s
JOIN pg_dist_placement p ON p.shardid = s.shardid
JOIN pg_dist_node n ON n.groupid = p.groupid AND n.noderole = 'primary'
WHERE s.logicalrelid IN ('reading_chunks'::regclass, 'reading_chunks_0'::regclass,
                         'reading_chunks_1'::regclass, 'reading_blocks'::regclass,
                         'reading_timelines'::regclass)
"""


@dataclass(frozen=True)
class ShardGroup:
    key: int                    # shard id of reading_chunks: the group's advisory lock
    host: str
    port: int
    chunks: tuple[str, str]     # shard names of reading_chunks_0, reading_chunks_1
    chunk_ids: tuple[int, int]
    blocks: str
    timelines: str
    block_ids: tuple[int, int]  # shard ids of reading_blocks, reading_timelines


class ShardMoved(Exception):
    """The group's placements left this worker (a rebalance): done next run."""


class NeedPartitions(Exception):
    """Hot rows of a month with no block partition arrived after the pre-check."""


async def is_distributed(conn) -> bool:
    if await conn.fetchval("SELECT to_regclass('pg_dist_partition') IS NULL"):
        return False  # plain PostgreSQL
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_dist_partition"
                               " WHERE logicalrelid = 'reading_chunks'::regclass)")


async def shard_groups(conn) -> list[ShardGroup]:
    by_range: dict[int, dict[str, tuple]] = {}
    for r in await conn.fetch(GROUPS):
        by_range.setdefault(r["lo"], {})[r["rel"]] = (r["shardid"], r["name"], r["host"],
                                                      r["port"])
    groups = []
    for lo in sorted(by_range):
        g = by_range[lo]
        key, _, host, port = g["reading_chunks"]
        if {v[2:] for v in g.values()} != {(host, port)}:
            continue  # mid-move: co-located shards on two nodes; next run
        groups.append(ShardGroup(
            key=key, host=host, port=port,
            chunks=(g["reading_chunks_0"][1], g["reading_chunks_1"][1]),
            chunk_ids=(g["reading_chunks_0"][0], g["reading_chunks_1"][0]),
            blocks=g["reading_blocks"][1], timelines=g["reading_timelines"][1],
            block_ids=(g["reading_blocks"][0], g["reading_timelines"][0])))
    return groups


def node_dsn(dsn: str, host: str, port: int) -> str:
    """The coordinator's URL with a worker's host and port."""
    u = urlsplit(dsn)
    auth = u.netloc.rpartition("@")[0]
    h = f"[{host}]" if ":" in host else host
    return urlunsplit((u.scheme, f"{auth}@{h}:{port}" if auth else f"{h}:{port}", u.path,
                       u.query, u.fragment))


class ShardCompactor(Compactor):
    """Compactor over one shard group's shards, on a connection to its worker;
    timeline ids come from the coordinator's sequence (``coordinator``)."""

    def __init__(self, conn, coordinator, group: ShardGroup, shards: int = 1, **kw) -> None:
        super().__init__(conn, **kw)
        # A shard holds about 1/shards of any range of series ids: a batch of
        # the same memory spans a range that many times wider (else 8 shards
        # of 1,000 series took 32 COPY round trips instead of 4).
        self.series_per_batch = SERIES_PER_BATCH * shards
        self.coordinator = coordinator
        self.group = group
        self.blocks_table = group.blocks
        self.timelines_table = group.timelines
        self.series_timelines = True  # migration 0007: a timeline per block
        self.covered: tuple[_dt.datetime, _dt.datetime] | None = None
        self.slot = 0

    async def _hold_placements(self) -> None:
        """On the coordinator, in a transaction open until the worker's has
        committed: a shard move of the group (ExclusiveLock on the same
        metadata lock, shard_transfer.c BlockWritesToShardList) waits for it,
        or it for the move. Then the placements must still be on the worker.
        Its first call in a session builds Citus's shard metadata cache
        (0.7 s on the busy test box), once per pooled connection."""
        coord = self.coordinator
        await coord.execute(f"SET LOCAL lock_timeout = '{int(self.lock_timeout * 1000)}ms'")
        ids = [self.group.chunk_ids[self.slot], *self.group.block_ids]
        await coord.execute("SELECT lock_shard_metadata($1, $2::bigint[])", SHARE_LOCK, ids)
        here = await coord.fetchval(
            "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid)"
            " WHERE p.shardid = ANY($1::bigint[]) AND n.nodename = $2 AND n.nodeport = $3",
            ids, self.group.host, self.group.port)
        if here != len(ids):
            raise ShardMoved(self.group.chunks[self.slot])

    async def _lock(self, table: str) -> None:
        conn = self.conn
        await conn.execute(f"SET LOCAL lock_timeout = '{int(self.lock_timeout * 1000)}ms'")
        # Writing shards directly is refused unless asked for (Citus
        # worker_shard_visibility.c); this transaction writes only its group's.
        await conn.execute("SET LOCAL citus.enable_manual_changes_to_shards = on")
        await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")

    async def _partitions(self, first: _dt.datetime, last: _dt.datetime) -> None:
        if self.covered is None or first < self.covered[0] or last > self.covered[1]:
            raise NeedPartitions(first, last)

    async def compact_group_slot(self, slot: int) -> int:
        table = self.group.chunks[slot]
        self.slot = slot
        for _ in range(3):
            lo, hi = await self.conn.fetchrow(f"SELECT min(bucket), max(bucket) FROM {table}")
            if lo is None:
                return 0
            await self.coordinator.execute("SELECT haltless_block_partitions($1, $2)", lo, hi)
            self.covered = (lo, hi)
            counted = self.readings, self.blocks
            try:
                async with self.coordinator.transaction():
                    await self._hold_placements()
                    return await self.compact_slot(slot, table)
            except NeedPartitions:  # rolled back; look at the months again
                self.readings, self.blocks = counted
        return 0


async def compact_shards(conn, dsn: str | None, slots, *, retention_days: int | None = None,
                         crash_at: str | None = None, wait: bool = False) -> tuple[int, int]:
    """Compact ``slots`` of every shard group whose lock this process gets
    (with ``wait``, of every group, waiting for each). ``conn`` is on the
    coordinator; returns (readings, blocks) written."""
    if dsn is None:
        raise ValueError("compaction on a Citus cluster needs the coordinator's URL to reach "
                         "the workers")
    workers: dict[tuple[str, int], asyncpg.Connection] = {}
    down: set[tuple[str, int]] = set()
    readings = blocks = 0
    try:
        groups = await shard_groups(conn)
        for group in groups:
            node = (group.host, group.port)
            if node in down:
                continue
            w = workers.get(node)
            if w is None:
                try:
                    w = await asyncpg.connect(node_dsn(dsn, *node), timeout=10)
                except DB_DOWN as exc:
                    if wait:
                        raise
                    # Its groups wait for the worker; the others go on.
                    log.warning("compaction skips the worker %s:%d: %s", *node, exc)
                    down.add(node)
                    continue
                workers[node] = w
            # Empty slot shards are the common case (every 30 s per process):
            # looked at without taking the group's lock.
            try:
                if not any([await w.fetchval(f"SELECT EXISTS (SELECT 1 FROM {group.chunks[slot]})")
                            for slot in slots]):
                    continue
            except asyncpg.UndefinedTableError:
                continue  # moved away since shard_groups() looked: next run
            key = group.key & 0x7FFFFFFF
            if wait:
                await conn.execute("SELECT pg_advisory_lock($1, $2)", SHARD_LOCK, key)
            elif not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", SHARD_LOCK, key):
                continue  # another compactor has this group
            try:
                c = ShardCompactor(w, conn, group, len(groups), retention_days=retention_days,
                                   crash_at=crash_at)
                for slot in slots:
                    counted = c.readings, c.blocks
                    try:
                        await c.compact_group_slot(slot)
                    except ShardMoved:
                        break
                    except asyncpg.LockNotAvailableError:
                        if wait:
                            raise
                        # A shard move, or a long writer of that shard: next run.
                        log.warning("compaction of shard group %d skipped: lock timeout",
                                    group.key)
                        c.readings, c.blocks = counted
                        break
                await c.vacuum()
                readings += c.readings
                blocks += c.blocks
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", SHARD_LOCK, key)
    finally:
        await close_all(workers.values())
    return readings, blocks


async def close_all(conns) -> None:
    """Close each connection; when that is cancelled (serve stopping while a
    run ends) or fails half way, terminate every one not closed yet, so none
    is left open for the garbage collector."""
    conns = list(conns)
    try:
        for c in conns:
            await c.close(timeout=10)
    except BaseException:
        for c in conns:
            c.terminate()  # a no-op on one already closed
        raise
