"""One node vs a three-node Citus cluster on the same box: ingest (both write
shapes), compaction and reads, in one run.

    python -m bench.citus [--duration 10] [--shapes agent,wide] [--connections 64]
                          [--out bench/results/]

Targets, each started fresh: ``single`` is the embedded PostgreSQL the other
benchmarks use (bench/procstat.start_bench_postgres); ``citus`` is a
coordinator and two workers on 127.0.0.1 (server/localcluster.py, fsync on, the
same durability as the single node). For each: the ingest benchmark's
haltless target (bench/run.run_target: readings/s counted in the database)
per shape, then reads of the hot store, ``haltless compact``, and the same
reads of the blocks. One box cannot show a speed-up: three postmasters share
its cores, so this measures the cluster's overhead and that nothing breaks
(bench/README "Citus").
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench import procstat as ps  # noqa: E402
from bench import results  # noqa: E402
from bench import run as ingest  # noqa: E402
from haltless.server.localcluster import CitusCluster  # noqa: E402
from haltless.server import db  # noqa: E402
from haltless.core.config import Settings  # noqa: E402

QUERIES = {
    # one series, the last two hours: the read API's hot path (one shard on Citus)
    "one series, 2 h": "SELECT count(*) FROM readings_between($1, now() - interval '2 hours', now())",
    # one machine's 20 series, the last two hours, series by series: on Citus
    # they sit on different shards, 20 single-shard tasks (what distributing
    # by machine would turn into one)
    "one machine, 2 h": "SELECT count(*) FROM series s, LATERAL readings_between(s.id,"
                        " now() - interval '2 hours', now()) r WHERE s.machine_id = $1",
}


def node_pids(cluster: CitusCluster) -> list[int]:
    return cluster.postmasters_running()


def cpu_of(roots: list[int]) -> list[float]:
    return [ps.cpu_seconds(ps.tree(p)) for p in roots]


async def _reads(dsn: str, repeat: int = 3) -> dict:
    conn = await db.connect(dsn)
    try:
        sid, machine = await conn.fetchrow(
            "SELECT id, machine_id FROM series ORDER BY id LIMIT 1")
        out = {}
        for name, sql in QUERIES.items():
            args = [sid] if name.startswith("one series") else [machine]
            times, n = [], None
            for _ in range(repeat):
                t0 = time.perf_counter()
                n = await conn.fetchval(sql, *args)
                times.append(1000 * (time.perf_counter() - t0))
            out[name] = {"rows": n, "median_ms": round(statistics.median(times), 2),
                         "min_ms": round(min(times), 2)}
        return out
    finally:
        await conn.close()


async def _at_rest(dsn: str) -> dict:
    """Compacted bytes per reading: values, and timestamps (timelines), which
    one node shares between the series of a machine and Citus cannot."""
    conn = await db.connect(dsn)
    try:
        n, vals, blocks = await conn.fetchrow(
            "SELECT sum(n), sum(length(vals)), count(*) FROM reading_blocks")
        ts, timelines = await conn.fetchrow("SELECT sum(length(ts)), count(*) FROM reading_timelines")
        return {"readings": n, "blocks": blocks, "timelines": timelines,
                "values_b_per_reading": round(vals / n, 3) if n else None,
                "timestamps_b_per_reading": round(ts / n, 3) if n else None}
    finally:
        await conn.close()


def compact(dsn: str) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "haltless.server.cli", "compact"], cwd=ROOT,
                       env={**os.environ, "HALTLESS_DATABASE_URL": dsn}, capture_output=True,
                       text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"haltless compact failed:\n{p.stderr[-2000:]}")
    return {"seconds": round(time.perf_counter() - t0, 2), "output": p.stdout.strip()}


def run_one(target: str, args, stamp: str) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix=f"haltless-bench-{target}-"))
    work.chmod(0o755)
    cluster = None
    records = []
    try:
        if target == "single":
            dsn, pg_pid, busy, hogs = ps.start_bench_postgres(work)
            roots = [pg_pid]
        else:
            cluster = CitusCluster(workers=2, fsync=True, settings=args.citus_settings).start()
            dsn = cluster.dsn
            roots = node_pids(cluster)
            busy, hogs = ps.idle_check()
        for shape in args.shapes:
            (work / shape).mkdir()
            a = argparse.Namespace(**{**vars(args), "shape": shape, "only": "haltless",
                                      "out": work / shape})
            before = cpu_of(roots)
            t0 = time.monotonic()
            r = ingest.run_target("haltless", dsn, roots[0], a, work / shape, stamp)
            wall = time.monotonic() - t0
            used = [b - a for a, b in zip(before, cpu_of(roots))]
            r.update(target=target, shape=shape, busy_before_run={"cpu_pct": busy, "top": hogs},
                     postgres_cpu_pct_whole_target={
                         ("coordinator" if i == 0 else f"worker{i}") if cluster else "postgres":
                         round(100 * u / wall, 1) for i, u in enumerate(used)})
            records.append(r)
        reads = {"hot": asyncio.run(_reads(dsn))}
        reads["compaction"] = compact(dsn)
        reads["blocks"] = asyncio.run(_reads(dsn))
        reads["at_rest"] = asyncio.run(_at_rest(dsn))
        records.append({"target": target, "shape": "reads", **reads})
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(work, ignore_errors=True)
        else:
            ps.stop_bench_postgres(work)
    return records


def markdown(records: list[dict], head: dict) -> str:
    ld = head["load"]
    lines = [
        *results.header_lines(head, "Citus benchmark (one node vs coordinator + 2 workers, same box)"),
        f"- load: {ld['tool']}, {ld['connections']} connections, {ld['duration_s']:g} s per shape, "
        f"{ld['workers']} `haltless serve` workers with {ld['writer_connections']} writer "
        f"connection(s) each; Citus settings {ld['citus_settings'] or 'none'}; the idle check of "
        "each target is in its records", "",
        "| target | shape | readings/s | vs single | p50 / p99 ms | PostgreSQL CPU % of a core"
        " (whole target) | server CPU % |", "|---|---|---:|---:|---|---|---:|"]
    single = {r["shape"]: r["readings_per_s"] for r in records
              if r["target"] == "single" and "readings_per_s" in r}
    for r in records:
        if "readings_per_s" not in r:
            continue
        base = single.get(r["shape"])
        lat = r["latency_ms"]
        lines.append(
            f"| {r['target']} | {r['shape']} | {r['readings_per_s']:,.0f} | "
            f"{r['readings_per_s'] / base:.2f} | {lat.get('p50')} / {lat.get('p99')} | "
            f"{r['postgres_cpu_pct_whole_target']} | {r['cpu_pct_of_one_core']['server']} |"
            if base else f"| {r['target']} | {r['shape']} | {r['readings_per_s']:,.0f} | - | |")
    lines += ["", "| target | query | hot: rows, median ms | blocks: rows, median ms |",
              "|---|---|---|---|"]
    for r in records:
        if r["shape"] != "reads":
            continue
        for q in QUERIES:
            h, b = r["hot"][q], r["blocks"][q]
            lines.append(f"| {r['target']} | {q} | {h['rows']:,}, {h['median_ms']} |"
                         f" {b['rows']:,}, {b['median_ms']} |")
        lines.append(f"| {r['target']} | `haltless compact` | | {r['compaction']['seconds']} s:"
                     f" {r['compaction']['output']} |")
        if "at_rest" in r:
            a = r["at_rest"]
            lines.append(f"| {r['target']} | at rest, bytes/reading | | values"
                         f" {a['values_b_per_reading']}, timestamps {a['timestamps_b_per_reading']}"
                         f" ({a['blocks']:,} blocks, {a['timelines']:,} timelines) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.citus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="timed load per shape (s)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="haltless serve worker processes")
    p.add_argument("--bodies", type=int, default=100)
    p.add_argument("--shapes", default="agent,wide")
    p.add_argument("--targets", default="single,citus")
    p.add_argument("--out", type=Path, default=results.RESULTS)
    p.add_argument("--citus-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a postgresql.conf line for every Citus node (repeatable)")
    args = p.parse_args(argv)
    args.citus_settings = dict(kv.split("=", 1) for kv in args.citus_setting)
    reason = CitusCluster.skip_reason()
    if reason:
        p.error(reason)
    args.shapes = args.shapes.split(",")
    args.use_wrk = shutil.which("wrk") is not None
    args.profile = False
    run = results.Run("citus", args.out)
    head = run.header(
        results.versions(wrk=args.use_wrk),
        load={"tool": "wrk" if args.use_wrk else "builtin", "duration_s": args.duration,
              "connections": args.connections, "workers": args.workers,
              "writer_connections": int(os.environ.get(
                  "HALTLESS_WRITER_CONNECTIONS", Settings().writer_connections)),
              "citus_settings": args.citus_settings})
    records = []
    for target in args.targets.split(","):
        print(f"=== {target}")
        records += run_one(target, args, run.run_id)
    md = markdown(records, head)
    print(md)
    run.append(records, md)


if __name__ == "__main__":
    main()
