"""The baseline: POST /api/v1/ingest the way a typical team would write it.

FastAPI + pydantic v2 models of the contract + asyncpg, one row per reading
in ``baseline_readings``. It is a correct implementation of the same contract
("HTTP Push"): 401 on a missing/unknown key, per-reading errors in a 207
``{accepted_count, rejected_count, errors}``, 400/413/422 for bad requests,
and it only answers after the accepted rows are committed.

Per request: hash the key and look it up, validate the body with pydantic
(whole batch at once; reading by reading only when that fails, so one bad
reading does not reject the others), look the batch's machines up, check
finite values and the timestamp window in Python, then ``executemany`` the
accepted rows in one transaction.

Run:  BASELINE_DATABASE_URL=postgresql://... uvicorn bench.baseline_app:app
Setup of an organization, its machines and a key: ``setup()`` below.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import math
import os
import secrets
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

MAX_READINGS = 1000
MAX_BODY_BYTES = 10 * 1024 * 1024
PAST_LIMIT = dt.timedelta(days=3650)
FUTURE_LIMIT = dt.timedelta(minutes=5)
KEY_PREFIX = "hk_"
UTC = dt.timezone.utc

SCHEMA = """
CREATE TABLE IF NOT EXISTS baseline_organizations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS baseline_api_keys (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id uuid NOT NULL REFERENCES baseline_organizations (id) ON DELETE CASCADE,
    key_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE TABLE IF NOT EXISTS baseline_machines (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id uuid NOT NULL REFERENCES baseline_organizations (id) ON DELETE CASCADE,
    machine_identifier text NOT NULL,
    name text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, machine_identifier)
);
CREATE TABLE IF NOT EXISTS baseline_readings (
    id bigserial PRIMARY KEY,
    machine_id uuid NOT NULL,
    ts timestamptz NOT NULL,
    metric_name text NOT NULL,
    value double precision NOT NULL,
    unit text,
    raw_tag text
);
CREATE INDEX IF NOT EXISTS baseline_readings_machine_metric_ts
    ON baseline_readings (machine_id, metric_name, ts);
"""

INSERT = ("INSERT INTO baseline_readings (machine_id, ts, metric_name, value, unit, raw_tag)"
          " VALUES ($1, $2, $3, $4, $5, $6)")
DB_DOWN = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
           asyncpg.InterfaceError, asyncpg.CannotConnectNowError)


# ------------------------------------------------------------------ models

class Reading(BaseModel):
    machine_identifier: str = Field(min_length=1, max_length=200)
    timestamp: dt.datetime
    metric_name: str = Field(min_length=1, max_length=200)
    value: float
    unit: str | None = Field(default=None, max_length=64)
    raw_tag: str | None = Field(default=None, max_length=200)


class IngestRequest(BaseModel):
    readings: list[Reading]


class ReadingError(BaseModel):
    index: int
    machine_identifier: str | None
    error: str


class IngestResponse(BaseModel):
    accepted_count: int
    rejected_count: int
    errors: list[ReadingError]


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _describe(exc: ValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    return f"{where}: {e['msg']}" if where else e["msg"]


def parse_batch(body: bytes) -> tuple[list[Reading | None], dict[int, ReadingError]]:
    """Readings (None where invalid) and the errors of the invalid ones."""
    try:
        readings = IngestRequest.model_validate_json(body).readings
        if len(readings) > MAX_READINGS:
            raise _too_many(len(readings))
        return list(readings), {}
    except ValidationError:
        pass
    # Slow path: something is wrong; find out what, reading by reading.
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("readings"), list):
        raise HTTPException(422, 'request body must be a JSON object {"readings": [...]}')
    raw = doc["readings"]
    if len(raw) > MAX_READINGS:
        raise _too_many(len(raw))
    readings: list[Reading | None] = []
    errors: dict[int, ReadingError] = {}
    for i, item in enumerate(raw):
        try:
            readings.append(Reading.model_validate(item))
        except ValidationError as exc:
            readings.append(None)
            ident = item.get("machine_identifier") if isinstance(item, dict) else None
            errors[i] = ReadingError(index=i, machine_identifier=ident if isinstance(ident, str)
                                     else None, error=_describe(exc))
    return readings, errors


def _too_many(n: int) -> HTTPException:
    return HTTPException(422, f"batch has {n} readings; the limit is {MAX_READINGS} per request")


# ------------------------------------------------------------------ app

@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.pool = await asyncpg.create_pool(os.environ["BASELINE_DATABASE_URL"],
                                               min_size=2, max_size=10)
    yield
    await app.state.pool.close()


app = FastAPI(title="baseline ingest", lifespan=lifespan)


async def authenticate(pool: asyncpg.Pool, key: str | None):
    if not key:
        raise HTTPException(401, "missing X-API-Key header")
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        raise HTTPException(401, "invalid API key")
    org_id = await pool.fetchval(
        "SELECT org_id FROM baseline_api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        hash_key(key))
    if org_id is None:
        raise HTTPException(401, "invalid or revoked API key")
    return org_id


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


@app.post("/api/v1/ingest", status_code=207, response_model=IngestResponse)
async def ingest(request: Request):
    pool: asyncpg.Pool = request.app.state.pool
    try:
        org_id = await authenticate(pool, request.headers.get("x-api-key"))
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body too large: the limit is {MAX_BODY_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body too large: the limit is {MAX_BODY_BYTES} bytes")
        readings, errors = parse_batch(body)

        now = dt.datetime.now(UTC)
        oldest, newest = now - PAST_LIMIT, now + FUTURE_LIMIT
        idents = list({r.machine_identifier for r in readings if r is not None})
        async with pool.acquire() as conn:
            machines = {row["machine_identifier"]: row["id"] for row in await conn.fetch(
                "SELECT machine_identifier, id FROM baseline_machines"
                " WHERE org_id = $1 AND machine_identifier = ANY($2::text[])", org_id, idents)}
            rows = []
            for i, r in enumerate(readings):
                if r is None:
                    continue
                ts = r.timestamp if r.timestamp.tzinfo else r.timestamp.replace(tzinfo=UTC)
                if not math.isfinite(r.value):
                    problem = "Value must be finite"
                elif ts < oldest:
                    problem = "Timestamp is more than 3,650 days in the past"
                elif ts > newest:
                    problem = "Timestamp is more than 5 minutes in the future"
                elif r.machine_identifier not in machines:
                    problem = "Machine not found"
                else:
                    rows.append((machines[r.machine_identifier], ts, r.metric_name, r.value,
                                 r.unit, r.raw_tag))
                    continue
                errors[i] = ReadingError(index=i, machine_identifier=r.machine_identifier,
                                         error=problem)
            if rows:
                async with conn.transaction():
                    await conn.executemany(INSERT, rows)
    except DB_DOWN:
        raise HTTPException(503, "the database is unavailable; nothing was stored, retry later",
                            headers={"Retry-After": "5"}) from None
    out = [errors[i].model_dump() for i in sorted(errors)]
    return JSONResponse(status_code=207, content={
        "accepted_count": len(rows), "rejected_count": len(out), "errors": out})


# ------------------------------------------------------------------ setup

async def setup(dsn: str, machine_identifiers: list[str], org_name: str = "bench") -> str:
    """Create the baseline tables, an organization with these machines, and a
    new API key for it; returns the key (only its SHA-256 is stored)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        org_id = await conn.fetchval(
            "INSERT INTO baseline_organizations (name) VALUES ($1)"
            " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id", org_name)
        await conn.executemany(
            "INSERT INTO baseline_machines (org_id, machine_identifier) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING", [(org_id, m) for m in machine_identifiers])
        key = KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        await conn.execute("INSERT INTO baseline_api_keys (org_id, key_hash) VALUES ($1, $2)",
                           org_id, hash_key(key))
        return key
    finally:
        await conn.close()


if __name__ == "__main__":
    import sys
    if len(sys.argv) < 3 or sys.argv[1] != "setup":
        sys.exit("usage: python -m bench.baseline_app setup DSN MACHINE_IDENTIFIER...")
    print(asyncio.run(setup(sys.argv[2], sys.argv[3:])))
