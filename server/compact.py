"""Compaction: hot ``reading_chunks`` into compressed ``reading_blocks``.

Writers fill the hot slot of the current arrival hour (``server/hot.py``).
Once that hour has ended (plus ``GRACE`` for writes still in flight), the
other slot is compacted, in ONE transaction:

    LOCK the slot's table IN EXCLUSIVE MODE (a late writer of that slot
    waits, then writes into the emptied slot: compacted next time, never
    lost; readers are not blocked, EXCLUSIVE lets ACCESS SHARE through)
    per batch of series: COPY the chunks out (binary) --kernel: group_chunks-->
    one group per (series, hour) --merge with the blocks already stored for
    that (series, hour), if any (late data)--> sort_by_time --> cut into
    parts of at most PART_READINGS --> pack_ints / pack_values --> timelines
    shared by series with identical timestamps --> replace the blocks, COPY
    the new ones in
    empty the slot (_empty: TRUNCATE when no reader holds it, else DELETE),
    COMMIT (compaction_state: record_run); VACUUM a slot emptied by DELETE

No step waits for a reader, however long its transaction: the locks taken
are EXCLUSIVE on the slot and ROW EXCLUSIVE on the block tables, which
ACCESS SHARE (any SELECT) does not conflict with; the one ACCESS EXCLUSIVE
lock (TRUNCATE) is only ever tried with NOWAIT. A reader's snapshot keeps
seeing the hot rows and old blocks it started with; block partitions are
attached, not created under their parent (migration 0010).

A kill at any point rolls the whole transaction back: nothing is lost or
written twice, and the next run does the same work again (idempotent). Hot
data is never deleted row by row; a block is replaced only when late data
joins it. One process at a time (a session advisory lock) across workers
and hosts; on a Citus cluster one per shard group instead, on the workers
(``compact_citus``); ``server/compaction.py`` picks the variant and runs it.
``haltless compact`` also compacts the slot still being written (its
writers wait meanwhile): what arrives later for that hour is late data.

Retention (``HALTLESS_RETENTION_DAYS``): readings older than the cutoff are
not carried into blocks, and block partitions (months) that ended before it
are dropped whole.
"""
from __future__ import annotations

import bisect
import datetime as _dt
import hashlib
import os
import time

import asyncpg

from ..core.times import to_dt
from ..fast import (
    MAX_COUNT,
    group_chunks,
    pack_ints,
    pack_values,
    sort_by_time,
    summarize,
    unpack_ints,
    unpack_values,
)

SERIES_PER_BATCH = 256  # series ids per COPY out: bounds the memory of one batch
# Readings of one block (migration 0022): an hour with more is cut into
# parts, in time order; part 0 also carries the summary of the whole hour
# (with its count, hour_n, and its last value, v_last).
# A block can hold 16,777,216 (MAX_COUNT); a part is also what a read decodes
# at once, so 1,048,576 (16 MB of arrays) bounds a read's memory inside a
# huge hour, and every hour of a series below ~290 Hz stays one block.
PART_READINGS = 1 << 20
MINUTE_US = 60_000_000
SUMMARY_COLUMNS = ["m_scale", "m_minute", "m_count", "m_k", "m_f", "v_first", "v_min", "v_max",
                   "v_sum"]


def summary(start_us: int, ts, vals) -> tuple:
    """The rollup columns of a block (SUMMARY_COLUMNS, migration 0013): per
    minute count and [sum, min, max, first, last], exact decimal mantissas
    when the block is decimal, and the hour's first, min, max and sum."""
    d, starts, count, fields = summarize(ts, vals, MINUTE_US)
    m = len(starts)
    minutes = None if m == 60 else [(x - start_us) // MINUTE_US for x in starts]
    rows = [fields[5 * j:5 * j + 5].tolist() for j in range(m)]
    if d >= 0:
        scale = 10 ** d  # int / int: one correct rounding, the value itself for min/max/first
        return (d, minutes, count.tolist(), rows, None, rows[0][3] / scale,
                min(r[1] for r in rows) / scale, max(r[2] for r in rows) / scale,
                sum(r[0] for r in rows) / scale)
    total = 0.0
    for r in rows:
        total += r[0]
    return (None, minutes, count.tolist(), None, rows, rows[0][3], min(r[1] for r in rows),
            max(r[2] for r in rows), total)
NO_SUMMARY = (None,) * len(SUMMARY_COLUMNS)  # a later part's: its hour's is on part 0
BLOCK_COLUMNS = ["series_id", "block_start", "part", "n", "t_first", "t_last", "timeline", "vals",
                 "v_last", *SUMMARY_COLUMNS, "hour_n"]
TIMELINE_COLUMNS = ["block_start", "id", "n", "ts"]
CRASH_POINTS = ("after-copy-out", "after-blocks", "before-truncate", "before-commit")


class Compactor:
    """Compacts whole slots on one connection; ``crash_at`` (tests only) kills
    the process at a named point, as kill -9 would. On a Citus cluster
    ``compact_citus.ShardCompactor`` compacts one shard group with it, on the
    worker that holds the group: it names the shards instead of the tables and
    overrides the locking and the bookkeeping."""

    blocks_table = "reading_blocks"
    timelines_table = "reading_timelines"
    series_per_batch = SERIES_PER_BATCH  # a range of ids; on a shard, 1/shards of them are there

    def __init__(self, conn, retention_days: int | None = None, crash_at: str | None = None,
                 lock_timeout: float = 10.0, part_readings: int = PART_READINGS) -> None:
        if not 1 <= part_readings <= MAX_COUNT:
            raise ValueError(f"part_readings: {part_readings} is outside 1 to {MAX_COUNT:,}")
        self.conn = conn
        self.part_readings = part_readings
        self.coordinator = conn  # where the catalog and its sequences are
        self.retention_days = retention_days
        self.crash_at = crash_at
        self.lock_timeout = lock_timeout
        self.readings = 0
        self.blocks = 0
        self.to_vacuum: list[str] = []  # slots emptied by DELETE
        # On Citus (migration 0007) a timeline belongs to one series: blocks
        # join it on the distribution column, so it cannot be shared.
        self.series_timelines: bool | None = None

    def _crash(self, point: str) -> None:
        if self.crash_at == point:
            os._exit(137)

    def cutoff_us(self) -> int | None:
        if self.retention_days is None:
            return None
        return (time.time_ns() // 1000) - self.retention_days * 86_400_000_000

    async def slot_has_rows(self, slot: int) -> bool:
        return await self.conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM reading_chunks_{slot})")

    async def compact_slot(self, slot: int, table: str | None = None) -> int:
        """Compact every row of ``slot`` (of ``table``, one of its shards on
        Citus); returns the readings moved."""
        conn = self.conn
        table = table or f"reading_chunks_{slot}"
        before = self.readings
        if self.series_timelines is None:
            self.series_timelines = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'reading_timelines'"
                "::regclass AND attname = 'series_id' AND NOT attisdropped)")
        async with conn.transaction():
            await self._lock(table)
            lo, hi = await conn.fetchrow(f"SELECT min(series_id), max(series_id) FROM {table}")
            timelines: dict[tuple[int, bytes], int] = {}
            start = lo
            while start is not None and start <= hi:
                end = start + self.series_per_batch
                buf = bytearray()

                async def sink(data: bytes) -> None:
                    buf.extend(data)
                await conn.copy_from_query(
                    f"SELECT series_id, bucket, ts, vals FROM {table}"
                    f" WHERE series_id >= {int(start)} AND series_id < {int(end)}"
                    " ORDER BY series_id, bucket", output=sink, format="binary")
                self._crash("after-copy-out")
                groups = group_chunks(bytes(buf))
                del buf
                if groups:
                    await self._write(groups, timelines)
                    self._crash("after-blocks")
                start = end
            self._crash("before-truncate")
            await self._empty(table)
            self._crash("before-commit")
        return self.readings - before

    async def _empty(self, table: str) -> None:
        """Empty the compacted slot. TRUNCATE frees its space at once, but its
        ACCESS EXCLUSIVE lock waits for every reader of the slot (any SELECT
        of reading_chunks or the readings view), and new readers would queue
        behind it: so it is only tried with NOWAIT, under a savepoint. When a
        reader holds the slot, DELETE instead: it neither waits for readers
        nor blocks them (their snapshot keeps the rows), and VACUUM after the
        commit (``vacuum``) makes the space reusable once no snapshot needs
        it. Measured in bench/README "Compaction beside readers"."""
        try:
            async with self.conn.transaction():  # a savepoint: a refusal rolls back only this
                await self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE NOWAIT")
                await self.conn.execute(f"TRUNCATE {table}")
        except asyncpg.LockNotAvailableError:
            await self.conn.execute(f"DELETE FROM {table}")
            self.to_vacuum.append(table)

    async def vacuum(self) -> None:
        """VACUUM the slots emptied by DELETE (outside any transaction; it takes
        SHARE UPDATE EXCLUSIVE, which neither readers nor writers conflict with)."""
        tables, self.to_vacuum = self.to_vacuum, []
        for table in tables:
            await self.conn.execute(f"VACUUM {table}")

    async def _lock(self, table: str) -> None:
        """A late writer of the slot waits, then writes into the emptied slot."""
        await self.conn.execute(f"SET LOCAL lock_timeout = '{int(self.lock_timeout * 1000)}ms'")
        await self.conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")

    async def _timeline_ids(self, n: int) -> list[int]:
        # The sequence lives where the catalog does: this node, or the
        # Citus coordinator (ShardCompactor).
        return [r[0] for r in await self.coordinator.fetch(
            "SELECT nextval('reading_timelines_id') FROM generate_series(1, $1)", n)]

    async def _partitions(self, first: _dt.datetime, last: _dt.datetime) -> None:
        await self.conn.execute("SELECT haltless_block_partitions($1, $2)", first, last)

    async def _write(self, groups: list, timelines: dict) -> None:
        conn = self.conn
        keys_sid = [g[0] for g in groups]
        keys_start = [to_dt(g[1]) for g in groups]
        # Late data: the blocks already stored for these (series, hour), every
        # part, join in.
        old = await conn.fetch(
            f"DELETE FROM {self.blocks_table} b USING unnest($1::int[], $2::timestamptz[]) AS k (sid, bs)"
            " WHERE b.series_id = k.sid AND b.block_start = k.bs"
            " RETURNING b.series_id, b.block_start, b.part, b.timeline, b.vals", keys_sid, keys_start)
        stored: dict[tuple, list] = {}
        if old:
            tl = await conn.fetch(
                f"SELECT block_start, id, ts FROM {self.timelines_table} t"
                " WHERE (block_start, id) IN (SELECT * FROM unnest($1::timestamptz[], $2::bigint[]))",
                [r["block_start"] for r in old], [r["timeline"] for r in old])
            tl_ts = {(r["block_start"], r["id"]): r["ts"] for r in tl}
            for r in sorted(old, key=lambda r: r["part"]):
                stored.setdefault((r["series_id"], r["block_start"]), []).append(
                    (tl_ts[(r["block_start"], r["timeline"])], r["vals"]))
        cutoff = self.cutoff_us()
        # (sid, start, part, ts, values bytes, timeline bytes, timeline key, (v_last, summary))
        packed = []
        for sid, bucket_us, ts, vals in groups:
            start = to_dt(bucket_us)
            merged_before = 0
            for prior_tsb, prior_vb in stored.get((sid, start), ()):
                prior_ts = unpack_ints(prior_tsb)
                merged_before += len(prior_ts)
                ts.extend(prior_ts)
                vals.extend(unpack_values(prior_vb))
            sort_by_time(ts, vals)
            if cutoff is not None and ts and ts[0] < cutoff:  # past the retention: not kept
                keep = bisect.bisect_left(ts, cutoff)
                del ts[:keep]
                del vals[:keep]
            self.readings += len(ts) - merged_before
            if not ts:
                continue
            whole = summary(bucket_us, ts, vals)  # of the hour: on part 0
            size = self.part_readings
            for part, i in enumerate(range(0, len(ts), size)):
                pts, pvals = (ts, vals) if len(ts) <= size else (ts[i:i + size], vals[i:i + size])
                tsb = pack_ints(pts)
                key = (bucket_us, sid if self.series_timelines else 0,
                       hashlib.blake2b(tsb, digest_size=16).digest())
                # Part 0 of a cut hour: the hour's summary, count and last value.
                tail = ((vals[-1], *whole, len(ts) if len(ts) > size else None) if part == 0
                        else (pvals[-1], *NO_SUMMARY, None))
                packed.append((sid, start, part, pts, pack_values(pvals), tsb, key, tail))
        # One timeline per distinct (hour, timestamps) in this run: a machine's
        # metrics polled together share theirs.
        new = {}
        for sid, start, _part, ts, vb, tsb, key, _ in packed:
            if key not in timelines and key not in new:
                new[key] = (start, len(ts), tsb)
        if new:
            timelines.update(zip(new, await self._timeline_ids(len(new))))
        if packed:
            starts = [p[1] for p in packed]
            await self._partitions(min(starts), max(starts))
        if new and self.series_timelines:
            await conn.copy_records_to_table(
                self.timelines_table, columns=TIMELINE_COLUMNS + ["series_id"],
                records=[(start, timelines[key], n, tsb, key[1])
                         for key, (start, n, tsb) in new.items()])
        elif new:
            await conn.copy_records_to_table(
                self.timelines_table, columns=TIMELINE_COLUMNS,
                records=[(start, timelines[key], n, tsb) for key, (start, n, tsb) in new.items()])
        if packed:
            await conn.copy_records_to_table(
                self.blocks_table, columns=BLOCK_COLUMNS,
                records=[(sid, start, part, len(ts), to_dt(ts[0]), to_dt(ts[-1]), timelines[key],
                          vb, *tail) for sid, start, part, ts, vb, tsb, key, tail in packed])
        self.blocks += len(packed)
        if old and self.series_timelines:  # the replaced blocks' own timelines
            await conn.execute(
                f"DELETE FROM {self.timelines_table} t"
                " USING unnest($1::int[], $2::timestamptz[], $3::bigint[]) AS o (sid, bs, id)"
                " WHERE t.series_id = o.sid AND t.block_start = o.bs AND t.id = o.id",
                [r["series_id"] for r in old], [r["block_start"] for r in old],
                [r["timeline"] for r in old])
        elif old:  # timelines no block uses any more
            await conn.execute(
                "DELETE FROM reading_timelines t"
                " USING unnest($1::timestamptz[], $2::bigint[]) AS o (bs, id)"
                " WHERE t.block_start = o.bs AND t.id = o.id AND NOT EXISTS ("
                "  SELECT 1 FROM reading_blocks b WHERE b.block_start = t.block_start"
                "  AND b.timeline = t.id)",
                [r["block_start"] for r in old], [r["timeline"] for r in old])


async def record_run(conn, readings: int, blocks: int) -> None:
    """What the last compaction run moved (``compaction_state``, one row)."""
    await conn.execute("UPDATE compaction_state SET last_run_at = now(), last_readings = $1,"
                       " last_blocks = $2", readings, blocks)
