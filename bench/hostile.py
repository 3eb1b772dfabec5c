"""Resource-exhaustion figures of issue 10: /healthz latency and server RSS
while 2,500 idle connections and 100 clients holding 10 MB bodies are open,
and RSS after they are gone.

    .venv/bin/python -m bench.hostile [--workers 2] [--idle 2500] [--bodies 100]

Starts an embedded PostgreSQL and `haltless serve` (default settings) on
127.0.0.1, then, in order: warms up with ingest traffic; opens the idle
connections (no byte sent); starts the body clients - half without a key
(answered 401 before their body is read) and half with a valid key, each
declaring Content-Length 10 MB - 1 and sending all but the last byte; while
all of that is held, measures /healthz (median of 21 fresh connections) and
samples RSS; closes everything and measures RSS again after 5 s. RSS is the
sum over granian's main process and its workers. One JSON line goes to
bench/results/hostile-<date>.jsonl.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import socket
import statistics
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
from bench.run import haltless_server, setup_haltless  # noqa: E402

BIG = 10 * 1024 * 1024 - 1


def server_rss(serve_pid: int) -> float:
    total = 0
    for p in psutil.Process(serve_pid).children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def healthz_ms(url: str, n: int = 21) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        requests.get(url + "/healthz", timeout=30)
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def body_client(port: int, key: str | None, statuses: list, stop: threading.Event) -> None:
    head = (b"POST /api/v1/ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + (b"X-API-Key: " + key.encode() + b"\r\n" if key else b"")
            + b"Content-Length: %d\r\n\r\n" % BIG)
    chunk = b" " * (1024 * 1024)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head + b'{"readings": [')
            sent = 15
            try:
                while sent < BIG - 1 - len(chunk):
                    s.sendall(chunk)
                    sent += len(chunk)
                s.sendall(b" " * (BIG - 1 - sent))  # all but the last byte: held
            except OSError:
                pass  # answered (401/503) and closed before we were done
            s.settimeout(0.2)
            data = b""
            while not stop.is_set() and not data:
                try:
                    data = s.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    break
            statuses.append(int(data.split(b" ", 2)[1]) if data else "held")
    except OSError as exc:
        statuses.append(type(exc).__name__)


def probe(url: str, key: str, port: int, srv, args) -> dict:
    """The measurements, on a running server: idle connections, then body
    clients holding 10 MB bodies, /healthz and RSS throughout."""
    idle: list[socket.socket] = []
    stop = threading.Event()
    try:
        return _probe(url, key, port, srv, args, idle, stop)
    finally:
        stop.set()
        for s in idle:
            s.close()


def _probe(url: str, key: str, port: int, srv, args, idle: list, stop) -> dict:
    out: dict = {}
    threads: list[threading.Thread] = []
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = json.dumps({"readings": [{"machine_identifier": "CNC-001", "timestamp": now,
                                     "metric_name": f"m{i}", "value": i} for i in range(100)]})
    for _ in range(200):
        requests.post(url + "/api/v1/ingest", data=body, headers={"X-API-Key": key}, timeout=30)
    time.sleep(1)
    out["rss_start_mb"] = round(server_rss(srv.pid), 1)
    out["healthz_ms_idle_server"] = healthz_ms(url)

    for _ in range(args.idle):
        idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    out["healthz_ms_with_idle"] = healthz_ms(url)

    statuses: list = []
    for i in range(args.bodies):
        t = threading.Thread(target=body_client,
                             args=(port, key if i % 2 else None, statuses, stop), daemon=True)
        t.start()
        threads.append(t)
    peak = 0.0
    t_end = time.monotonic() + 4
    while time.monotonic() < t_end:
        peak = max(peak, server_rss(srv.pid))
        time.sleep(0.2)
    out["healthz_ms_with_idle_and_bodies"] = healthz_ms(url)
    peak = max(peak, server_rss(srv.pid))
    out["rss_peak_mb"] = round(peak, 1)
    stop.set()
    for s in idle:
        s.close()
    for t in threads:
        t.join(30)
    counts: dict = {}
    for st in statuses:
        counts[str(st)] = counts.get(str(st), 0) + 1
    out["body_clients"] = counts
    time.sleep(5)
    out["rss_after_mb"] = round(server_rss(srv.pid), 1)
    out["rss_after_minus_start_mb"] = round(out["rss_after_mb"] - out["rss_start_mb"], 1)
    out["healthz_ms_after"] = healthz_ms(url)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--idle", type=int, default=2500)
    ap.add_argument("--bodies", type=int, default=100)
    ap.add_argument("--out", type=Path, default=results.RESULTS)
    args = ap.parse_args(argv)
    run = results.Run("hostile", args.out)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    with ps.bench_postgres("haltless-hostile-") as (work, dsn, _pg_pid, idle):
        run.header(results.versions(dsn=dsn), idle)
        key = asyncio.run(setup_haltless(dsn, ["CNC-001"]))
        with haltless_server(dsn, work / "data", args.workers, work / "server.log") as (srv, port):
            out = probe(f"http://127.0.0.1:{port}", key, port, srv, args)
    record = {"workers": args.workers, "idle_connections": args.idle, "body_clients": args.bodies,
              **out}
    print(json.dumps(record, indent=1))
    run.append([record])


if __name__ == "__main__":
    main()
