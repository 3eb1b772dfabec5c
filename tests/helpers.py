"""What the tests share, imported by name (``from helpers import ...``);
``conftest.py`` holds only the fixtures built from these.

- Paths and commands: ``ROOT`` (the checkout), ``HALTLESS`` (the command
  line as argv), ``haltless(*args)`` (run it and check the exit code),
  ``postmasters(pgdata)`` (the PostgreSQL servers running on a data dir).
- The database: ``run(coro)``, ``fetch``/``fetchval`` (one query on a fresh
  connection), ``make_tenant`` (an organization with machines and an API
  key: a ``Tenant``), ``start_test_postgres``/``stop_test_postgres`` (the
  suite's embedded PostgreSQL, watched by ``tests/pg_watchdog.py``).
- The server: ``ServerProcess`` (`haltless serve` on a free port),
  ``serving`` (the suite's server, for a fixture to yield from),
  ``serve_compactors`` (two serve workers' compaction loops).
- Ingest: ``now_iso``, ``reading`` (one reading as the API takes it) and
  ``post`` (POST /api/v1/ingest), ``wait_until_every_worker_refuses`` (a
  revoked key, once no worker's cache passes it any more).
- Metrics: ``scrape`` (GET /metrics), ``metric`` (a sum out of its text),
  ``workers``, ``multiproc_dir`` and ``worker_counts`` (a counter per worker).
- Waiting: ``wait_for(pred)``, a condition polled until true or a deadline:
  the way tests wait for something to happen, never a fixed sleep.
- ``free_port`` (haltless.server.localcluster's, the one definition) and
  ``twins`` (a kernel's pure-Python twin and compiled module, as pytest params).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import requests

from haltless.server import db, store
from haltless.server.localcluster import free_port

__all__ = ["ROOT", "HALTLESS", "haltless", "postmasters", "run", "fetch", "fetchval", "Tenant",
           "make_tenant", "start_test_postgres", "stop_test_postgres", "ServerProcess", "serving",
           "serve_compactors", "scrape", "metric", "workers", "multiproc_dir", "worker_counts",
           "now_iso", "reading", "post", "wait_until_every_worker_refuses", "wait_for", "free_port",
           "twins"]

ROOT = Path(__file__).resolve().parent.parent
HALTLESS = [sys.executable, "-m", "haltless.server.cli"]
WATCHDOG = Path(__file__).resolve().parent / "pg_watchdog.py"


# ------------------------------------------------------------------ commands and processes

def haltless(*args, env=None, check=True, timeout=60) -> subprocess.CompletedProcess:
    """The command line, run to its end; ``env`` entries set to None are removed."""
    e = {**os.environ, **(env or {})}
    e = {k: v for k, v in e.items() if v is not None}
    p = subprocess.run(HALTLESS + list(args), env=e, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"haltless {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


def source_tree(dst: Path) -> Path:
    """A copy of the project's sources as a fresh clone has them (what git
    tracks, and new files it does not ignore), without this checkout's
    build/, generated C or built extensions: a wheel built from it compiles
    from scratch."""
    import shutil
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in listed.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: all but the build's
        skip = {".git", ".venv", "build", "node_modules", "__pycache__", "haltless-data"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
                 and p.suffix not in (".so", ".c") and ".egg-info" not in str(p)]
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return dst


def postmasters(pgdata) -> list:
    """The postmasters (not their backends) running on ``pgdata``."""
    import psutil
    out = []
    for p in psutil.process_iter(["name", "cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if p.info["name"] == "postgres" and str(pgdata) in " ".join(cmd):
            try:
                if psutil.Process(p.info["ppid"]).name() != "postgres":
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
    return out


def wait_for(pred, timeout: float = 20.0, every: float = 0.2, what: str = "condition"):
    """``pred()``'s first true value, polled every ``every`` seconds; an
    AssertionError naming ``what`` if none came within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def twins(kernel: str):
    """(pure-Python twin, compiled kernel or None, pytest params over both) of
    haltless.fast.<kernel>: one test body runs against both."""
    py = importlib.import_module(f"haltless.fast.{kernel}_py")
    try:
        c = importlib.import_module(f"haltless.fast.{kernel}")
    except ImportError:  # pragma: no cover - `pip install -e .` builds it
        if os.environ.get("HALTLESS_REQUIRE_EXTENSIONS") == "1":
            raise
        c = None
    return py, c, [pytest.param(py, id="python"), pytest.param(c, id="cython", marks=pytest.mark.skipif(
        c is None, reason="extension not built (pip install -e . builds it)"))]


# ------------------------------------------------------------------ the database

def run(coro):
    return asyncio.run(coro)


def migrate(dsn: str) -> int:
    """Bring the database at ``dsn`` to the latest migration; its version."""
    async def go():
        c = await asyncpg.connect(dsn)
        try:
            return await db.migrate(c)
        finally:
            await c.close()
    return run(go())


async def _fetch(dsn, sql, *args):
    c = await asyncpg.connect(dsn)
    try:
        return await c.fetch(sql, *args)
    finally:
        await c.close()


def fetch(dsn, sql, *args):
    return run(_fetch(dsn, sql, *args))


def fetchval(dsn, sql, *args):
    rows = fetch(dsn, sql, *args)
    return rows[0][0] if rows else None


def start_test_postgres(data_dir: Path) -> tuple[str, subprocess.Popen]:
    """The suite's embedded PostgreSQL in ``data_dir`` (0755 and outside
    pytest's 0700 tree: as root it runs as its own system user), watched by
    tests/pg_watchdog.py, which stops it and removes ``data_dir`` if this
    process dies without doing so (a CI timeout's SIGKILL). Returns (DSN,
    the watchdog); ``stop_test_postgres`` undoes both.

    The watchdog starts first, so a kill while PostgreSQL starts is covered
    too (unless the postmaster comes up after the watchdog has looked)."""
    watchdog = subprocess.Popen(
        [sys.executable, str(WATCHDOG), str(os.getpid()), str(data_dir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # a signal to our process group does not reach it
    try:
        return db.start_embedded(data_dir), watchdog
    except BaseException:
        watchdog.kill()
        watchdog.wait()
        raise


def stop_test_postgres(data_dir: Path, watchdog: subprocess.Popen) -> None:
    """Stop the postmaster and remove ``data_dir``, then the watchdog, whose
    work that was (it stays until then, in case we die half way)."""
    import shutil
    try:
        db.stop_embedded(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        watchdog.kill()
        watchdog.wait()


@dataclass
class Tenant:
    org_id: uuid.UUID
    name: str
    key: str
    machines: dict[str, uuid.UUID]

    def count(self, dsn: str, identifier: str | None = None) -> int:
        sql = "SELECT count(*) FROM readings WHERE org_id = $1"
        args = [self.org_id]
        if identifier:
            sql += " AND machine_identifier = $2"
            args.append(identifier)
        return fetchval(dsn, sql, *args)


def make_tenant(dsn: str, machines=("CNC-001",), key: str | None = None) -> Tenant:
    """A new organization with ``machines`` and an API key (``key``, or a new one)."""
    async def go():
        c = await asyncpg.connect(dsn)
        try:
            name = f"org-{uuid.uuid4().hex[:10]}"
            org = (await store.create_org(c, name))["id"]
            ids = {}
            for m in machines:
                ids[m] = (await store.create_machine(c, org, m))["id"]
            if key is None:
                k, _ = await store.create_key(c, org, "test")
            else:  # a fixed key, e.g. the contract's literal "hk_your_api_key"
                await c.execute(
                    "INSERT INTO api_keys (org_id, name, prefix, key_hash) VALUES ($1, 'fixed', $2, $3)",
                    org, key[:10], store.hash_api_key(key))
                k = key
            return Tenant(org, name, k, ids)
        finally:
            await c.close()
    return run(go())


# ------------------------------------------------------------------ the server

class ServerProcess:
    """`haltless serve` in a child process on an ephemeral port."""

    def __init__(self, env: dict, workers: int = 1, data_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        if data_dir is not None:
            self.env["HALTLESS_DATA_DIR"] = str(data_dir)
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    def start(self, log_path: Path, timeout: float = 30.0) -> "ServerProcess":
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            HALTLESS + ["serve", "--host", "127.0.0.1", "--port", str(self.port),
                        "--workers", str(self.workers)],
            env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # One worker answers /healthz while the others may still be
                # starting, without a socket of their own yet (granian binds
                # one per worker on Linux): a test that then killed the one
                # serving saw every connection refused (CI).
                if (requests.get(self.url + "/healthz", timeout=1).status_code == 200
                        and self.workers_listening() >= self.workers):
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log()}")

    def token(self, org_id, ttl: int = 600) -> str:
        """A management JWT signed with this server's secret."""
        from haltless.server.auth import issue_token
        secret = (Path(self.env["HALTLESS_DATA_DIR"]) / "jwt-secret").read_text().strip()
        return issue_token(secret, org_id, ttl)

    def workers_listening(self) -> int:
        """How many granian workers hold a listening socket on our port."""
        import psutil
        n = 0
        for w in workers(self):
            try:
                n += any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                         for c in w.net_connections(kind="tcp"))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return n

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.log_path is not None and not self._log.closed:
            self._log.close()


def serving(dsn: str, tmp_path_factory, name: str):
    """The suite's `haltless serve` (2 workers) against ``dsn``, for a fixture to yield from."""
    d = tmp_path_factory.mktemp(name)
    srv = ServerProcess({"HALTLESS_DATABASE_URL": dsn, "HALTLESS_AUTH_CACHE_SECONDS": "0.5",
                         "HALTLESS_POLL_ALLOW": "127.0.0.0/8"}, workers=2, data_dir=d)
    srv.start(d / "server.log")
    yield srv
    srv.stop()


def serve_compactors(url: str, clock: float, until: str, *args, timeout: float = 60.0,
                     **kw) -> None:
    """Two `haltless serve` workers' compaction loops (compact_forever, one
    pool each) against ``url``, by a clock stopped at ``clock``, until the
    query ``until`` (with ``args``) answers true: their work seen done, or an
    AssertionError after ``timeout`` seconds."""
    from haltless.server.compaction import compact_forever

    async def go():
        pools = [await asyncpg.create_pool(url, min_size=1, max_size=2) for _ in range(2)]
        tasks = [asyncio.create_task(compact_forever(p, every=0.05, clock=lambda: clock, **kw))
                 for p in pools]
        try:
            deadline = time.monotonic() + timeout
            while not await pools[0].fetchval(until, *args):
                for task in tasks:
                    if task.done():  # compact_forever never returns: an error ends the wait
                        task.result()
                if time.monotonic() >= deadline:
                    raise AssertionError(f"compactors not done after {timeout}s: {until}")
                await asyncio.sleep(0.1)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for p in pools:
                await p.close()
    run(go())


def scrape(server) -> str:
    """GET /metrics: the Prometheus text, summed over the server's workers."""
    r = requests.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def metric(text: str, name: str, **labels) -> float:
    """The sum of ``name``'s samples in ``text`` that carry ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def workers(server) -> list:
    """The live granian workers of a ServerProcess (psutil.Process each)."""
    import psutil
    try:
        return psutil.Process(server.proc.pid).children()[0].children()
    except (psutil.NoSuchProcess, IndexError):
        return []


def multiproc_dir(server) -> str:
    """Where the workers of a ServerProcess keep their metrics files."""
    import psutil
    granian = psutil.Process(server.proc.pid).children()[0]
    return granian.environ()["PROMETHEUS_MULTIPROC_DIR"]


def worker_counts(server, name: str, **labels) -> dict[int, float]:
    """A counter as each live worker counted it (its own file in the
    multiprocess dir), by pid: which worker answered what, where /metrics
    gives only the sum."""
    from prometheus_client.multiprocess import MultiProcessCollector
    d = Path(multiproc_dir(server))
    out = {}
    for w in workers(server):
        f = d / f"counter_{w.pid}.db"
        total = 0.0
        if f.exists():
            for m in MultiProcessCollector.merge([str(f)], accumulate=False):
                for sample in m.samples:
                    if sample.name == name and all(sample.labels.get(k) == v
                                                   for k, v in labels.items()):
                        total += sample.value
        out[w.pid] = total
    return out


# ------------------------------------------------------------------ ingest

def now_iso(delta: dt.timedelta = dt.timedelta()) -> str:
    return (dt.datetime.now(dt.timezone.utc) + delta).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def reading(machine="CNC-001", metric="temperature", value=72.5, ts=None, **extra) -> dict:
    r = {"machine_identifier": machine, "timestamp": ts or now_iso(), "metric_name": metric,
         "value": value}
    r.update(extra)
    return r


def post(server, key, body, **kw) -> requests.Response:
    """POST /api/v1/ingest: ``body`` as JSON, or bytes/str/an iterator as they are."""
    data = body if isinstance(body, (bytes, str)) or hasattr(body, "__next__") else json.dumps(body)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    headers.update(kw.pop("headers", {}))
    return requests.post(server.url + "/api/v1/ingest", data=data, headers=headers, timeout=30, **kw)


def wait_until_every_worker_refuses(server, key: str) -> None:
    """After ``key`` was revoked, each worker of ``server`` passes it until
    its cache entry expires (HALTLESS_AUTH_CACHE_SECONDS): probe with an
    empty batch (it stores nothing while the key still passes) over fresh
    connections until every live worker has answered one with 401."""
    def refused():
        return worker_counts(server, "haltless_http_requests_total", route="/api/v1/ingest",
                             status="401")
    before = refused()

    def every_worker_refused():
        post(server, key, {"readings": []}, headers={"Connection": "close"})
        now = refused()
        return len(now) == server.workers and all(n > before.get(w, 0) for w, n in now.items())
    wait_for(every_worker_refused, timeout=20, every=0.05,
             what="every worker to refuse the revoked key")
