"""The management API (``Authorization: Bearer <JWT>``): machines, ingest
sources and test-connection, as in the contract's "Direct ingestion" and
"Testing connections". Every query is scoped to the token's organization."""
from __future__ import annotations

import time
import uuid

from ..core.errors import ReaderError, Unauthorized
from ..core.wire import Machine, MachineCreate, SourceCreate, SourcePatch, TestConnectionResult
from ..pollers.readers import outer_timeout, probe_reader, probe_subscriber, subscribes
from . import sources, store
from .auth import verify_claims
from .devices import reader_for, subscriber_for
from .http import Request, Response

# organization -> (until (monotonic), tokens valid after (Unix seconds) or None)
_known_orgs: dict[uuid.UUID, tuple[float, float | None]] = {}
ORG_CACHE_SECONDS = 5.0


async def authorize(app, req: Request) -> uuid.UUID:
    """The organization of the request's bearer token (checked before the
    body is read); 401 when the token is invalid, names an organization that
    does not exist (any more), or was issued before the organization's
    tokens were revoked (``haltless token revoke``; seen within
    ORG_CACHE_SECONDS)."""
    org, issued = verify_claims(app.rt.jwt_secret, req.header(b"authorization"))
    now = time.monotonic()
    known = _known_orgs.get(org)
    if known is None or known[0] <= now:
        row = await app.rt.pool.fetchrow(
            "SELECT extract(epoch FROM tokens_valid_after)::float8 AS after"
            " FROM organizations WHERE id = $1", org)
        if row is None:
            raise Unauthorized(f"the token's organization {org} does not exist (deleted?); "
                               "issue a new token with `haltless token create`")
        if len(_known_orgs) > 10_000:
            _known_orgs.clear()
        known = _known_orgs[org] = (now + ORG_CACHE_SECONDS, row["after"])
    if known[1] is not None and issued < known[1]:
        raise Unauthorized("token revoked (`haltless token revoke` was run after it was issued); "
                           "issue a new one with `haltless token create`")
    return org


def _machine(r) -> Machine:
    return Machine(r["id"], r["machine_identifier"], r["name"], r["created_at"])


# ------------------------------------------------------------------ machines

async def create_machine(app, req: Request) -> Response:
    org = req.org
    body = sources.decode_body(req.body, MachineCreate)
    async with app.rt.pool.acquire() as conn:
        row = await store.create_machine(conn, org, body.machine_identifier, body.name)
    app.rt.ingestor.catalog.forget_absent(org, body.machine_identifier)
    return Response(201, _machine(row))


async def list_machines(app, req: Request) -> Response:
    org = req.org
    async with app.rt.pool.acquire() as conn:
        rows = await store.list_machines(conn, org)
    return Response(200, [_machine(r) for r in rows])


async def get_machine(app, req: Request) -> Response:
    org = req.org
    mid = req.uuid_param("id", "machine")
    async with app.rt.pool.acquire() as conn:
        return Response(200, _machine(await store.get_machine(conn, org, mid)))


# ------------------------------------------------------------------ ingest sources

async def create_source(app, req: Request) -> Response:
    org = req.org
    body = sources.decode_body(req.body, SourceCreate)
    async with app.rt.pool.acquire() as conn:
        out = await sources.create(conn, org, body, app.rt.box,
                                   app.rt.policy)
    return Response(201, out)


async def list_sources(app, req: Request) -> Response:
    org = req.org
    async with app.rt.pool.acquire() as conn:
        return Response(200, await sources.list_all(conn, org))


async def get_source(app, req: Request) -> Response:
    org = req.org
    sid = req.uuid_param("id", "ingest source")
    async with app.rt.pool.acquire() as conn:
        return Response(200, sources.to_wire(await sources.get_row(conn, org, sid)))


async def patch_source(app, req: Request) -> Response:
    org = req.org
    sid = req.uuid_param("id", "ingest source")
    body = sources.decode_body(req.body, SourcePatch)
    async with app.rt.pool.acquire() as conn:
        out = await sources.patch(conn, org, sid, body, app.rt.box,
                                  app.rt.policy)
    return Response(200, out)


async def delete_source(app, req: Request) -> Response:
    org = req.org
    sid = req.uuid_param("id", "ingest source")
    async with app.rt.pool.acquire() as conn:
        await sources.delete(conn, org, sid)
    return Response(204, b"")


async def test_connection(app, req: Request) -> Response:
    """Connect and read the configured points once (a subscribed source:
    subscribe, wait for the first notification, delete the subscription):
    {success, message, latency_ms}."""
    org = req.org
    sid = req.uuid_param("id", "ingest source")
    async with app.rt.pool.acquire() as conn:
        row = await sources.get_row(conn, org, sid)
    source = sources.stored(row, app.rt.box)
    timeout = outer_timeout(source.config.timeout_seconds)
    start = time.monotonic()
    try:
        if subscribes(source.protocol, source.config):
            subscriber = await subscriber_for(source, interval=float(row["poll_interval_seconds"]),
                                              policy=app.rt.policy, pool=app.rt.pool,
                                              pki_dir=app.rt.pki_dir)
        else:
            reader = await reader_for(source, policy=app.rt.policy, pool=app.rt.pool,
                                      pki_dir=app.rt.pki_dir)
    except ReaderError as exc:
        ok, message = False, str(exc)
    else:
        if subscribes(source.protocol, source.config):
            # the first notification comes one publishing interval after the subscription
            wait = timeout + subscriber.publishing_interval
            ok, message = await probe_subscriber(subscriber, len(source.config.nodes), wait)
        else:
            ok, message = await probe_reader(reader, timeout)
    return Response(200, TestConnectionResult(ok, message,
                                              round((time.monotonic() - start) * 1000)))


LIMIT = 1024 * 1024
ROUTES = [
    ("POST", "/api/v1/machines", create_machine, LIMIT, "jwt"),
    ("GET", "/api/v1/machines", list_machines, 0, "jwt"),
    ("GET", "/api/v1/machines/{id}", get_machine, 0, "jwt"),
    ("POST", "/api/v1/ingest-sources", create_source, LIMIT, "jwt"),
    ("GET", "/api/v1/ingest-sources", list_sources, 0, "jwt"),
    ("GET", "/api/v1/ingest-sources/{id}", get_source, 0, "jwt"),
    ("PATCH", "/api/v1/ingest-sources/{id}", patch_source, LIMIT, "jwt"),
    ("DELETE", "/api/v1/ingest-sources/{id}", delete_source, 0, "jwt"),
    ("POST", "/api/v1/ingest-sources/{id}/test-connection", test_connection, LIMIT, "jwt"),
]
