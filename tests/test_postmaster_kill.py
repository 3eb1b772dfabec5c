"""kill -9 of the postmaster while writers, readers and a compactor are busy
(#21): on a PostgreSQL of its own, `haltless serve` (2 workers) takes posts
from a writer, a reader role queries, and serve's compaction loop compacts
the slot being written (by a clock an hour ahead); the postmaster is
SIGKILLed and started again (crash recovery). The server comes back by
itself, and every reading it acknowledged is stored exactly once."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import pytest
import requests

from helpers import (ServerProcess, fetch, fetchval, haltless, make_tenant, migrate,
                     start_test_postgres, stop_test_postgres, wait_for)
from test_kills_beside_readers import HERE, LOOP, Writer


class TolerantQuerier(threading.Thread):
    """A reader role querying again and again, reconnecting after the
    database went away; counts the queries answered after ``mark``."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.answered = 0
        self.stop = threading.Event()

    def run(self) -> None:
        async def go():
            conn = None
            while not self.stop.is_set():
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.url, timeout=2)
                    await conn.fetchval("SELECT count(*) FROM readings")
                    await conn.fetchval("SELECT sum(count) FROM readings_1m")
                    self.answered += 1
                except Exception:  # noqa: BLE001 - the database went away under it
                    if conn is not None:
                        conn.terminate()
                    conn = None
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.01)
            if conn is not None:
                await conn.close()
        asyncio.run(go())


@pytest.fixture
def own_postgres():
    pgdir = Path(tempfile.mkdtemp(prefix="haltless-test-pgkill-"))
    pgdir.chmod(0o755)
    dsn, watchdog = start_test_postgres(pgdir)

    migrate(dsn)
    yield pgdir, dsn
    # This process's handle names the killed postmaster: the one started
    # again is stopped by its pid (SIGQUIT), then the dir is removed.
    import pg_watchdog
    pid = pg_watchdog.postmaster_pid(pgdir / "pg")
    try:
        stop_test_postgres(pgdir, watchdog)
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess for the killed one
        watchdog.kill()
        watchdog.wait()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
            pg_watchdog.wait_for_exit(pid, 10)
    shutil.rmtree(pgdir, ignore_errors=True)


def test_the_postmaster_killed_under_load_loses_and_doubles_nothing(own_postgres, tmp_path):
    pgdir, dsn = own_postgres
    srv = ServerProcess({"HALTLESS_DATABASE_URL": dsn, "HALTLESS_AUTH_CACHE_SECONDS": "0.5"},
                        workers=2, data_dir=tmp_path / "serve")
    (tmp_path / "serve").mkdir()
    srv.start(tmp_path / "server.log")
    tenant = make_tenant(dsn, machines=("CNC-001",))
    url = haltless("grafana-role", "--org", tenant.name,
                   env={"HALTLESS_DATABASE_URL": dsn}).stdout.strip()
    writer, querier = Writer(srv, tenant), TolerantQuerier(url)
    clock = int(time.time()) // 3600 * 3600 + 3600 + 600  # this hour's slot is closed
    loop = subprocess.Popen([sys.executable, "-c", LOOP, dsn, str(clock)], cwd=HERE,
                            start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        writer.start()
        querier.start()
        wait_for(lambda: len(writer.acked) >= 5_000 and querier.answered > 5, timeout=60,
                 what="the load to start")
        postmaster = int((pgdir / "pg" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        killed_at = len(writer.acked)
        time.sleep(1.0)  # writes fail meanwhile (503s and errors): not acknowledged
        # Down until the restart below (serve keeps only an embedded PostgreSQL up).
        assert requests.get(srv.url + "/readyz", timeout=10).status_code == 503
        assert requests.get(srv.url + "/healthz", timeout=10).status_code == 200

        def restart():
            # As a new `haltless serve` would: a process of its own (this
            # one's handle is of the killed postmaster); refused while the
            # old backends still hold the shared memory.
            return subprocess.run(
                [sys.executable, "-c", "import sys; from pathlib import Path; from haltless."
                 "server import db; db.start_embedded(Path(sys.argv[1]))", str(pgdir)],
                capture_output=True, timeout=120).returncode == 0
        wait_for(restart, timeout=60, every=0.5, what="PostgreSQL to start again")
        answered = querier.answered
        wait_for(lambda: len(writer.acked) >= killed_at + 5_000 and querier.answered > answered,
                 timeout=90, what="writes and reads to flow again after the restart")
        assert requests.get(srv.url + "/readyz", timeout=5).status_code == 200
    finally:
        writer.stop.set()
        querier.stop.set()
        writer.join(60)
        querier.join(60)
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
            loop.wait(10)
        srv.stop()
    haltless("compact", env={"HALTLESS_DATABASE_URL": dsn}, timeout=120)
    stored = [r[0] for r in fetch(dsn, "SELECT value FROM readings WHERE org_id = $1",
                                  tenant.org_id)]
    assert len(stored) == len(set(stored)), "a reading is stored twice"
    missing = set(writer.acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged readings lost"
    # What is stored beyond the acknowledged came in whole batches that were
    # committed but whose answer the kill cut off (a client retries those).
    assert len(stored) - len(writer.acked) <= 200  # one writer: one batch in flight
    assert fetchval(dsn, "SELECT count(*) FROM reading_chunks") == 0
