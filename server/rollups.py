"""Aggregates from the per-minute summaries compaction stores with each block
(migration 0013, ``haltless.fast.summarize``), for the query API.

    [from, to) --> whole hours inside it --> per (series, hour): summarised
    (a block with a summary, no hot rows of that hour waiting to be merged)
    or not --> summarised hours: minutes folded into buckets in SQL, no
    reading decoded --> the rest (the range's cut hours at both ends, hot
    hours, late rows, blocks older than 0013): readings through ``readback``
    and the kernel's ``aggregate``, span by span --> each bucket combined
    from its pieces, which never overlap in time

Used when the interval is a whole number of minutes (each minute then lies
in one bucket); shorter intervals read every reading (``query.aggregates``).
The readings are the same either way; sums of a summarised hour are added
per minute (exact for decimal readings), so they may differ from a running
sum in the last bits.
"""
from __future__ import annotations

from array import array

import asyncpg

from ..core.times import HOUR_US, hour_of, to_dt
from ..fast import aggregate
from . import readback

MINUTE_US = 60_000_000

# The blocks of the series ($1) in the hours [$2, $3) whose summary is the
# whole answer: they have one (part 0 holds its hour's, migration 0022), and
# no hot rows of that series and hour wait to be merged into them (the
# rollup views' "summarised", migration 0013).
_SUMMARISED_BLOCKS = """b.series_id = ANY($1::int[]) AND b.block_start >= $2 AND b.block_start < $3
      AND b.part = 0 AND b.m_count IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM reading_chunks c
                      WHERE c.series_id = b.series_id AND c.bucket = b.block_start)"""

# One row per series and bucket over the summarised hours of [$2, $3):
# $4 is the bucket width in µs. A minute's start is its hour plus its index
# (m_minute lists the minutes present when not all 60 are). first/last:
# the minute's own, taken from the earliest/latest minute of the bucket.
SUMMARISED = """
WITH m AS (
    SELECT b.series_id,
           (extract(epoch FROM b.block_start) * 1000000)::int8
             + coalesce(u.minute, u.i - 1) * 60000000::int8 AS t,
           u.count,
           coalesce(u.ksum / p.f, u.fsum) AS sum,
           coalesce(u.kmin / p.f, u.fmin) AS min, coalesce(u.kmax / p.f, u.fmax) AS max,
           coalesce(u.kfirst / p.f, u.ffirst) AS first, coalesce(u.klast / p.f, u.flast) AS last
    FROM reading_blocks b
    CROSS JOIN LATERAL (SELECT 10::float8 ^ b.m_scale AS f) AS p
    CROSS JOIN LATERAL unnest(b.m_minute, b.m_count,
        b.m_k[:][1:1], b.m_k[:][2:2], b.m_k[:][3:3], b.m_k[:][4:4], b.m_k[:][5:5],
        b.m_f[:][1:1], b.m_f[:][2:2], b.m_f[:][3:3], b.m_f[:][4:4], b.m_f[:][5:5])
        WITH ORDINALITY AS u (minute, count, ksum, kmin, kmax, kfirst, klast,
                              fsum, fmin, fmax, ffirst, flast, i)
    WHERE """ + _SUMMARISED_BLOCKS + """)
SELECT series_id, t - ((t % $4) + $4) % $4 AS start, min(t) AS first_t, max(t) AS last_t,
       sum(count)::int8 AS count, sum(sum) AS sum, min(min) AS min, max(max) AS max,
       (array_agg(first ORDER BY t))[1] AS first,
       (array_agg(last ORDER BY t DESC))[1] AS last
FROM m GROUP BY 1, 2"""

# The summarised (series, hour) pairs of the same range.
HOURS = """
SELECT b.series_id, (extract(epoch FROM b.block_start) * 1000000)::int8
FROM reading_blocks b
WHERE """ + _SUMMARISED_BLOCKS


class Buckets:
    """Per series, {bucket start: [count, sum, min, max, first_t, first,
    last_t, last]}, combined from pieces that do not overlap in time."""

    def __init__(self) -> None:
        self.per: dict[int, dict[int, list]] = {}

    def add(self, sid: int, start: int, first_t: int, last_t: int, count: int, total: float,
            lo: float, hi: float, first: float, last: float) -> None:
        have = self.per.setdefault(sid, {}).get(start)
        if have is None:
            self.per[sid][start] = [count, total, lo, hi, first_t, first, last_t, last]
            return
        have[0] += count
        have[1] += total
        have[2] = min(have[2], lo)
        have[3] = max(have[3], hi)
        if first_t < have[4]:
            have[4], have[5] = first_t, first
        if last_t > have[6]:
            have[6], have[7] = last_t, last

    def add_readings(self, sid: int, ts: array, vals: array, step: int) -> None:
        starts, count, total, lo, hi, first, last = aggregate(ts, vals, step)
        # Within a piece of readings, a bucket's first and last reading lie
        # inside the piece's own time span.
        for i, b in enumerate(starts):
            self.add(sid, b, max(b, ts[0]), min(b + step - 1, ts[-1]), count[i], total[i],
                     lo[i], hi[i], first[i], last[i])

    def arrays(self, sid: int) -> tuple | None:
        """(starts, count, sum, min, max, first, last) as ``aggregate`` gives them."""
        got = self.per.get(sid)
        if not got:
            return None
        out = (array("q"), array("q")) + tuple(array("d") for _ in range(5))
        for b in sorted(got):
            c, s, lo, hi, _, first, _, last = got[b]
            for a, x in zip(out, (b, c, s, lo, hi, first, last)):
                a.append(x)
        return out


async def aggregates(conn, sids: list[int], t0: int, t1: int, step: int) -> dict[int, tuple]:
    """{series id: (starts, count, sum, min, max, first, last)} of [t0, t1)
    in buckets of ``step`` µs (a whole number of minutes), summarised hours
    from their summaries, everything else from its readings."""
    inner0, inner1 = hour_of(t0 + HOUR_US - 1), hour_of(t1)
    out = Buckets()
    covered: set[tuple[int, int]] = set()
    if inner0 < inner1 and sids:
        for sid, h in await conn.fetch(HOURS, sids, to_dt(inner0), to_dt(inner1)):
            covered.add((sid, h))
        if covered:
            try:
                async with conn.transaction():  # a savepoint: the read's snapshot goes on
                    rows = await conn.fetch(SUMMARISED, sids, to_dt(inner0), to_dt(inner1),
                                            step)
            except asyncpg.NumericValueOutOfRangeError:
                # Sums of readings near ±1.8e308 overflow float8, which
                # PostgreSQL refuses: those buckets from their readings.
                covered, rows = set(), []
            for r in rows:
                out.add(r["series_id"], r["start"], r["first_t"], r["last_t"], r["count"],
                        r["sum"], r["min"], r["max"], r["first"], r["last"])
    for span0, span1, span_sids in _raw_spans(sids, covered, t0, t1, inner0, inner1,
                                              await readback.hour_counts(conn, sids, t0, t1)):
        async for got in readback.scan(conn, span_sids, span0, span1):
            for sid, (ts, vals) in got.items():
                out.add_readings(sid, ts, vals, step)
    return {sid: got for sid in sids if (got := out.arrays(sid)) is not None}


def _raw_spans(sids: list[int], covered: set[tuple[int, int]], t0: int, t1: int,
               inner0: int, inner1: int, hours: list[tuple[int, int]]):
    """[start, end) spans and the series to read there from their readings:
    the cut hours at both ends for every series, and inside, each hour with
    readings for the series not summarised there (consecutive hours with the
    same series joined into one span)."""
    spans: list[list] = []
    for h, _n in hours:
        lo, hi = max(h, t0), min(h + HOUR_US, t1)
        need = sids if not (inner0 <= h < inner1) else [s for s in sids if (s, h) not in covered]
        if not need:
            continue
        if spans and spans[-1][1] == lo and spans[-1][2] == need:
            spans[-1][1] = hi
        else:
            spans.append([lo, hi, need])
    return [tuple(s) for s in spans]


def usable(step: int) -> bool:
    return step % MINUTE_US == 0

