"""Stored readings back out: hot chunks and compacted blocks of a set of
series over [from, to), decoded in the kernel, in time order.

    hour counts of the series (one small query) --> batches of whole hours
    of at most BATCH readings --> per batch: blocks + their timelines (index
    on (series_id, block_start), month partitions pruned), and the hot rows
    as binary COPY (index on (series_id, bucket, ...)) --> unpack_ints /
    unpack_values / group_chunks --> per (series, hour)
    one piece as is, or several (hot rows, late data beside a block) merged
    by sort_by_time --> cut to [from, to)

Nothing is decoded in SQL: ``haltless_block_readings`` takes ~6 ms per
3,600 readings, the kernel a few microseconds. Every function takes series
ids already scoped to one organization by the caller.
"""
from __future__ import annotations

import bisect
from array import array
from collections.abc import AsyncIterator

from ..core.times import HOUR_US, hour_of, to_dt, to_us
from ..fast import group_chunks, sort_by_time, unpack_ints, unpack_values

BATCH = 1_000_000  # readings decoded at once (16 MB of arrays), at least one hour
HOUR_COUNTS = """
SELECT h, sum(n)::int8 FROM (
    SELECT block_start AS h, n FROM reading_blocks
    WHERE series_id = ANY($1::int[]) AND block_start >= $2 AND block_start < $3
    UNION ALL
    SELECT bucket, n FROM reading_chunks
    WHERE series_id = ANY($1::int[]) AND bucket >= $2 AND bucket < $3
) x GROUP BY h ORDER BY h"""

# $2/$3: whole hours (prune partitions, walk the indexes); $4/$5: the range
# itself, to skip blocks that end before it or start after it.
BLOCKS = """
SELECT b.series_id, b.block_start AS h, b.timeline, t.ts, b.vals
FROM reading_blocks b
JOIN reading_timelines t ON t.block_start = b.block_start AND t.id = b.timeline
WHERE b.series_id = ANY($1::int[]) AND b.block_start >= $2 AND b.block_start < $3
  AND t.block_start >= $2 AND t.block_start < $3 AND b.t_last >= $4 AND b.t_first < $5"""

# Hot rows through binary COPY: no Record per row; group_chunks parses them
# all in one kernel call and joins the rows of each (series, hour).
HOT = """
SELECT series_id, bucket, ts, vals FROM reading_chunks
WHERE series_id = ANY($1::int[]) AND bucket >= $2 AND bucket < $3
ORDER BY series_id, bucket"""


async def hour_counts(conn, sids: list[int], from_us: int, to_us_: int) -> list[tuple[int, int]]:
    """(hour start µs, readings stored under it) of the hours that overlap the range."""
    rows = await conn.fetch(HOUR_COUNTS, sids, to_dt(hour_of(from_us)), to_dt(to_us_))
    return [(to_us(r[0]), r[1]) for r in rows]


def batches_of(hours: list[tuple[int, int]], budget: int = BATCH) -> list[tuple[int, int]]:
    """Consecutive whole hours grouped into [start, end) spans of at most
    ``budget`` readings (one hour alone may hold more)."""
    out: list[tuple[int, int]] = []
    total = 0
    for h, n in hours:
        if out and total + n <= budget:
            out[-1] = (out[-1][0], h + HOUR_US)
            total += n
        else:
            out.append((h, h + HOUR_US))
            total = n
    return out


async def load(conn, sids: list[int], from_us: int, to_us_: int) -> dict[int, tuple[array, array]]:
    """Every reading of the series in [from, to), per series id, sorted by
    (timestamp, value bits); series without readings are left out."""
    hours = (to_dt(hour_of(from_us)), to_dt(to_us_))
    rows = await conn.fetch(BLOCKS, sids, *hours, to_dt(from_us), to_dt(to_us_))
    buf = bytearray()

    async def sink(data: bytes) -> None:
        buf.extend(data)
    await conn.copy_from_query(HOT, sids, *hours, output=sink, format="binary")
    pieces: dict[tuple[int, int], list] = {}
    timelines: dict[tuple[int, int], array] = {}  # a machine's series share one
    for sid, h, tl, tsb, vb in rows:
        key = (h, tl)
        ts = timelines.get(key)
        if ts is None:
            ts = timelines[key] = unpack_ints(tsb)
        pieces.setdefault((sid, to_us(h)), []).append((False, ts, unpack_values(vb)))
    for sid, h, ts, vals in group_chunks(bytes(buf)):
        pieces.setdefault((sid, h), []).append((True, ts, vals))
    del buf
    parts: dict[int, list[tuple[array, array]]] = {}
    for sid, h in sorted(pieces):
        got = pieces[(sid, h)]
        if len(got) == 1 and not got[0][0]:
            ts, vals = got[0][1], got[0][2]  # one block: sorted when written
        elif len(got) == 1:
            ts, vals = got[0][1], got[0][2]  # the hot rows of one hour: fresh arrays
            sort_by_time(ts, vals)
        else:
            ts, vals = array("q"), array("d")
            for _, t, v in got:
                ts.extend(t)
                vals.extend(v)
            sort_by_time(ts, vals)
        parts.setdefault(sid, []).append((ts, vals))
    out: dict[int, tuple[array, array]] = {}
    for sid, got in parts.items():
        if len(got) == 1:
            out[sid] = got[0]  # may be a shared timeline: callers never change arrays
        else:
            ts, vals = array("q"), array("d")
            for t, v in got:
                ts.extend(t)
                vals.extend(v)
            out[sid] = (ts, vals)
    for sid, (ts, vals) in list(out.items()):
        lo = bisect.bisect_left(ts, from_us)
        hi = bisect.bisect_left(ts, to_us_)
        if lo or hi < len(ts):
            ts, vals = ts[lo:hi], vals[lo:hi]
        if ts:
            out[sid] = (ts, vals)
        else:
            del out[sid]
    return out


async def scan(conn, sids: list[int], from_us: int, to_us_: int,
               budget: int = BATCH) -> AsyncIterator[dict[int, tuple[array, array]]]:
    """The readings of [from, to) in consecutive time spans of about
    ``budget`` readings: each yield is what ``load`` gives for one span."""
    hours = await hour_counts(conn, sids, from_us, to_us_)
    for start, end in batches_of(hours, budget):
        got = await load(conn, sids, max(start, from_us), min(end, to_us_))
        if got:
            yield got
