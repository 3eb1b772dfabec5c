"""Downsampling of readings into time buckets (pure-Python twin of
``_aggregate.pyx``).

Buckets are ``interval_us`` long and aligned to the Unix epoch (floor
division, so a reading at -1 µs is in the bucket that starts at
``-interval_us``); only non-empty buckets are returned. The sum adds the
values in time order, so both kernels give the same float to the bit.
"""
from __future__ import annotations

from array import array


def aggregate(ts: array, vals: array, interval_us: int) -> tuple:
    """Downsample readings sorted by time into buckets of ``interval_us``
    aligned to the Unix epoch: ``(starts, count, sum, min, max, first, last)``,
    one element per non-empty bucket (``array('q')`` for starts and count,
    ``array('d')`` for the rest)."""
    if type(ts) is not array or ts.typecode != "q":
        raise TypeError("aggregate: ts must be an array('q')")
    if type(vals) is not array or vals.typecode != "d":
        raise TypeError("aggregate: vals must be an array('d')")
    if interval_us < 1:
        raise ValueError(f"aggregate: interval_us must be at least 1, got {interval_us}")
    if len(ts) != len(vals):
        raise ValueError(f"aggregate: {len(ts)} timestamps but {len(vals)} values")
    for i in range(1, len(ts)):
        if ts[i] < ts[i - 1]:
            raise ValueError(f"aggregate: timestamps are not sorted at index {i}; "
                             "sort_by_time first")
    starts, count = array("q"), array("q")
    s, lo, hi, first, last = (array("d") for _ in range(5))
    cur = None
    for t, x in zip(ts, vals):
        q = t // interval_us
        if q != cur:
            cur = q
            starts.append(q * interval_us)
            count.append(1)
            s.append(x)
            lo.append(x)
            hi.append(x)
            first.append(x)
            last.append(x)
        else:
            count[-1] += 1
            s[-1] += x
            if x < lo[-1]:
                lo[-1] = x
            if x > hi[-1]:
                hi[-1] = x
            last[-1] = x
    return starts, count, s, lo, hi, first, last
