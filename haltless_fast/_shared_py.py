"""What the codec twins (``_blocks_py``, ``_chunks_py``) share: big-endian
arrays, the block size limit and the bytes a kernel accepts (the compiled
kernels have the same in ``_shared.pxd``)."""
from __future__ import annotations

import sys
from array import array

MAX_COUNT = 1 << 24  # 16,777,216: 4.6 hours at 1 kHz; a block is meant to be ~1 hour

_LITTLE = sys.byteorder == "little"


def to_be(typecode: str, xs) -> bytes:
    a = array(typecode, xs)
    if _LITTLE:
        a.byteswap()
    return a.tobytes()


def from_be(typecode: str, data) -> array:
    a = array(typecode)
    a.frombytes(data)
    if _LITTLE:
        a.byteswap()
    return a


def check_count(n: int) -> None:
    if n > MAX_COUNT:
        raise ValueError(f"a block holds at most {MAX_COUNT:,} readings, got {n:,}; "
                         "compact into smaller blocks")


def as_bytes(data, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(data).__name__}")
    return bytes(data)
