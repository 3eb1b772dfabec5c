"""Compaction on a Citus cluster: the whole slot through the coordinator (the
former design, still ``Compactor.compact_slot`` on the coordinator) against
per shard group on the workers (``compact_citus``), by one compactor and by
two at once (two processes, as two API hosts would).

    python -m bench.citus_compaction [--series 1000] [--rows 60] [--per-row 60]
                                     [--out bench/results/]

One cluster (coordinator + 2 workers on 127.0.0.1, fsync on); before each
mode the same hot rows are loaded into slot 0 (``series`` x ``rows`` chunk
rows of ``per-row`` readings, one hour, 1 s apart, one-decimal values) and
the blocks emptied. One JSON line per mode, appended to
bench/results/citus-compaction-<date>.jsonl. One 2-core box: the three
postmasters and the compactors share its cores, so two compactors can at
best use both (bench/README "Citus").
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from bench import results  # noqa: E402
from haltless.server.localcluster import CitusCluster  # noqa: E402
from haltless.server import db  # noqa: E402
from haltless.server.compact import Compactor  # noqa: E402
from haltless.server.compaction import compact_all  # noqa: E402

# ts: n big-endian Unix microseconds since migration 0008 (haltless_chunk_stamps)
LOAD = """
INSERT INTO reading_chunks_0 (series_id, bucket, n, ts, vals)
SELECT s, $1::timestamptz, $3,
       haltless_chunk_stamps(ARRAY(SELECT $1::timestamptz + (r * $3 + i) * interval '1 s'
                                   FROM generate_series(0, $3 - 1) i)),
       ARRAY(SELECT round((20 + ((s * 7 + r * 13 + i) % 97) / 10.0)::numeric, 1)::float8
             FROM generate_series(0, $3 - 1) i)
FROM generate_series(1, $2) s, generate_series(0, $4 - 1) r
"""


async def load(dsn: str, args) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE reading_chunks, reading_blocks, reading_timelines")
        hour = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0) \
            - dt.timedelta(hours=2)
        await conn.execute(LOAD, hour, args.series, args.per_row, args.rows)
        return await conn.fetchval("SELECT sum(n) FROM reading_chunks")
    finally:
        await conn.close()


async def coordinator_mode(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await Compactor(conn).compact_slot(0)
    finally:
        await conn.close()


async def groups_mode(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        # include_current with a clock that makes slot 0 the closed one
        return (await compact_all(conn, include_current=False, dsn=dsn, wait=False,
                                  now=3600.0 + 60))[0]
    finally:
        await conn.close()


def _groups_process(dsn: str, q) -> None:
    q.put(asyncio.run(groups_mode(dsn)))


def run_mode(mode: str, dsn: str) -> list[int]:
    if mode == "coordinator":
        return [asyncio.run(coordinator_mode(dsn))]
    n = int(mode.split("-")[1])
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_groups_process, args=(dsn, q)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return got


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.citus_compaction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", type=int, default=1000)
    p.add_argument("--rows", type=int, default=60, help="chunk rows per series")
    p.add_argument("--per-row", type=int, default=60, help="readings per chunk row")
    p.add_argument("--modes", default="coordinator,groups-1,groups-2")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", type=Path, default=results.RESULTS)
    args = p.parse_args(argv)
    if reason := CitusCluster.skip_reason():
        sys.exit(f"bench.citus_compaction: {reason}")
    run = results.Run("citus-compaction", args.out)
    records = []
    with CitusCluster(workers=2, fsync=True) as cluster:
        async def migrate():
            conn = await db.connect(cluster.dsn)
            try:
                await db.migrate(conn)
            finally:
                await conn.close()
        asyncio.run(migrate())
        run.header(results.versions(dsn=cluster.dsn), series=args.series, rows=args.rows,
                   per_row=args.per_row)
        for _ in range(args.repeat):
            for mode in args.modes.split(","):
                n = asyncio.run(load(cluster.dsn, args))
                load1 = open("/proc/loadavg").read().split()[0]
                t0 = time.perf_counter()
                per = run_mode(mode, cluster.dsn)
                secs = time.perf_counter() - t0
                assert sum(per) == n, (mode, per, n)
                r = {"mode": mode, "readings": n, "seconds": round(secs, 2),
                     "us_per_reading": round(secs * 1e6 / n, 3), "per_compactor": per,
                     "loadavg_1m_before": float(load1)}
                print(json.dumps(r), flush=True)
                records.append(r)
    run.append(records)


if __name__ == "__main__":
    main()
