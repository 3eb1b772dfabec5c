"""Storage benchmark (issue #8): what a reading costs at rest, in WAL and to
compact, per write shape, beside a plain narrow table loaded with the same data.

    python -m bench.storage [--readings 2000000] [--shapes agent,live,pollers,push]
                            [--connections 64] [--workers 2] [--out bench/results/]

One embedded PostgreSQL; every target gets its own database in it, so sizes
and compaction are per target:

- ``narrow``: ``(series_id int, ts timestamptz, value float8)`` + a b-tree on
  (series_id, ts), loaded with binary COPY (asyncpg) in batches of 1,000 rows
  by its own process;
- per write shape (``bench/mix.py``): the real ``haltless serve --workers N``,
  every body of the shape sent exactly once (``bench/loadgen.py --once``),
  then ``haltless compact`` if the command exists;
- ``pollers``: what ``haltless pollers`` does with one poll per machine and
  tick (``Ingestor.prepare``, then its ``Flusher`` commits every 10 ticks:
  ``HALTLESS_POLL_FLUSH_SECONDS`` at 1 s polls), in a process of its own
  without the devices; ``push``: the same bodies over HTTP, one request per
  poll, as an agent that pushes each poll does (each answer means committed,
  so nothing waits to be merged).

The same readings everywhere (``bench/mix.py``, one seed, one end time). A
Gorilla encoding of them is counted in Python as the anchor. JSON lines and a
markdown table go to ``--out``; see bench/README.md "Storage benchmark".
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from bench import loadgen, mix  # noqa: E402
from bench import procstat as ps  # noqa: E402
from bench import results  # noqa: E402
from bench import run as ingest_bench  # noqa: E402  (its server and database helpers)
from bench.syncdb import DB  # noqa: E402

# Every table that holds readings, by its root: partitions, indexes and TOAST
# count through pg_partition_tree + pg_total_relation_size; absent ones add 0.
READINGS_TABLES = ("reading_chunks", "reading_blocks", "reading_timelines")

SIZE_SQL = """
SELECT r.root, count(*)::int AS relations,
       sum(pg_total_relation_size(t.rel))::bigint AS bytes
FROM unnest($1::text[]) AS r(root)
CROSS JOIN LATERAL (SELECT relid AS rel FROM pg_partition_tree(to_regclass(r.root))
                    UNION  -- a plain table has no partition tree: itself
                    SELECT to_regclass(r.root)) AS t
WHERE t.rel IS NOT NULL
GROUP BY r.root ORDER BY r.root
"""
WAL_LSN_SQL = "SELECT pg_current_wal_lsn()::text"
WAL_DIFF_SQL = "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::bigint"
NARROW_DDL = """
CREATE TABLE narrow_readings (series_id integer NOT NULL, ts timestamptz NOT NULL,
                              value float8 NOT NULL);
CREATE INDEX narrow_readings_series_ts ON narrow_readings (series_id, ts);
"""
HALTLESS = [sys.executable, "-m", "haltless.server.cli"]
# target -> the bodies it sends (bench/mix.py). "pollers" is `haltless
# pollers`' own path (server/direct.py: Ingestor.prepare per poll, then
# Flusher commits every POLL_FLUSH_TICKS ticks, its 10 s default at 1 s
# polls), in a process of its own; "push" sends the same bodies over HTTP,
# one request per poll, as an agent that pushes as it polls does.
TARGETS = {"agent": "agent", "live": "live", "pollers": "pollers", "push": "pollers"}
POLL_FLUSH_TICKS = 10


class BenchDB(DB):
    """The database handle, plus WAL positions and the readings tables' sizes."""

    def lsn(self) -> str:
        return self.val(WAL_LSN_SQL)

    def wal_since(self, lsn: str) -> int:
        return self.val(WAL_DIFF_SQL, self.lsn(), lsn)

    def sizes(self, tables=READINGS_TABLES) -> dict:
        rows = self.fetch(SIZE_SQL, list(tables))
        out = {r["root"]: {"bytes": r["bytes"], "relations": r["relations"]} for r in rows}
        return {"total_bytes": sum(v["bytes"] for v in out.values()), "tables": out,
                "database_bytes": self.val("SELECT pg_database_size(current_database())")}


def database_dsn(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (("?" + query) if query else "")


def create_database(admin_dsn: str, name: str) -> str:
    h = BenchDB(admin_dsn)
    try:
        h.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        h.execute(f'CREATE DATABASE "{name}"')
    finally:
        h.close()
    return database_dsn(admin_dsn, name)


def run_child(argv: list[str], env: dict, log: Path, timeout: float | None = None
              ) -> tuple[int, float, float, str]:
    """Run a process to its end: (exit code, wall s, its CPU s incl. reaped children, output)."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    return (os.waitstatus_to_exitcode(status), time.perf_counter() - t0,
            ru.ru_utime + ru.ru_stime, log.read_text(errors="replace"))


def per_reading(x: float | None, n: int) -> float | None:
    return round(x / n, 2) if x is not None and n else None


# ------------------------------------------------------------------ pollers' path

async def _pollers_path(dsn: str, bodies: Path, per_flush: int) -> dict:
    """What a `haltless pollers` process does with what it polls, without the
    devices: each body (one machine's poll) through Ingestor.prepare, into
    the Flusher, committed every ``per_flush`` bodies."""
    import asyncpg

    from haltless.server.direct import Flusher
    from haltless.server.decode import decode_batch
    from haltless.server.ingest import Ingestor
    from haltless.server.writer import GroupCommitWriter
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    writer = GroupCommitWriter(pool, connections=1)
    ingestor = Ingestor(pool, writer)
    flusher = Flusher(writer, every=0)
    org = await pool.fetchval("SELECT org_id FROM machines LIMIT 1")
    accepted, failed, polls = 0, [], 0

    def done(result):
        def landed(exc):
            nonlocal accepted
            if exc is None:
                accepted += result.accepted_count
            else:
                failed.append(repr(exc))
        return landed
    t0 = time.perf_counter()
    with bodies.open("rb") as f:
        for line in f:
            # strict: Reading structs with datetimes, as server/direct.py builds them
            payload, result, _ = await ingestor.prepare(
                org, *decode_batch(line.rstrip(b"\n"), strict=True))
            flusher.add(payload, done(result))
            polls += 1
            if polls % per_flush == 0:
                await flusher.flush()
    await flusher.flush()
    wall = time.perf_counter() - t0
    await writer.close()
    await pool.close()
    return {"accepted_readings": accepted, "duration_s": round(wall, 3), "requests": polls,
            "requests_per_s": round(polls / wall, 1), "non_207": len(failed), "socket_errors": 0,
            "status_counts": {}, "latency_ms": None, "error_samples": failed[:5]}


# ------------------------------------------------------------------ narrow baseline

async def _narrow_copy(dsn: str, readings: int, end_us: int, seed: int, connections: int) -> dict:
    """In its own process: the same readings, binary COPY in batches of 1,000."""
    data = mix.generate(readings, end_us, seed)
    n = mix.SERIES_PER_MACHINE
    stamps = [[mix.utc(u) for u in row] for row in data.ts]
    # arrival order: tick by tick, one tick of the fleet per batch
    batches = [[(m * n + j + 1, stamps[m][t], data.values[m * n + j][t])
                for m in range(mix.MACHINES) for j in range(n)] for t in range(data.ticks)]
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    todo = iter(batches)

    async def worker():
        async with pool.acquire() as conn:
            for batch in todo:
                await conn.copy_records_to_table("narrow_readings", records=batch,
                                                 columns=["series_id", "ts", "value"])
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(connections)])
    secs = time.perf_counter() - t0
    await pool.close()
    return {"duration_s": round(secs, 3), "rows": sum(map(len, batches)), "batches": len(batches)}


def run_narrow(data: mix.Mix, admin_dsn: str, pg_pid: int, args, work: Path) -> dict:
    print("== narrow: plain (series_id, ts, value) table + b-tree, binary COPY of 1,000 rows")
    dsn = create_database(admin_dsn, "bench_narrow")
    h = BenchDB(dsn)
    try:
        h.execute(NARROW_DDL)
        empty = h.sizes(("narrow_readings",))["total_bytes"]
        h.val("CHECKPOINT")
        lsn0, pg0 = h.lsn(), ps.cpu_seconds(ps.tree(pg_pid))
        argv = [sys.executable, "-m", "bench.storage", "--narrow-loader", dsn,
                "--readings", str(data.readings), "--end-us", str(data.end_us),
                "--seed", str(data.seed), "--connections", str(args.narrow_connections)]
        code, _wall, cpu, out = run_child(argv, dict(os.environ), work / "narrow.log")
        if code != 0:
            raise RuntimeError(f"narrow loader failed ({code}):\n{out[-3000:]}")
        res = json.loads(out.strip().splitlines()[-1])
        wal = h.wal_since(lsn0)
        pg_cpu = ps.cpu_seconds(ps.tree(pg_pid)) - pg0
        count = h.val("SELECT count(*) FROM narrow_readings")
        size = h.sizes(("narrow_readings",))
    finally:
        h.close()
    return {
        "target": "narrow", "readings_expected": data.readings, "readings_committed": count,
        "exact": count == data.readings == res["rows"],
        "readings_per_s": round(count / res["duration_s"], 1), "load": res,
        "connections": args.narrow_connections,
        "ingest": {"wal_bytes": wal, "wal_bytes_per_reading": per_reading(wal, count),
                   "cpu_s": {"loader": round(cpu, 2), "postgres": round(pg_cpu, 2)}},
        "empty_bytes": empty,
        "before": {**size, "bytes_per_reading": per_reading(size["total_bytes"] - empty, count)},
        "compaction": None,
    }


# ------------------------------------------------------------------ haltless, one shape

def compact_available(env: dict) -> bool:
    r = subprocess.run(HALTLESS + ["compact", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    return r.returncode == 0


def run_shape(shape: str, data: mix.Mix, admin_dsn: str, pg_pid: int, args, work: Path) -> dict:
    """One target: ``shape`` is a key of TARGETS."""
    body_shape = TARGETS[shape]
    direct = shape == "pollers"
    print(f"== {shape}: " + (f"the pollers' path, a flush every {POLL_FLUSH_TICKS} ticks"
                             if direct else f"haltless serve --workers {args.workers}")
          + f", {mix.body_count(data, body_shape):,} bodies")
    dsn = create_database(admin_dsn, f"bench_{shape}")
    key = asyncio.run(ingest_bench.setup_haltless(dsn, mix.machine_ids()))
    bodies = work / f"bodies-{shape}.jsonl"
    n_bodies = loadgen.write_bodies_file(mix.bodies(data, body_shape), bodies)
    env = dict(os.environ, HALTLESS_DATABASE_URL=dsn, HALTLESS_DATA_DIR=str(work / "data"))
    env.update(args.serve_env)
    log = work / f"serve-{shape}.log"
    server = (contextlib.nullcontext((None, None)) if direct else
              ingest_bench.haltless_server(dsn, work / "data", args.workers, log, args.serve_env))
    h = BenchDB(dsn)
    try:
        with server as (proc, port):
            empty = h.sizes()["total_bytes"]  # the schema's own pages, partitions made ahead
            h.val("CHECKPOINT")
            lsn0 = h.lsn()
            cpu0 = (ps.cpu_seconds(ps.tree(proc.pid)) if proc else 0.0, ps.cpu_seconds(ps.tree(pg_pid)))
            if direct:
                argv = [sys.executable, "-m", "bench.storage", "--pollers-path", dsn, str(bodies),
                        str(POLL_FLUSH_TICKS * mix.MACHINES)]
            else:
                argv = [sys.executable, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}",
                        "--key", key, "--connections", str(args.connections), "--once", str(bodies)]
            code, _wall, load_cpu, out = run_child(argv, dict(os.environ), work / f"load-{shape}.out")
            if code != 0:
                raise RuntimeError(f"load generator failed ({code}):\n{out[-3000:]}")
            res = json.loads(out.strip().splitlines()[-1])
            wal = h.wal_since(lsn0)  # every answer is in: everything accepted is committed
            cpu1 = (ps.cpu_seconds(ps.tree(proc.pid)) if proc else load_cpu,
                    ps.cpu_seconds(ps.tree(pg_pid)))
            if direct:
                load_cpu = 0.0  # the driver is the server here: counted as such
        bodies.unlink()
        count = h.val("SELECT count(*) FROM readings")
        chunk_rows = (h.val("SELECT count(*) FROM reading_chunks")
                      if h.val("SELECT to_regclass('reading_chunks') IS NOT NULL") else None)
        before = h.sizes()
        record = {
            "target": shape, "readings_expected": data.readings, "readings_committed": count,
            "readings_accepted_207": res["accepted_readings"],
            "readings_per_s": round(count / res["duration_s"], 1),
            "exact": count == data.readings == res["accepted_readings"]
            and res["non_207"] == 0 and res["socket_errors"] == 0,
            "bodies": n_bodies, "readings_per_body": data.readings // n_bodies,
            "connections": args.connections, "workers": args.workers,
            "load": {k: res[k] for k in ("duration_s", "requests", "requests_per_s", "non_207",
                                         "socket_errors", "status_counts", "latency_ms",
                                         "error_samples")},
            "ingest": {"wal_bytes": wal, "wal_bytes_per_reading": per_reading(wal, count),
                       "cpu_s": {"server": round(cpu1[0] - cpu0[0], 2),
                                 "postgres": round(cpu1[1] - cpu0[1], 2),
                                 "loadgen": round(load_cpu, 2)}},
            "chunk_rows": chunk_rows,
            "readings_per_chunk_row": round(count / chunk_rows, 2) if chunk_rows else None,
            "empty_bytes": empty,
            "before": {**before, "bytes_per_reading": per_reading(before["total_bytes"] - empty,
                                                                  count)},
            "server_log_problems": (ingest_bench.server_log_problems(log.read_text(errors="replace"))
                                    if proc is not None else []),
        }
        record["compaction"] = compact(h, env, pg_pid, count, empty,
                                       work / f"compact-{shape}.log")
    finally:
        h.close()
    return record


def _compact_once(h: BenchDB, env: dict, pg_pid: int, log: Path) -> dict:
    h.val("CHECKPOINT")  # its WAL then includes the full-page images a steady state pays
    lsn0, pg0 = h.lsn(), ps.cpu_seconds(ps.tree(pg_pid))
    code, wall, cpu, out = run_child(HALTLESS + ["compact"], env, log)
    pg_cpu = ps.cpu_seconds(ps.tree(pg_pid)) - pg0
    return {"exit_code": code, "wall_s": round(wall, 2),
            "cpu_s": {"compact": round(cpu, 2), "postgres": round(pg_cpu, 2)},
            "wal_bytes": h.wal_since(lsn0), "output_tail": out[-1500:] if code else out[-300:]}


ROLLUP_BYTES = """
SELECT coalesce(sum(coalesce(pg_column_size(m_scale), 0) + coalesce(pg_column_size(m_minute), 0)
                    + coalesce(pg_column_size(m_count), 0) + coalesce(pg_column_size(m_k), 0)
                    + coalesce(pg_column_size(m_f), 0) + coalesce(pg_column_size(v_first), 0)
                    + coalesce(pg_column_size(v_min), 0) + coalesce(pg_column_size(v_max), 0)
                    + coalesce(pg_column_size(v_sum), 0)), 0)::int8
FROM reading_blocks"""


def compact(h: BenchDB, env: dict, pg_pid: int, count: int, empty: int, log: Path) -> dict:
    """``haltless compact`` (compacts everything committed, exits), measured;
    then once more with nothing left to do: its cost is the fixed part
    (interpreter start, imports, connecting; about 0.2 CPU-s here), which a
    compaction inside a running server does not pay, and its sizes show
    whether a second run changes anything (it should not)."""
    if not compact_available(env):
        print("  compaction: not available (no `haltless compact` in this checkout)")
        return {"available": False}
    first = _compact_once(h, env, pg_pid, log)
    after = h.sizes()
    # The rollups' share of that: the per-minute summaries stored with each
    # block (migration 0013), as stored (pg_column_size: compressed or not).
    rollup = h.val(ROLLUP_BYTES) if h.val(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'reading_blocks'::regclass"
        " AND attname = 'm_count'") else None
    count_after = h.val("SELECT count(*) FROM readings")
    idle = _compact_once(h, env, pg_pid, log.with_suffix(".again.log"))
    again = h.sizes()
    millions = count / 1e6
    cpu = sum(first["cpu_s"].values())
    net = cpu - sum(idle["cpu_s"].values())
    return {
        "available": True, **first,
        "cpu_s_per_million": round(cpu / millions, 3) if millions else None,
        "cpu_s_per_million_net": round(net / millions, 3) if millions else None,
        "wal_bytes_per_reading": per_reading(first["wal_bytes"], count),
        "after": {**after, "bytes_per_reading": per_reading(after["total_bytes"] - empty, count)},
        "rollup_bytes": rollup, "rollup_bytes_per_reading": per_reading(rollup, count),
        "readings_after": count_after, "nothing_lost_or_duplicated": count_after == count,
        "second_run": {**idle, "total_bytes": again["total_bytes"],
                       "unchanged": again["total_bytes"] == after["total_bytes"]},
    }


# ------------------------------------------------------------------ report

def _num(x, fmt="{:,.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ratio(x, base) -> str:
    return f"{x / base:.2f}x" if x is not None and base else "–"


def markdown(records: list[dict], head: dict) -> str:
    p = head["parameters"]
    base = next((r for r in records if r["target"] == "narrow"), None)
    b_rate = base["readings_per_s"] if base else None
    b_rest = base["before"]["bytes_per_reading"] if base else None
    b_wal = base["ingest"]["wal_bytes_per_reading"] if base else None
    lines = [
        *results.header_lines(head, "Storage benchmark"),
        f"- data: `bench/mix.py` seed {p['seed']}, {p['readings']:,} readings per target "
        f"({p['readings'] // mix.SERIES:,} ticks of {mix.MACHINES} machines x "
        f"{mix.SERIES_PER_MACHINE} metrics at 1 s, ending {p['end']}); every target stores "
        f"the same readings",
        f"- haltless: `serve --workers {p['workers']}`, built-in load generator, "
        f"{p['connections']} connections, each body sent once; narrow: binary COPY of 1,000 rows, "
        f"{p['narrow_connections']} connections; everything shares the machine",
        f"- Gorilla encoding of the same readings (counted in Python, us timestamps): "
        f"**{head['gorilla_bytes_per_reading']:.2f} B/reading**",
        "",
        "| target | readings/s committed | vs narrow | readings/row | B/reading at rest "
        "| vs narrow | WAL B/reading | vs narrow | after compaction B/reading | vs narrow "
        "| vs Gorilla | of which rollups B/reading | compaction CPU-s / M readings (net) "
        "| compaction WAL B/reading |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    g = head["gorilla_bytes_per_reading"]
    for r in records:
        c = r.get("compaction") or {}
        after = c.get("after", {}).get("bytes_per_reading") if c.get("available") else None
        name = r["target"] if r["target"] == "narrow" else f"haltless, {r['target']} " + (
            f"({r['readings_per_body']:,}/poll, committed every {POLL_FLUSH_TICKS} s of polls)"
            if r["target"] == "pollers" else f"({r['readings_per_body']:,}/request)")
        if r.get("exact") is False:
            name += " **(count mismatch)**"
        lines.append(
            f"| {name} | {_num(r['readings_per_s'], '{:,.0f}')} | {_ratio(r['readings_per_s'], b_rate)} "
            f"| {_num(r.get('readings_per_chunk_row'))} "
            f"| {_num(r['before']['bytes_per_reading'])} | {_ratio(r['before']['bytes_per_reading'], b_rest)} "
            f"| {_num(r['ingest']['wal_bytes_per_reading'])} "
            f"| {_ratio(r['ingest']['wal_bytes_per_reading'], b_wal)} "
            f"| {_num(after, '{:,.2f}')} | {_ratio(after, b_rest)} | {_ratio(after, g)} "
            f"| {_num(c.get('rollup_bytes_per_reading'), '{:,.2f}')} "
            f"| {_num(c.get('cpu_s_per_million'), '{:,.2f}')} "
            f"({_num(c.get('cpu_s_per_million_net'), '{:,.2f}')}) "
            f"| {_num(c.get('wal_bytes_per_reading'))} |")
    lines.append("")
    if any(r.get("compaction") == {"available": False} for r in records):
        lines.append("compaction: not available (`haltless compact` does not exist in this "
                     "checkout); the after-compaction columns are empty.")
    lines.append("B/reading at rest: pg_total_relation_size (heap, indexes, TOAST) of every "
                 "readings table and partition, less the same sum before the first reading "
                 "(empty schema), over the readings committed. Of which rollups: the per-minute "
                 "summaries stored with the blocks (readings_1m/readings_1h, migration 0013), "
                 "column sizes as stored. Compaction CPU-s: "
                 "`haltless compact` plus PostgreSQL's whole process tree while it ran; (net): "
                 "less a second run with nothing to compact (process start, imports).")
    for r in records:
        c = r.get("compaction") or {}
        if c.get("available") and not (c["exit_code"] == 0 and c["nothing_lost_or_duplicated"]
                                       and c["second_run"]["unchanged"]):
            lines.append(f"**{r['target']}: compaction exit {c['exit_code']}, readings "
                         f"{r['readings_committed']:,} -> {c['readings_after']:,}, second run "
                         f"{'unchanged' if c['second_run']['unchanged'] else 'changed the size'}**")
    return "\n".join(lines) + "\n"


def _env_pair(s: str) -> tuple[str, str]:
    k, sep, v = s.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {s!r}")
    return k, v


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readings", type=int, default=2_000_000,
                   help="readings per target, a multiple of 1,000 (default 2,000,000)")
    p.add_argument("--shapes", default=",".join(TARGETS),
                   help=f"write shapes to run, comma-separated (default {','.join(TARGETS)}; "
                        "pollers: `haltless pollers`' path, a commit every 10 ticks; push: the "
                        "same bodies over HTTP, one request per poll)")
    p.add_argument("--no-narrow", action="store_true", help="skip the narrow-table baseline")
    p.add_argument("--connections", type=int, default=64, help="load connections to haltless")
    p.add_argument("--narrow-connections", type=int, default=4,
                   help="concurrent COPY connections of the narrow baseline")
    p.add_argument("--workers", type=int, default=2, help="haltless serve workers")
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--serve-env", type=_env_pair, action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for haltless serve and compact (repeatable)")
    p.add_argument("--out", type=Path, default=results.RESULTS)
    p.add_argument("--narrow-loader", metavar="DSN", help=argparse.SUPPRESS)
    p.add_argument("--end-us", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pollers-path", nargs=3, metavar=("DSN", "BODIES", "PER_FLUSH"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.readings <= 0 or args.readings % mix.SERIES:
        p.error(f"--readings must be a positive multiple of {mix.SERIES}")
    if args.pollers_path:  # the pollers target's own process
        dsn, path, per_flush = args.pollers_path
        print(json.dumps(asyncio.run(_pollers_path(dsn, Path(path), int(per_flush)))))
        return
    if args.narrow_loader:  # the baseline's own process
        print(json.dumps(asyncio.run(_narrow_copy(args.narrow_loader, args.readings, args.end_us,
                                                  args.seed, args.narrow_connections))))
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in TARGETS]
    if bad:
        p.error(f"unknown shape {', '.join(bad)}; choose from {', '.join(TARGETS)}")
    args.serve_env = dict(args.serve_env)
    run = results.Run("storage", args.out)

    t = time.perf_counter()
    data = mix.generate(args.readings, seed=args.seed)
    gorilla = mix.gorilla_bytes_per_reading(data)
    print(f"generated {data.readings:,} readings in {time.perf_counter() - t:.1f} s; "
          f"Gorilla {gorilla:.2f} B/reading")
    records: list[dict] = []
    with ps.bench_postgres("haltless-storage-") as (work, dsn, pg_pid, idle):
        head = run.header(
            results.versions(dsn=dsn), idle,
            parameters={"readings": args.readings, "seed": args.seed,
                        "end": mix.iso_us(data.end_us), "end_us": data.end_us,
                        "shapes": shapes, "workers": args.workers,
                        "connections": args.connections,
                        "narrow_connections": args.narrow_connections,
                        "serve_env": args.serve_env, "readings_tables": list(READINGS_TABLES)},
            gorilla_bytes_per_reading=round(gorilla, 3))
        if not args.no_narrow:
            records.append(run_narrow(data, dsn, pg_pid, args, work))
        for shape in shapes:
            records.append(run_shape(shape, data, dsn, pg_pid, args, work))
    base = next((r for r in records if r["target"] == "narrow"), None)
    for r in records:
        r["vs_narrow"] = None if base is None else {
            "readings_per_s": round(r["readings_per_s"] / base["readings_per_s"], 3),
            "bytes_per_reading": round(r["before"]["bytes_per_reading"]
                                       / base["before"]["bytes_per_reading"], 3),
            "wal_bytes_per_reading": round(r["ingest"]["wal_bytes_per_reading"]
                                           / base["ingest"]["wal_bytes_per_reading"], 3)}
    md = markdown(records, head)
    print()
    print(md)
    for r in records:
        if r.get("exact") is False:
            print(f"{r['target']}: committed {r['readings_committed']:,}, expected "
                  f"{r['readings_expected']:,}, accepted {r['readings_accepted_207']:,}; "
                  f"load: {r['load']['status_counts']} {r['load']['error_samples'][:3]}")
        if r.get("server_log_problems"):
            print(f"{r['target']}: server log: {r['server_log_problems'][:5]}")
    run.append(records, md)


if __name__ == "__main__":
    main()
