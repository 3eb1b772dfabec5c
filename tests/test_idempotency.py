"""Idempotency-Key on POST /api/v1/ingest: the key and its response are
stored with the rows; a retry gets the stored response and stores nothing."""
from __future__ import annotations

import json
import threading
import uuid

import requests

from helpers import fetchval, make_tenant, reading


def post(server, key, body, idem):
    h = {"X-API-Key": key, "Content-Type": "application/json"}
    if idem is not None:
        h["Idempotency-Key"] = idem
    return requests.post(server.url + "/api/v1/ingest", data=body, headers=h, timeout=30)


def test_a_retried_batch_with_the_same_key_stores_nothing_twice(server, pg_dsn, tenant):
    body = json.dumps({"readings": [reading(), reading("GHOST"), reading(metric="rpm")]})
    key = str(uuid.uuid4())
    first = post(server, tenant.key, body, key)
    assert first.status_code == 207 and "idempotency-replayed" not in first.headers
    assert first.json()["accepted_count"] == 2 and first.json()["rejected_count"] == 1
    again = post(server, tenant.key, body, key)
    assert again.status_code == 207 and again.headers["idempotency-replayed"] == "true"
    assert again.content == first.content
    assert tenant.count(pg_dsn) == 2
    stored = fetchval(pg_dsn, "SELECT count(*) FROM idempotency_keys WHERE org_id = $1", tenant.org_id)
    assert stored == 1
    # without a key the same body is new data
    assert post(server, tenant.key, body, None).json()["accepted_count"] == 2
    assert tenant.count(pg_dsn) == 4


def test_the_same_key_with_a_different_body_is_refused(server, pg_dsn, tenant):
    key = "batch-0001"
    assert post(server, tenant.key, json.dumps({"readings": [reading()]}), key).status_code == 207
    r = post(server, tenant.key, json.dumps({"readings": [reading(value=1.0)]}), key)
    assert r.status_code == 422 and "different request body" in r.json()["detail"]
    assert tenant.count(pg_dsn) == 1


def test_keys_are_scoped_to_the_organization(server, pg_dsn, tenant):
    other = make_tenant(pg_dsn, machines=("CNC-001",))
    body = json.dumps({"readings": [reading()]})
    assert post(server, tenant.key, body, "shared-key").json()["accepted_count"] == 1
    r = post(server, other.key, body, "shared-key")
    assert r.json()["accepted_count"] == 1 and "idempotency-replayed" not in r.headers
    assert tenant.count(pg_dsn) == 1 and other.count(pg_dsn) == 1


def test_concurrent_retries_of_one_key_store_the_batch_once(server, pg_dsn, tenant):
    body = json.dumps({"readings": [reading(metric=f"m{i}") for i in range(500)]})
    key = str(uuid.uuid4())
    out = []

    def send():
        r = post(server, tenant.key, body, key)
        out.append((r.status_code, r.json(), r.headers.get("idempotency-replayed")))

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _, _ in out] == [207] * 12
    assert all(b == out[0][1] for _, b, _ in out) and out[0][1]["accepted_count"] == 500
    assert sum(1 for *_, rep in out if rep is None) == 1
    assert tenant.count(pg_dsn) == 500


def test_an_empty_or_overlong_key_is_refused(server, tenant):
    body = json.dumps({"readings": [reading()]})
    for bad in ("", "x" * 256, "caf\u00e9".encode().decode("latin-1")):
        r = post(server, tenant.key, body, bad)
        assert r.status_code == 400 and "Idempotency-Key" in r.json()["detail"]
