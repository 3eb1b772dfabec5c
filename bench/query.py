"""Query benchmark (issue #9): the read side's three targets, on the storage
benchmark's realistic data (``bench/mix.py``), hot and then compacted.

    python -m bench.query [--metrics 20] [--repeat 20] [--workers 1] [--out bench/results/]

- ``raw``: GET /api/v1/readings, one series over one day at 1 s (86,400
  readings, limit 100,000) - target <= 30 ms;
- ``aggregate``: the same day at 1 minute, avg/min/max (1,440 buckets) -
  target <= 15 ms;
- ``latest``: GET /api/v1/readings/latest of an organization of 1,000
  series (the mix's fleet of 50 machines x 20 metrics) - target <= 10 ms.

Data: one machine ``DAY-001`` with ``--metrics`` of the mix's 20 metrics
polled once a second for the 24 hours before the last whole hour (bodies of
1,000 readings: every metric over 1,000 / metrics ticks, sent one after the
other), in its own organization; and 60 ticks of the whole fleet (agent
bodies) in another. Each query runs ``--repeat`` times after 3
warm-ups over one keep-alive connection on 127.0.0.1; the figures are the
server's own time (its ``Server-Timing: app;dur=`` header: the request's
arrival to its answer ready to send), which the targets are about, and the
wall time the client sees (that plus loopback HTTP and reading the answer
in Python), as median and p90. Then ``haltless compact`` and the same again. One JSON
line per (storage, query) and a markdown table go to ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import requests  # noqa: E402

from bench import mix  # noqa: E402
from bench import procstat as ps  # noqa: E402
from bench import results  # noqa: E402
from bench.run import haltless_server  # noqa: E402
from haltless.server import db, store  # noqa: E402
from haltless.server.auth import issue_token  # noqa: E402

HALTLESS = [sys.executable, "-m", "haltless.server.cli"]
TARGETS_MS = {"raw": 30.0, "aggregate": 15.0, "latest": 10.0}
DAY = 86_400


MEASURED = ("coolant_temp", "vibration_x")  # 0.1 steps (decimal blocks); full-precision floats


def chosen_metrics(n: int) -> list:
    """The measured two first, then the mix's other metrics up to n."""
    first = [m for m in mix.METRICS if m[0] in MEASURED]
    return (first + [m for m in mix.METRICS if m[0] not in MEASURED])[:max(2, n)]


def day_bodies(metrics: int, end_us: int, seed: int = 9):
    """``metrics`` of the mix's series of one machine, 86,400 ticks at 1 s."""
    rnd = random.Random(seed)
    first = end_us - (DAY - 1) * 1_000_000
    ts = [first + t * 1_000_000 + rnd.randint(-mix.JITTER_US, mix.JITTER_US) for t in range(DAY)]
    chosen = chosen_metrics(metrics)
    values = [mix._series(rnd, 0, name, kind, sp, sc, DAY) for name, _u, kind, sp, sc in chosen]
    stamps = [mix.iso_us(u) for u in ts]
    pre = [f'{{"machine_identifier":"DAY-001","metric_name":"{name}","unit":"{unit}",'
           f'"raw_tag":"{mix.raw_tag(0, j)}","timestamp":"' for j, (name, unit, *_r) in
           enumerate(chosen)]
    per_body = max(1, 1000 // metrics)
    for t0 in range(0, DAY, per_body):
        yield ('{"readings":[' + ",".join(
            f'{pre[j]}{stamps[t]}","value":{values[j][t]!r}}}'
            for t in range(t0, min(t0 + per_body, DAY)) for j in range(metrics)) + "]}").encode()


def send_all(url: str, key: str, bodies) -> int:
    s = requests.Session()
    n = 0
    for body in bodies:
        r = s.post(url + "/api/v1/ingest", data=body, timeout=60,
                   headers={"X-API-Key": key, "Content-Type": "application/json"})
        if r.status_code != 207 or r.json()["rejected_count"]:
            raise SystemExit(f"ingest failed: {r.status_code} {r.text[:300]}")
        n += r.json()["accepted_count"]
    return n


def timed(session, url, params, token, repeat, check) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        r = session.get(url, params=params, headers=headers, timeout=60)
        r.raise_for_status()
    rows = check(r.json())
    ms, server = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        r = session.get(url, params=params, headers=headers, timeout=60)
        ms.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        server.append(server_ms(r.headers.get("server-timing", "")))
    ms.sort()
    server.sort()
    return {"rows": rows, "median_ms": round(statistics.median(ms), 2),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2), "min_ms": round(ms[0], 2),
            "server_median_ms": round(statistics.median(server), 2),
            "server_p90_ms": round(server[int(0.9 * (len(server) - 1))], 2),
            "bytes": len(r.content)}


def server_ms(header: str) -> float:
    """The ``app;dur=`` of a Server-Timing header: the server's own time for
    the request, from its arrival to the answer ready to send (server/app.py)."""
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if name == "app" and rest.startswith("dur="):
            return float(rest[4:])
    raise ValueError(f"no Server-Timing app;dur= in {header!r}")


def measure(server_url, day_token, fleet_token, frm, to, repeat) -> list[dict]:
    s = requests.Session()

    def raw_rows(b):
        [series] = b["series"]
        assert b["next_cursor"] is None
        return len(series["values"])

    def agg_rows(b):
        [series] = b["series"]
        return len(series["buckets"])

    def latest_rows(b):
        return len(b["series"])
    out = []
    for metric in MEASURED:
        base = {"machine_identifier": "DAY-001", "metric_name": metric, "from": frm, "to": to}
        out.append({"query": "raw", "series": metric, **timed(
            s, server_url + "/api/v1/readings", {**base, "limit": 100_000}, day_token, repeat,
            raw_rows)})
        out.append({"query": "aggregate", "series": metric, **timed(
            s, server_url + "/api/v1/readings/aggregate",
            {**base, "interval": "1m", "agg": "avg,min,max"}, day_token, repeat, agg_rows)})
    out.append({"query": "latest", "series": "all", **timed(
        s, server_url + "/api/v1/readings/latest", {}, fleet_token, repeat, latest_rows)})
    return out


async def explain(dsn: str, org) -> None:
    from haltless.server.query import LATEST
    c = await asyncpg.connect(dsn)
    try:
        await c.fetch(LATEST, org, None)
        plan = await c.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + LATEST, org, None)
        print("\n".join(r[0] for r in plan), file=sys.stderr)
    finally:
        await c.close()


async def setup(dsn: str):
    c = await asyncpg.connect(dsn)
    try:
        await db.migrate(c)
        out = {}
        for org_name, machines in (("day", ["DAY-001"]), ("fleet", mix.machine_ids())):
            org = (await store.create_org(c, org_name))["id"]
            for m in machines:
                await store.create_machine(c, org, m)
            key, _ = await store.create_key(c, org, "bench")
            out[org_name] = (org, key)
        return out
    finally:
        await c.close()


def markdown(records: list[dict], head: dict) -> str:
    lines = [*results.header_lines(head, "Query benchmark"),
             f"- `haltless serve --workers {head['workers']}`; each query {head['repeat']} times "
             "after 3 warm-ups over one keep-alive connection; server time from Server-Timing",
             "",
             "| storage | query | series | rows | server median ms | server p90 ms "
             "| client median ms | client p90 ms | target ms (server) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['storage']} | {r['query']} | {r['series']} | {r['rows']:,} "
              f"| {r['server_median_ms']} | {r['server_p90_ms']} | {r['median_ms']} "
              f"| {r['p90_ms']} | {r['target_ms']:g} |" for r in records]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", type=int, default=20, help="series of DAY-001 (1-20)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=results.RESULTS)
    ap.add_argument("--explain", action="store_true",
                    help="print EXPLAIN ANALYZE of the latest query per storage")
    args = ap.parse_args(argv)
    run = results.Run("query", args.out)
    with ps.bench_postgres("haltless-bench-query-") as (work, dsn, _pg_pid, idle):
        head = run.header(results.versions("requests", dsn=dsn), idle,
                          workers=args.workers, repeat=args.repeat)
        orgs = asyncio.run(setup(dsn))
        env = {**os.environ, "HALTLESS_DATABASE_URL": dsn, "HALTLESS_DATA_DIR": str(work)}
        with haltless_server(dsn, work, args.workers, work / "serve.log") as (_, port):
            url = f"http://127.0.0.1:{port}"
            secret = (work / "jwt-secret").read_text().strip()
            day_token = issue_token(secret, orgs["day"][0], 3600)
            fleet_token = issue_token(secret, orgs["fleet"][0], 3600)
            end_us = (int(time.time()) // 3600 - 1) * 3_600_000_000  # a closed hour
            t = time.monotonic()
            day_n = send_all(url, orgs["day"][1], day_bodies(args.metrics, end_us))
            fleet = mix.generate(60 * mix.SERIES)
            fleet_n = send_all(url, orgs["fleet"][1], mix.bodies(fleet, "agent"))
            print(f"ingested {day_n:,} + {fleet_n:,} readings in {time.monotonic() - t:.1f} s",
                  file=sys.stderr)
            frm = mix.iso_us(end_us - DAY * 1_000_000)
            to = mix.iso_us(end_us + 1_000_000)
            records = []
            for storage in ("hot", "compacted"):
                if storage == "compacted":
                    out = subprocess.run(HALTLESS + ["compact"], env=env, capture_output=True,
                                         text=True, check=True).stdout.strip()
                    print(out, file=sys.stderr)
                if args.explain:
                    asyncio.run(explain(dsn, orgs["fleet"][0]))
                for rec in measure(url, day_token, fleet_token, frm, to, args.repeat):
                    rec = {"storage": storage, **rec, "target_ms": TARGETS_MS[rec["query"]],
                           "day_series": args.metrics, "day_readings": day_n,
                           "fleet_readings": fleet_n}
                    records.append(rec)
                    print(json.dumps(rec))
    md = markdown(records, head)
    print(md, file=sys.stderr)
    run.append(records, md)


if __name__ == "__main__":
    main()
