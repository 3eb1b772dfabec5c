"""Poller benchmark: `haltless pollers` against simulated Modbus and OPC-UA devices.

    python -m bench.pollers [--scenario modbus|opcua|subscribe|both|all] [--duration 60]
                            [--sources 1000] [--registers 10] [--nodes 10000]
                            [--nodes-per-source 1000] [--device-processes 2]
                            [--device asyncua|node-opcua] [--publishing-interval-ms 1000]
                            [--sampling-interval-ms MS] [--profile] [--out bench/results/]

Scenario A (modbus): ``--sources`` Modbus TCP sources at a 1 s interval, each
reading ``--registers`` consecutive holding registers (one request per poll)
over its own TCP connection, against pymodbus TCP servers running in
``--device-processes`` separate processes (sources spread round-robin).

Scenario B (opcua): ``--nodes`` OPC-UA nodes at a 1 s interval, split into
sources of ``--nodes-per-source`` nodes (security None), against asyncua
servers in ``--device-processes`` separate processes. The servers give every
node a new value and SourceTimestamp once a second, as a real server would.

Scenario C (subscribe): the same devices and nodes as B, the sources in
OPC-UA ``mode = "subscribe"`` (publishing interval ``--publishing-interval-ms``,
default 1 s; sampling the same unless ``--sampling-interval-ms``; one
subscription per source): the server sends each node's change once a
second. Measured: values received (the poller's ``notifications``) and
committed per second against the node count (a lost notification shows
there, and as ``missed``: publish sequence numbers the server skipped), the
delivery lag (SourceTimestamp to arrival, p99 per 10 s window), and the
poller's CPU per 1,000 changes/s, to put beside scenario B's for the same
nodes. The issue's bar: >= 50,000 nodes per process, nothing lost, p99
delivery lag < 1 s (``--nodes 50000 --nodes-per-source 5000``).

For each scenario: one embedded PostgreSQL (shared by the scenarios, reading
tables emptied in between), the device processes, the sources inserted into
``ingest_sources``, then ONE poller process, ``haltless pollers --processes 1
--stats-file F``. Its first stats line (10 s, the connects and series
creation) is warm-up; the measured window runs from the first to the last of
the next ceil(duration / 10) stats lines. Over that window: polls and lag from
the poller's own stats lines, readings/s as the delta of ``SELECT sum(n) FROM
reading_chunks``, CPU seconds of the poller, the devices and PostgreSQL from
/proc. See bench/README.md.

The simulated devices are ``bench/devices.py``, one process each; with
``--device node-opcua`` the OPC-UA ones are ``bench/devices_node/server.js``
(node-opcua, installed with ``npm ci`` on first use).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench import procstat as ps  # noqa: E402
from bench import results  # noqa: E402
from bench.syncdb import DB  # noqa: E402
from haltless.server.localcluster import free_port  # noqa: E402

HOST = "127.0.0.1"
STATS_EVERY = 10.0  # seconds between the poller's stats lines (server/direct.py)


# ================================================================== helpers

COUNT_SQL = ("SELECT (SELECT coalesce(sum(n), 0) FROM reading_chunks)"
             " + (SELECT coalesce(sum(n), 0) FROM reading_blocks)")

# --trace-gc: the poller runs under this wrapper, which times every garbage
# collection (gc.callbacks) and appends the ones of >= 1 ms, and every gen-2
# one, to $BENCH_GC_TRACE; a diagnostic, not part of the measured setup.
GC_WRAPPER = r"""
import gc, json, os, sys, time
_f = open(os.environ["BENCH_GC_TRACE"], "a", buffering=1)
_t = [0.0, time.time()]
_sum = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
def _cb(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _t[0]) * 1000
    g = info["generation"]
    _sum[g][0] += 1
    _sum[g][1] += ms
    now = time.time()
    if ms >= 1.0 or g == 2:
        _f.write(json.dumps({"gen": g, "ms": round(ms, 2), "collected": info["collected"],
                             "at": now}) + "\n")
    if now - _t[1] >= 1.0:
        _f.write(json.dumps({"summary": {k: [v[0], round(v[1], 2)] for k, v in _sum.items()},
                             "at": now}) + "\n")
        _t[1] = now
        for v in _sum.values():
            v[0], v[1] = 0, 0.0
gc.callbacks.append(_cb)
sys.argv[0] = "haltless"
from haltless.server.cli import main
main()
"""


def code_digest() -> str:
    """SHA-256 (12 hex) of the code under test (core/, pollers/, server/,
    haltless_fast/), so a run on a dirty tree can still be matched to the code
    it measured."""
    import hashlib
    h = hashlib.sha256()
    for pattern in ("core/*.py", "pollers/*.py", "server/*.py", "server/migrations/*.sql", "haltless_fast/*.py",
                    "haltless_fast/*.pyx", "haltless_fast/*.pxd"):
        for f in sorted(ROOT.glob(pattern)):
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


# Where the poller's main-thread samples go, first match from the leaf up
# (GC wins wherever it is in the stack).
PROFILE_GROUPS = [
    ("modbus read: pymodbus client", ("pymodbus/",)),
    ("modbus read: reader decode (pollers/modbus.py)", ("pollers/modbus.py",)),
    ("opcua read: asyncua client (request encode, response decode)", ("asyncua/",)),
    ("opcua read: reader (pollers/opcua.py)", ("pollers/opcua.py",)),
    ("write: Readings + validate/encode (runner.write, Ingestor)", ("SourceTask.write", "Ingestor.", "haltless_fast/")),
    ("DB: group COPY (GroupCommitWriter, asyncpg)", ("GroupCommitWriter",)),
    ("DB: lease tick / state flush / pool", ("PollerProcess.", "asyncpg/pool.py", "PoolConnectionHolder")),
    ("schedule: PollLoop, wait_for, sleep", ("pollers/schedule.py", "asyncio/tasks.py")),
]
IDLE_LEAVES = ("epoll_pwait", "epoll_wait")


def summarize_profile(raw: Path, top: int = 25) -> dict:
    """From py-spy's raw output ('frame;frame;... count' per line): the
    poller's main thread only (stacks through run_process), idle samples
    (blocked in epoll) counted apart; self and inclusive shares per function
    and shares per group (PROFILE_GROUPS) of the busy samples."""
    busy = idle = other = 0
    self_c: Counter = Counter()
    incl: Counter = Counter()
    groups: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = [_short(f) for f in stack.split(";") if "(" in f]
        if not any(f.startswith("run_process ") for f in frames):
            other += n  # another thread (asyncio.to_thread workers)
            continue
        if frames[-1].startswith(IDLE_LEAVES):
            idle += n
            continue
        busy += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        group = "event loop: uvloop, syscalls, task stepping"
        if any(f.startswith("gc_collect_main") for f in frames):
            group = "garbage collection"
        else:
            for f in reversed(frames):
                hit = next((g for g, keys in PROFILE_GROUPS if any(k in f for k in keys)), None)
                if hit:
                    group = hit
                    break
        groups[group] += n

    def pct(c, k=top):
        return [(name, round(100 * v / busy, 1)) for name, v in c.most_common(k)] if busy else []
    return {"busy_samples": busy, "idle_samples": idle, "other_thread_samples": other,
            "samples": busy, "groups_pct_of_busy": pct(groups, 20),
            "self_pct": pct(self_c), "inclusive_pct": pct(incl, 60)}


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)" so line numbers do not split a function
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    for anchor in ("site-packages", "main", "lib"):
        if anchor in parts:
            path = "/".join(parts[parts.index(anchor) + 1:])
            break
    return f"{name} ({path})"


# ================================================================== setup

async def _setup_sources(dsn: str, protocol: str, prefix: str, rows: list[dict]) -> None:
    """Machines ``<prefix>-0001...`` (one per source) and their sources, in the
    default organization; previous sources removed, reading tables emptied."""
    from haltless.server import db, store
    conn = await db.connect(dsn)
    try:
        await db.migrate(conn)
        org = await store.org_id(conn, None)
        await conn.execute("DELETE FROM ingest_sources")
        await conn.execute("DELETE FROM poller_processes")
        await conn.execute("TRUNCATE reading_chunks, reading_blocks, reading_timelines")
        idents = [f"{prefix}-{i + 1:04d}" for i in range(len(rows))]
        await conn.execute(
            "INSERT INTO machines (org_id, machine_identifier)"
            " SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING", org, idents)
        mids = dict(await conn.fetch(
            "SELECT machine_identifier, id FROM machines WHERE org_id = $1"
            " AND machine_identifier = ANY($2::text[])", org, idents))
        await conn.execute(
            "INSERT INTO ingest_sources (org_id, machine_id, name, protocol, host, port,"
            " poll_interval_seconds, is_active, config, secrets)"
            " SELECT $1, u.m, u.name, $2, $3, u.port, 1, true, u.cfg::jsonb, NULL"
            " FROM unnest($4::uuid[], $5::text[], $6::int[], $7::text[]) AS u (m, name, port, cfg)",
            org, protocol, HOST, [mids[i] for i in idents], [f"bench {i}" for i in idents],
            [r["port"] for r in rows], [json.dumps(r["config"]) for r in rows])
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def modbus_plan(args, ports: list[int]) -> list[dict]:
    regs = [{"address": a, "metric_name": f"reg_{a}"} for a in range(args.registers)]
    return [{"port": ports[j % len(ports)], "config": {"registers": regs, "unit_id": 1}}
            for j in range(args.sources)]


def opcua_layout(args) -> tuple[list[list[int]], list[int]]:
    """(node ids of each source, node count of each device): source j on
    device j % D, its nodes consecutive ids on that device starting at 1."""
    n_src = math.ceil(args.nodes / args.nodes_per_source)
    d = args.device_processes
    sizes = [min(args.nodes_per_source, args.nodes - j * args.nodes_per_source) for j in range(n_src)]
    used = [0] * d
    ids = []
    for j, size in enumerate(sizes):
        k = j % d
        ids.append(list(range(used[k] + 1, used[k] + 1 + size)))
        used[k] += size
    return ids, used


# ================================================================== one scenario
#
# run_scenario runs the phases below in order. Scenario holds what they
# start, so that stop_scenario stops all of it however far a run got.

@dataclass
class Scenario:
    kind: str  # "modbus", "opcua" or "subscribe"
    args: argparse.Namespace
    dsn: str
    pg_pid: int
    work: Path
    stamp: str
    devices: list[subprocess.Popen] = field(default_factory=list)
    poller: subprocess.Popen | None = None
    profiler: subprocess.Popen | None = None
    rss: ps.RssSampler | None = None
    # its files in the work dir
    device_log: Path = field(init=False)
    stats_file: Path = field(init=False)
    poller_log: Path = field(init=False)
    gc_trace: Path = field(init=False)

    def __post_init__(self) -> None:
        self.device_log = self.work / f"devices-{self.kind}.log"
        self.stats_file = self.work / f"stats-{self.kind}.jsonl"
        self.poller_log = self.work / f"poller-{self.kind}.log"
        self.gc_trace = self.work / f"gc-{self.kind}.jsonl"

    @property
    def windows(self) -> int:
        """Stats windows measured after the warm-up."""
        return max(1, math.ceil(self.args.duration / STATS_EVERY))

    def stats_lines(self) -> list[dict]:
        if not self.stats_file.exists():
            return []
        return [json.loads(ln) for ln in self.stats_file.read_text().splitlines() if ln.strip()]

    def wait_stats_lines(self, n: int, timeout: float) -> float:
        """When (time.monotonic()) the poller's n-th stats line was there."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.poller.poll() is not None:
                raise RuntimeError(f"poller exited with {self.poller.returncode}:\n"
                                   f"{self.poller_log.read_text()[-3000:]}")
            if len(self.stats_lines()) >= n:
                return time.monotonic()
            time.sleep(0.05)
        raise RuntimeError(f"no stats line {n} within {timeout:.0f} s:\n"
                           f"{self.poller_log.read_text()[-3000:]}")

    def cpu_now(self) -> dict:
        return {"poller": ps.cpu_seconds(ps.tree(self.poller.pid)),
                "devices": ps.cpu_seconds([q for d in self.devices for q in ps.tree(d.pid)]),
                "postgres": ps.cpu_seconds(ps.tree(self.pg_pid))}


class Plan(NamedTuple):
    """The sources of a scenario (port and config of each), its parameters
    for the record, and the readings/s that polling all of them means."""
    rows: list[dict]
    params: dict
    expected_readings_per_s: int


@dataclass
class Window:
    """What measure_window read at the start (0) and the end (1) of the
    measured stats windows, and the database's state right after."""
    w0: float
    w1: float
    c0: int
    c1: int
    cpu0: dict
    cpu1: dict
    busy0: tuple[float, float]
    busy1: tuple[float, float]
    ticks0: dict
    ticks1: dict
    rss_end: int
    profiler_cpu: float | None
    source_errors: list
    db_state: dict


def run_scenario(kind: str, args, dsn: str, pg_pid: int, work: Path, stamp: str) -> dict:
    print(f"== scenario {kind}")
    sc = Scenario(kind, args, dsn, pg_pid, work, stamp)
    try:
        plan = set_up_devices_and_sources(sc)
        start_poller(sc)
        window = measure_window(sc)
        return collect_result(sc, plan, window)
    finally:
        stop_scenario(sc)


# ---- phase 1: devices, then one machine and one ingest_sources row per source

def set_up_devices_and_sources(sc: Scenario) -> Plan:
    t0 = time.monotonic()
    plan = start_modbus_devices(sc) if sc.kind == "modbus" else start_opcua_devices(sc)
    plan.params["devices_ready_s"] = round(time.monotonic() - t0, 1)
    print(f"  {len(sc.devices)} device processes ready in {plan.params['devices_ready_s']} s")
    protocol = "modbus" if sc.kind == "modbus" else "opcua"
    asyncio.run(_setup_sources(sc.dsn, protocol, "MB" if sc.kind == "modbus" else "UA", plan.rows))
    return plan


def spawn_device(sc: Scenario, kind: str, *extra: str) -> subprocess.Popen:
    """A simulated device (bench/devices.py, or with kind "node-opcua"
    bench/devices_node/server.js) in its own process, kept in sc.devices."""
    argv = ([NODE_DEVICE.node, str(NODE_DEVICE.dir / "server.js"), *extra] if kind == "node-opcua"
            else [sys.executable, "-m", "bench.devices", kind, *extra])
    with sc.device_log.open("ab") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    sc.devices.append(proc)
    return proc


def wait_ready(sc: Scenario, proc: subprocess.Popen, what: str, timeout: float) -> str:
    """The device's "READY <port> ..." line, once it serves."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].startswith("READY"):
        raise RuntimeError(f"{what} not ready within {timeout:.0f} s (exit {proc.poll()}):\n"
                           f"{sc.device_log.read_text()[-3000:]}")
    return line[0].strip()


def start_modbus_devices(sc: Scenario) -> Plan:
    args = sc.args
    ready = []
    for _ in range(args.device_processes):
        proc = spawn_device(sc, "modbus", "--registers", str(args.registers))
        ready.append(int(wait_ready(sc, proc, "modbus device", 60).split()[1]))
    return Plan(modbus_plan(args, ready), {
        "sources": args.sources, "registers_per_source": args.registers,
        "requests_per_poll": math.ceil(args.registers / 125), "interval_s": 1,
        "device_processes": args.device_processes, "device_ports": ready,
        "connections": args.sources, "device": "pymodbus ModbusTcpServer + SimDevice (uvloop)"},
        args.sources * args.registers)


class NodeDevice(NamedTuple):
    """bench/devices_node: the node-opcua device (--device node-opcua)."""
    dir: Path
    node: str = "node"
    npm: str = "npm"

    def version(self) -> str:
        lock = json.loads((self.dir / "package-lock.json").read_text())
        return lock["packages"]["node_modules/node-opcua"]["version"]

    def install(self) -> None:
        """``npm ci`` (the versions package-lock.json pins) into
        bench/devices_node/node_modules, once: it is git-ignored."""
        if (self.dir / "node_modules" / "node-opcua" / "package.json").exists():
            return
        print(f"  installing node-opcua into {self.dir / 'node_modules'} (npm ci, once)")
        subprocess.run([self.npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=self.dir,
                       check=True)


NODE_DEVICE = NodeDevice(ROOT / "bench" / "devices_node")


def start_opcua_devices(sc: Scenario) -> Plan:
    args = sc.args
    ids, per_dev = opcua_layout(args)
    node = args.device == "node-opcua"
    if node:
        NODE_DEVICE.install()
    # start them all, then wait: their (slow) node creation runs in parallel
    pending = []
    for count in per_dev:
        port = free_port()
        extra = ["--nodes", str(count), "--port", str(port),
                 "--max-nodes-per-read", str(args.opcua_max_nodes_per_read)]
        if node:
            extra += ["--pki", str(sc.work / f"node-opcua-pki-{port}")]
            if args.opcua_max_notifications_per_publish:
                extra += ["--max-notifications-per-publish", str(args.opcua_max_notifications_per_publish)]
        pending.append((spawn_device(sc, "node-opcua" if node else "opcua", *extra), port))
    ports, lines = [], []
    for proc, port in pending:
        lines.append(wait_ready(sc, proc, f"OPC-UA device on port {port}", args.device_timeout))
        ports.append(port)
    print("  devices: " + "; ".join(lines))
    rows = [{"port": ports[j % len(ports)],
             "config": {"nodes": [{"node_id": f"ns=2;i={i}", "metric_name": f"node_{i}"}
                                  for i in node_ids], "security_mode": "None"}}
            for j, node_ids in enumerate(ids)]
    mode, sub = "poll", {}
    if sc.kind == "subscribe":
        # publishing interval --publishing-interval-ms (default 1 s, the
        # sources' poll interval); sampling the same unless --sampling-interval-ms
        mode = "subscribe"
        sub = {"publishing_interval_ms": args.publishing_interval_ms,
               "sampling_interval_ms": (args.sampling_interval_ms if args.sampling_interval_ms is not None
                                        else "= publishing interval")}
        for r in rows:
            r["config"]["mode"] = "subscribe"
            r["config"]["publishing_interval_ms"] = args.publishing_interval_ms
            if args.sampling_interval_ms is not None:
                for n in r["config"]["nodes"]:
                    n["sampling_interval_ms"] = args.sampling_interval_ms
    device = ("asyncua Server, values + SourceTimestamp updated every second (uvloop)"
              if not node else
              f"node-opcua {NODE_DEVICE.version()} OPCUAServer (node {node_version()}), "
              "setValueFromSource every second")
    return Plan(rows, {"mode": mode, **sub,
        "nodes": args.nodes, "nodes_per_source": args.nodes_per_source, "sources": len(rows),
        "interval_s": 1, "device_processes": len(per_dev), "nodes_per_device": per_dev,
        "security_mode": "None",
        "server_max_nodes_per_read": args.opcua_max_nodes_per_read or f"{args.device} default",
        "server_max_notifications_per_publish": (args.opcua_max_notifications_per_publish
                                                 or ("node-opcua default (1000)" if node else "no limit")),
        "device_kind": args.device, "device": device},
        args.nodes)


def node_version() -> str:
    try:
        return subprocess.run([NODE_DEVICE.node, "--version"], capture_output=True, text=True, check=False,
                              timeout=10).stdout.strip()
    except OSError:
        return "?"


# ---- phase 2: one poller process

def start_poller(sc: Scenario) -> None:
    """`haltless pollers --processes 1 --stats-file F` (under GC_WRAPPER with
    --trace-gc), its RSS sampled from now on."""
    sc.stats_file.unlink(missing_ok=True)
    env = dict(os.environ, HALTLESS_DATABASE_URL=sc.dsn,
               HALTLESS_DATA_DIR=str(sc.work / "poller-data"),
               HALTLESS_POLL_ALLOW="127.0.0.0/8", HALTLESS_LOG_LEVEL="info")
    argv = [sys.executable, "-m", "haltless.server.cli", "pollers", "--processes", "1",
            "--stats-file", str(sc.stats_file)]
    if sc.args.trace_gc:
        sc.gc_trace.unlink(missing_ok=True)
        env["BENCH_GC_TRACE"] = str(sc.gc_trace)
        argv = [sys.executable, "-c", GC_WRAPPER, *argv[3:]]
    with sc.poller_log.open("wb") as log:
        sc.poller = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    print(f"  poller pid {sc.poller.pid}: haltless pollers --processes 1 --stats-file ...")
    sc.rss = ps.RssSampler(sc.poller.pid)
    sc.rss.start()


# ---- phase 3: from the last warm-up stats line to the last measured one

def measure_window(sc: Scenario) -> Window:
    args = sc.args
    with DB(sc.dsn) as dbh:
        sc.wait_stats_lines(args.warmup_lines, STATS_EVERY * args.warmup_lines + 60)
        w0 = time.monotonic()
        c0 = dbh.val(COUNT_SQL)
        cpu0 = sc.cpu_now()
        busy0 = ps.machine_busy()
        ticks0 = ps.all_ticks()
        if args.profile:
            start_profiler(sc)
        print(f"  warm-up done; measuring {sc.windows} stats windows "
              f"(~{sc.windows * STATS_EVERY:.0f} s)")
        w1 = sc.wait_stats_lines(args.warmup_lines + sc.windows, sc.windows * STATS_EVERY + 60)
        c1 = dbh.val(COUNT_SQL)
        cpu1 = sc.cpu_now()
        busy1 = ps.machine_busy()
        ticks1 = ps.all_ticks()
        rss_end = sc.rss.current()
        profiler_cpu = None
        if sc.profiler is not None and sc.profiler.poll() is None:
            profiler_cpu = ps.cpu_seconds([sc.profiler.pid])
            sc.profiler.send_signal(signal.SIGINT)
        # the window has ended
        errors = dbh.fetch(
            "SELECT left(last_error, 160) AS e, count(*) AS n FROM ingest_sources"
            " WHERE last_error IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT 5")
        db_state = dict(dbh.fetch(
            "SELECT count(*) FILTER (WHERE lease_owner IS NOT NULL) AS leased,"
            " count(*) FILTER (WHERE last_success_at > now() - interval '5 seconds') AS fresh,"
            " coalesce(sum(polls_missed), 0)::bigint AS missed_total,"
            " coalesce(sum(points_failed), 0)::bigint AS points_failed"
            " FROM ingest_sources")[0])
    return Window(w0, w1, c0, c1, cpu0, cpu1, busy0, busy1, ticks0, ticks1, rss_end,
                  profiler_cpu, errors, db_state)


def start_profiler(sc: Scenario) -> None:
    """py-spy on the poller, until measure_window sends it SIGINT at the end
    of the window (it then writes the file)."""
    args = sc.args
    exe = ps.py_spy()
    if exe is None:
        return
    prof_path = args.out / f"pollers-{sc.stamp}-{sc.kind}-profile.txt"
    print(f"  profiling the poller with py-spy -> {prof_path}")
    # --native unwinds C/Cython frames (uvloop, asyncpg) too; it has
    # to pause the process for each sample, so it is opt-in
    how = ["--native"] if args.profile_native else ["--nonblocking"]
    sc.profiler = subprocess.Popen(
        [exe, "record", "--pid", str(sc.poller.pid), "--rate", str(args.profile_rate),
         "--duration", str(round(sc.windows * STATS_EVERY + 120)), *how,
         "--format", "raw", "-o", str(prof_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# ---- phase 4: the profile written, the stats lines and the counts turned into the record

def collect_result(sc: Scenario, plan: Plan, m: Window) -> dict:
    args, kind, profiler = sc.args, sc.kind, sc.profiler
    sc.rss.stop()
    if profiler is not None:
        try:
            _, err = profiler.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            ps.stop_process(profiler, timeout=10)
            err = "py-spy did not finish"
        if profiler.returncode != 0:
            print(f"  py-spy failed: {err[-500:]}")
    windows = sc.windows
    all_lines = sc.stats_lines()
    measured = all_lines[args.warmup_lines:args.warmup_lines + windows]
    span = measured[-1]["at"] - all_lines[args.warmup_lines - 1]["at"]
    wall = m.w1 - m.w0
    ours = {sc.poller.pid, sc.pg_pid, os.getpid(), *(d.pid for d in sc.devices)}
    if profiler is not None:
        ours.add(profiler.pid)
    ours |= set(ps.tree(sc.pg_pid)) | {q for d in sc.devices for q in ps.tree(d.pid)}
    polls = sum(w["polls"] for w in measured)
    p99s = [w["lag_ms_p99"] for w in measured if w["lag_ms_p99"] is not None]
    p50s = [w["lag_ms_p50"] for w in measured if w["lag_ms_p50"] is not None]
    maxes = [w["lag_ms_max"] for w in measured if w["lag_ms_max"] is not None]
    cpu = {k: round(100 * (m.cpu1[k] - m.cpu0[k]) / wall, 1) for k in m.cpu0}
    cpu["machine_total"] = round(100 * (m.busy1[0] - m.busy0[0]) / (m.busy1[1] - m.busy0[1]), 1)
    cpu["busiest_others"] = ps.top_others(m.ticks0, m.ticks1, ours, wall)
    # everything else on the machine (another benchmark, a build...): it competes for the 2 cores
    cpu["others_total"] = round(100 * sum(t - m.ticks0.get(k, 0) for k, t in m.ticks1.items()
                                          if k[0] not in ours) / ps.TICK / wall, 1)
    if m.profiler_cpu is not None:
        cpu["py_spy"] = round(100 * m.profiler_cpu / wall, 1)  # started with the window
    log_text = sc.poller_log.read_text(errors="replace")
    problems = [ln for ln in log_text.splitlines()
                if any(w in ln for w in ("WARNING", "ERROR", "Traceback", "CRITICAL"))][:20]
    readings_ps = (m.c1 - m.c0) / wall
    result = {
        "scenario": kind,
        "params": {**plan.params, "duration_s": args.duration,
                   "warmup_stats_lines": args.warmup_lines,
                   "stats_windows": windows, "poller_processes": 1,
                   "profiled": profiler is not None,
                   "profile_native": bool(profiler is not None and args.profile_native),
                   "profile_rate": args.profile_rate,
                   "gc_traced": args.trace_gc},
        "window_s": round(wall, 2),
        "stats_span_s": round(span, 2),
        "sources_polled": measured[-1]["sources"],
        "polls": polls,
        "polls_per_s": round(polls / span, 1),
        "expected_polls_per_s": len(plan.rows),
        "readings_committed": m.c1 - m.c0,
        "readings_per_s": round(readings_ps, 1),
        "expected_readings_per_s": plan.expected_readings_per_s,
        "readings_reported_by_poller": sum(w["readings"] for w in measured),
        "lag_ms": {"p50_mean": round(sum(p50s) / len(p50s), 2) if p50s else None,
                   "p99_worst": max(p99s) if p99s else None,
                   "p99_mean": round(sum(p99s) / len(p99s), 2) if p99s else None,
                   "max": max(maxes) if maxes else None},
        "missed": sum(w["missed"] for w in measured),
        "failed": sum(w["failed"] for w in measured),
        "cpu_pct_of_one_core": cpu,
        "poller_rss_mb": {"peak": round(sc.rss.peak / 1024, 1), "end": round(m.rss_end / 1024, 1)},
        "db_state_after": m.db_state,
        "source_errors": [dict(r) for r in m.source_errors],
        "poller_log_problems": problems,
        "windows": all_lines[:args.warmup_lines + windows],
    }
    if kind == "subscribe":
        # the server sends what changed: no polls; values and their delivery lag instead
        p99d = [w["delivery_ms_p99"] for w in measured if w.get("delivery_ms_p99") is not None]
        values = sum(w.get("notifications", 0) for w in measured)
        result["subscribe"] = {
            "publishes": sum(w.get("publishes", 0) for w in measured),
            "values_received": values,
            "values_per_s": round(values / span, 1),
            "dropped_lease": sum(w.get("dropped", 0) for w in measured),
            "delivery_ms": {"p99_worst": max(p99d) if p99d else None,
                            "p99_mean": round(sum(p99d) / len(p99d), 1) if p99d else None,
                            "max": max((w.get("delivery_ms_max") or 0) for w in measured) or None},
            # per value received: the committed count moves by whole flushes
            # (HALTLESS_POLL_FLUSH_SECONDS, 10 s), up to a third of a 30 s window
            "poller_cpu_pct_per_1000_changes_s": (round(cpu["poller"] / (values / span / 1000), 2)
                                                  if values else None),
            "device_cpu_pct_per_1000_changes_s": (round(cpu["devices"] / (values / span / 1000), 2)
                                                  if values else None)}
    elif kind == "opcua":
        result["poller_cpu_pct_per_1000_readings_s"] = (round(cpu["poller"] / (readings_ps / 1000), 2)
                                                        if readings_ps else None)
    if args.trace_gc:
        result["gc"] = gc_summary(sc.gc_trace, all_lines[args.warmup_lines - 1]["at"],
                                  measured[-1]["at"])
    result["bar"] = judge(kind, result)
    return result


# ---- last: stop whatever was started (SIGTERM all devices first: they stop in parallel)

def stop_scenario(sc: Scenario) -> None:
    if sc.poller is not None:
        ps.stop_process(sc.poller, timeout=15)
    if sc.profiler is not None and sc.profiler.poll() is None:
        ps.stop_process(sc.profiler, timeout=10)
    for d in sc.devices:
        if d.poll() is None:
            try:
                d.terminate()
            except ProcessLookupError:
                pass
    for d in sc.devices:
        ps.stop_process(d, timeout=10)


def gc_summary(path: Path, t0: float, t1: float) -> dict:
    """Per generation within the measured window: every collection's count and
    total time (from the wrapper's per-second sums), and the longest pauses."""
    ev = []
    if path.exists():
        ev = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    ev = [e for e in ev if t0 <= e["at"] <= t1]
    sums = [e["summary"] for e in ev if "summary" in e]
    pauses = [e for e in ev if "gen" in e]
    out = {}
    for g in (0, 1, 2):
        ms = [e["ms"] for e in pauses if e["gen"] == g]
        out[f"gen{g}"] = {"count": sum(s[str(g)][0] for s in sums),
                          "total_ms": round(sum(s[str(g)][1] for s in sums), 1),
                          "max_ms": max(ms) if ms else None}
    out["pct_of_window"] = round(100 * sum(v["total_ms"] for v in out.values()) / 1000 / (t1 - t0), 2)
    out["longest"] = sorted(pauses, key=lambda e: -e["ms"])[:5]
    if path.exists():
        fz = [json.loads(ln) for ln in path.read_text().splitlines() if '"frozen"' in ln]
        if fz:
            out["frozen_objects"] = fz[0]["frozen"]
    return out


def judge(kind: str, r: dict) -> dict:
    """The issue's bars, stated with the numbers they were judged on."""
    if kind == "modbus":
        ok_lag = r["lag_ms"]["p99_worst"] is not None and r["lag_ms"]["p99_worst"] < 100
        ok_missed = r["missed"] == 0
        return {"text": "p99 poll-start lag < 100 ms (worst 10 s window) and no missed polls",
                "lag_ok": ok_lag, "missed_ok": ok_missed, "pass": ok_lag and ok_missed}
    if kind == "subscribe":
        sub = r["subscribe"]
        ok_lost = (r["missed"] == 0 and sub["dropped_lease"] == 0
                   and sub["values_per_s"] >= 0.99 * r["expected_readings_per_s"]
                   and r["readings_per_s"] >= 0.99 * r["expected_readings_per_s"])
        ok_lag = sub["delivery_ms"]["p99_worst"] is not None and sub["delivery_ms"]["p99_worst"] < 1000
        ok_failed = r["failed"] == 0
        return {"text": "every change of every node received and committed (>= 99% of the node "
                        "count per second, no skipped publish, none dropped), p99 delivery lag < 1 s "
                        "in every 10 s window, no failed subscribe",
                "lost_ok": ok_lost, "lag_ok": ok_lag, "failed_ok": ok_failed,
                "pass": ok_lost and ok_lag and ok_failed}
    ok_missed = r["missed"] == 0
    ok_rate = r["readings_per_s"] >= 0.99 * r["expected_readings_per_s"]
    ok_failed = r["failed"] == 0
    return {"text": "every node read every second: no missed and no failed polls, and committed "
                    "readings/s >= 99% of the node count",
            "missed_ok": ok_missed, "failed_ok": ok_failed, "rate_ok": ok_rate,
            "pass": ok_missed and ok_failed and ok_rate}


# ================================================================== report

def bar_cell(r: dict) -> str:
    """PASS/FAIL; a profiled run (py-spy steals CPU and, with --native, pauses
    the poller) is not judged, and an experiment changed the poller."""
    p, verdict = r["params"], "PASS" if r["bar"]["pass"] else "FAIL"
    if p.get("profiled"):
        return f"not judged (profiled; measured {verdict})"
    if p.get("gc_freeze_after_s"):
        return f"{verdict} (experiment, not the shipped poller)"
    return verdict


def markdown(records: list[dict], head: dict) -> str:
    m = head["machine"]
    lines = [
        *results.header_lines(head, "Poller benchmark"),
        f"- one poller process (`haltless pollers --processes 1`); the first "
        f"{records[0]['params']['warmup_stats_lines']} stats line(s) (~10 s each) are warm-up; "
        "devices, poller and PostgreSQL share the machine",
        "",
        "| scenario | sources | polls/s (expected) | readings/s committed (expected) "
        "| lag ms p50 mean / p99 mean / p99 worst / max | missed | failed "
        "| CPU % poller / devices / postgres / machine | poller RSS MB peak / end | bar |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for r in records:
        c, lag, p = r["cpu_pct_of_one_core"], r["lag_ms"], r["params"]
        what = (f"modbus: {p['sources']} x {p['registers_per_source']} registers"
                if r["scenario"] == "modbus" else
                f"{r['scenario']}: {p['nodes']:,} nodes in {p['sources']} x {p['nodes_per_source']}"
                + (f", server MaxNodesPerRead {p['server_max_nodes_per_read']}"
                   if isinstance(p.get("server_max_nodes_per_read"), int) else "")
                + (f", {p['device_kind']} device" if p.get("device_kind", "asyncua") != "asyncua" else "")
                + (f", server MaxNotificationsPerPublish {p['server_max_notifications_per_publish']}"
                   if isinstance(p.get("server_max_notifications_per_publish"), int) else "")
                + (f", publishing {p['publishing_interval_ms']:g} ms" if "publishing_interval_ms" in p else "")
                + (f", sampling {p['sampling_interval_ms']:g} ms"
                   if isinstance(p.get("sampling_interval_ms"), (int, float)) else ""))
        if p["profiled"]:
            what += " (profiled, native)" if p.get("profile_native") else " (profiled)"
        if p.get("gc_freeze_after_s"):
            what += f" (EXPERIMENT: gc.freeze() at {p['gc_freeze_after_s']:g} s)"
        elif p.get("gc_traced"):
            what += " (gc traced)"
        lines.append(
            f"| {what} | {r['sources_polled']} | {r['polls_per_s']:,.1f} ({r['expected_polls_per_s']:,}) "
            f"| {r['readings_per_s']:,.0f} ({r['expected_readings_per_s']:,}) "
            f"| {lag['p50_mean']} / {lag['p99_mean']} / {lag['p99_worst']} / {lag['max']} "
            f"| {r['missed']:,} | {r['failed']:,} "
            f"| {c['poller']} / {c['devices']} / {c['postgres']} / {c['machine_total']} "
            f"| {r['poller_rss_mb']['peak']:,.0f} / {r['poller_rss_mb']['end']:,.0f} "
            f"| {bar_cell(r)} |")
    lines.append("")
    for r in records:
        lines.append(f"- {r['scenario']} bar ({r['bar']['text']}): "
                     f"**{bar_cell(r)}**; measured window {r['window_s']} s")
        per = ", ".join(f"{w['lag_ms_p99']}" for w in r["windows"][r["params"]["warmup_stats_lines"]:])
        lines.append(f"  - p99 lag per 10 s window (ms): {per}; missed per window: "
                     + ", ".join(str(w["missed"]) for w in r["windows"][r["params"]["warmup_stats_lines"]:]))
        if r["scenario"] == "subscribe":
            sub = r["subscribe"]
            ws = r["windows"][r["params"]["warmup_stats_lines"]:]
            lines.append("  - subscribe, per 10 s window: delivery p99 (ms) "
                         + ", ".join(str(w.get("delivery_ms_p99")) for w in ws) + "; values received "
                         + ", ".join(f"{w.get('notifications', 0):,}" for w in ws) + "; dropped "
                         + ", ".join(str(w.get("dropped", 0)) for w in ws))
            lines.append(f"  - subscribe: {sub['values_per_s']:,.0f} values/s received, delivery lag "
                         f"p99 mean {sub['delivery_ms']['p99_mean']} ms / worst {sub['delivery_ms']['p99_worst']} "
                         f"ms / max {sub['delivery_ms']['max']} ms, {sub['dropped_lease']} dropped; poller "
                         f"{sub['poller_cpu_pct_per_1000_changes_s']}% of a core per 1,000 changes/s "
                         f"(devices {sub.get('device_cpu_pct_per_1000_changes_s')}%)")
        elif r.get("poller_cpu_pct_per_1000_readings_s") is not None:
            lines.append(f"  - poll: poller {r['poller_cpu_pct_per_1000_readings_s']}% of a core "
                         "per 1,000 readings/s")
        c = r["cpu_pct_of_one_core"]
        if c["busiest_others"] or c.get("others_total", 0) >= 10:
            lines.append(f"  - other processes used {c.get('others_total')}% of a core in the window"
                         + (f"{' (NOT an idle machine)' if c.get('others_total', 0) >= 20 else ''}: "
                            + "; ".join(c["busiest_others"]) if c["busiest_others"] else ""))
        if r["source_errors"]:
            lines.append("  - source errors: " + "; ".join(f"{e['n']}x {e['e']}" for e in r["source_errors"]))
        if r["poller_log_problems"]:
            lines.append(f"  - poller log: {len(r['poller_log_problems'])} warning/error lines, first: "
                         f"`{r['poller_log_problems'][0][:200]}`")
        if r.get("gc"):
            g = r["gc"]
            lines.append(f"  - garbage collection in the window: {g['pct_of_window']}% of wall time"
                         + (f" ({g['frozen_objects']:,} objects frozen)" if g.get("frozen_objects") else "")
                         + "; " + "; ".join(
                f"{k} {v['count']}x, {v['total_ms']} ms in all, longest {v['max_ms']} ms"
                for k, v in g.items() if k.startswith("gen")))
        if r.get("profile"):
            pr = r["profile"]
            lines.append(f"  - py-spy{' --native' if r['params'].get('profile_native') else ''} on the poller's "
                         f"main thread, {pr['busy_samples']} busy samples at {r['params'].get('profile_rate', 100)} Hz "
                         f"over {r['window_s']} s (file {pr['file']}). Busy time by part: "
                         + "; ".join(f"{k} {v}%" for k, v in pr["groups_pct_of_busy"]))
            lines.append("  - top self time: " + "; ".join(f"{k} {v}%" for k, v in pr["self_pct"][:12]))
    lines.append(f"CPU % is of one core (the machine has {m['nproc']}: 100 = one core busy).")
    return "\n".join(lines) + "\n"


# ================================================================== main

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.pollers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["modbus", "opcua", "subscribe", "both", "all"], default="both",
                   help="both: modbus and opcua; all: the three")
    p.add_argument("--duration", type=float, default=60.0,
                   help="measured time after warm-up, s (rounded up to 10 s stats windows)")
    p.add_argument("--sources", type=int, default=1000, help="Modbus sources (scenario modbus)")
    p.add_argument("--registers", type=int, default=10, help="consecutive holding registers per Modbus source")
    p.add_argument("--nodes", type=int, default=10000,
                   help="OPC-UA nodes in all (scenarios opcua and subscribe)")
    p.add_argument("--nodes-per-source", type=int, default=1000, help="OPC-UA nodes per source")
    p.add_argument("--opcua-max-nodes-per-read", type=int, default=0, metavar="N",
                   help="the OPC-UA servers announce MaxNodesPerRead N (the reader then splits each "
                        "source's read into requests of N nodes); default: asyncua's 10000")
    p.add_argument("--opcua-max-notifications-per-publish", type=int, default=0, metavar="N",
                   help="with --device node-opcua: the most notifications one PublishResponse carries "
                        "(default: node-opcua's 1000; asyncua's server has no limit)")
    p.add_argument("--device-processes", type=int, default=2, help="simulated-device server processes")
    p.add_argument("--device", choices=["asyncua", "node-opcua"], default="asyncua",
                   help="OPC-UA device (scenarios opcua and subscribe): bench/devices.py's asyncua server, or "
                        "bench/devices_node/server.js (node-opcua, installed by npm ci on first use)")
    p.add_argument("--publishing-interval-ms", type=float, default=1000.0,
                   help="scenario subscribe: the subscriptions' publishing interval, ms")
    p.add_argument("--sampling-interval-ms", type=float, default=None,
                   help="scenario subscribe: the monitored items' sampling interval, ms (default: the "
                        "publishing interval; 0 asks the server for every change as it happens)")
    p.add_argument("--device-timeout", type=float, default=300.0,
                   help="how long an OPC-UA device may take to create its nodes, s")
    p.add_argument("--warmup-lines", type=int, default=1, help="stats lines (10 s each) skipped as warm-up")
    p.add_argument("--profile", action="store_true",
                   help="record the poller with py-spy (raw collapsed stacks) over the measured window")
    p.add_argument("--profile-native", action="store_true",
                   help="with --profile: also unwind C/Cython frames (uvloop, asyncpg); pauses "
                        "the poller for every sample, so lag numbers of that run are inflated")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--trace-gc", action="store_true",
                   help="diagnostic: run the poller under a wrapper that times its garbage collections")
    p.add_argument("--out", type=Path, default=results.RESULTS)
    args = p.parse_args(argv)
    if args.profile_native:
        args.profile = True
    if args.warmup_lines < 1:
        p.error("--warmup-lines must be >= 1")
    run = results.Run("pollers", args.out)
    args.out, stamp = run.out, run.run_id
    kinds = {"both": ["modbus", "opcua"], "all": ["modbus", "opcua", "subscribe"]}.get(
        args.scenario, [args.scenario])

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    records: list[dict] = []
    with ps.bench_postgres("haltless-pollers-bench-") as (work, dsn, pg_pid, idle):
        head = run.header({**results.versions("pymodbus", "asyncua", dsn=dsn),
                           "code_sha256": code_digest()}, idle)
        for kind in kinds:
            r = run_scenario(kind, args, dsn, pg_pid, work, stamp)
            prof = args.out / f"pollers-{stamp}-{kind}-profile.txt"
            if r["params"]["profiled"] and prof.exists():
                r["profile"] = {"file": str(prof.relative_to(ROOT) if prof.is_relative_to(ROOT) else prof),
                                **summarize_profile(prof)}
            records.append(r)
            print(f"  {kind}: {r['polls_per_s']} polls/s, {r['readings_per_s']:,.0f} readings/s, "
                  f"lag p99 worst {r['lag_ms']['p99_worst']} ms, missed {r['missed']}, "
                  f"failed {r['failed']} -> {bar_cell(r)}")
    if not records:
        return
    md = markdown(records, head)
    print()
    print(md)
    run.append(records, md)


if __name__ == "__main__":
    main()
