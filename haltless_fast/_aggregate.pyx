# cython: language_level=3
"""Downsampling of readings into time buckets (twin: ``_aggregate_py.py``).
Same function, same results to the bit; here one pass counts the buckets so
that every output array is allocated once, and the second runs without the GIL.
"""
from cpython cimport array
from libc.stdint cimport int64_t

import array

cdef array.array _Q = array.array("q")
cdef array.array _D = array.array("d")


def aggregate(ts, vals, long long interval_us):
    """Downsample readings sorted by time into buckets of ``interval_us``
    aligned to the Unix epoch: ``(starts, count, sum, min, max, first, last)``,
    one element per non-empty bucket (``array('q')`` for starts and count,
    ``array('d')`` for the rest)."""
    if type(ts) is not array.array or ts.typecode != "q":
        raise TypeError("aggregate: ts must be an array('q')")
    if type(vals) is not array.array or vals.typecode != "d":
        raise TypeError("aggregate: vals must be an array('d')")
    if interval_us < 1:
        raise ValueError(f"aggregate: interval_us must be at least 1, got {interval_us}")
    cdef array.array t = ts, v = vals
    cdef Py_ssize_t n = len(t), i, k = -1
    if n != len(v):
        raise ValueError(f"aggregate: {n} timestamps but {len(v)} values")
    cdef const int64_t* tp = <int64_t*>t.data.as_longlongs
    cdef const double* vp = v.data.as_doubles
    cdef int64_t b, q, cur = 0
    cdef double x
    for i in range(1, n):
        if tp[i] < tp[i - 1]:
            raise ValueError(f"aggregate: timestamps are not sorted at index {i}; "
                             "sort_by_time first")
    cdef Py_ssize_t m = 0
    for i in range(n):  # buckets first, so every output is allocated once
        q = tp[i] // interval_us if tp[i] >= 0 else -((-tp[i] - 1) // interval_us) - 1
        if i == 0 or q != cur:
            m += 1
            cur = q
    cdef array.array starts = array.clone(_Q, m, False), count = array.clone(_Q, m, False)
    cdef array.array s = array.clone(_D, m, False), lo = array.clone(_D, m, False)
    cdef array.array hi = array.clone(_D, m, False), first = array.clone(_D, m, False)
    cdef array.array last = array.clone(_D, m, False)
    cdef int64_t* sp = <int64_t*>starts.data.as_longlongs
    cdef int64_t* cp = <int64_t*>count.data.as_longlongs
    with nogil:
        for i in range(n):
            q = tp[i] // interval_us if tp[i] >= 0 else -((-tp[i] - 1) // interval_us) - 1
            x = vp[i]
            if k < 0 or q != cur:
                k += 1
                cur = q
                sp[k] = q * interval_us
                cp[k] = 1
                s.data.as_doubles[k] = x
                lo.data.as_doubles[k] = x
                hi.data.as_doubles[k] = x
                first.data.as_doubles[k] = x
            else:
                cp[k] += 1
                s.data.as_doubles[k] += x
                if x < lo.data.as_doubles[k]:
                    lo.data.as_doubles[k] = x
                if x > hi.data.as_doubles[k]:
                    hi.data.as_doubles[k] = x
            last.data.as_doubles[k] = x
    return starts, count, s, lo, hi, first, last
