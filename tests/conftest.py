"""Real components only: a real PostgreSQL (embedded, or HALTLESS_DATABASE_URL),
the real `haltless serve` process (granian) on an ephemeral port, and real
protocol peers on 127.0.0.1."""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import signal
import socket
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

ROOT = Path(__file__).resolve().parent.parent
HALTLESS = [sys.executable, "-m", "haltless.server.cli"]


def twins(kernel: str):
    """(pure-Python twin, compiled kernel or None, pytest params over both) of
    haltless.fast.<kernel>: one test body runs against both."""
    import importlib
    py = importlib.import_module(f"haltless.fast.{kernel}_py")
    try:
        c = importlib.import_module(f"haltless.fast.{kernel}")
    except ImportError:  # pragma: no cover - `pip install -e .` builds it
        if os.environ.get("HALTLESS_REQUIRE_EXTENSIONS") == "1":
            raise
        c = None
    return py, c, [pytest.param(py, id="python"), pytest.param(c, id="cython", marks=pytest.mark.skipif(
        c is None, reason="extension not built (pip install -e . builds it)"))]


def serve_compactors(url: str, clock: float, seconds: float, **kw) -> None:
    """Two `haltless serve` workers' compaction loops (compact_forever, one
    pool each) against ``url`` for ``seconds``, by a clock stopped at ``clock``."""
    from haltless.server.compaction import compact_forever

    async def go():
        pools = [await asyncpg.create_pool(url, min_size=1, max_size=2) for _ in range(2)]
        tasks = [asyncio.create_task(compact_forever(p, every=0.05, clock=lambda: clock, **kw))
                 for p in pools]
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in pools:
            await p.close()
    run(go())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory):
    """A migrated database: a fresh one on HALTLESS_DATABASE_URL's server, or
    an embedded PostgreSQL in a temporary directory."""
    outer = os.environ.get("HALTLESS_DATABASE_URL")
    if outer:
        name = f"haltless_test_{uuid.uuid4().hex[:8]}"

        async def create():
            c = await asyncpg.connect(outer)
            try:
                await c.execute(f'CREATE DATABASE "{name}"')
            finally:
                await c.close()
        run(create())
        base, _, query = outer.partition("?")
        dsn = base.rsplit("/", 1)[0] + "/" + name + (("?" + query) if query else "")
    else:
        # Not under pytest's basetemp: that tree is 0700, and the embedded
        # server runs as its own system user when the tests run as root.
        pgdir = Path(tempfile.mkdtemp(prefix="haltless-test-pg-"))
        pgdir.chmod(0o755)
        dsn = db.start_embedded(pgdir)

    async def migrate():
        c = await asyncpg.connect(dsn)
        try:
            await db.migrate(c)
        finally:
            await c.close()
    run(migrate())
    yield dsn
    if not outer:
        db.stop_embedded(pgdir)
        shutil.rmtree(pgdir, ignore_errors=True)
    if outer:
        async def drop():
            c = await asyncpg.connect(outer)
            try:
                await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await c.close()
        run(drop())


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
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
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


@pytest.fixture(scope="session")
def server(pg_dsn, tmp_path_factory):
    yield from serving(pg_dsn, tmp_path_factory, "server")


@pytest.fixture
def public_tmp():
    """A temporary directory other system users can enter (for data dirs of
    an embedded PostgreSQL, which runs as its own user when we are root)."""
    d = Path(tempfile.mkdtemp(prefix="haltless-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tenant(pg_dsn) -> Tenant:
    return make_tenant(pg_dsn, machines=("CNC-001", "CNC-002", "PRESS-7"))
