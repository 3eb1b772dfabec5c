"""kill -9 of a compactor while readers and writers are busy (#21): of
`haltless compact` at each step, and of serve's compaction loop
(``compact_forever``, in a process of its own) while it holds the slot.
Meanwhile a writer keeps posting (each reading a value of its own), a reader
role keeps a REPEATABLE READ transaction open and another keeps querying.
Afterwards every acknowledged reading is stored exactly once, the readers
saw no error and the held snapshot did not change under its reader.

The postmaster's kill -9 under the same load is in test_postmaster_kill.py."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time

import asyncpg
import pytest

from haltless.server.compact import CRASH_POINTS
from helpers import fetch, fetchval, haltless, make_tenant, post
from test_readers_vs_writers import reader_held_open
from test_storage import compact

UTC = dt.UTC
HERE = os.path.dirname(os.path.abspath(__file__))


class Writer(threading.Thread):
    """Posts batches of 200 readings (5 metrics x 40 ticks, timestamps of the
    last minutes), each reading's value unique, until stopped; ``acked`` holds
    the values of every batch answered 207 with nothing rejected."""

    def __init__(self, server, tenant) -> None:
        super().__init__(daemon=True)
        self.server, self.tenant = server, tenant
        self.acked: list[float] = []
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.next = 0

    def run(self) -> None:
        base = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=10)
        while not self.stop.is_set():
            body, vals = [], []
            for _ in range(40):
                self.next += 1
                t = base + dt.timedelta(milliseconds=self.next)
                for m in range(5):
                    v = float(self.next * 10 + m)
                    vals.append(v)
                    body.append({"machine_identifier": "CNC-001", "metric_name": f"m{m}",
                                 "timestamp": t.isoformat().replace("+00:00", "Z"), "value": v})
            try:
                r = post(self.server, self.tenant.key, {"readings": body})
            except Exception as exc:  # noqa: BLE001 - recorded; the test fails on it
                self.failed.append(repr(exc))
                continue
            if r.status_code == 207 and r.json()["rejected_count"] == 0:
                self.acked += vals
            else:
                self.failed.append(f"{r.status_code} {r.text[:200]}")


class Querier(threading.Thread):
    """A reader role asking for counts and a rollup, again and again."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.errors: list[str] = []
        self.queries = 0
        self.stop = threading.Event()

    def run(self) -> None:
        async def go():
            conn = await asyncpg.connect(self.url)
            try:
                while not self.stop.is_set():
                    try:
                        await conn.fetchval("SELECT count(*) FROM readings")
                        await conn.fetchval("SELECT sum(count) FROM readings_1m")
                        self.queries += 1
                    except Exception as exc:  # noqa: BLE001 - recorded; the test fails on it
                        self.errors.append(repr(exc))
                    await asyncio.sleep(0.01)
            finally:
                await conn.close()
        asyncio.run(go())


@pytest.fixture
def busy(server, pg_dsn):
    """A tenant with a reader role; a writer and a querier running; yields
    (tenant, reader URL, writer, querier) and stops them after the test."""
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    compact(pg_dsn)
    url = haltless("grafana-role", "--org", tenant.name,
                   env={"HALTLESS_DATABASE_URL": pg_dsn}).stdout.strip()
    writer, querier = Writer(server, tenant), Querier(url)
    writer.start()
    querier.start()
    deadline = time.monotonic() + 30
    while len(writer.acked) < 5_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(writer.acked) >= 5_000, (len(writer.acked), writer.failed[:3])
    yield tenant, url, writer, querier
    writer.stop.set()
    querier.stop.set()
    writer.join(60)
    querier.join(60)


def finish(pg_dsn, tenant, writer, querier, held) -> None:
    """Stop the load, compact what is left, and check every acknowledged
    reading is stored once, nothing else is, and the readers were served."""
    time.sleep(0.5)  # writes go on after the kill
    writer.stop.set()
    querier.stop.set()
    writer.join(60)
    querier.join(60)
    assert not writer.failed, writer.failed[:3]
    assert not querier.errors, querier.errors[:3]
    assert querier.queries > 0
    assert held["seen"] == held["again"]  # the held snapshot did not change
    compact(pg_dsn)
    stored = [r[0] for r in fetch(pg_dsn, "SELECT value FROM readings WHERE org_id = $1",
                                  tenant.org_id)]
    assert len(stored) == len(set(stored)), "a reading is stored twice"
    assert sorted(stored) == sorted(writer.acked)
    assert fetchval(pg_dsn, "SELECT count(*) FROM reading_chunks c JOIN series s ON s.id ="
                    " c.series_id JOIN machines m ON m.id = s.machine_id WHERE m.org_id = $1",
                    tenant.org_id) == 0


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_haltless_compact_killed_at_each_step_beside_readers_and_writers(pg_dsn, busy, point):
    tenant, url, writer, querier = busy
    with reader_held_open(url) as held:
        killed = compact(pg_dsn, "--crash-at", point, check=False)
        assert killed.returncode == 137, killed.stderr
        n = len(writer.acked)
        deadline = time.monotonic() + 30
        while len(writer.acked) < n + 1_000 and time.monotonic() < deadline:
            time.sleep(0.05)  # writers are not held up by what the kill left
        assert len(writer.acked) >= n + 1_000
    finish(pg_dsn, tenant, writer, querier, held)


LOOP = r"""
import asyncio, sys, time
import asyncpg
from haltless.server.compaction import compact_forever

async def main(url, clock):
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2,
                                     server_settings={"application_name": "doomed-compactor"})
    await compact_forever(pool, every=0.05, clock=lambda: clock)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_serves_compaction_loop_killed_while_it_holds_the_slot(pg_dsn, busy, delay):
    """serve's compaction loop compacts the slot being written, by a clock an
    hour ahead (as it does once that hour has ended); it is SIGKILLed
    ``delay`` seconds after it locked the slot, at whatever step it is."""
    tenant, url, writer, querier = busy
    hour = int(time.time()) // 3600 * 3600
    clock = hour + 3600 + 600  # the next hour, past the grace: this hour's slot is closed
    with reader_held_open(url) as held:
        proc = subprocess.Popen([sys.executable, "-c", LOOP, pg_dsn, str(clock)],
                                cwd=HERE, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if fetchval(pg_dsn, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a"
                            " ON a.pid = l.pid WHERE a.application_name = 'doomed-compactor'"
                            " AND l.mode = 'ExclusiveLock' AND l.granted"
                            " AND l.relation::regclass::text LIKE 'reading_chunks_%'"):
                    break
                assert proc.poll() is None, "the compaction loop died by itself"
                time.sleep(0.005)
            else:
                raise AssertionError("the compaction loop never locked the slot")
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        n = len(writer.acked)
        deadline = time.monotonic() + 30
        while len(writer.acked) < n + 1_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(writer.acked) >= n + 1_000
    finish(pg_dsn, tenant, writer, querier, held)
