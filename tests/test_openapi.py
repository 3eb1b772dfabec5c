"""The OpenAPI document at /openapi.json: it validates, it documents every
route with the parameters and limits its handler takes, and the live server
keeps to it (schemathesis, with real data behind the read operations)."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys

import pytest
import requests

from helpers import make_tenant, post, reading


def test_openapi_document_validates_and_carries_the_limits(server):
    from openapi_spec_validator import validate
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
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
    fails here (the read routes were once missing from the document)."""
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
    # Only the raw readings need a machine; aggregates without one are the fleet's.
    assert params["machine_identifier"]["required"] is (path == "/api/v1/readings")
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
           "--request-timeout", "30", "--workers", "2", "--max-time", "75",
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
