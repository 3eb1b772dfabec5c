"""The ASGI application: one callable, a path -> handler table, and the
lifespan that owns the database pool. No framework.

Run it with ``haltless serve`` (granian + uvloop), or any ASGI server:
``granian --interface asgi haltless.server.app:app``.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time

from ..core.config import Settings
from ..core.errors import (
    ClientError,
    ClientGone,
    DatabaseUnavailable,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    TooManyRequests,
    Unprocessable,
)
from ..core.logs import configure_logging
from ..core.wire import MAX_BODY_BYTES, MAX_MACHINE_CHECK, MachineCheck
from . import db, fleet, management, metrics, query, store
from .bodies import BodyBudget, read_body
from .compaction import compact_forever
from .db import DB_DOWN
from .decode import count_readings
from .http import Request, Response, StreamingResponse
from .ratelimit import RateLimiter
from .reader_limits import police_readers
from .runtime import Runtime
from .store import hash_api_key

log = logging.getLogger("haltless.app")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# ------------------------------------------------------------------ handlers

async def ingest(app: App, req: Request) -> Response:
    """POST /api/v1/ingest - the contract's "HTTP Push". The API key was
    checked (``req.org``) before the body was read."""
    key = req.header(b"idempotency-key")
    if key is not None and not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
        raise ClientError("Idempotency-Key must be 1 to 255 printable ASCII characters")
    if app.limiter is not None:
        n = count_readings(req.body)
        try:
            app.limiter.check(req.key_hash, n)
        except TooManyRequests:
            metrics.READINGS_REJECTED.labels("rate_limited").inc(n)
            raise
    body, done = await app.rt.ingestor.ingest_body(req.org, req.body, key)
    if done is None:  # a replay: counted when it was first answered
        return Response(207, body, [(b"idempotency-replayed", b"true")])
    metrics.READINGS_ACCEPTED.inc(done.result.accepted_count)
    for reason, n in done.reasons.items():
        metrics.READINGS_REJECTED.labels(reason).inc(n)
    return Response(207, body)


MACHINE_CHECK_PARAMS = ("machine_identifier",)


async def ingest_machines(app: App, req: Request) -> Response:
    """GET /api/v1/ingest/machines?machine_identifier=A&machine_identifier=B -
    which of the given machines the API key's organization has, so that a
    sender (``haltless agent --check``) learns before it sends that its
    readings would come back "Machine not found". Not in the public contract;
    1 to MAX_MACHINE_CHECK identifiers, answered in the order given. It
    tells a key holder nothing about other organizations."""
    asked = query.Params(req, MACHINE_CHECK_PARAMS).many("machine_identifier")
    if not asked:
        raise Unprocessable("machine_identifier: required; give it once per machine "
                            f"(at most {MAX_MACHINE_CHECK})")
    if len(asked) > MAX_MACHINE_CHECK:
        raise Unprocessable(f"machine_identifier: given {len(asked)} times; at most "
                            f"{MAX_MACHINE_CHECK} per request, ask again for the rest")
    for i, ident in enumerate(asked):
        if not 1 <= len(ident) <= 200:  # as on ingest (core/wire.py Identifier)
            raise Unprocessable(f"machine_identifier[{i}]: must be 1 to 200 characters, "
                                f"not {len(ident)}")
    asked = list(dict.fromkeys(asked))
    async with app.rt.pool.acquire() as conn:
        have = await store.existing_machines(conn, req.org, asked)
    return Response(200, MachineCheck([m for m in asked if m in have],
                                      [m for m in asked if m not in have]))


async def healthz(app: App, req: Request) -> Response:
    return Response(200, {"status": "ok"})


async def readyz(app: App, req: Request) -> Response:
    async with app.rt.pool.acquire(timeout=2) as conn:
        await conn.fetchval("SELECT 1", timeout=2)
    return Response(200, {"status": "ready"})


async def metrics_endpoint(app: App, req: Request) -> Response:
    metrics.sample_pool(app.rt.pool)
    body, ctype = await metrics.render(app.rt.pool)
    return Response(200, body, content_type=ctype.encode())


async def openapi(app: App, req: Request) -> Response:
    from .openapi import document
    return Response(200, document())


# (method, path pattern, handler, max body bytes, credentials checked before
# the body is read: "key" (X-API-Key), "jwt" (Bearer token) or None).
# {name} matches one path segment.
ROUTES: list[tuple[str, str, object, int, str | None]] = [
    ("POST", "/api/v1/ingest", ingest, MAX_BODY_BYTES, "key"),
    ("GET", "/api/v1/ingest/machines", ingest_machines, 0, "key"),
    ("GET", "/healthz", healthz, 0, None),
    ("GET", "/readyz", readyz, 0, None),
    ("GET", "/metrics", metrics_endpoint, 0, None),
    ("GET", "/openapi.json", openapi, 0, None),
    *management.ROUTES,
    *query.ROUTES,
    *fleet.ROUTES,
]


def compile_routes(routes):
    exact, patterns = {}, []
    for method, path, handler, limit, auth in routes:
        if "{" in path:
            rx = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
            patterns.append((method, rx, (handler, limit, auth, path)))
        else:
            exact[(method, path)] = (handler, limit, auth, path)
    return exact, patterns


# ------------------------------------------------------------------ the app

class App:
    def __init__(self, settings: Settings | None = None, routes=None) -> None:
        self.settings = settings
        self._exact, self._patterns = compile_routes(routes if routes is not None else ROUTES)
        self.rt: Runtime | None = None
        self.limiter: RateLimiter | None = None
        # Replaced at startup by the settings' budget; this is the default's.
        self.budget = BodyBudget(Settings.body_memory_mb * 1024 * 1024)
        self.outage = Outage()
        self._maintenance: asyncio.Task | None = None
        self._compaction: asyncio.Task | None = None
        self._readers: asyncio.Task | None = None

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    def _route(self, method: str, path: str):
        """(handler, limit, auth, route pattern, params); handler None and
        params the allowed methods (or None) when nothing matches (the route
        pattern is then the path's when only the method is wrong, else
        "unmatched": metrics labels stay bounded)."""
        hit = self._exact.get((method, path))
        if hit is not None:
            return (*hit, {})
        allowed = [m for (m, p) in self._exact if p == path]
        route = path if allowed else "unmatched"
        for m, rx, target in self._patterns:
            match = rx.match(path)
            if match:
                if m == method:
                    return (*target, match.groupdict())
                allowed.append(m)
                route = target[3]
        return None, 0, None, route, sorted(set(allowed)) or None

    async def _http(self, scope, receive, send) -> None:
        started = time.perf_counter()
        handler, limit, auth, route, params = self._route(scope["method"], scope["path"])
        try:
            if handler is None:
                if params:  # answered (and counted) like every other answer below
                    raise MethodNotAllowed(scope["method"], params)
                raise NotFound(f"no such endpoint: {scope['path']}")
            req = Request(scope, params)
            # Credentials first: a request that may not write is answered
            # without reading (or holding) its body.
            if auth == "key":
                key = req.header(b"x-api-key")
                req.org = await self.rt.keys.org_for(self.rt.pool, key)
                req.key_hash = hash_api_key(key)
            elif auth == "jwt":
                req.org = await management.authorize(self, req)
            s = self.settings
            req.body, held = await read_body(req.headers, receive, limit, self.budget,
                                             s.body_timeout, s.body_timeout * 6)
            try:
                resp = await handler(self, req)
            finally:
                req.body = b""
                self.budget.give(held)  # counted until the handler is done with it
                metrics.BODIES.set(self.budget.used)
            if resp.status < 300 and auth is not None:
                self.outage.up()
        except ClientError as exc:
            resp = Response(exc.status, {"detail": str(exc)}, exc.headers())
        except Overloaded as exc:
            resp = Response(503, {"detail": str(exc)},
                            [(b"retry-after", str(exc.retry_after).encode())])
        except ClientGone as exc:
            # A client that left cannot read this; a malformed chunked body
            # (which granian reports the same way) gets a 400, not granian's 500.
            log.info("%s %s: %s (client gone, or malformed chunked framing)",
                     scope["method"], scope["path"], exc)
            resp = Response(400, {"detail": f"malformed request body framing: {exc} before its "
                                            "end; send a valid Content-Length or chunked body"})
        except (DatabaseUnavailable, *DB_DOWN) as exc:
            self.outage.down(exc)
            resp = Response(503, {"detail": "the database is unavailable; nothing was stored, "
                                            "retry later"}, [(b"retry-after", b"5")])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            resp = Response(500, {"detail": "internal server error"})
        try:
            if isinstance(resp, StreamingResponse):
                await _stream(send, resp, self.rt.settings.send_timeout)
            else:
                # Server-Timing (W3C): the time from the request's arrival to
                # its answer being ready, body read and encoded; what a client
                # (or bench/query.py) tells apart from the network's share.
                resp.headers.append((b"server-timing", b"app;dur=%.2f" % (
                    (time.perf_counter() - started) * 1000)))
                await _send(send, resp)
        except Exception as exc:  # noqa: BLE001 - the client is gone; nothing to answer
            log.info("%s %s: response not sent: %s", scope["method"], scope["path"], exc)
        method = scope["method"] if scope["method"] in _METHODS else "other"  # bounded labels
        metrics.REQUESTS.labels(route, method, str(resp.status)).inc()
        metrics.DURATION.labels(route).observe(time.perf_counter() - started)

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
        self.rt = await Runtime(s, writer_class=metrics.MeasuredWriter).start()
        self.settings = s = self.rt.settings
        self.budget = BodyBudget(s.body_memory_mb * 1024 * 1024)
        if s.rate_limit:
            self.limiter = RateLimiter(s.rate_limit, s.run_dir / "rate-limits" if s.run_dir else None)
        self._maintenance = asyncio.create_task(maintain(self.rt.pool))
        self._compaction = asyncio.create_task(compact_forever(self.rt.pool, s.retention_days,
                                                           dsn=s.database_url))
        self._readers = asyncio.create_task(police_readers(self.rt.pool))

    async def shutdown(self) -> None:
        for task in (self._maintenance, self._compaction, self._readers):
            if task is not None:
                task.cancel()
        if self.rt is not None:
            await self.rt.close()


class Outage:
    """Logs a database outage once when it starts and once when it ends, with
    the number of requests answered 503 meanwhile (one warning per request
    was 6,171 lines in 20 s)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.refused = 0

    def down(self, exc: BaseException) -> None:
        self.refused += 1
        if self.since is None:
            self.since = time.monotonic()
            log.warning("database unavailable (%s); answering 503 until it is back",
                        exc or type(exc).__name__)

    def up(self) -> None:
        if self.since is not None:
            log.warning("database available again after %.0f s; %d requests were answered 503",
                        time.monotonic() - self.since, self.refused)
            self.since, self.refused = None, 0


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
        except Exception:
            log.exception("maintenance failed")
        await asyncio.sleep(every)


async def _send(send, resp: Response) -> None:
    await send({"type": "http.response.start", "status": resp.status,
                "headers": [(b"content-type", resp.content_type),
                            (b"content-length", str(len(resp.body)).encode())] + resp.headers})
    await send({"type": "http.response.body", "body": resp.body})


async def _stream(send, resp: StreamingResponse, timeout: float) -> None:
    """Send a streamed body; a client that stops reading (a chunk not gone
    within ``timeout``, HALTLESS_SEND_TIMEOUT) or leaves ends it, and what it
    held (its database connection, its read slot) is given back at once."""
    try:
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": [(b"content-type", resp.content_type)] + resp.headers})
        try:
            async for chunk in resp.chunks:
                if chunk:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": chunk,
                                                 "more_body": True}), timeout)
        finally:
            await resp.chunks.aclose()  # gives its database connection back at once
        await send({"type": "http.response.body", "body": b""})
    finally:
        if resp.on_close is not None:
            resp.on_close()


app = App()

__all__ = ["ROUTES", "App", "Request", "Response", "app"]
