"""A mutation fuzzer for the HTTP API: many malformed and hostile requests,
counted by status; any 5xx is a failure (issue 10: 1,291 of 11,345 fuzzed
requests were 500s).

    .venv/bin/python -m bench.fuzz [--requests 10000] [--seed 1] [--concurrency 16]

Starts an embedded PostgreSQL and `haltless serve` (2 workers) on 127.0.0.1,
creates a key, a token, a machine and a source, then sends requests built
from valid ones with one or more mutations: hostile values in a field (huge
integers, NaN/Infinity, lone surrogates, bytes that are not UTF-8, NUL,
deep nesting, 1 MB strings, wrong types, bad host names), broken structure
(truncated, bytes flipped or inserted, wrong top-level shapes, 1,001
readings) and odd headers (gzip, good and broken; Idempotency-Key; other
encodings). The suite runs a smaller run of the same generator
(tests/test_fuzz.py). One JSON line goes to bench/results/fuzz-<date>.jsonl.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

HUGE = "1" * 5000
VALUES = [
    HUGE, "-" + HUGE, "1e400", "-1e400", "NaN", "Infinity", "-Infinity", '"\\ud800"', '"\\udfff x"',
    '"a\\u0000b"', '"\\u0000"', '""', "null", "true", "[]", "{}", '"x"', "0", "-0", "1.5",
    '"2026-13-45T99:99:99Z"', '"yesterday"', '"' + "x" * 300 + '"', '"' + "y" * 1_000_000 + '"',
    "[" * 2000 + "]" * 2000, "[" * 60_000 + "]" * 60_000, '{"a":' * 3000 + "1" + "}" * 3000,
    '"\\"\\\\\\/\\b\\f\\n\\r\\t"', '"\U0001f600"', '"\\uD83D\\uDE00"', "9223372036854775808",
    '"ns=2;i=1001"', '"' + "a" * 64 + '.example.com"', '"a..b"', '"."', '"127.0.0.1"',
    '"169.254.169.254"', '"[::1]"', '"metadata.google.internal"', "65536", "-1",
]
RAW_BYTES = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"\x80\x80"]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def reading_fields() -> dict:
    return {"machine_identifier": '"CNC-001"', "timestamp": json.dumps(_now()),
            "metric_name": '"temperature"', "value": "72.5", "unit": '"celsius"',
            "raw_tag": '"hr100"'}


def obj(fields: dict) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


def mutate_fields(rng: random.Random, fields: dict) -> dict:
    fields = dict(fields)
    for _ in range(rng.choice((1, 1, 2, 3))):
        what = rng.random()
        if what < 0.75 and fields:
            fields[rng.choice(list(fields))] = rng.choice(VALUES)
        elif what < 0.85 and fields:
            fields.pop(rng.choice(list(fields)))
        else:
            fields[rng.choice(["extra", "x", "\u00e9", "readings", ""])] = rng.choice(VALUES)
    return fields


def mutate_bytes(rng: random.Random, body: bytes) -> bytes:
    kind = rng.random()
    if kind < 0.3 and body:
        return body[:rng.randrange(len(body))]
    b = bytearray(body)
    for _ in range(rng.randint(1, 5)):
        if not b:
            break
        i = rng.randrange(len(b))
        if kind < 0.65:
            b[i] = rng.randrange(256)
        else:
            b[i:i] = rng.choice(RAW_BYTES)
    return bytes(b)


def ingest_body(rng: random.Random) -> bytes:
    shape = rng.random()
    if shape < 0.05:
        return rng.choice([b"", b"[]", b"null", b'"x"', b"{}", b'{"data": []}', b'{"readings": {}}',
                           b'{"readings": null}', b"\xff\xfe", b"{" * 100_000])
    if shape < 0.08:
        return ('{"readings": [' + ", ".join([obj(reading_fields())] * 1001) + "]}").encode()
    items = [obj(reading_fields()) for _ in range(rng.randint(0, 5))]
    if items or rng.random() < 0.5:
        i = rng.randrange(len(items) + 1)
        items.insert(i, obj(mutate_fields(rng, reading_fields())))
    body = ('{"readings": [' + ", ".join(items) + "]}").encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:
        # A hostile value (deep nesting, huge numbers, ...) under an unknown
        # top-level key, before or after "readings": the family whose deep
        # nesting answered 500 (issue 21).
        extra = '"' + rng.choice(["x", "data", "readings2", "\u0000"]) + '": ' + rng.choice(VALUES)
        readings = '"readings": [' + ", ".join(items) + "]"
        parts = [extra, readings] if rng.random() < 0.5 else [readings, extra]
        body = ("{" + ", ".join(parts) + "}").encode("utf-8", "surrogatepass")
    if rng.random() < 0.15:
        body = body.replace(b"CNC-001", rng.choice(RAW_BYTES) + b"CNC", 1)
    if rng.random() < 0.2:
        body = mutate_bytes(rng, body)
    return body


def management_body(rng: random.Random, machine_id: str) -> tuple[str, bytes]:
    if rng.random() < 0.3:
        fields = {"machine_identifier": json.dumps(f"M-{rng.randrange(10**9)}"), "name": '"m"'}
        path = "/api/v1/machines"
    else:
        reg = {"address": "100", "metric_name": '"t"', "count": "1", "register_type": '"holding"',
               "scale": "0.1", "data_type": '"int16"'}
        if rng.random() < 0.5:
            reg = mutate_fields(rng, reg)
        cfg = {"registers": "[" + obj(reg) + "]", "timeout_seconds": "1"}
        if rng.random() < 0.3:
            cfg = mutate_fields(rng, cfg)
        fields = {"machine_id": json.dumps(machine_id), "name": '"s"', "protocol": '"modbus"',
                  "host": '"10.1.2.3"', "port": "502", "poll_interval_seconds": "10",
                  "config": obj(cfg), "is_active": "false"}
        path = "/api/v1/ingest-sources"
    if rng.random() < 0.8:
        fields = mutate_fields(rng, fields)
    body = obj(fields).encode("utf-8", "surrogatepass")
    if rng.random() < 0.15:
        body = mutate_bytes(rng, body)
    return path, body


def make_request(rng: random.Random, key: str, token: str, machine_id: str,
                 source_id: str) -> tuple[str, str, dict, bytes]:
    """(method, path, headers, body) of one fuzzed request."""
    r = rng.random()
    headers = {"Content-Type": "application/json"}
    if r < 0.6:
        method, path, body = "POST", "/api/v1/ingest", ingest_body(rng)
        headers["X-API-Key"] = key if rng.random() < 0.95 else rng.choice(["", "hk_x", "x" * 300])
        if rng.random() < 0.1:
            headers["Idempotency-Key"] = rng.choice(["k" + str(rng.random()), "a b", "x\x7f", "x" * 300,
                                                     "\u00e9"])
    else:
        headers["Authorization"] = f"Bearer {token}" if rng.random() < 0.95 else "Bearer x.y.z"
        if r < 0.9:
            method = "POST"
            path, body = management_body(rng, machine_id)
        elif r < 0.95:
            method, path = "PATCH", f"/api/v1/ingest-sources/{source_id}"
            body = obj(mutate_fields(rng, {"name": '"n"', "port": "502", "host": '"10.1.2.3"',
                                           "is_active": "false"})).encode("utf-8", "surrogatepass")
        else:
            method, body = "GET", b""
            path = rng.choice(["/api/v1/machines/" + rng.choice([machine_id, "x", "%ff", "0" * 40]),
                               f"/api/v1/ingest-sources/{source_id}", "/api/v1/ingest-sources",
                               "/metrics", "/openapi.json", "/nope", "/api/v1/ingest"])
    if body and rng.random() < 0.1:
        enc = rng.choice(["gzip", "gzip", "br", "deflate"])
        headers["Content-Encoding"] = enc
        if enc == "gzip":
            body = gzip.compress(body)
            if rng.random() < 0.3:
                body = mutate_bytes(rng, body)
    return method, path, headers, body


async def fuzz(url: str, key: str, token: str, machine_id: str, source_id: str, n: int,
               seed: int = 1, concurrency: int = 16) -> dict:
    """Send n fuzzed requests; {status: count} plus up to 10 examples of 5xx."""
    import httpx

    rng = random.Random(seed)
    counts: dict[str, int] = {}
    bad: list = []
    transport: list = []  # requests that got no HTTP answer (client refused, or connection closed)
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(n):
        queue.put_nowait(make_request(rng, key, token, machine_id, source_id))

    async def worker(client):
        while not queue.empty():
            method, path, headers, body = queue.get_nowait()
            try:
                r = await client.request(method, url + path, content=body,
                                         headers={k: v.encode() for k, v in headers.items()})
                status = str(r.status_code)
                if r.status_code >= 500 and len(bad) < 10:
                    bad.append({"method": method, "path": path, "status": r.status_code,
                                "body": body[:300].decode("latin-1"), "answer": r.text[:300]})
            except httpx.HTTPError as exc:
                status = type(exc).__name__
                if len(transport) < 10 and status != "LocalProtocolError":
                    transport.append({"error": status, "detail": str(exc)[:200], "method": method,
                                      "path": path, "headers": {k: v[:40] for k, v in headers.items()
                                                                if k != "Authorization"},
                                      "body": body[:200].decode("latin-1")})
            counts[status] = counts.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"counts": dict(sorted(counts.items())), "server_errors": bad,
            "no_http_answer": transport}


async def add_source(dsn: str) -> tuple:
    """CNC-001 in the default organization and an inactive Modbus source of it:
    (organization id, machine id, source id)."""
    import uuid

    import asyncpg

    from haltless.server import store
    c = await asyncpg.connect(dsn)
    try:
        org = await store.org_id(c, None)
        machine = (await store.create_machine(c, org, "CNC-001"))["id"]
        sid = uuid.uuid4()
        await c.execute(
            "INSERT INTO ingest_sources (id, org_id, machine_id, name, protocol, host, port,"
            " poll_interval_seconds, is_active, config) VALUES ($1, $2, $3, 's', 'modbus',"
            " '10.1.2.3', 502, 10, false, $4::jsonb)", sid, org, machine,
            json.dumps({"registers": [{"address": 1, "metric_name": "t"}]}))
        return org, machine, sid
    finally:
        await c.close()


def main(argv=None) -> None:
    from bench import procstat as ps
    from bench import results
    from bench.run import haltless_server, setup_haltless
    from haltless.server.auth import issue_token, jwt_secret

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=results.RESULTS)
    args = ap.parse_args(argv)
    run = results.Run("fuzz", args.out)
    with ps.bench_postgres("haltless-fuzz-") as (work, dsn, _pg_pid, idle):
        run.header(results.versions("httpx", dsn=dsn), idle)
        data = work / "data"
        data.mkdir()
        key = asyncio.run(setup_haltless(dsn, []))
        org, machine, sid = asyncio.run(add_source(dsn))
        token = issue_token(jwt_secret(None, data), org, 3600)
        with haltless_server(dsn, data, 2, work / "server.log") as (_, port):
            started = time.monotonic()
            res = asyncio.run(fuzz(f"http://127.0.0.1:{port}", key, token, str(machine),
                                   str(sid), args.requests, args.seed, args.concurrency))
            took = time.monotonic() - started
        server_log = (work / "server.log").read_text(errors="replace")
        if "Traceback" in server_log:
            (run.out / "fuzz-last-server.log").write_text(server_log)
    fivexx = sum(v for k, v in res["counts"].items() if k.startswith("5"))
    record = {"requests": args.requests, "seed": args.seed,
              "seconds": round(took, 1), "5xx": fivexx,
              "tracebacks_in_server_log": server_log.count("Traceback"),
              "server_exceptions": sorted(set(re.findall(
                  r"\n([A-Za-z_][\w.]*(?:Error|Exception)\b[^\n]*)", server_log)))[:10], **res}
    print(json.dumps(record, indent=1))
    run.append([record])
    if fivexx:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
