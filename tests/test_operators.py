"""What operators expect (issue 10): gzip bodies, per-key rate limits,
Prometheus metrics correct across workers, an OpenAPI document that
validates and that the live server keeps to (schemathesis).

One server of its own (2 workers, HALTLESS_RATE_LIMIT set); every test uses
its own tenant, so the per-key limit of one does not touch the others."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import subprocess
import sys
import time
import zlib

import pytest
import requests

from helpers import ServerProcess, make_tenant, post, reading

RATE = 500  # readings per second per key


@pytest.fixture(scope="module")
def srv(pg_dsn, tmp_path_factory):
    d = tmp_path_factory.mktemp("operators")
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
    the limit allows, having read only a small part of the compressed body."""
    t = make_tenant(pg_dsn)
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    sent = 0

    def stream():
        nonlocal sent
        zeros = b"\0" * (1024 * 1024)
        yield comp.compress(b'{"readings": [')
        for _ in range(1024):
            chunk = comp.compress(zeros)
            sent += len(chunk)
            if chunk:
                yield chunk
        yield comp.flush()
    started = time.monotonic()
    try:
        r = post(srv, t.key, stream(), headers={"Content-Encoding": "gzip"})
    except requests.ConnectionError:
        pytest.fail("the server dropped the connection instead of answering 413")
    assert r.status_code == 413, r.text
    assert time.monotonic() - started < 20
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
    time.sleep(1.2)  # a second later the bucket is full again
    assert post(srv, t.key, batch(200)).status_code == 207


def test_the_limit_holds_across_workers_over_many_connections(srv, pg_dsn):
    """Fresh connections land on either worker: the key's budget is shared."""
    t = make_tenant(pg_dsn)
    started = time.monotonic()
    accepted = 0
    while time.monotonic() - started < 3:
        r = requests.post(srv.url + "/api/v1/ingest", data=json.dumps(batch(50)),
                          headers={"X-API-Key": t.key, "Connection": "close"}, timeout=10)
        if r.status_code == 207:
            accepted += r.json()["accepted_count"]
    took = time.monotonic() - started
    # one full bucket plus RATE per second; per-worker buckets would allow twice that
    assert accepted <= RATE + RATE * took + 50, (accepted, took)


# ------------------------------------------------------------------ metrics

def scrape(srv) -> str:
    r = requests.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_every_reading_across_both_workers(srv, pg_dsn):
    """Requests go to both workers (concurrent, fresh connections, until each
    worker has counted some); /metrics, answered by one of them, sums both
    exactly."""
    from concurrent.futures import ThreadPoolExecutor
    t = make_tenant(pg_dsn, machines=("CNC-001", "CNC-002"))
    before = scrape(srv)
    totals = {"accepted": 0, "rejected": 0, "requests": 0}

    def one(_):
        body = batch(10)
        body["readings"].append(reading("NOPE"))  # one Machine not found each
        r = requests.post(srv.url + "/api/v1/ingest", data=json.dumps(body),
                          headers={"X-API-Key": t.key, "Connection": "close"}, timeout=10)
        if r.status_code == 207:
            return r.json()["accepted_count"], r.json()["rejected_count"]
        assert r.status_code == 429, r.text
        return 0, 0

    def workers_counted() -> int:
        files = os.listdir(_multiproc_dir(srv))
        return len({f for f in files if f.startswith("counter_")})

    deadline = time.monotonic() + 30
    while totals["requests"] < 20 or workers_counted() < 2:
        assert time.monotonic() < deadline, "one worker took every request for 30 s"
        with ThreadPoolExecutor(8) as pool:
            for a, r in pool.map(one, range(8)):
                totals["accepted"] += a
                totals["rejected"] += r
                totals["requests"] += 1
        time.sleep(0.2)  # the per-key rate limit (RATE/s) refills
    assert requests.request("FUZZ-METHOD-X", srv.url + "/nope/abc", timeout=10).status_code == 404
    after = scrape(srv)
    assert "FUZZ-METHOD-X" not in after and "/nope/abc" not in after  # labels stay bounded
    assert totals["accepted"] >= 100
    assert (metric(after, "haltless_readings_accepted_total")
            - metric(before, "haltless_readings_accepted_total")) == totals["accepted"]
    assert (metric(after, "haltless_readings_rejected_total", reason="machine_not_found")
            - metric(before, "haltless_readings_rejected_total", reason="machine_not_found")
            ) == totals["rejected"]
    assert metric(after, "haltless_http_requests_total", route="/api/v1/ingest", status="207") >= 10
    for name in ("haltless_http_request_duration_seconds_bucket", "haltless_group_commit_requests_count",
                 "haltless_group_commit_seconds_count", "haltless_db_pool_connections",
                 "haltless_poller_sources", "haltless_poller_overdue_seconds"):
        assert name in after, name


def _multiproc_dir(srv) -> str:
    import psutil
    granian = psutil.Process(srv.proc.pid).children()[0]
    return granian.environ()["PROMETHEUS_MULTIPROC_DIR"]


def test_the_run_dir_is_private_and_removed_at_stop(pg_dsn, tmp_path):
    s = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn}, workers=1, data_dir=tmp_path)
    s.start(tmp_path / "server.log")
    try:
        d = os.path.dirname(_multiproc_dir(s))
        assert os.stat(d).st_mode & 0o077 == 0
    finally:
        s.stop()
    assert not os.path.exists(d)


# ------------------------------------------------------------------ OpenAPI

def test_openapi_document_validates_and_carries_the_limits(srv):
    from openapi_spec_validator import validate
    doc = requests.get(srv.url + "/openapi.json", timeout=10).json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    assert schemas["IngestBatch"]["properties"]["readings"]["maxItems"] == 1000
    assert schemas["Reading"]["properties"]["timestamp"]["format"] == "date-time"
    assert schemas["Reading"]["properties"]["machine_identifier"]["maxLength"] == 200
    ops = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert ("post", "/api/v1/ingest") in ops and ("patch", "/api/v1/ingest-sources/{id}") in ops


def test_openapi_documents_every_route_but_the_static_files():
    """A route added to the table without its operation in the document
    fails here (the read routes were missing until issue 9's follow-up)."""
    from haltless.server.app import ROUTES
    from haltless.server.openapi import document
    doc = json.loads(document())
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    served = {(m, p) for m, p, *_ in ROUTES}
    assert served - documented == {("GET", "/static/{name}")}
    assert documented <= served


READ_PARAMS = {"/api/v1/readings": "READINGS_PARAMS",
               "/api/v1/readings/aggregate": "AGGREGATE_PARAMS",
               "/api/v1/readings/latest": "LATEST_PARAMS"}


@pytest.mark.parametrize("path", sorted(READ_PARAMS))
def test_read_operations_document_the_parameters_their_handler_takes(path):
    from openapi_spec_validator import validate
    from haltless.server import query
    from haltless.server.openapi import document
    doc = json.loads(document())
    validate(doc)
    op = doc["paths"][path]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert list(params) == list(getattr(query, READ_PARAMS[path]))
    assert all(p["in"] == "query" for p in params.values())
    assert op["security"] == [{"bearer": []}]
    for code in ("401", "404", "422"):
        assert op["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}
    assert params["machine_identifier"]["required"] is (path != "/api/v1/readings/latest")
    if path == "/api/v1/readings/latest":
        return
    assert params["from"]["required"] and params["to"]["required"]
    assert params["from"]["schema"] == {"type": "string", "format": "date-time"}
    assert params["metric_name"]["schema"]["type"] == "array"
    assert params["metric_name"]["explode"] is True  # ?metric_name=a&metric_name=b


def test_the_read_limits_in_the_document_are_the_handlers_limits():
    from haltless.server import query
    from haltless.server.openapi import document
    doc = json.loads(document())
    readings = {p["name"]: p for p in doc["paths"]["/api/v1/readings"]["get"]["parameters"]}
    assert readings["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100_000,
                                           "default": 10_000}
    assert readings["format"]["schema"]["enum"] == ["json", "csv"]
    ok = doc["paths"]["/api/v1/readings"]["get"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/csv"}
    agg = {p["name"]: p for p in doc["paths"]["/api/v1/readings/aggregate"]["get"]["parameters"]}
    assert agg["agg"]["schema"]["items"]["enum"] == list(query.AGGREGATES)
    assert agg["agg"]["explode"] is False  # ?agg=avg,min
    assert agg["agg"]["schema"]["default"] == ["avg", "min", "max", "count"]
    pattern = re.compile(agg["interval"]["schema"]["pattern"])
    for good in ("1s", "15m", "1h", "31d"):
        assert pattern.search(good) and query._interval(good)
    assert pattern.search("9999999s")  # the pattern is the syntax; 1s to 31d is said in words
    for bad in ("0s", "1", "1w", "m", "01m", "1.5h", "12345678s"):
        assert not pattern.search(bad)
    schemas = doc["components"]["schemas"]
    stamps = schemas["SeriesReadings"]["properties"]["timestamps"]
    assert stamps["items"] == {"type": "string", "format": "date-time"}
    assert schemas["LatestReading"]["properties"]["timestamp"]["format"] == "date-time"
    assert schemas["SeriesBuckets"]["properties"]["buckets"]["items"]["format"] == "date-time"


def read_side_data(srv, pg_dsn, t) -> tuple[list[str], list[str]]:
    """Readings of CNC-001 (`temperature`, the document's example, and
    `vibration`) over the last two hours: the older part compacted into
    blocks, the rest hot. Returns (from, to) values that fall in that data."""
    from test_storage import compact
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    start = now - dt.timedelta(hours=2)

    def send(first: int, last: int) -> None:
        rs = [reading("CNC-001", metric=m, value=v, unit=u, raw_tag=g,
                      ts=(start + dt.timedelta(seconds=15 * i)).isoformat())
              for i in range(first, last)
              for m, v, u, g in (("temperature", 20 + 0.1 * (i % 50), "celsius", "ns2_i1001"),
                                 ("vibration", [-0.0, 5e-324, 0.1, 1e300][i % 4], None, None))]
        for k in range(0, len(rs), 1000):
            r = post(srv, t.key, {"readings": rs[k:k + 1000]})
            assert r.status_code == 207 and r.json()["rejected_count"] == 0, r.text
    send(0, 240)  # the first hour
    compact(pg_dsn)
    send(240, 470)  # up to now, hot
    iso = lambda d: d.isoformat().replace("+00:00", "Z")  # noqa: E731
    # every start before every end: a reversed range is the fuzzer's to find
    starts = [iso(start), iso(start + dt.timedelta(minutes=50)),
              iso(start + dt.timedelta(minutes=65, seconds=3))]
    ends = [iso(start + dt.timedelta(minutes=70, seconds=7)), iso(now - dt.timedelta(minutes=3)),
            iso(now + dt.timedelta(minutes=1))]
    return starts, ends


def schemathesis_config(path, starts: list[str], ends: list[str]) -> None:
    """Most generated read requests name the machine that has data and a
    range that holds some (dictionaries, drawn with probability 0.85), the
    rest whatever schemathesis generates."""
    quoted = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # noqa: E731
    path.write_text(f"""
[dictionaries.machines]
values = ["CNC-001"]
[dictionaries.starts]
values = {quoted(starts)}
[dictionaries.ends]
values = {quoted(ends)}

[parameters]
"query.machine_identifier" = {{ dictionary = "machines", probability = 0.85 }}
"query.from" = {{ dictionary = "starts", probability = 0.85 }}
"query.to" = {{ dictionary = "ends", probability = 0.85 }}
""")


def read_answers(har_path) -> dict:
    """(path, status, what) -> count from schemathesis's HAR report; what is
    "data" for a 200 that holds readings, "empty" for one that holds none."""
    from collections import Counter
    from urllib.parse import urlsplit
    counts: Counter = Counter()
    for e in json.loads(har_path.read_text())["log"]["entries"]:
        path, status = urlsplit(e["request"]["url"]).path, e["response"]["status"]
        if not path.startswith("/api/v1/readings"):
            continue
        what = "refused"
        if status == 200:
            content = e["response"]["content"]
            text = content.get("text", "")
            if "csv" in content.get("mimeType", ""):
                what = "csv" if text.count("\n") > 1 else "empty"
            else:
                series = json.loads(text)["series"]
                what = "data" if any(s.get("timestamps") or s.get("buckets") or s.get("timestamp")
                                     for s in series) else "empty"
        counts[(path, status, what)] += 1
    return counts


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_response_breaking_the_document(server, pg_dsn, tmp_path):
    """Against the suite's server (no rate limit, so ingest is exercised
    rather than answered 429), with readings stored hot and compacted so
    that the read operations answer with data. The coverage phase is left
    out: schemathesis 4.32 crashes in it on this document (a KeyError inside
    its own coverage generator), which says nothing about the server."""
    srv = server
    t = make_tenant(pg_dsn, machines=("CNC-001",))
    token = srv.token(t.org_id)
    schemathesis_config(tmp_path / "schemathesis.toml", *read_side_data(srv, pg_dsn, t))
    st = os.path.join(os.path.dirname(sys.executable), "st")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    cmd = [st, "--config-file", str(tmp_path / "schemathesis.toml"), "run",
           srv.url + "/openapi.json", "--checks",
           "not_a_server_error,status_code_conformance,content_type_conformance,"
           "response_schema_conformance", "--max-examples", "15", "--seed", "10",
           "--phases", "examples,fuzzing,stateful",
           "-H", f"Authorization: Bearer {token}", "-H", f"X-API-Key: {t.key}",
           "--request-timeout", "30", "--workers", "2", "--max-time", "150",
           "--suppress-health-check", "all", "--no-color",
           "--report", "har", "--report-har-path", str(tmp_path / "run.har")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    text = out.stdout + out.stderr
    (tmp_path / "schemathesis.txt").write_text(text)
    assert out.returncode == 0, text[-6000:]
    assert re.search(r"\d+ passed", text) or "passed" in text, text[-3000:]
    assert "Server error" not in srv.log()
    counts = read_answers(tmp_path / "run.har")
    (tmp_path / "read-answers.txt").write_text(
        "\n".join(f"{p} {s} {w}: {n}" for (p, s, w), n in sorted(counts.items())))
    for path in ("/api/v1/readings", "/api/v1/readings/aggregate", "/api/v1/readings/latest"):
        assert counts[(path, 200, "data")] >= 20, counts  # real data came back, not only 4xx
        assert counts[(path, 404, "refused")] + counts[(path, 422, "refused")] >= 20, counts
    (tmp_path / "run.har").unlink()  # ~50 MB; the counts are kept beside the output
