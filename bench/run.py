"""Ingest benchmark: haltless vs the FastAPI baseline, on one embedded PostgreSQL.

    python -m bench.run [--duration 20] [--connections 64] [--workers 2]
                        [--only haltless|baseline] [--out bench/results/] [--profile]

For each target: start its server (own process tree) on a free 127.0.0.1
port, create 50 machines and an API key, warm up, then count committed
readings in PostgreSQL before and after a timed load. readings/s is the
database count delta over the load duration (after in-flight requests have
drained), never a number taken from responses. See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from bench import procstat as ps  # noqa: E402
from bench import results  # noqa: E402
from bench import stages  # noqa: E402
from bench.syncdb import DB  # noqa: E402
from haltless.server import db, store  # noqa: E402
from haltless.server.localcluster import free_port  # noqa: E402

MACHINES = 50
METRICS = 20
STEPS = 50  # timestamps per body: 20 metrics x 50 = 1,000 readings


# ------------------------------------------------------------------ targets

async def setup_haltless(dsn: str, idents: list[str]) -> str:
    """Migrated, machines ``idents`` in the default organization, and a new API key
    for it (the key): what `haltless machines add` / `haltless keys create` do."""
    conn = await db.connect(dsn)
    try:
        await db.migrate(conn)
        org = await store.org_id(conn, None)
        have = {r["machine_identifier"] for r in await store.list_machines(conn, org)}
        for ident in idents:
            if ident not in have:
                await store.create_machine(conn, org, ident)
        key, _ = await store.create_key(conn, org, "bench")
        return key
    finally:
        await conn.close()


def _haltless_argv(port: int, workers: int) -> list[str]:
    exe = Path(sys.executable).with_name("haltless")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "haltless.server.cli"]
    return head + ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]


def _baseline_argv(port: int, workers: int) -> list[str]:
    argv = [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers), "--no-access-log",
            "--log-level", "warning", "--backlog", "2048"]
    for mod, flag in (("uvloop", ["--loop", "uvloop"]), ("httptools", ["--http", "httptools"])):
        try:
            __import__(mod)
            argv += flag
        except ImportError:
            pass
    return argv


async def _setup_baseline(*args):
    # Imported here: FastAPI and pydantic come with the [bench] extra only, and
    # the storage and query benchmarks reuse this module without them.
    from bench import baseline_app
    return await baseline_app.setup(*args)


TARGETS = {
    "baseline": dict(setup=_setup_baseline, argv=_baseline_argv,
                     server="FastAPI + pydantic + asyncpg executemany, uvicorn",
                     count="SELECT count(*) FROM baseline_readings",
                     vacuum="VACUUM (ANALYZE) baseline_readings"),
    "haltless": dict(setup=setup_haltless, argv=_haltless_argv,
                     server="haltless serve (granian + msgspec + group-commit COPY)",
                     count=("SELECT (SELECT coalesce(sum(n), 0) FROM reading_chunks)"
                     " + (SELECT coalesce(sum(n), 0) FROM reading_blocks)"),
                     vacuum="VACUUM (ANALYZE) reading_chunks, reading_blocks"),
}


# ------------------------------------------------------------------ helpers

def wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serving(argv_for_port, env: dict, log: Path):
    """The server ``argv_for_port(port)`` starts, on a free 127.0.0.1 port, once it
    answers /healthz: yields (process, port); stopped, with every process it
    started, on exit. The one way bench/ tools start a server."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv_for_port(port), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc, log)
        yield proc, port
    finally:
        ps.stop_process(proc)


def haltless_server(dsn: str, data_dir: Path, workers: int, log: Path, env: dict | None = None):
    """`haltless serve --workers N` against ``dsn``, as ``serving`` runs it
    (fuzz, hostile, query, storage)."""
    env = {**os.environ, "HALTLESS_DATABASE_URL": dsn, "HALTLESS_DATA_DIR": str(data_dir),
           **(env or {})}
    return serving(lambda port: _haltless_argv(port, workers), env, log)


def run_load(url: str, key: str, bodies: Path, duration: float, connections: int,
             use_wrk: bool | None, outfile: Path) -> tuple[dict, float]:
    """One load run in its own process; returns (result, its CPU seconds)."""
    argv, tool = loadgen.load_command(url, key, bodies, duration, connections, use_wrk)
    with outfile.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = outfile.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{text[-3000:]}")
    return loadgen.parse_output(tool, text, connections), ru.ru_utime + ru.ru_stime


def server_log_problems(text: str) -> list[str]:
    words = ("error", "traceback", "exception", "503", "warning", "critical")
    return [ln for ln in text.splitlines() if any(w in ln.lower() for w in words)][:20]


def top_snapshot(delay: float, dest: Path) -> threading.Thread:
    def run():
        time.sleep(delay)
        if shutil.which("top") is None:
            return
        out = subprocess.run(["top", "-b", "-n", "2", "-d", "1", "-w", "200"],
                             capture_output=True, text=True).stdout
        frames = out.split("\ntop - ")  # the 2nd frame: CPU % over the 1 s between them
        last = "top - " + frames[-1] if len(frames) > 1 else out
        dest.write_text("\n".join(last.splitlines()[:30]) + "\n")
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def start_profiler(pid: int, duration: float, dest: Path) -> subprocess.Popen | None:
    exe = ps.py_spy()
    if exe is None:
        return None
    print(f"  profiling with py-spy -> {dest}")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--subprocesses", "--rate", "100",
                             "--duration", str(max(1, round(duration))), "--nonblocking",
                             "--format", "flamegraph", "-o", str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------ one target

def run_target(name: str, dsn: str, pg_pid: int, args, work: Path, stamp: str) -> dict:
    t = TARGETS[name]
    print(f"== {name}: {t['server']}")
    idents = loadgen.machine_ids(MACHINES)
    key = asyncio.run(t["setup"](dsn, idents))
    log = work / f"{name}.log"
    env = dict(os.environ, HALTLESS_DATABASE_URL=dsn, HALTLESS_DATA_DIR=str(work / "data"),
               BASELINE_DATABASE_URL=dsn)
    profile_path = None
    with contextlib.ExitStack() as stack:
        dbh = stack.enter_context(DB(dsn))
        dbh.val("CHECKPOINT")  # same starting point for both targets
        proc, port = stack.enter_context(
            serving(lambda port: t["argv"](port, args.workers), env, log))
        rss = ps.RssSampler(proc.pid)
        rss.start()
        stack.callback(rss.stop)
        url = f"http://127.0.0.1:{port}"
        bodies = work / f"bodies-{name}"
        loadgen.write_bodies(loadgen.make_bodies(time.time(), args.bodies, MACHINES, METRICS,
                                                 STEPS, shape=args.shape), bodies)
        if args.warmup > 0:
            print(f"  warm-up {args.warmup:g} s")
            warm, _ = run_load(url, key, bodies, args.warmup, args.connections, args.use_wrk,
                               work / f"{name}-warmup.out")
            if warm["non_207"] or warm["socket_errors"]:
                print(f"  warm-up: {warm['non_207']} non-207, {warm['socket_errors']} socket errors")
        before = dbh.drained(t["count"])
        spy = None
        if args.profile and name == "haltless":
            profile_path = args.out / f"profile-haltless-{stamp}.svg"
            spy = start_profiler(proc.pid, args.duration, profile_path)
        top = top_snapshot(args.duration / 2, args.out / f"ingest-{stamp}-{name}-top.txt")
        cpu0 = {"server": ps.cpu_seconds(ps.tree(proc.pid)), "postgres": ps.cpu_seconds(ps.tree(pg_pid)),
                "machine": ps.machine_busy(), "all": ps.all_ticks(), "self": sum(os.times()[:2])}
        print(f"  load {args.duration:g} s, {args.connections} connections")
        sampler = (stages.Sampler(work / f"{name}-perf.data", args.duration)
                   if args.stages and name == "haltless" else contextlib.nullcontext())
        with sampler:
            res, load_cpu = run_load(url, key, bodies, args.duration, args.connections,
                                     args.use_wrk, work / f"{name}-load.out")
        # the processes that did the work, while they still exist
        roles = {"server": set(ps.tree(proc.pid)), "postgres": set(ps.tree(pg_pid))}
        cpu1 = {"server": ps.cpu_seconds(ps.tree(proc.pid)), "postgres": ps.cpu_seconds(ps.tree(pg_pid)),
                "machine": ps.machine_busy(), "all": ps.all_ticks(), "self": sum(os.times()[:2])}
        ours = set(ps.tree(proc.pid)) | set(ps.tree(pg_pid)) | {os.getpid()}
        rss_end, pss_end = rss.current(), ps.pss_kb(ps.tree(proc.pid))
        after = dbh.drained(t["count"])
        # now, not in the next target's timed window (autovacuum would do it there)
        dbh.execute(t["vacuum"])
        top.join(timeout=5)
        if spy is not None:
            try:
                _, err = spy.communicate(timeout=args.duration + 60)
                if spy.returncode != 0:
                    print(f"  py-spy failed: {err.strip()[-500:]}")
                    profile_path = None
            except subprocess.TimeoutExpired:
                ps.stop_process(spy)
                profile_path = None
    wall = cpu1["machine"][1] - cpu0["machine"][1]
    pct = lambda secs: round(100 * secs / wall, 1) if wall > 0 else None  # noqa: E731
    cpu = {"server": pct(cpu1["server"] - cpu0["server"]),
           "postgres": pct(cpu1["postgres"] - cpu0["postgres"]),
           "loadgen": pct(load_cpu),
           "machine_busy": pct(cpu1["machine"][0] - cpu0["machine"][0])}
    cpu["other"] = round(cpu["machine_busy"] - cpu["server"] - cpu["postgres"] - cpu["loadgen"], 1)
    # os.times: this process only (its cutime holds the reaped load generator)
    cpu["this_script"] = pct(cpu1["self"] - cpu0["self"])
    cpu["busiest_others"] = ps.top_others(cpu0["all"], cpu1["all"], ours, wall)
    committed = after - before
    log_text = log.read_text(errors="replace")
    stage_table = (sampler.table(roles, committed) if isinstance(sampler, stages.Sampler)
                   else None)
    return {
        "target": name, "server": t["server"], "tool": res["tool"],
        "readings_committed": committed,
        "readings_per_s": round(committed / res["duration_s"], 1),
        "batches": {k: res[k] for k in ("requests", "requests_per_s", "duration_s", "non_207",
                                        "socket_errors", "status_counts", "accepted_readings",
                                        "error_samples")},
        "latency_ms": res["latency_ms"],
        "rss_mb": {"peak": round(rss.peak / 1024, 1), "end": round(rss_end / 1024, 1)},
        "pss_mb_end": round(pss_end / 1024, 1),
        "cpu_pct_of_one_core": cpu,
        "server_log_problems": server_log_problems(log_text),
        "profile": str(profile_path) if profile_path else None,
        "stages": stage_table,
    }


# ------------------------------------------------------------------ report

def markdown(records: list[dict], head: dict) -> str:
    m, ld = head["machine"], head["load"]
    lines = [
        *results.header_lines(head, "Ingest benchmark"),
        f"- load: {ld['tool']}, {ld['connections']} connections, {ld['duration_s']:g} s per target "
        f"after {ld['warmup_s']:g} s warm-up; {ld['readings_per_batch']:,} readings per batch "
        f"({ld['machines']} machines x {ld['metrics']} metrics, shape {ld.get('shape', 'agent')}, "
        f"{ld['bodies']} distinct bodies); "
        f"{ld['workers']} server workers; load generator, servers and PostgreSQL share the machine",
        "",
        "| shape | target | readings/s committed | vs baseline | batches/s | p50 ms | p99 ms "
        "| non-207 | RSS peak / end MB | CPU % server / postgres / loadgen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        c = r["cpu_pct_of_one_core"]
        ratio = f"{r['ratio_vs_baseline']:.2f}x" if r.get("ratio_vs_baseline") else "n/a"
        lines.append(
            f"| {r.get('shape', ld.get('shape'))} | {r['target']}"
            f"{' (profiled)' if r['profile'] else ''} | {r['readings_per_s']:,.0f} "
            f"| {ratio} | {r['batches']['requests_per_s']:,.1f} | {r['latency_ms']['p50']:,.1f} "
            f"| {r['latency_ms']['p99']:,.1f} | {r['batches']['non_207']} "
            f"| {r['rss_mb']['peak']:,.0f} / {r['rss_mb']['end']:,.0f} "
            f"| {c['server']} / {c['postgres']} / {c['loadgen']} |")
    lines.append("")
    for r in records:
        if r["cpu_pct_of_one_core"]["busiest_others"]:
            lines.append(f"- other processes busy during {r['target']}: "
                         + "; ".join(r["cpu_pct_of_one_core"]["busiest_others"]))
    lines.append(f"CPU % is of one core (the machine has {m['nproc']}: 100 = one core busy).")
    lines.append("")
    for r in records:
        if r.get("stages"):
            lines += stages.markdown(f"Where {r['target']}'s CPU went, shape {r.get('shape')}",
                                     r["stages"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, help="timed load per target (s)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="server worker processes (both targets)")
    p.add_argument("--only", choices=sorted(TARGETS))
    p.add_argument("--out", type=Path, default=results.RESULTS)
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up load per target (s)")
    p.add_argument("--bodies", type=int, default=100, help="distinct request bodies to rotate")
    p.add_argument("--loadgen", choices=["auto", "wrk", "builtin"], default="auto")
    p.add_argument("--shape", choices=["both", "agent", "wide"], default="both",
                   help="agent (buffered): one machine's 20 metrics x 50 timestamps per batch; "
                        "wide (live): 1,000 series x 1 timestamp per batch (one poll of 50 "
                        "machines); both (default): each, with its own baseline run")
    p.add_argument("--profile", action="store_true",
                   help="record our server with py-spy (flamegraph SVG in --out)")
    p.add_argument("--stages", action="store_true",
                   help="sample the whole machine with perf during haltless's timed load and "
                        "print CPU per reading by stage (bench/stages.py)")
    args = p.parse_args(argv)
    if args.loadgen == "wrk" and shutil.which("wrk") is None:
        p.error("--loadgen wrk: wrk is not on PATH")
    args.use_wrk = {"auto": shutil.which("wrk") is not None, "wrk": True, "builtin": False}[args.loadgen]
    if args.stages and stages.available():
        p.error(f"--stages: {stages.available()}")
    run = results.Run("ingest", args.out)
    args.out, stamp = run.out, run.run_id
    names = [args.only] if args.only else ["baseline", "haltless"]
    shapes = ["agent", "wide"] if args.shape == "both" else [args.shape]

    records: list[dict] = []
    with ps.bench_postgres("haltless-bench-") as (work, dsn, pg_pid, idle):
        head = run.header(
            results.versions("fastapi", "uvicorn", "pydantic", "httptools", dsn=dsn,
                             wrk=args.use_wrk), idle,
            load={"tool": "wrk" if args.use_wrk else "builtin",
                  "duration_s": args.duration, "warmup_s": args.warmup,
                  "connections": args.connections, "workers": args.workers,
                  "readings_per_batch": METRICS * STEPS, "machines": MACHINES,
                  "shape": args.shape,
                  "metrics": METRICS, "timestamps_per_body": STEPS, "spacing_ms": 10,
                  "bodies": args.bodies})
        for shape in shapes:
            for name in names:
                records.append({"shape": shape, **run_target(
                    name, dsn, pg_pid, argparse.Namespace(**{**vars(args), "shape": shape}),
                    work, stamp)})
    for r in records:
        base = next((b["readings_per_s"] for b in records
                     if b["target"] == "baseline" and b["shape"] == r["shape"]), None)
        r["ratio_vs_baseline"] = round(r["readings_per_s"] / base, 2) if base else None
    md = markdown(records, head)
    print()
    print(md)
    for r in records:
        if r["batches"]["non_207"] or r["batches"]["socket_errors"] or r["server_log_problems"]:
            print(f"{r['target']}: non-207 {r['batches']['non_207']}, socket errors "
                  f"{r['batches']['socket_errors']}, samples {r['batches']['error_samples'][:3]}, "
                  f"server log: {r['server_log_problems'][:5]}")
    run.append(records, md)


if __name__ == "__main__":
    main()
