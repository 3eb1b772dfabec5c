"""Request and Response of the ASGI app: the two small types handlers see."""
from __future__ import annotations

import json
import uuid

from ..core.errors import NotFound
from ..core.wire import encoder


class Request:
    __slots__ = ("scope", "headers", "params", "body", "org", "key_hash")

    def __init__(self, scope, params) -> None:
        self.scope = scope
        self.headers = dict(scope["headers"])
        self.params = params
        self.body = b""
        self.org: uuid.UUID | None = None  # the caller's organization, once checked
        self.key_hash: bytes = b""

    def header(self, name: bytes) -> str | None:
        v = self.headers.get(name)
        return v.decode("latin-1") if v is not None else None

    def uuid_param(self, name: str, what: str) -> uuid.UUID:
        try:
            return uuid.UUID(self.params[name])
        except ValueError:
            raise NotFound(f"no {what} {self.params[name]!r}: not a UUID") from None


class Response:
    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(self, status: int, body, headers: list | None = None,
                 content_type: bytes = b"application/json") -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else _encode(body)
        self.headers = headers or []
        self.content_type = content_type


def _encode(body) -> bytes:
    try:
        return encoder.encode(body)
    except UnicodeEncodeError:
        # A message quoting the client's own text with a lone surrogate in it
        # (msgspec refuses to encode those): \\udXXX escapes instead of a 500.
        return json.dumps(body, ensure_ascii=True).encode()


class StreamingResponse:
    """A body sent as it is produced (``more_body`` chunks), e.g. a CSV export:
    ``chunks`` is an async iterator of bytes. A failure half way ends the
    connection without the final chunk, so the client sees a broken body,
    never a short one that looks complete."""
    __slots__ = ("status", "chunks", "headers", "content_type", "on_close")

    def __init__(self, status: int, chunks, content_type: bytes,
                 headers: list | None = None, on_close=None) -> None:
        self.status = status
        self.chunks = chunks
        self.content_type = content_type
        self.on_close = on_close  # called once the stream is over, sent or not
        self.headers = headers or []
