"""GET /metrics (Prometheus text): counters summed exactly across the
server's workers, labels kept bounded, the workers' private run dir, and
every refused reading counted under the reason the ingestor gave it."""
from __future__ import annotations

import json
import os
import time

import pytest
import requests

from helpers import (ServerProcess, make_tenant, metric, multiproc_dir, now_iso, post, reading, scrape,
                     worker_counts)


def batch(n: int, machine="CNC-001") -> dict:
    return {"readings": [reading(machine, metric=f"m{i % 5}", value=float(i)) for i in range(n)]}


def test_metrics_count_every_reading_across_both_workers(server, pg_dsn):
    """Requests go to both workers (concurrent, fresh connections, until each
    worker has counted some of these: its own file in the metrics dir);
    /metrics, answered by one of them, sums both exactly."""
    from concurrent.futures import ThreadPoolExecutor
    srv = server
    t = make_tenant(pg_dsn, machines=("CNC-001", "CNC-002"))
    before = scrape(srv)
    by_worker = worker_counts(srv, "haltless_readings_accepted_total")
    totals = {"accepted": 0, "rejected": 0, "requests": 0}

    def one(_):
        body = batch(10)
        body["readings"].append(reading("NOPE"))  # one Machine not found each
        r = requests.post(srv.url + "/api/v1/ingest", data=json.dumps(body),
                          headers={"X-API-Key": t.key, "Connection": "close"}, timeout=10)
        assert r.status_code == 207, r.text
        return r.json()["accepted_count"], r.json()["rejected_count"]

    def workers_counted() -> int:
        now = worker_counts(srv, "haltless_readings_accepted_total")
        return sum(n > by_worker.get(w, 0) for w, n in now.items())

    deadline = time.monotonic() + 30
    while totals["requests"] < 20 or workers_counted() < 2:
        assert time.monotonic() < deadline, "one worker took every request for 30 s"
        with ThreadPoolExecutor(8) as pool:
            for a, r in pool.map(one, range(8)):
                totals["accepted"] += a
                totals["rejected"] += r
                totals["requests"] += 1
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


def test_every_answer_is_counted_405_and_404_included(server):
    """A request whose method the path does not take is answered 405 (with
    Allow) and counted under the path's route, like every other answer."""
    before = scrape(server)
    sources = "/api/v1/ingest-sources/{id}"
    for method, path in (("GET", "/api/v1/ingest"), ("PUT", "/api/v1/ingest"),
                         ("POST", "/api/v1/ingest-sources/abc"), ("GET", "/nope")):
        r = requests.request(method, server.url + path, timeout=10)
        assert r.status_code == (404 if path == "/nope" else 405), (method, path, r.text)
    after = scrape(server)

    def grew(**labels) -> float:
        return (metric(after, "haltless_http_requests_total", **labels)
                - metric(before, "haltless_http_requests_total", **labels))
    assert grew(route="/api/v1/ingest", status="405", method="GET") == 1
    assert grew(route="/api/v1/ingest", status="405", method="PUT") == 1
    assert grew(route=sources, status="405", method="POST") == 1
    assert grew(route="unmatched", status="404") == 1
    assert grew(status="405") == 3


def test_the_run_dir_is_private_and_removed_at_stop(pg_dsn, tmp_path):
    s = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn}, workers=1, data_dir=tmp_path)
    s.start(tmp_path / "server.log")
    try:
        d = os.path.dirname(multiproc_dir(s))
        assert os.stat(d).st_mode & 0o077 == 0
    finally:
        s.stop()
    assert not os.path.exists(d)


# ------------------------------------------------------------------ refusals, by reason

def rejected(text: str) -> dict[str, float]:
    """haltless_readings_rejected_total by reason."""
    out = {}
    for line in text.splitlines():
        if line.startswith('haltless_readings_rejected_total{reason="'):
            reason = line.split('"', 2)[1]
            out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def counted(srv, key: str, readings: list[str]) -> dict[str, float]:
    """POST one batch (its readings as JSON texts: NaN literals included) with
    one good reading first; what it added to each reason's count."""
    before = rejected(scrape(srv))
    body = '{"readings": [%s]}' % ", ".join([json.dumps(reading()), *readings])
    r = post(srv, key, body)
    assert r.status_code == 207, r.text
    assert r.json()["accepted_count"] == 1 and r.json()["rejected_count"] == len(readings), r.text
    after = rejected(scrape(srv))
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def ts(**delta) -> str:
    import datetime as dt
    return json.dumps(reading(ts=now_iso(dt.timedelta(**delta))))


REFUSED = {  # made when the test runs: the timestamps are relative to now
    "invalid": lambda: [  # the decoder's: a field missing, of the wrong type or too long, not an object
        '{"machine_identifier": "CNC-001", "timestamp": "%s", "value": 1.0}' % now_iso(),
        json.dumps(reading(value="72.5")), json.dumps(reading(ts="yesterday")),
        json.dumps(reading(metric="x" * 201)), '"not an object"'],
    "machine_not_found": lambda: [json.dumps(reading("NOPE-1")), json.dumps(reading("NOPE-2"))],
    "not_finite": lambda: [json.dumps(reading()).replace("72.5", v)
                           for v in ("NaN", "Infinity", "-Infinity", "1e400")],
    "timestamp_window": lambda: [ts(days=-3651), ts(minutes=6)],
}


@pytest.mark.parametrize("reason", sorted(REFUSED))
def test_refused_readings_are_counted_under_the_reason_the_ingestor_gave(server, pg_dsn, reason):
    t = make_tenant(pg_dsn)
    refused = REFUSED[reason]()
    assert counted(server, t.key, refused) == {reason: len(refused)}


def test_readings_older_than_the_retention_are_counted_as_retention(pg_dsn, tmp_path):
    """With HALTLESS_RETENTION_DAYS set, too old is "retention" however old
    (past the contract's 3,650 days too); too new is still "timestamp_window"."""
    s = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn, "HALTLESS_RETENTION_DAYS": "30"},
                      data_dir=tmp_path)
    s.start(tmp_path / "server.log")
    try:
        t = make_tenant(pg_dsn)
        got = counted(s, t.key, [ts(days=-31), ts(days=-400), ts(days=-3651), ts(minutes=6)])
    finally:
        s.stop()
    assert got == {"retention": 3, "timestamp_window": 1}
