"""GET /metrics (Prometheus text): counters summed exactly across the
server's workers, labels kept bounded, the workers' private run dir, and
every refused reading counted under the reason the ingestor gave it."""
from __future__ import annotations

import json
import os
import time

import requests

from helpers import ServerProcess, make_tenant, reading


def batch(n: int, machine="CNC-001") -> dict:
    return {"readings": [reading(machine, metric=f"m{i % 5}", value=float(i)) for i in range(n)]}


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


def test_metrics_count_every_reading_across_both_workers(server, pg_dsn):
    """Requests go to both workers (concurrent, fresh connections, until each
    worker has counted some); /metrics, answered by one of them, sums both
    exactly."""
    from concurrent.futures import ThreadPoolExecutor
    srv = server
    t = make_tenant(pg_dsn, machines=("CNC-001", "CNC-002"))
    before = scrape(srv)
    totals = {"accepted": 0, "rejected": 0, "requests": 0}

    def one(_):
        body = batch(10)
        body["readings"].append(reading("NOPE"))  # one Machine not found each
        r = requests.post(srv.url + "/api/v1/ingest", data=json.dumps(body),
                          headers={"X-API-Key": t.key, "Connection": "close"}, timeout=10)
        assert r.status_code == 207, r.text
        return r.json()["accepted_count"], r.json()["rejected_count"]

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
