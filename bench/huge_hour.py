"""One series-hour beyond a block's limit (issue 21): ingest N readings
(default 20,000,000, over the codec's 16,777,216) of one series into one
hour, then read a 1 s window of it (limit=10) while it is hot, compact it
(`haltless compact`: time and peak RSS), and read the window again.

    .venv/bin/python -m bench.huge_hour [--readings 20000000] [--workers 2]

Starts an embedded PostgreSQL and `haltless serve` on 127.0.0.1. Reported:
ingest rate, the blocks (parts) compaction wrote, the compactor's peak RSS,
and per read its latency and how much the serving workers' RSS grew (the
sum over granian's workers, sampled before and after). One JSON line goes
to bench/results/huge_hour-<date>.jsonl. Before block parts (migration
0022) the compaction failed with "a block holds at most 16,777,216
readings" and stopped compaction for every tenant; a 1 s window inside a
75.6 M-reading hour added 1.14 GB to a worker (issue 21).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench import procstat as ps  # noqa: E402
from bench import results  # noqa: E402
from bench.hostile import server_rss as workers_rss  # noqa: E402
from bench.run import haltless_server, setup_haltless  # noqa: E402

PER_BODY = 1_000  # the contract's most readings per batch


def bodies(hour_us: int, n: int, step_us: int):
    seconds: dict[int, str] = {}
    for start in range(0, n, PER_BODY):
        parts = []
        for i in range(start, min(n, start + PER_BODY)):
            t = hour_us + i * step_us
            s, us = divmod(t, 1_000_000)
            if s not in seconds:
                seconds.clear()
                seconds[s] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
            stamp = f"{seconds[s]}.{us:06d}Z"
            parts.append('{"machine_identifier":"CNC-001","metric_name":"vib","timestamp":"'
                         f'{stamp}","value":{(i % 2000) / 10}}}')
        yield ('{"readings":[' + ",".join(parts) + "]}").encode()


def ingest(url: str, key: str, hour_us: int, n: int, step_us: int, threads: int = 4) -> float:
    """Post every body (in ``threads`` threads); the seconds it took."""
    gen = bodies(hour_us, n, step_us)
    lock = threading.Lock()
    errors: list[str] = []

    def work():
        with requests.Session() as s:
            while True:
                with lock:
                    body = next(gen, None)
                if body is None:
                    return
                r = s.post(url + "/api/v1/ingest", data=body, timeout=120,
                           headers={"X-API-Key": key, "Content-Type": "application/json"})
                if r.status_code != 207 or r.json()["rejected_count"]:
                    errors.append(r.text[:200])
    started = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise SystemExit(f"ingest failed: {errors[:2]}")
    return time.perf_counter() - started


def window_read(url: str, token: str, serve_pid: int, t0_us: int) -> dict:
    def iso(u):
        return dt.datetime.fromtimestamp(u / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")
    before = workers_rss(serve_pid)
    started = time.perf_counter()
    r = requests.get(url + "/api/v1/readings", timeout=600,
                     headers={"Authorization": f"Bearer {token}"},
                     params={"machine_identifier": "CNC-001", "from": iso(t0_us),
                             "to": iso(t0_us + 1_000_000), "limit": 10})
    ms = (time.perf_counter() - started) * 1000
    after = workers_rss(serve_pid)
    got = sum(len(s["values"]) for s in r.json()["series"]) if r.status_code == 200 else None
    return {"status": r.status_code, "readings": got, "ms": round(ms, 1),
            "workers_rss_mb_before": round(before, 1), "workers_rss_mb_after": round(after, 1)}


def compact(dsn: str) -> dict:
    env = {**os.environ, "HALTLESS_DATABASE_URL": dsn}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "haltless.server.cli", "compact"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    return {"seconds": round(time.perf_counter() - started, 1), "returncode": proc.returncode,
            "peak_rss_mb": round(peak / 2**20, 1), "stdout": out.strip()[-200:],
            "stderr": err.strip()[-300:]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=20_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=results.RESULTS)
    args = ap.parse_args(argv)
    run = results.Run("huge_hour", args.out)
    hour_us = (int(time.time()) // 3600 - 3) * 3600 * 1_000_000  # a past hour, whole
    step_us = 3_600_000_000 // args.readings
    with ps.bench_postgres("haltless-huge-hour-") as (work, dsn, _pg_pid, idle):
        run.header(results.versions(dsn=dsn), idle)
        key = asyncio.run(setup_haltless(dsn, ["CNC-001"]))
        with haltless_server(dsn, work / "data", args.workers, work / "server.log") as (srv, port):
            url = f"http://127.0.0.1:{port}"
            secs = ingest(url, key, hour_us, args.readings, step_us)
            from haltless.server.auth import issue_token
            org = asyncio.run(_org(dsn))
            token = issue_token((work / "data" / "jwt-secret").read_text().strip(), org, 3600)
            mid = hour_us + 1_800_000_000
            hot = window_read(url, token, srv.pid, mid)
            comp = compact(dsn)
            parts = asyncio.run(_parts(dsn))
            cold = window_read(url, token, srv.pid, mid)
            cold_again = window_read(url, token, srv.pid, mid + 600_000_000)
    record = {"readings": args.readings, "workers": args.workers,
              "ingest_s": round(secs, 1), "ingest_per_s": round(args.readings / secs),
              "read_hot": hot, "compact": comp, "blocks": parts, "read_compacted": cold,
              "read_compacted_elsewhere": cold_again}
    print(json.dumps(record, indent=1))
    run.append([record])


async def _org(dsn):
    import asyncpg
    c = await asyncpg.connect(dsn)
    try:
        return await c.fetchval("SELECT id FROM organizations WHERE is_default")
    finally:
        await c.close()


async def _parts(dsn):
    import asyncpg
    c = await asyncpg.connect(dsn)
    try:
        r = await c.fetchrow("SELECT count(*) AS parts, max(n) AS largest, sum(n) AS readings,"
                             " sum(length(vals)) AS value_bytes FROM reading_blocks")
        return dict(r)
    finally:
        await c.close()


if __name__ == "__main__":
    main()
