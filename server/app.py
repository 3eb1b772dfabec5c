"""The ASGI application: one callable, a path -> handler table, and the
lifespan that owns the database pool. No framework.

Run it with ``haltless serve`` (granian + uvloop), or any ASGI server:
``granian --interface asgi haltless.server.app:app``.
"""
from __future__ import annotations

import asyncio
import logging
import re

from . import fleet, management, query
from .compact import compact_forever
from .config import Settings
from . import db
from .db import DB_DOWN
from .errors import ClientError, DatabaseUnavailable, NotFound, PayloadTooLarge
from .http import Request, Response, StreamingResponse
from .runtime import Runtime, configure_logging
from .wire import MAX_BODY_BYTES

log = logging.getLogger("haltless.app")

# ------------------------------------------------------------------ handlers

async def ingest(app: "App", req: Request) -> Response:
    """POST /api/v1/ingest - the contract's "HTTP Push"."""
    org = await app.rt.keys.org_for(app.rt.pool, req.header(b"x-api-key"))
    key = req.header(b"idempotency-key")
    if key is not None and not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
        raise ClientError("Idempotency-Key must be 1 to 255 printable ASCII characters")
    body, replayed = await app.rt.ingestor.ingest_body(org, req.body, key)
    return Response(207, body, [(b"idempotency-replayed", b"true")] if replayed else None)


async def healthz(app: "App", req: Request) -> Response:
    return Response(200, {"status": "ok"})


async def readyz(app: "App", req: Request) -> Response:
    async with app.rt.pool.acquire(timeout=2) as conn:
        await conn.fetchval("SELECT 1", timeout=2)
    return Response(200, {"status": "ready"})


# (method, path pattern) -> (handler, max body bytes). {name} matches one path segment.
ROUTES: list[tuple[str, str, object, int]] = [
    ("POST", "/api/v1/ingest", ingest, MAX_BODY_BYTES),
    ("GET", "/healthz", healthz, 0),
    ("GET", "/readyz", readyz, 0),
    *management.ROUTES,
    *query.ROUTES,
    *fleet.ROUTES,
]


def compile_routes(routes):
    exact, patterns = {}, []
    for method, path, handler, limit in routes:
        if "{" in path:
            rx = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
            patterns.append((method, rx, handler, limit))
        else:
            exact[(method, path)] = (handler, limit)
    return exact, patterns


# ------------------------------------------------------------------ the app

class App:
    def __init__(self, settings: Settings | None = None, routes=None) -> None:
        self.settings = settings
        self._exact, self._patterns = compile_routes(routes if routes is not None else ROUTES)
        self.rt: Runtime | None = None
        self._maintenance: asyncio.Task | None = None
        self._compaction: asyncio.Task | None = None

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    def _route(self, method: str, path: str):
        hit = self._exact.get((method, path))
        if hit is not None:
            return hit[0], hit[1], {}
        allowed = [m for (m, p) in self._exact if p == path]
        for m, rx, handler, limit in self._patterns:
            match = rx.match(path)
            if match:
                if m == method:
                    return handler, limit, match.groupdict()
                allowed.append(m)
        if allowed:
            return None, 0, sorted(set(allowed))
        return None, 0, None

    async def _http(self, scope, receive, send) -> None:
        handler, limit, params = self._route(scope["method"], scope["path"])
        try:
            if handler is None:
                if params:
                    await _send(send, Response(405, {"detail": f"method {scope['method']} not allowed "
                                                                f"here; allowed: {', '.join(params)}"},
                                               [(b"allow", ", ".join(params).encode())]))
                    return
                raise NotFound(f"no such endpoint: {scope['path']}")
            req = Request(scope, params)
            req.body = await _read_body(req, receive, limit)
            resp = await handler(self, req)
        except ClientError as exc:
            resp = Response(exc.status, {"detail": str(exc)})
        except (DatabaseUnavailable, *DB_DOWN) as exc:
            log.warning("503: %s", exc)
            resp = Response(503, {"detail": "the database is unavailable; nothing was stored, "
                                            "retry later"}, [(b"retry-after", b"5")])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            resp = Response(500, {"detail": "internal server error"})
        if isinstance(resp, StreamingResponse):
            await _stream(send, resp)
        else:
            await _send(send, resp)

    async def _lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        s = self.settings or Settings.from_env()
        configure_logging(s.log_level)
        self.rt = await Runtime(s).start()
        self.settings = self.rt.settings
        self._maintenance = asyncio.create_task(maintain(self.rt.pool))
        self._compaction = asyncio.create_task(compact_forever(self.rt.pool, s.retention_days))

    async def shutdown(self) -> None:
        for task in (self._maintenance, self._compaction):
            if task is not None:
                task.cancel()
        if self.rt is not None:
            await self.rt.close()


async def maintain(pool, every: float = 3600.0) -> None:
    """Hourly, in every worker (both statements are idempotent): create the
    next months' reading partitions ahead of time, and forget idempotency
    keys older than 48 hours (the contract with clients is at least 24)."""
    while True:
        try:
            async with pool.acquire() as conn:
                await conn.execute(db.ENSURE_PARTITIONS)
                await conn.execute(
                    "DELETE FROM idempotency_keys WHERE created_at < now() - interval '48 hours'")
        except DB_DOWN as exc:
            log.warning("maintenance skipped: %s", exc)
        except Exception:  # noqa: BLE001 - retried next hour; never end the loop
            log.exception("maintenance failed")
        await asyncio.sleep(every)


async def _read_body(req: Request, receive, limit: int) -> bytes:
    declared = req.headers.get(b"content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ClientError("Content-Length header is not a number") from None
        if n > limit:
            raise _too_large(limit, n)
    chunks = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise asyncio.CancelledError("client went away")
        body = msg.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise _too_large(limit, None)
            chunks.append(body)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int, n: int | None) -> PayloadTooLarge:
    if limit == 0:
        return PayloadTooLarge("this endpoint takes no request body")
    got = f" (Content-Length {n:,})" if n is not None else ""
    return PayloadTooLarge(f"request body too large{got}: the limit is {limit:,} bytes "
                           f"({limit // (1024 * 1024)} MB); send fewer readings per request")


async def _send(send, resp: Response) -> None:
    await send({"type": "http.response.start", "status": resp.status,
                "headers": [(b"content-type", resp.content_type),
                            (b"content-length", str(len(resp.body)).encode())] + resp.headers})
    await send({"type": "http.response.body", "body": resp.body})


async def _stream(send, resp: StreamingResponse) -> None:
    await send({"type": "http.response.start", "status": resp.status,
                "headers": [(b"content-type", resp.content_type)] + resp.headers})
    try:
        async for chunk in resp.chunks:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        await resp.chunks.aclose()  # gives its database connection back at once
    await send({"type": "http.response.body", "body": b""})


app = App()

__all__ = ["App", "app", "Request", "Response", "ROUTES"]
