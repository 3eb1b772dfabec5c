"""Reading request bodies without letting a client hold the worker.

granian hands the body over chunk by chunk as it arrives on the socket, and
never times out a body that stops half way (granian #728), so this module is
where a request body is bounded:

* in size: ``Content-Length`` over the route's limit is refused before a byte
  is read, a stream passing it is refused as soon as it does, and a gzip body
  (``Content-Encoding: gzip``) is decompressed as it arrives, so the limit
  applies to what it expands to and a decompression bomb is refused after at
  most ``limit`` bytes of output;
* in time: each chunk must arrive within ``stall`` seconds, the whole body
  within ``total`` seconds (408 otherwise);
* in memory: every worker has a budget for the bodies it holds at once
  (``BodyBudget``); a request that would pass it gets 503 with ``Retry-After``
  before its body is read. 100 unauthenticated clients each holding a 10 MB
  body took one server from 181 MB to 1,253 MB before this (issue 10);
* in framing: a malformed chunked body (``zz`` or a 19-digit chunk size)
  reaches the app as ``http.disconnect`` (granian discards hyper's decode
  error); it is answered 400 here instead of granian's built-in 500.
"""
from __future__ import annotations

import asyncio
import ctypes
import zlib

from ..core.errors import (ClientError, ClientGone, Overloaded, PayloadTooLarge, RequestTimeout,
                           UnsupportedMediaType)


class BodyBudget:
    """Bytes of request bodies this worker holds at once, across requests.
    Big bodies given back are handed to a ``Trimmer``, whatever became of
    their request (answered, refused, timed out or abandoned)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.trimmer = Trimmer()

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise Overloaded(
                f"this server holds {self.limit // (1024 * 1024)} MB of request bodies per "
                "worker at once and is at that limit; retry after the Retry-After seconds")
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        if n >= 1024 * 1024:
            self.trimmer.released_body(n)


def too_large(limit: int, n: int | None = None, decompressed: bool = False) -> PayloadTooLarge:
    if limit == 0:
        return PayloadTooLarge("this endpoint takes no request body")
    got = f" (Content-Length {n:,})" if n is not None else ""
    what = "decompressed request body" if decompressed else "request body"
    return PayloadTooLarge(f"{what} too large{got}: the limit is {limit:,} bytes "
                           f"({limit // (1024 * 1024)} MB); send fewer readings per request")


async def read_body(headers: dict, receive, limit: int, budget: BodyBudget,
                    stall: float, total: float) -> tuple[bytes, int]:
    """The whole (decompressed) body, bounded as the module says, and the
    bytes of ``budget`` it holds: the caller gives them back once it is done
    with the body (they are given back here if reading fails)."""
    declared = headers.get(b"content-length")
    n = None
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ClientError("Content-Length header is not a number") from None
        if n > limit:
            raise too_large(limit, n)
    encoding = headers.get(b"content-encoding", b"identity").strip().lower()
    if encoding not in (b"identity", b"gzip", b"x-gzip", b""):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; "
            "send gzip or an uncompressed body")
    gunzip = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if encoding in (b"gzip", b"x-gzip") else None
    # Reserve what Content-Length says up front (a client declaring 10 MB is
    # refused before it sends them), else as the chunks come.
    held = 0
    if n:
        budget.take(n)
        held = n
    chunks: list[bytes] = []
    size = 0    # bytes received
    out = 0     # bytes of body (decompressed when gzip)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total
    try:
        while True:
            try:
                # a timer handle per chunk (asyncio.wait_for would start a task)
                async with asyncio.timeout_at(min(loop.time() + stall, deadline)):
                    msg = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body stalled: nothing arrived for {stall:g} s (or the whole "
                    f"body took over {total:g} s) after {size:,} bytes; send the body at once"
                    ) from None
            if msg["type"] == "http.disconnect":
                raise ClientGone(f"the body ended after {size:,} bytes")
            body = msg.get("body", b"")
            more = msg.get("more_body", False)
            if body:
                size += len(body)
                if size > limit:
                    raise too_large(limit)
                if gunzip is not None:
                    body = _inflate(gunzip, body, limit - out)
                out += len(body)
                if out > limit:
                    raise too_large(limit, decompressed=gunzip is not None)
                if out > held:
                    budget.take(out - held)
                    held = out
                chunks.append(body)
            if not more:
                break
        if gunzip is not None:
            if not gunzip.eof:
                raise ClientError("the gzip body is truncated: it ends before the gzip stream does")
            if gunzip.unused_data:
                raise ClientError("the gzip body has data after the end of the gzip stream")
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except BaseException:
        budget.give(held)
        raise
    return body, held


def _inflate(gunzip, data: bytes, room: int) -> bytes:
    """Decompress ``data``, producing at most ``room + 1`` bytes: one more
    than fits says "too large" without inflating a bomb any further."""
    try:
        out = gunzip.decompress(data, max(room, 0) + 1)
    except zlib.error as exc:
        raise ClientError(f"the body is not valid gzip ({exc}); send gzip or drop the "
                          "Content-Encoding header") from None
    return out


# ------------------------------------------------------------------ memory

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None

TRIM_AFTER = 8 * 1024 * 1024  # bytes of bodies released since the last trim


class Trimmer:
    """Gives freed body memory back to the OS. glibc keeps freed heap memory
    for reuse, so a burst of 10 MB bodies left a worker 1 GB larger for good;
    ``malloc_trim(0)`` after big bodies are released returns it."""

    def __init__(self) -> None:
        self.released = 0
        self._pending = False

    def released_body(self, n: int) -> None:
        self.released += n
        if self.released >= TRIM_AFTER and not self._pending and _malloc_trim is not None:
            self._pending = True
            # after this request's objects are gone, and once per burst
            asyncio.get_running_loop().call_later(0.2, self._trim)

    def _trim(self) -> None:
        self._pending = False
        self.released = 0
        _malloc_trim(0)
