# cython: language_level=3
"""Hot rows of ``reading_chunks`` as PostgreSQL sends them (twin:
``_chunks_py.py``, which documents the contract). Same functions, same
results; here the big-endian fields go straight into the buffers of
``array('q')``/``array('d')``, with no Python object per element.
"""
from cpython cimport array
from libc.stdint cimport int16_t, int32_t, int64_t

# _shared.pxd, by its bare name (setup.py says why)
from _shared cimport as_bytes, check_count, from_bits, get_be

import array

cdef int64_t PG_EPOCH_US = 946684800000000

cdef array.array _Q = array.array("q")
cdef array.array _D = array.array("d")


# --------------------------------------------------------- PostgreSQL arrays

cdef Py_ssize_t _pg_array(const unsigned char[::1] b, int oid, str what,
                          Py_ssize_t* head) except -1:
    """Check the array_send header; return the element count, set *head."""
    cdef Py_ssize_t size = b.shape[0], n, i
    if size < 12:
        raise ValueError(f"{what}: {size} bytes is shorter than an array header (12)")
    cdef const unsigned char* p = &b[0]
    cdef int ndim = <int>get_be(p, 4), flags = <int>get_be(p + 4, 4)
    cdef int elem = <int>get_be(p + 8, 4)
    if elem != oid:
        raise ValueError(f"{what}: element type oid {elem}, expected {oid}; "
                         "send the column through array_send() unchanged")
    if flags != 0:
        raise ValueError(f"{what}: the array has NULLs (flag {flags}); a block cannot hold them")
    if ndim == 0:
        n, head[0] = 0, 12
    elif ndim == 1:
        if size < 20:
            raise ValueError(f"{what}: {size} bytes is shorter than a 1-D array header (20)")
        n, head[0] = <int>get_be(p + 12, 4), 20
    else:
        raise ValueError(f"{what}: {ndim} dimensions; only 1-D arrays are blocks")
    if n < 0 or size != head[0] + 12 * n:
        raise ValueError(f"{what}: {size} bytes do not hold the {n} elements of 12 bytes "
                         "its header declares; the array is truncated or corrupt")
    check_count(n)
    p += head[0]
    for i in range(n):
        if get_be(p + 12 * i, 4) != 8:
            raise ValueError(f"{what}: element {i} is not 8 bytes long (NULL or corrupt)")
    return n


cdef Py_ssize_t _chunk_count(Py_ssize_t size, str what) except -1:
    if size % 8:
        raise ValueError(f"{what}: {size} bytes is not a whole number of 8-byte "
                         "timestamps; the column is truncated or corrupt")
    check_count(size // 8)
    return size // 8


def from_chunk(ts_bin, vals_bin):
    """See ``_chunks_py.from_chunk``: same contract, same results."""
    cdef const unsigned char[::1] tb = as_bytes(ts_bin, "ts")
    cdef const unsigned char[::1] vb = as_bytes(vals_bin, "float8[]")
    cdef Py_ssize_t hv, i
    cdef Py_ssize_t nt = _chunk_count(tb.shape[0], "ts")
    cdef Py_ssize_t nv = _pg_array(vb, 701, "float8[]", &hv)
    if nt != nv:
        raise ValueError(f"{nt} timestamps but {nv} values; a chunk pairs them one to one")
    cdef array.array ts = array.clone(_Q, nt, False)
    cdef array.array vals = array.clone(_D, nv, False)
    for i in range(nt):
        (<int64_t*>ts.data.as_longlongs)[i] = <int64_t>get_be(&tb[8 * i], 8)
        vals.data.as_doubles[i] = from_bits(get_be(&vb[hv + 12 * i + 4], 8))
    return ts, vals


# ------------------------------------------------- reading_chunks, as COPY out

cdef Py_ssize_t _extend_stamps(const unsigned char[::1] b, Py_ssize_t off, Py_ssize_t size,
                               array.array dest) except -1:
    """Append the big-endian Unix µs of the bytea at b[off:off+size] to dest."""
    cdef Py_ssize_t n = _chunk_count(size, "ts"), i, base = len(dest)
    array.resize(dest, base + n)
    for i in range(n):
        (<int64_t*>dest.data.as_longlongs)[base + i] = <int64_t>get_be(&b[off + 8 * i], 8)
    return n


cdef Py_ssize_t _extend_from_pg(const unsigned char[::1] b, Py_ssize_t off, Py_ssize_t size,
                                int oid, str what, array.array dest) except -1:
    """Append the float8 elements of the array_send bytes at b[off:off+size] to dest."""
    cdef Py_ssize_t head, n, i, base = len(dest)
    n = _pg_array(b[off:off + size], oid, what, &head)
    array.resize(dest, base + n)
    cdef const unsigned char* p = &b[off + head] if n else NULL
    for i in range(n):
        dest.data.as_doubles[base + i] = from_bits(get_be(p + 12 * i + 4, 8))
    return n


def group_chunks(data):
    """See ``_chunks_py.group_chunks``: same contract, same results."""
    cdef const unsigned char[::1] b = as_bytes(data, "COPY data")
    cdef Py_ssize_t size = b.shape[0], p, k, flen[4], foff[4]
    cdef int nf
    cdef int32_t sid, cur_sid = 0
    cdef int64_t bucket, cur_bucket = 0
    cdef bint have = False
    cdef array.array ts = None, vals = None
    if size < 19 or bytes(b[:11]) != b"PGCOPY\n\xff\r\n\x00":
        raise ValueError("COPY data: not PostgreSQL's binary COPY format (bad signature)")
    p = 19 + <Py_ssize_t>get_be(&b[15], 4)
    out = []
    while True:
        if p + 2 > size:
            raise ValueError("COPY data: truncated (no trailer)")
        nf = <int16_t>get_be(&b[p], 2)
        p += 2
        if nf == -1:
            break
        if nf != 4:
            raise ValueError(f"COPY data: a row of {nf} fields, expected 4 "
                             "(series_id, bucket, ts, vals)")
        for k in range(4):
            if p + 4 > size:
                raise ValueError("COPY data: truncated inside a row")
            flen[k] = <int32_t>get_be(&b[p], 4)
            if flen[k] < 0 or p + 4 + flen[k] > size:
                raise ValueError("COPY data: a NULL or truncated field")
            foff[k] = p + 4
            p += 4 + flen[k]
        if flen[0] != 4 or flen[1] != 8:
            raise ValueError("COPY data: series_id must be int4 and bucket timestamptz")
        sid = <int32_t>get_be(&b[foff[0]], 4)
        bucket = <int64_t>get_be(&b[foff[1]], 8) + PG_EPOCH_US
        if not have or sid != cur_sid or bucket != cur_bucket:
            have, cur_sid, cur_bucket = True, sid, bucket
            ts = array.clone(_Q, 0, False)
            vals = array.clone(_D, 0, False)
            out.append((sid, bucket, ts, vals))
        nt = _extend_stamps(b, foff[2], flen[2], ts)
        nv = _extend_from_pg(b, foff[3], flen[3], 701, "float8[]", vals)
        if nt != nv:
            raise ValueError(f"{nt} timestamps but {nv} values; a block pairs them one to one")
    if p != size:
        raise ValueError("COPY data: bytes after the trailer")
    return out
