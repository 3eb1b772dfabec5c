"""Ingest bodies sent gzip-compressed (stored as if sent plain, the 10 MB
limit applied to what they decompress to, bombs and broken streams refused)
and the per-key rate limit (429 with Retry-After, nothing stored, one budget
for a key across workers and connections).

One server of its own (2 workers, HALTLESS_RATE_LIMIT set); every test uses
its own tenant, so the per-key limit of one does not touch the others."""
from __future__ import annotations

import gzip
import json
import socket
import zlib

import pytest
import requests

from helpers import ServerProcess, make_tenant, post, reading, wait_for, worker_counts

RATE = 500  # readings per second per key


@pytest.fixture(scope="module")
def srv(pg_dsn, tmp_path_factory):
    d = tmp_path_factory.mktemp("gzip-and-rate-limit")
    s = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn, "HALTLESS_RATE_LIMIT": str(RATE),
                       "HALTLESS_POLL_ALLOW": "127.0.0.0/8"}, workers=2, data_dir=d)
    s.start(d / "server.log")
    yield s
    s.stop()


def batch(n: int, machine="CNC-001") -> dict:
    return {"readings": [reading(machine, metric=f"m{i % 5}", value=float(i)) for i in range(n)]}


# ------------------------------------------------------------------ gzip

def test_a_gzip_body_is_decompressed_and_stored(srv, pg_dsn):
    t = make_tenant(pg_dsn)
    body = gzip.compress(json.dumps(batch(100)).encode())
    r = post(srv, t.key, body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 207 and r.json()["accepted_count"] == 100, r.text
    assert t.count(pg_dsn) == 100


def test_the_10_mb_limit_applies_to_the_decompressed_body(srv, pg_dsn):
    t = make_tenant(pg_dsn)
    inner = b'{"readings": [' + b" " * (11 * 1024 * 1024) + b"]}"
    r = post(srv, t.key, gzip.compress(inner), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decompressed" in r.json()["detail"], r.text


def test_a_decompression_bomb_is_refused_after_reading_no_more_than_the_limit(srv, pg_dsn):
    """1 GB of zeros gzips to ~1 MB; the server stops at the 10 MB of output
    the limit allows: it answers 413 to a client that has sent only the first
    11 MB's worth (~11 kB) of the bomb and waits, and a client that streams
    all of it gets the 413 too, not a dropped connection."""
    t = make_tenant(pg_dsn)
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    start = (comp.compress(b'{"readings": [') + comp.compress(b"\0" * (11 * 1024 * 1024))
             + comp.flush(zlib.Z_SYNC_FLUSH))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(b"POST /api/v1/ingest HTTP/1.1\r\nHost: x\r\nX-API-Key: " + t.key.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                  b"Content-Length: %d\r\n\r\n" % (1024 * 1024) + start)
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"decompressed" in answer, answer[:300]

    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def stream():
        zeros = b"\0" * (1024 * 1024)
        yield comp.compress(b'{"readings": [')
        for _ in range(1024):
            chunk = comp.compress(zeros)
            if chunk:
                yield chunk
        yield comp.flush()
    try:
        r = post(srv, t.key, stream(), headers={"Content-Encoding": "gzip"})
    except requests.ConnectionError:
        pytest.fail("the server dropped the connection instead of answering 413")
    assert r.status_code == 413, r.text
    assert t.count(pg_dsn) == 0


def test_bad_gzip_and_unknown_encodings_are_refused(srv, pg_dsn):
    t = make_tenant(pg_dsn)
    r = post(srv, t.key, b"not gzip at all", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["detail"]
    r = post(srv, t.key, gzip.compress(b'{"readings": []}')[:-5], headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "truncated" in r.json()["detail"], r.text
    r = post(srv, t.key, b"{}", headers={"Content-Encoding": "br"})
    assert r.status_code == 415 and "gzip" in r.json()["detail"]


# ------------------------------------------------------------------ rate limit

def test_over_the_rate_limit_gets_429_with_retry_after_and_stores_nothing(srv, pg_dsn):
    t = make_tenant(pg_dsn)
    assert post(srv, t.key, batch(RATE)).status_code == 207  # a full bucket
    stored = t.count(pg_dsn)
    refused = 0
    for _ in range(6):  # more than the bucket refills meanwhile, across both workers
        r = post(srv, t.key, batch(200))
        if r.status_code == 429:
            refused += 1
            assert int(r.headers["retry-after"]) >= 1
            assert "HALTLESS_RATE_LIMIT" in r.json()["detail"]
        else:
            stored += r.json()["accepted_count"]
    assert refused >= 3
    assert t.count(pg_dsn) == stored
    # another key is not limited by this one
    other = make_tenant(pg_dsn)
    assert post(srv, other.key, batch(100)).status_code == 207
    # and this one's bucket fills again (RATE a second): the same batch passes
    wait_for(lambda: post(srv, t.key, batch(200)).status_code == 207, timeout=10,
             what="the bucket to refill")


def test_the_limit_holds_across_workers_over_many_connections(pg_dsn, tmp_path):
    """A server of its own, whose limit (0.001 readings/s) lets one reading
    through per key and then none for 1,000 s: requests on fresh connections,
    until both workers have answered some, get exactly one reading in. With a
    bucket per worker each worker would let one through."""
    s = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn, "HALTLESS_RATE_LIMIT": "0.001"},
                      workers=2, data_dir=tmp_path)
    s.start(tmp_path / "server.log")
    try:
        t = make_tenant(pg_dsn)
        answered = dict(route="/api/v1/ingest", status="429")
        before = worker_counts(s, "haltless_http_requests_total", **answered)
        statuses = []

        def both_workers_refused() -> bool:
            r = post(s, t.key, batch(1), headers={"Connection": "close"})
            statuses.append(r.status_code)
            now = worker_counts(s, "haltless_http_requests_total", **answered)
            return len(now) == 2 and all(n > before.get(w, 0) for w, n in now.items())
        wait_for(both_workers_refused, timeout=30, every=0.05,
                 what="both workers to refuse the key")
    finally:
        s.stop()
    assert statuses.count(207) == 1 and set(statuses) == {207, 429}, statuses
    assert t.count(pg_dsn) == 1
