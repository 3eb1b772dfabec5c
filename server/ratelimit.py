"""Per-key rate limits (``HALTLESS_RATE_LIMIT`` readings/s), shared by every
worker of one server.

A token bucket per API key holding one second's worth of readings. A batch
passes when the bucket holds its readings, or when the bucket is full (so a
batch larger than one second's allowance is not refused forever: it leaves
the bucket in debt and the next ones wait). Refused batches store nothing
and get 429 with the seconds until they would pass.

The buckets live in a small file that every worker maps (``haltless serve``
puts it in its private run dir) and updates under ``flock``: a key is
limited across workers, whichever worker its connections land on. Without a
run dir (the app started by another ASGI server) each process keeps its own.
"""
from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
import time
from pathlib import Path

from ..core.errors import TooManyRequests

SLOTS = 4096
PROBE = 16
STALE = 60.0  # seconds: a slot unused this long may go to another key
_REC = struct.Struct("<8sdd")  # key digest prefix, tokens, updated (time.time())


class RateLimiter:
    def __init__(self, rate: float, path: Path | None = None) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        size = SLOTS * _REC.size
        self._fd = None
        if path is not None:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
            self._mem = mmap.mmap(self._fd, size)
        else:
            self._mem = bytearray(size)

    def check(self, key: bytes, n: int) -> None:
        """Take ``n`` readings from ``key``'s bucket, or raise TooManyRequests."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            wait = self._take(key[:8], n, time.time())
        finally:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        if wait is not None:
            retry = max(1, math.ceil(wait))
            raise TooManyRequests(
                f"rate limit: this API key may send {self.rate:g} readings per second "
                f"(HALTLESS_RATE_LIMIT); nothing was stored - retry in {retry} s", retry)

    def _take(self, key: bytes, n: int, now: float) -> float | None:
        start = int.from_bytes(key[:4], "little") % SLOTS
        slot, tokens = None, 0.0
        for i in range(PROBE):
            off = ((start + i) % SLOTS) * _REC.size
            k, left, updated = _REC.unpack_from(self._mem, off)
            if k == key:
                slot = off
                tokens = min(self.capacity, left + (now - updated) * self.rate)
                break
            if slot is None and (updated == 0.0 or now - updated > STALE):
                slot, tokens = off, self.capacity  # a free (or forgotten) slot
        if slot is None:
            return None  # 16 busy keys in a row: let it through rather than refuse
        full = tokens >= self.capacity
        if tokens >= n or full:
            _REC.pack_into(self._mem, slot, key, tokens - n, now)
            return None
        _REC.pack_into(self._mem, slot, key, tokens, now)
        return (min(n, self.capacity) - tokens) / self.rate
