"""MQTT benchmark: what one `haltless pollers` process ingests from a local
broker as a Sparkplug B primary host.

    python -m bench.mqtt [--rates 200,500,0] [--duration 30] [--publishers 2]
                         [--devices 4] [--metrics 100] [--flush 1] [--out bench/results/]

One embedded PostgreSQL, one mosquitto on 127.0.0.1, one Sparkplug source
(every group, host_id "bench", no machine: each device is its machine), ONE
poller process (``haltless pollers --processes 1 --stats-file F``), and
``--publishers`` edge-node processes (bench/sparkplug_edge.py), each with
``--devices`` devices, publishing DDATA of ``--metrics`` doubles (aliases,
metric timestamps), QoS 0 as Sparkplug data is, together ``rate`` messages
per second (0: as fast as they can). Per rate: the first stats line after
the publishers started (10 s) is warm-up; over the next ``ceil(duration /
10)`` the committed readings (``sum(n)`` of the hot rows), the messages the
source heard (its status), and CPU seconds of the poller, mosquitto, the
publishers and PostgreSQL from /proc. Everything shares the machine.
``--flush`` is HALTLESS_POLL_FLUSH_SECONDS (1 s here, so the count at the
window's edges is off by at most a second of readings; 10 s by default in
production, which commits fewer, bigger rows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench import procstat as ps  # noqa: E402
from bench import results  # noqa: E402
from bench.syncdb import DB  # noqa: E402
from haltless.server.localcluster import free_port  # noqa: E402

HOST = "127.0.0.1"
STATS_EVERY = 10.0
DRAIN_SETTLE = 15.0  # s the committed count must not move once the publishers stop
COUNT_SQL = "SELECT coalesce(sum(n), 0) FROM reading_chunks"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def start_broker(work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = work / "mosquitto.conf"
    lines = [f"listener {port} {HOST}", "allow_anonymous true",
             # an online subscriber that falls behind gets a queue, not drops
             "max_queued_messages 1000000", "log_type error"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    import socket
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def set_up(dsn: str, port: int, args) -> list[str]:
    """The source and one machine per device; reading tables emptied."""
    idents = [f"N{p}-D{d}" for p in range(args.publishers) for d in range(args.devices)]
    from haltless.server import db
    with DB(dsn) as h:
        h.run(db.migrate(h.conn))
        h.execute("DELETE FROM ingest_sources")
        h.execute("DELETE FROM poller_processes")
        h.execute("TRUNCATE reading_chunks, reading_blocks, reading_timelines")
        org = h.val("SELECT id FROM organizations WHERE name = 'default'")
        h.execute("INSERT INTO machines (org_id, machine_identifier) SELECT $1, unnest($2::text[])"
                  " ON CONFLICT DO NOTHING", org, idents)
        h.execute("INSERT INTO ingest_sources (org_id, name, protocol, host, port,"
                  " poll_interval_seconds, config) VALUES ($1, 'bench broker', 'mqtt', $2, $3, 1,"
                  " $4::jsonb)", org, HOST, port,
                  json.dumps({"format": "sparkplug_b", "host_id": "bench", "qos": 0}))
        h.execute("CHECKPOINT")
    return idents


class Run:
    """The processes of one rate: the poller (started once) and the publishers."""

    def __init__(self, work: Path, dsn: str, port: int, args) -> None:
        self.work, self.dsn, self.port, self.args = work, dsn, port, args
        self.stats = work / "stats.jsonl"
        self.poller: subprocess.Popen | None = None
        self.publishers: list[subprocess.Popen] = []

    def start_poller(self) -> None:
        env = dict(os.environ, HALTLESS_DATABASE_URL=self.dsn,
                   HALTLESS_DATA_DIR=str(self.work / "poller-data"),
                   HALTLESS_POLL_ALLOW="127.0.0.0/8", HALTLESS_LOG_LEVEL="info",
                   HALTLESS_POLL_FLUSH_SECONDS=str(self.args.flush))
        log = (self.work / "poller.log").open("wb")
        self.poller = subprocess.Popen(
            [sys.executable, "-m", "haltless.server.cli", "pollers", "--processes", "1",
             "--stats-file", str(self.stats)], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def stats_lines(self) -> list[dict]:
        if not self.stats.exists():
            return []
        return [json.loads(ln) for ln in self.stats.read_text().splitlines() if ln.strip()]

    def wait_lines(self, n: int, timeout: float) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.poller.poll() is not None:
                raise RuntimeError("poller exited:\n" + (self.work / "poller.log").read_text()[-3000:])
            if len(self.stats_lines()) >= n:
                return time.monotonic()
            time.sleep(0.05)
        raise RuntimeError(f"no stats line {n} within {timeout:.0f} s")

    def warnings(self) -> list[str]:
        """The poller's WARNING and ERROR lines so far (the last 10): a lost
        connection or a failed commit explains readings short of messages."""
        text = (self.work / "poller.log").read_text(errors="replace")
        return [ln for ln in text.splitlines() if "WARNING" in ln or "ERROR" in ln][-10:]

    def start_publishers(self, rate: float, seconds: float) -> None:
        per = rate / self.args.publishers if rate else 0
        self.publishers = [subprocess.Popen(
            [sys.executable, "-m", "bench.sparkplug_edge", "--port", str(self.port),
             "--group", "Plant1", "--node", f"N{p}", "--devices", str(self.args.devices),
             "--metrics", str(self.args.metrics), "--rate", str(per),
             "--duration", str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
            start_new_session=True) for p in range(self.args.publishers)]

    def published(self) -> int:
        total = 0
        for p in self.publishers:
            out, _ = p.communicate(timeout=120)
            total += json.loads(out.strip().splitlines()[-1])["messages"]
        return total


def source_messages(h: DB) -> int:
    st = h.val("SELECT protocol_status FROM ingest_sources")
    return json.loads(st)["messages"] if st else 0


def measure(run: Run, h: DB, rate: float, pg_pid: int, broker_pid: int) -> dict:
    args = run.args
    windows = max(1, math.ceil(args.duration / STATS_EVERY))
    seen = len(run.stats_lines())
    run.start_publishers(rate, (windows + 1) * STATS_EVERY + 5)
    run.wait_lines(seen + 1, STATS_EVERY + 30)  # warm-up: births, series created

    def cpu():
        return {"poller": ps.cpu_seconds(ps.tree(run.poller.pid)),
                "mosquitto": ps.cpu_seconds([broker_pid]),
                "publishers": ps.cpu_seconds([q for p in run.publishers for q in ps.tree(p.pid)]),
                "postgres": ps.cpu_seconds(ps.tree(pg_pid))}
    w0, c0, m0, cpu0, busy0 = time.monotonic(), h.val(COUNT_SQL), source_messages(h), cpu(), \
        ps.machine_busy()
    w1 = run.wait_lines(seen + 1 + windows, windows * STATS_EVERY + 30)
    c1, m1, cpu1, busy1 = h.val(COUNT_SQL), source_messages(h), cpu(), ps.machine_busy()
    published = run.published()
    # Once the publishers stopped: everything heard committed (a poller that
    # fell behind catches up; what it could not take was dropped before).
    # A poller behind its database commits in lumps seconds apart, so the
    # count must stand still for longer than one of those gaps.
    total = h.drained(COUNT_SQL, settle=DRAIN_SETTLE, timeout=180)
    heard = source_messages(h)
    wall = w1 - w0
    readings = c1 - c0
    used = {k: cpu1[k] - cpu0[k] for k in cpu0}
    per100k = (lambda s: round(s / readings * 100_000, 3) if readings else None)
    status = json.loads(h.val("SELECT protocol_status FROM ingest_sources") or "{}")
    written = h.val("SELECT readings_written FROM ingest_sources")
    failed = h.val("SELECT points_failed FROM ingest_sources")
    last_error = h.val("SELECT last_error FROM ingest_sources")
    return {
        "rate_offered_msgs_per_s": rate or "max",
        "published_msgs": published,
        "window_s": round(wall, 2),
        "messages_per_s": round((m1 - m0) / wall, 1),
        "readings_per_s": round(readings / wall, 1),
        "readings_committed": readings,
        "after_publishers_stopped": {"messages_heard_total": heard, "readings_total": total,
                                     "source_readings_written": written,
                                     "source_points_failed": failed,
                                     "source_last_error": last_error},
        "cpu_pct_of_one_core": {**{k: round(100 * v / wall, 1) for k, v in used.items()},
                                "machine_total": round(100 * (busy1[0] - busy0[0])
                                                       / (busy1[1] - busy0[1]), 1)},
        "cpu_s_per_100k_readings": {"poller": per100k(used["poller"]),
                                    "poller_and_postgres": per100k(used["poller"] + used["postgres"])},
        "poller_warnings": run.warnings(),
        "discarded": status.get("discarded"), "rebirths_requested": status.get("rebirths_requested"),
        "skipped": status.get("skipped"),
    }


def markdown(records: list[dict], head: dict) -> str:
    p = head["params"]
    lines = [*results.header_lines(head, "MQTT benchmark"),
             f"- one poller process, one Sparkplug source (primary host), {p['publishers']} edge-node "
             f"processes x {p['devices']} devices, DDATA of {p['metrics']} doubles (QoS 0), "
             f"HALTLESS_POLL_FLUSH_SECONDS={p['flush']}; mosquitto, publishers, poller and "
             "PostgreSQL share the machine", "",
             "| offered msgs/s | messages/s heard | readings/s committed | CPU % poller / postgres / "
             "mosquitto / publishers / machine | CPU-s per 100k readings: poller (+postgres) |",
             "|---:|---:|---:|---|---|"]
    for r in records:
        c, k = r["cpu_pct_of_one_core"], r["cpu_s_per_100k_readings"]
        lines.append(f"| {r['rate_offered_msgs_per_s']} | {r['messages_per_s']:,.0f} "
                     f"| {r['readings_per_s']:,.0f} | {c['poller']} / {c['postgres']} / "
                     f"{c['mosquitto']} / {c['publishers']} / {c['machine_total']} "
                     f"| {k['poller']} ({k['poller_and_postgres']}) |")
    lines.append("")
    lines.append("readings/s committed is over the window; a poller behind its database "
                 "commits in lumps seconds apart, so at 'max' it can read above or below "
                 "messages/s x metrics: after_publishers_stopped in the JSON lines has the "
                 "totals.")
    lines.append("")
    lines.append("CPU % is of one core (100 = one core busy). Rate 'max': the publishers send as "
                 "fast as they can; what the poller does not keep up with mosquitto queues or, "
                 "QoS 0, drops (sequence gaps: discarded messages and rebirth requests).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.mqtt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200,500,0",
                    help="messages/s offered by all publishers together, comma-separated; 0 = max")
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds per rate")
    ap.add_argument("--publishers", type=int, default=2)
    ap.add_argument("--devices", type=int, default=4, help="devices per publisher")
    ap.add_argument("--metrics", type=int, default=100, help="metrics per DDATA")
    ap.add_argument("--flush", type=float, default=1.0, help="HALTLESS_POLL_FLUSH_SECONDS")
    ap.add_argument("--out", type=Path, default=results.RESULTS)
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    bench_run = results.Run("mqtt", args.out)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    records = []
    with ps.bench_postgres("haltless-mqtt-bench-") as (work, dsn, pg_pid, idle):
        head = bench_run.header(results.versions("gmqtt", "protobuf", dsn=dsn), idle,
                                params={k: v for k, v in vars(args).items() if k != "out"})
        broker, port = start_broker(work)
        run = Run(work, dsn, port, args)
        try:
            set_up(dsn, port, args)
            run.start_poller()
            with DB(dsn) as h:
                end = time.monotonic() + 30
                while not (json.loads(h.val("SELECT coalesce(protocol_status::text, '{}')"
                                            " FROM ingest_sources")).get("connected")):
                    if time.monotonic() > end:
                        raise RuntimeError("the source did not connect")
                    time.sleep(0.2)
                for rate in rates:
                    print(f"== rate {rate or 'max'} msgs/s")
                    r = measure(run, h, rate, pg_pid, broker.pid)
                    print(f"  {r['messages_per_s']:,.0f} msgs/s, {r['readings_per_s']:,.0f} readings/s,"
                          f" poller {r['cpu_pct_of_one_core']['poller']}% of a core,"
                          f" {r['cpu_s_per_100k_readings']['poller']} CPU-s per 100k readings")
                    records.append(r)
                    time.sleep(3)  # let the broker's queue drain before the next rate
        finally:
            for p in run.publishers:
                ps.stop_process(p, timeout=5)
            if run.poller is not None:
                ps.stop_process(run.poller, timeout=15)
            ps.stop_process(broker, timeout=5)
    if records:
        md = markdown(records, head)
        print(md)
        bench_run.append(records, md)


if __name__ == "__main__":
    main()
