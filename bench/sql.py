"""SQL read benchmark: the README's Grafana queries on a fleet, as a reader role.

    python -m bench.sql [--machines 20] [--hours 2] [--hot-minutes 10] [--repeat 5]
                        [--no-late-rows] [--out bench/results/]

Data: ``--machines`` machines x the mix's 20 metrics (bench/mix.py: walks,
noise, full-precision floats, counters, setpoints) at 1 s with +-500 us of
jitter, for the ``--hours`` whole hours before the current one, compacted,
plus the first ``--hot-minutes`` of the current hour left hot (not
compacted: the state of a live fleet; the range queried ends there); and
one machine ``DAY-001`` whose coolant_temp and vibration_x cover the 24 hours before, compacted (the "one series, one day raw" case).
Written through the kernel and COPY in process, compacted by
``compact_all`` (the real compaction), then read by ``haltless grafana-role``'s
role over the embedded server's unix socket.

Each query is the README's, with Grafana 11's macros expanded as Grafana
expands them (bench/grafana.py), run ``--repeat`` times after one warm-up;
the figures are the server's execution time (EXPLAIN ANALYZE, TIMING OFF),
the client's round trip, and from one EXPLAIN (ANALYZE, BUFFERS): the block
rows the plan read against the blocks the asked series have in the range.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import re
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import asyncpg
from haltless.fast import encode_chunks
from haltless.server import db, store
from haltless.server.compaction import compact_all
from haltless.server.hot import hot_slot
from haltless.server.reader_roles import create_reader_role, url_for_role
from haltless.server.writer import COPY_COLUMNS, COPY_HEADER, COPY_TRAILER

from bench import (
    grafana,
    mix,
    results,
)
from bench import procstat as ps

HOUR = 3600
RECORD = struct.Struct("<iqd")
UTC = dt.UTC


def readme_queries() -> dict[str, str]:
    """The ```sql blocks of the README's Grafana section, by their first comment line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### SQL: psql and Grafana", 1)[1].split("\n## ", 1)[0]
    out = {}
    for block in re.findall(r"```sql\n(.*?)```", section, re.DOTALL):
        name = block.splitlines()[0].lstrip("- ").strip() if block.startswith("--") else \
            f"query {len(out) + 1}"
        out[name] = block
    return out


# ------------------------------------------------------------------ data

async def make_fleet(conn, org, machines: int, prefix: str) -> dict[str, list[int]]:
    """Machines PREFIX-001.. with the mix's 20 metrics; {identifier: [series ids]}."""
    out = {}
    for m in range(machines):
        ident = f"{prefix}-{m + 1:03d}"
        row = await store.create_machine(conn, org, ident)
        sids = []
        for j, (name, unit, *_rest) in enumerate(mix.METRICS):
            sids.append(await conn.fetchval(
                "INSERT INTO series (machine_id, metric_name, unit, raw_tag) VALUES ($1, $2, $3, $4)"
                " RETURNING id", row["id"], name, unit, mix.raw_tag(m, j)))
        out[ident] = sids
    return out


def hour_records(fleet: dict[str, list[int]], start_s: int, seconds: int, rnd: random.Random,
                 only: tuple[int, ...] | None = None, from_start: bool = False) -> bytes:
    """Packed kernel records of ``seconds`` ticks from ``start_s`` (Unix seconds)
    for every series of the fleet (``only``: these metric indices). The
    first tick's jitter may put it just before ``start_s``, into the hour
    before; ``from_start`` keeps every reading at or after ``start_s``."""
    parts = []
    for m, sids in enumerate(fleet.values()):
        ts = [(start_s + t) * 1_000_000 + rnd.randint(-mix.JITTER_US, mix.JITTER_US)
              for t in range(seconds)]
        if from_start:
            ts[0] = max(ts[0], start_s * 1_000_000)
        for j, (name, _unit, kind, setpoint, scale) in enumerate(mix.METRICS):
            if only is not None and j not in only:
                continue
            vals = mix._series(rnd, m, name, kind, setpoint, scale, seconds)
            sid = sids[j]
            parts.append(b"".join(RECORD.pack(sid, t, v) for t, v in zip(ts, vals)))
    return b"".join(parts)


async def write_hot(conn, records: bytes) -> None:
    data = COPY_HEADER + encode_chunks(records) + COPY_TRAILER
    await conn.copy_to_table(f"reading_chunks_{hot_slot()}", source=memoryview(data),
                             columns=COPY_COLUMNS, format="binary")


async def load(dsn: str, args) -> dict:
    conn = await db.connect(dsn)
    try:
        await db.migrate(conn)
        org = await store.org_id(conn, None)
        rnd = random.Random(20)
        now_h = int(time.time()) // HOUR * HOUR
        fleet = await make_fleet(conn, org, args.machines, "FLEET")
        day = await make_fleet(conn, org, 1, "DAY")
        t0 = time.monotonic()
        for h in range(args.hours, 0, -1):  # compacted hours, oldest first
            await write_hot(conn, hour_records(fleet, now_h - h * HOUR, HOUR, rnd))
            await compact_all(conn, include_current=True)
        for h in range(24, 0, -1):
            await write_hot(conn, hour_records(day, now_h - h * HOUR, HOUR, rnd, only=(0, 9)))
        await compact_all(conn, include_current=True)
        hot_from = now_h
        # Half the machines' first hot tick falls (jitter) into the last
        # compacted hour: late rows that wait there for the next compaction,
        # and make that series-hour's rollups come from its raw readings
        # until then (README "Rollups"). --no-late-rows leaves them out.
        await write_hot(conn, hour_records(fleet, hot_from, args.hot_minutes * 60, rnd,
                                           from_start=args.no_late_rows))
        print(f"loaded in {time.monotonic() - t0:.0f} s")
        role, password = await create_reader_role(conn, org, "default", "bench_reader")
        readings = await conn.fetchval(
            "SELECT (SELECT coalesce(sum(n), 0) FROM reading_blocks)"
            " + (SELECT coalesce(sum(n), 0) FROM reading_chunks)")
        await conn.execute("VACUUM ANALYZE")
        late = await conn.fetchval("SELECT count(*) FROM reading_chunks WHERE bucket < $1",
                                   dt.datetime.fromtimestamp(now_h, UTC))
        return {"role_url": url_for_role(dsn, role, password), "now_h": now_h,
                "late_hot_rows": late,
                "hot_until": hot_from + args.hot_minutes * 60, "readings": readings,
                "machines": args.machines, "hours": args.hours, "hot_minutes": args.hot_minutes}
    finally:
        await conn.close()


# ------------------------------------------------------------------ measuring

def plan_block_rows(plan: dict) -> int:
    """Rows the plan read from reading_blocks (any partition), over all loops;
    not counting the row-level security check of reader roles on timelines
    (a subplan that probes whether a visible block uses the timeline)."""
    n = 0
    if plan.get("Subplan Name"):
        return 0
    if plan.get("Relation Name", "").startswith("reading_blocks"):
        n += round(plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1))
    for sub in plan.get("Plans", []):
        n += plan_block_rows(sub)
    return n


async def measure(url: str, name: str, sql: str, repeat: int) -> dict:
    conn = await asyncpg.connect(url)
    try:
        await conn.fetch(sql)  # warm-up (plans, caches)
        walls, execs = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            rows = await conn.fetch(sql)
            walls.append((time.perf_counter() - t0) * 1000)
            plan = await conn.fetchval("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + sql)
            execs.append(json.loads(plan)[0]["Execution Time"])
        plan = json.loads(await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql))[0]
        return {"query": name, "rows": len(rows), "server_ms": round(statistics.median(execs), 1),
                "wall_ms": round(statistics.median(walls), 1),
                "block_rows_read": plan_block_rows(plan["Plan"]),
                "buffers_hit": plan["Plan"].get("Shared Hit Blocks"),
                "buffers_read": plan["Plan"].get("Shared Read Blocks")}
    finally:
        await conn.close()


async def asked_blocks(dsn: str, machine: str, metric: str | None, frm: dt.datetime,
                       to: dt.datetime) -> int:
    """Blocks of the asked series that overlap [frm, to]."""
    conn = await db.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM reading_blocks b JOIN series s ON s.id = b.series_id"
            " JOIN machines m ON m.id = s.machine_id WHERE m.machine_identifier LIKE $1"
            " AND ($2::text IS NULL OR s.metric_name = $2) AND b.t_last >= $3 AND b.t_first <= $4",
            machine, metric, frm, to)
    finally:
        await conn.close()


def cases(info: dict) -> list[tuple[str, str, dt.datetime, dt.datetime, dict, str, str, str | None]]:
    """(name, README query, from, to, variables, $__interval, machine pattern,
    metric) of every measurement. The machine panel on one machine and all 20
    metrics; the fleet panel on one metric of every machine; each at the
    intervals that select its arms (raw below 1 min, readings_1m, readings_1h)."""
    q = readme_queries()
    end = dt.datetime.fromtimestamp(info["hot_until"], UTC)
    whole = dt.timedelta(hours=info["hours"]) + dt.timedelta(seconds=info["hot_until"] - info["now_h"])
    every = ",".join(f"'{name}'" for name, *_ in mix.METRICS)
    one = f"FLEET-{min(7, info['machines']):03d}"
    machine = {"machine": one, "metric": every}
    fleet = {"metric": "'coolant_temp'"}
    out = []
    for label, span, interval in (("15 min, 1s (raw)", dt.timedelta(minutes=15), "1s"),
                                  ("2 h, 10s (raw)", dt.timedelta(hours=2), "10s"),
                                  ("2 h, 1m (readings_1m)", dt.timedelta(hours=2), "1m"),
                                  ("whole range, 1m (readings_1m)", whole, "1m"),
                                  ("whole range, 1h (readings_1h)", whole, "1h")):
        out.append((f"machine panel, one machine x 20 metrics, {label}", q["machine panel"],
                    end - span, end, machine, interval, one, None))
    for label, span, interval in (("whole range, 5m (readings_1m)", whole, "5m"),
                                  ("whole range, 1h (readings_1h)", whole, "1h")):
        out.append((f"fleet panel, one metric x {info['machines']} machines, {label}",
                    q["fleet panel"], end - span, end, fleet, interval, "FLEET-%", "coolant_temp"))
    day_to = dt.datetime.fromtimestamp(info["now_h"], UTC)
    out.append(("one series, one day raw (readings_between)",
                ("SELECT ts, value FROM series s JOIN machines m ON m.id = s.machine_id,"
                 " readings_between(s.id, $__timeFrom(), $__timeTo()) WHERE m.machine_identifier"
                 " = 'DAY-001' AND s.metric_name = 'coolant_temp'"),
                day_to - dt.timedelta(days=1), day_to, {}, "1m", "DAY-001", "coolant_temp"))
    return out


async def run_all(dsn: str, info: dict, repeat: int) -> list[dict]:
    out = []
    for name, sql, frm, to, variables, interval, machine, metric in cases(info):
        expanded = grafana.expand(sql, frm, to, variables, interval)
        r = await measure(info["role_url"], name, expanded, repeat)
        r["asked_blocks"] = await asked_blocks(dsn, machine, metric, frm, to)
        print(f"  {name}: {r['server_ms']} ms server, {r['wall_ms']} ms wall, "
              f"{r['block_rows_read']} block rows read / {r['asked_blocks']} asked")
        out.append(r)
    return out


def markdown(records: list[dict], head: dict) -> str:
    d = head["data"]
    lines = [*results.header_lines(head, "SQL read benchmark"),
             (f"- data: {d['machines']} machines x 20 metrics at 1 s, {d['hours']} h compacted + "
              f"{d['hot_minutes']} min hot, and one machine's 2 series over 24 h compacted: "
              f"{d['readings']:,} readings, {d.get('late_hot_rows', 0):,} of them hot rows waiting "
              "in a compacted hour (late data); queried as a reader role (row-level security on)"),
             "", "| query | server ms | wall ms | rows | block rows read / asked |",
             "|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['query']} | {r['server_ms']:,.1f} | {r['wall_ms']:,.1f} | {r['rows']:,} "
                     f"| {r['block_rows_read']:,} / {r['asked_blocks']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sql", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machines", type=int, default=20)
    p.add_argument("--hours", type=int, default=2)
    p.add_argument("--hot-minutes", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-late-rows", action="store_true",
                   help="no hot reading falls into the last compacted hour (by default the "
                        "first hot tick's jitter puts one there for about half the machines)")
    p.add_argument("--out", type=Path, default=results.RESULTS)
    args = p.parse_args(argv)
    run = results.Run("sql", args.out)
    with ps.bench_postgres("haltless-sql-") as (_work, dsn, _pg_pid, idle):
        info = asyncio.run(load(dsn, args))
        head = run.header(results.versions(dsn=dsn), idle,
                          data={k: v for k, v in info.items() if k != "role_url"})
        records = asyncio.run(run_all(dsn, info, args.repeat))
    md = markdown(records, head)
    print()
    print(md)
    run.append(records, md)


if __name__ == "__main__":
    main()
