"""POST /api/v1/ingest against the real server process and PostgreSQL, case
by case as in the contract ("HTTP Push", docs/contract.md): what is stored,
who may write, whole-batch refusals, per-reading errors, concurrency."""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import socket
import threading

import requests

from helpers import (fetch, fetchval, make_tenant, now_iso, post, reading, wait_for,
                     wait_until_every_worker_refuses)

CONTRACT_EXAMPLE = '''
import requests
import time

API_KEY = "hk_your_api_key"
API_URL = "https://api.haltless.io/api/v1/ingest"

readings = [
{
"machine_identifier": "CNC-001",
"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
"metric_name": "temperature",
"value": 72.5,
"unit": "celsius",
},
{
"machine_identifier": "CNC-001",
"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
"metric_name": "vibration",
"value": 3.2,
"unit": "mm/s",
},
]

response = requests.post(
API_URL,
json={"readings": readings},
headers={"X-API-Key": API_KEY},
)

print(response.json())
'''


# ------------------------------------------------------------------ contract

def test_contract_python_example_runs_verbatim_with_only_the_url_changed(server, pg_dsn):
    t = make_tenant(pg_dsn, machines=("CNC-001",), key="hk_your_api_key")
    code = CONTRACT_EXAMPLE.replace("https://api.haltless.io", server.url)
    assert code.count(server.url) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "contract_example.py", "exec"), {})
    assert out.getvalue().strip() == "{'accepted_count': 2, 'rejected_count': 0, 'errors': []}"
    rows = fetch(pg_dsn, "SELECT metric_name, unit, value FROM readings WHERE org_id = $1"
                 " ORDER BY metric_name", t.org_id)
    assert [tuple(r) for r in rows] == [("temperature", "celsius", 72.5), ("vibration", "mm/s", 3.2)]


def test_accepted_readings_are_stored_with_every_field(server, pg_dsn, tenant):
    ts = "2026-04-04T10:30:00Z"
    ts = now_iso(-dt.timedelta(minutes=3))
    r = post(server, tenant.key, {"readings": [reading(unit="celsius", raw_tag="ns2_i1001", ts=ts)]})
    assert r.status_code == 207
    assert r.json() == {"accepted_count": 1, "rejected_count": 0, "errors": []}
    row = fetch(pg_dsn, "SELECT machine_identifier, metric_name, unit, raw_tag, value, timestamp"
                " FROM readings WHERE org_id = $1", tenant.org_id)[0]
    assert row["machine_identifier"] == "CNC-001" and row["raw_tag"] == "ns2_i1001"
    assert row["unit"] == "celsius" and row["value"] == 72.5
    assert row["timestamp"] == dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_timestamp_offsets_fractions_and_js_toisostring_are_stored_as_utc(server, pg_dsn, tenant):
    base = dt.datetime.now(dt.timezone.utc).replace(microsecond=123456) - dt.timedelta(minutes=1)
    plus2 = base.astimezone(dt.timezone(dt.timedelta(hours=2)))
    forms = [
        base.strftime("%Y-%m-%dT%H:%M:%SZ"),                       # seconds, Z
        base.strftime("%Y-%m-%dT%H:%M:%S.") + f"{base.microsecond // 1000:03d}Z",  # toISOString()
        plus2.isoformat(),                                          # +02:00 offset, microseconds
        base.replace(tzinfo=None).isoformat(),                      # naive: documented as UTC
    ]
    body = {"readings": [reading(metric=f"m{i}", ts=f) for i, f in enumerate(forms)]}
    r = post(server, tenant.key, body)
    assert r.json() == {"accepted_count": 4, "rejected_count": 0, "errors": []}
    got = {r["metric_name"]: r["timestamp"] for r in fetch(
        pg_dsn, "SELECT metric_name, timestamp FROM readings WHERE org_id = $1", tenant.org_id)}
    assert got["m0"] == base.replace(microsecond=0)
    assert got["m1"] == base.replace(microsecond=123000)
    assert got["m2"] == base
    assert got["m3"] == base


# ------------------------------------------------------------------ auth

def test_missing_unknown_and_revoked_keys_get_401_and_store_nothing(server, pg_dsn, tenant):
    body = {"readings": [reading()]}
    for key, expect in [(None, "missing X-API-Key"), ("hk_not_a_real_key", "invalid"),
                        ("Bearer something", "invalid")]:
        r = post(server, key, body)
        assert r.status_code == 401, key
        assert expect in r.json()["detail"]
    assert tenant.count(pg_dsn) == 0
    # Revoke, then wait until every worker has seen it (each caches a key for
    # HALTLESS_AUTH_CACHE_SECONDS, 0.5 s here).
    assert post(server, tenant.key, body).status_code == 207
    key_id = fetchval(pg_dsn, "SELECT id FROM api_keys WHERE org_id = $1", tenant.org_id)
    fetch(pg_dsn, "UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    wait_until_every_worker_refuses(server, tenant.key)
    r = post(server, tenant.key, body)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert tenant.count(pg_dsn) == 1


def test_a_key_cannot_write_into_another_organizations_machines(server, pg_dsn, tenant):
    other = make_tenant(pg_dsn, machines=("SECRET-9",))
    r = post(server, tenant.key, {"readings": [reading("SECRET-9"), reading("CNC-001")]})
    assert r.json() == {"accepted_count": 1, "rejected_count": 1, "errors": [
        {"index": 0, "machine_identifier": "SECRET-9", "error": "Machine not found"}]}
    assert other.count(pg_dsn) == 0
    # Same identifier in two organizations: each key writes into its own.
    twin = make_tenant(pg_dsn, machines=("CNC-001",))
    assert post(server, twin.key, {"readings": [reading("CNC-001")] * 3}).json()["accepted_count"] == 3
    assert twin.count(pg_dsn) == 3 and tenant.count(pg_dsn) == 1


# ------------------------------------------------------------------ whole-batch errors

def test_more_than_1000_readings_is_refused_naming_the_limit(server, pg_dsn, tenant):
    r = post(server, tenant.key, {"readings": [reading()] * 1001})
    assert r.status_code == 422
    assert "1,001" in r.json()["detail"] and "1,000" in r.json()["detail"]
    assert post(server, tenant.key, {"readings": [reading()] * 1000}).json()["accepted_count"] == 1000
    assert tenant.count(pg_dsn) == 1000


def test_body_over_10_mb_gets_413_before_it_is_read(server, pg_dsn, tenant):
    big = b'{"readings": [' + b" " * (10 * 1024 * 1024) + b"]}"
    r = post(server, tenant.key, big)
    assert r.status_code == 413 and "10,485,760" in r.json()["detail"]
    # Without Content-Length (chunked), the server stops reading at the limit.
    def chunks():
        yield b'{"readings": ['
        for _ in range(11):
            yield b" " * (1024 * 1024)
        yield b"]}"
    r = post(server, tenant.key, chunks())
    assert r.status_code == 413
    # A lying Content-Length is refused as well, without waiting for the body.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/ingest HTTP/1.1\r\nHost: x\r\nX-API-Key: " + tenant.key.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")
    assert tenant.count(pg_dsn) == 0


def test_malformed_json_and_wrong_shapes_are_refused_with_a_reason(server, tenant):
    cases = [
        (b'{"readings": [', 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not"),
        (b'[{"machine_identifier": "CNC-001"}]', 422, '{"readings": [...]}'),
        (b'{"data": []}', 422, '{"readings": [...]}'),
        (b'{"readings": {"a": 1}}', 422, '"readings" must be an array'),
        (b"", 400, "not valid JSON"),
    ]
    for body, status, text in cases:
        r = post(server, tenant.key, body)
        assert r.status_code == status, (body, r.text)
        assert text in r.json()["detail"], (body, r.json())


def test_unknown_paths_and_methods_answer_json(server):
    r = requests.get(server.url + "/api/v1/nope", timeout=5)
    assert r.status_code == 404 and "no such endpoint" in r.json()["detail"]
    r = requests.get(server.url + "/api/v1/ingest", timeout=5)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


# ------------------------------------------------------------------ per-reading errors

def test_per_reading_errors_reject_only_that_reading(server, pg_dsn, tenant):
    readings = [
        reading(),                                                   # 0 ok
        reading("UNKNOWN-001"),                                      # 1
        reading(value=float("nan")),                                 # 2 NaN literal
        reading(value=float("inf")),                                 # 3 Infinity literal
        reading(value=float("-inf")),                                # 4 -Infinity literal
        reading(ts=now_iso(-dt.timedelta(days=3651))),               # 5 too old
        reading(ts=now_iso(dt.timedelta(minutes=6))),                # 6 too new
        {"machine_identifier": "CNC-002", "timestamp": now_iso(), "value": 1.0},  # 7 no metric
        reading(value="72.5"),                                       # 8 wrong type
        reading(ts="yesterday"),                                     # 9 bad timestamp
        "not an object",                                             # 10
        reading("CNC-002", ts=now_iso(-dt.timedelta(days=3649))),    # 11 ok, old but inside
        reading("PRESS-7", ts=now_iso(dt.timedelta(minutes=4))),     # 12 ok, a little ahead
        reading(metric="x" * 201),                                   # 13 too long
    ]
    body = json.dumps({"readings": readings})  # allow_nan=True: writes NaN/Infinity literals
    assert "NaN" in body and "-Infinity" in body
    r = post(server, tenant.key, body)
    assert r.status_code == 207
    res = r.json()
    assert res["accepted_count"] == 3 and res["rejected_count"] == 11
    errs = {e["index"]: e for e in res["errors"]}
    assert sorted(errs) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13]
    assert errs[1] == {"index": 1, "machine_identifier": "UNKNOWN-001", "error": "Machine not found"}
    for i in (2, 3, 4):
        assert errs[i]["error"] == "Value must be finite" and errs[i]["machine_identifier"] == "CNC-001"
    assert "3,650 days in the past" in errs[5]["error"]
    assert "5 minutes in the future" in errs[6]["error"]
    assert "metric_name" in errs[7]["error"] and "missing" in errs[7]["error"]
    assert errs[7]["machine_identifier"] == "CNC-002"
    assert errs[8]["error"].startswith("value:")
    assert errs[9]["error"].startswith("timestamp:")
    assert errs[10] == {"index": 10, "machine_identifier": None,
                        "error": "reading must be a JSON object; got a string"}
    assert errs[13]["error"].startswith("metric_name:") and "200" in errs[13]["error"]
    assert tenant.count(pg_dsn) == 3


def test_a_number_too_large_for_a_double_is_not_finite(server, pg_dsn, tenant):
    body = '{"readings": [%s, %s]}' % (
        json.dumps(reading()), json.dumps(reading()).replace("72.5", "1e400"))
    assert post(server, tenant.key, body).json() == {
        "accepted_count": 1, "rejected_count": 1,
        "errors": [{"index": 1, "machine_identifier": "CNC-001", "error": "Value must be finite"}]}


def test_a_machine_added_while_serving_is_found_on_the_next_batch(server, pg_dsn, tenant):
    body = {"readings": [reading("LATE-1")]}
    assert post(server, tenant.key, body).json()["errors"][0]["error"] == "Machine not found"
    fetch(pg_dsn, "INSERT INTO machines (org_id, machine_identifier) VALUES ($1, 'LATE-1')",
          tenant.org_id)
    # Unknown identifiers are remembered for HALTLESS_AUTH_CACHE_SECONDS (0.5 s
    # here): refused (and not stored) until then, accepted after.
    wait_for(lambda: post(server, tenant.key, body).json()["accepted_count"] == 1, timeout=10,
             every=0.1, what="the new machine to be found")
    assert tenant.count(pg_dsn, "LATE-1") == 1


def test_empty_batch_is_accepted_with_zero_counts(server, tenant):
    assert post(server, tenant.key, {"readings": []}).json() == {
        "accepted_count": 0, "rejected_count": 0, "errors": []}


# ------------------------------------------------------------------ concurrency

def test_many_concurrent_clients_get_right_counts_and_every_ack_is_stored(server, pg_dsn, tenant):
    results = []
    errors = []

    def client(n: int) -> None:
        s = requests.Session()
        for b in range(8):
            rs = [reading(("CNC-001", "CNC-002", "PRESS-7")[i % 3], metric=f"m{i % 17}",
                          value=float(i)) for i in range(200)]
            bad = (n + b) % 4
            for j in range(bad):
                rs[j * 7]["machine_identifier"] = "GHOST"
            try:
                r = s.post(server.url + "/api/v1/ingest", data=json.dumps({"readings": rs}),
                           headers={"X-API-Key": tenant.key}, timeout=60)
                results.append((r.status_code, r.json(), bad))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 24 * 8
    for status, body, bad in results:
        assert status == 207
        assert body["accepted_count"] == 200 - bad and body["rejected_count"] == bad
    assert tenant.count(pg_dsn) == sum(b["accepted_count"] for _, b, _ in results)


# ------------------------------------------------------------------ health

def test_healthz_and_readyz(server):
    assert requests.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(server.url + "/readyz", timeout=5).json() == {"status": "ready"}
