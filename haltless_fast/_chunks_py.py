"""Hot rows of ``reading_chunks`` as PostgreSQL sends them (pure-Python twin
of ``_chunks.pyx``).

A hot row holds one (series, hour) of one group commit (``encode_chunks``
writes them): ``ts`` is a bytea of n big-endian Unix µs, 8 bytes each
(migration ``0008_hot_stamps.sql``), and ``vals`` a ``float8[]``, which
``array_send`` and binary COPY give as::

    [0:4] ndim (0 or 1)   [4:8] flags (0: no NULLs)   [8:12] element oid (701)
    ndim 1: [12:16] n   [16:20] lower bound
    then n elements of 12 bytes: a length word (8) and the float8's bits

Compaction and the read API COPY the rows of many series out at once, in
PostgreSQL's binary COPY format (the ``PGCOPY`` signature, flags and a
header extension; per row an int16 field count and int32-length-prefixed
fields; an int16 -1 as the trailer). ``group_chunks`` merges consecutive
rows of one (series, hour). Each row is held to a block's limit, MAX_COUNT
readings (``_blocks_py``); what a (series, hour) merges into is not: an
hour may hold more than one block can, and compaction cuts it into parts
(``server/compact.py``).
"""
from __future__ import annotations

from array import array

from ._shared_py import as_bytes, check_count, from_be

_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
_OID_FLOAT8 = 701
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def _pg_array(data: bytes, oid: int, what: str) -> tuple[int, int]:
    """Check the array_send header; return (element count, offset of the first element)."""
    size = len(data)
    if size < 12:
        raise ValueError(f"{what}: {size} bytes is shorter than an array header (12)")
    ndim, flags, elem = (int.from_bytes(data[o:o + 4], "big", signed=True) for o in (0, 4, 8))
    if elem != oid:
        raise ValueError(f"{what}: element type oid {elem}, expected {oid}; "
                         "send the column through array_send() unchanged")
    if flags != 0:
        raise ValueError(f"{what}: the array has NULLs (flag {flags}); a block cannot hold them")
    if ndim == 0:
        n, head = 0, 12
    elif ndim == 1:
        if size < 20:
            raise ValueError(f"{what}: {size} bytes is shorter than a 1-D array header (20)")
        n, head = int.from_bytes(data[12:16], "big", signed=True), 20
    else:
        raise ValueError(f"{what}: {ndim} dimensions; only 1-D arrays are blocks")
    if n < 0 or size != head + 12 * n:
        raise ValueError(f"{what}: {size} bytes do not hold the {n} elements of 12 bytes "
                         "its header declares; the array is truncated or corrupt")
    check_count(n)
    for i in range(n):
        if data[head + 12 * i:head + 12 * i + 4] != b"\x00\x00\x00\x08":
            raise ValueError(f"{what}: element {i} is not 8 bytes long (NULL or corrupt)")
    return n, head


def _chunk_stamps(ts_bin: bytes, what: str = "ts") -> array:
    """The bytea ``ts`` of a ``reading_chunks`` row: big-endian Unix µs, 8 bytes each."""
    if len(ts_bin) % 8:
        raise ValueError(f"{what}: {len(ts_bin)} bytes is not a whole number of 8-byte "
                         "timestamps; the column is truncated or corrupt")
    check_count(len(ts_bin) // 8)
    return from_be("q", ts_bin)


def from_chunk(ts_bin: bytes, vals_bin: bytes) -> tuple[array, array]:
    """Parse one ``reading_chunks`` row: ``ts`` as stored (bytea, big-endian
    Unix µs) and ``array_send(vals)`` (``float8[]``, 1-D, no NULLs), into
    ``array('q')`` and ``array('d')`` of the same length."""
    ts = _chunk_stamps(as_bytes(ts_bin, "ts"))
    vals_bin = as_bytes(vals_bin, "float8[]")
    nv, hv = _pg_array(vals_bin, _OID_FLOAT8, "float8[]")
    if len(ts) != nv:
        raise ValueError(f"{len(ts)} timestamps but {nv} values; a chunk pairs them one to one")
    vals = array("d", from_be("Q", b"".join(
        vals_bin[hv + 12 * i + 4:hv + 12 * i + 12] for i in range(nv))).tobytes())
    return ts, vals


# ------------------------------------------------- reading_chunks, as COPY out

def group_chunks(data) -> list:
    """Parse the binary COPY output of ``(series_id int4, bucket timestamptz,
    ts bytea, vals float8[])`` ordered by (series_id, bucket), and merge
    consecutive rows of one (series_id, bucket): a list of ``(series_id,
    bucket in Unix µs, ts array('q'), vals array('d'))``, readings in the
    order the rows held them (``sort_by_time`` orders them)."""
    data = as_bytes(data, "COPY data")
    if data[:11] != _COPY_SIGNATURE or len(data) < 19:
        raise ValueError("COPY data: not PostgreSQL's binary COPY format (bad signature)")
    p = 19 + int.from_bytes(data[15:19], "big")
    out: list = []
    key = None
    while True:
        if p + 2 > len(data):
            raise ValueError("COPY data: truncated (no trailer)")
        nf = int.from_bytes(data[p:p + 2], "big", signed=True)
        p += 2
        if nf == -1:
            break
        if nf != 4:
            raise ValueError(f"COPY data: a row of {nf} fields, expected 4 "
                             "(series_id, bucket, ts, vals)")
        fields = []
        for _ in range(4):
            if p + 4 > len(data):
                raise ValueError("COPY data: truncated inside a row")
            n = int.from_bytes(data[p:p + 4], "big", signed=True)
            if n < 0 or p + 4 + n > len(data):
                raise ValueError("COPY data: a NULL or truncated field")
            fields.append(data[p + 4:p + 4 + n])
            p += 4 + n
        if len(fields[0]) != 4 or len(fields[1]) != 8:
            raise ValueError("COPY data: series_id must be int4 and bucket timestamptz")
        sid = int.from_bytes(fields[0], "big", signed=True)
        bucket = int.from_bytes(fields[1], "big", signed=True) + _PG_EPOCH_US
        ts, vals = from_chunk(fields[2], fields[3])
        if (sid, bucket) != key:
            key = (sid, bucket)
            out.append((sid, bucket, ts, vals))
        else:
            out[-1][2].extend(ts)
            out[-1][3].extend(vals)
    if p != len(data):
        raise ValueError("COPY data: bytes after the trailer")
    return out
