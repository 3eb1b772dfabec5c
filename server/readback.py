"""Stored readings back out: hot chunks and compacted blocks of a set of
series over [from, to), decoded in the kernel, in time order.

    hour counts of the series (one small query) --> batches of whole hours
    of at most BATCH readings, an hour with more cut into shorter spans
    (``spans``) --> per span: the blocks that overlap it + their timelines
    (index on (series_id, block_start, part), month partitions pruned), and
    the hot rows that overlap it as binary COPY (index on (series_id,
    bucket, haltless_chunk_last(ts))) --> unpack_ints / unpack_values /
    group_chunks --> per (series, hour) one piece as is, the parts of a
    block joined, or several (hot rows, late data beside a block) merged by
    sort_by_time --> cut to [from, to)

Memory: a span decodes whole blocks and hot rows, so what it holds is what
overlaps it; a block is at most one part of its hour (``compact.
PART_READINGS``), a hot row one write. A span that would still decode more
than MAX_LOAD readings at once (many fast series over the same moments) is
refused with ``TooMuchAtOnce``, which the API answers with a 422.

Nothing is decoded in SQL: ``haltless_block_readings`` takes ~6 ms per
3,600 readings, the kernel a few microseconds. Every function takes series
ids already scoped to one organization by the caller.
"""
from __future__ import annotations

import bisect
from array import array
from collections.abc import AsyncIterator

from ..core.errors import Unprocessable
from ..core.times import HOUR_US, hour_of, to_dt, to_us
from ..fast import group_chunks, sort_by_time, unpack_ints, unpack_values

BATCH = 1_000_000  # readings decoded at once (16 MB of arrays), at least one hour
MAX_LOAD = 1 << 23  # readings one span may decode at once: 128 MB of arrays


class TooMuchAtOnce(Unprocessable):
    """A read would decode more than MAX_LOAD readings at once."""


# What a read of [$4, $5) (timestamptz; $6/$7 the same as µs) in the hours
# [$2, $3) decodes, per hour: the blocks and the hot rows that overlap it.
_OVERLAPPING = """
    SELECT block_start AS h, n FROM reading_blocks
    WHERE series_id = ANY($1::int[]) AND block_start >= $2 AND block_start < $3
      AND t_last >= $4 AND t_first < $5
    UNION ALL
    SELECT bucket, n FROM reading_chunks
    WHERE series_id = ANY($1::int[]) AND bucket >= $2 AND bucket < $3
      AND haltless_chunk_last(ts) >= $6 AND haltless_chunk_us(ts, 1) < $7"""
HOUR_COUNTS = "SELECT h, sum(n)::int8 FROM (" + _OVERLAPPING + ") x GROUP BY h ORDER BY h"
LOAD_COUNT = "SELECT coalesce(sum(n), 0)::int8 FROM (" + _OVERLAPPING + ") x"

# $2/$3: whole hours (prune partitions, walk the indexes); $4/$5: the range
# itself, to skip blocks that end before it or start after it.
BLOCKS = """
SELECT b.series_id, b.block_start AS h, b.timeline, t.ts, b.vals, b.part
FROM reading_blocks b
JOIN reading_timelines t ON t.block_start = b.block_start AND t.id = b.timeline
WHERE b.series_id = ANY($1::int[]) AND b.block_start >= $2 AND b.block_start < $3
  AND t.block_start >= $2 AND t.block_start < $3 AND b.t_last >= $4 AND b.t_first < $5"""

# Hot rows through binary COPY: no Record per row; group_chunks parses them
# all in one kernel call and joins the rows of each (series, hour). A row
# is sorted by time, so its first and last stamps say if it overlaps.
HOT = """
SELECT series_id, bucket, ts, vals FROM reading_chunks
WHERE series_id = ANY($1::int[]) AND bucket >= $2 AND bucket < $3
  AND haltless_chunk_last(ts) >= $4 AND haltless_chunk_us(ts, 1) < $5
ORDER BY series_id, bucket"""


def _args(sids: list[int], from_us: int, to_us_: int) -> tuple:
    return (sids, to_dt(hour_of(from_us)), to_dt(to_us_), to_dt(from_us), to_dt(to_us_),
            from_us, to_us_)


async def hour_counts(conn, sids: list[int], from_us: int, to_us_: int) -> list[tuple[int, int]]:
    """(hour start µs, readings a read of the range decodes under it) of the
    hours that overlap the range."""
    rows = await conn.fetch(HOUR_COUNTS, *_args(sids, from_us, to_us_))
    return [(to_us(r[0]), r[1]) for r in rows]


def batches_of(hours: list[tuple[int, int]], budget: int = BATCH) -> list[tuple[int, int, int]]:
    """Consecutive whole hours grouped into [start, end) spans of at most
    ``budget`` readings, with the readings of each (one hour alone may hold
    more)."""
    out: list[tuple[int, int, int]] = []
    for h, n in hours:
        if out and out[-1][2] + n <= budget:
            out[-1] = (out[-1][0], h + HOUR_US, out[-1][2] + n)
        else:
            out.append((h, h + HOUR_US, n))
    return out


async def load(conn, sids: list[int], from_us: int, to_us_: int) -> dict[int, tuple[array, array]]:
    """Every reading of the series in [from, to), per series id, sorted by
    (timestamp, value bits); series without readings are left out."""
    hours = (to_dt(hour_of(from_us)), to_dt(to_us_))
    rows = await conn.fetch(BLOCKS, sids, *hours, to_dt(from_us), to_dt(to_us_))
    buf = bytearray()

    async def sink(data: bytes) -> None:
        buf.extend(data)
    await conn.copy_from_query(HOT, sids, *hours, from_us, to_us_, output=sink, format="binary")
    pieces: dict[tuple[int, int], list] = {}
    timelines: dict[tuple[int, int], array] = {}  # a machine's series share one
    # The parts of an hour in order: joined, they are sorted (compact.py).
    for sid, h, tl, tsb, vb, _part in sorted(rows, key=lambda r: r[5]):
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
            if any(hot for hot, _, _ in got):  # else parts of one block, in order
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
    for start, end, n in batches_of(hours, budget):
        start, end = max(start, from_us), min(end, to_us_)
        for s, e in [(start, end)] if n <= budget else await spans(conn, sids, start, end,
                                                                    budget):
            got = await load(conn, sids, s, e)
            if got:
                yield got


async def spans(conn, sids: list[int], start: int, end: int, budget: int,
                n: int | None = None) -> list[tuple[int, int]]:
    """[start, end) (inside one hour) cut in halves until each piece decodes at
    most ``budget`` readings, or until cutting stops helping: a half still
    decodes all that the whole does (a block or hot row overlaps the cut, or
    everything lies in that half). TooMuchAtOnce when a piece that cannot be
    cut decodes over MAX_LOAD."""
    if n is None:
        n = await conn.fetchval(LOAD_COUNT, *_args(sids, start, end))
    if n > budget and end - start > 1:
        mid = (start + end) // 2
        nl = await conn.fetchval(LOAD_COUNT, *_args(sids, start, mid))
        nr = await conn.fetchval(LOAD_COUNT, *_args(sids, mid, end))
        if max(nl, nr) < n:
            return (await spans(conn, sids, start, mid, budget, nl)
                    + await spans(conn, sids, mid, end, budget, nr))
    if n > MAX_LOAD:
        raise TooMuchAtOnce(
            f"from/to: the {len(sids)} series asked for hold {n:,} readings around "
            f"{to_dt(start).isoformat()} that must be decoded together, more than "
            f"{MAX_LOAD:,} at once; ask for fewer series (metric_name)")
    return [(start, end)]
