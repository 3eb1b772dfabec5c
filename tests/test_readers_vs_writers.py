"""Readers never stop writers: a reader role's transaction, however long it
stays open, neither holds off compaction (nor the block partitions it
creates, nor retention) nor sees the data change under it, and nothing
acknowledged is lost or doubled."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import threading
import time

import asyncpg
import pytest
import requests
from haltless.server import query, readback
from haltless.server.compaction import compact_all
from helpers import fetch, fetchval, haltless, make_tenant, run
from test_query import us
from test_storage import compact, hot_count, send

UTC = dt.UTC


@pytest.fixture
def reading_org(pg_dsn, server):
    """A tenant with hot readings of the last minutes, its reader role's URL,
    and an empty hot store otherwise."""
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    compact(pg_dsn)
    start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
    n = send(server, tenant, start, 120, metrics=5)
    url = haltless("grafana-role", "--org", tenant.name,
                   env={"HALTLESS_DATABASE_URL": pg_dsn}).stdout.strip()
    return tenant, url, n


@contextlib.contextmanager
def reader_held_open(url: str):
    """A reader role's connection, in its own thread and event loop, inside a
    REPEATABLE READ transaction that has read every reading (so it holds
    ACCESS SHARE on every reading table and partition, and the oldest
    snapshot) until the block ends. Yields a dict: ``seen`` (its count at
    the start); after the block, ``again`` (its count in the same snapshot
    at the end) and ``fresh`` (the count in a new transaction)."""
    ready, release, box = threading.Event(), threading.Event(), {}

    async def hold():
        conn = await asyncpg.connect(url)
        try:
            tr = conn.transaction(isolation="repeatable_read", readonly=True)
            await tr.start()
            box["seen"] = await conn.fetchval("SELECT count(*) FROM readings")
            ready.set()
            while not release.is_set():
                await asyncio.sleep(0.05)
            box["again"] = await conn.fetchval("SELECT count(*) FROM readings")
            await tr.commit()
            box["fresh"] = await conn.fetchval("SELECT count(*) FROM readings")
        finally:
            ready.set()
            await conn.close()

    th = threading.Thread(target=lambda: asyncio.run(hold()), daemon=True)
    th.start()
    assert ready.wait(60) and "seen" in box, "the reader could not start"
    try:
        yield box
    finally:
        release.set()
        th.join(60)


def test_a_reader_transaction_held_open_across_a_whole_compaction_does_not_stop_it(
        pg_dsn, reading_org):
    tenant, url, n = reading_org

    with reader_held_open(url) as reader:
        assert reader["seen"] == n
        # `haltless compact` in another process while the reader stays open.
        out = compact(pg_dsn)
        assert f"compacted {n} readings" in out.stdout, out.stdout + out.stderr
        assert hot_count(pg_dsn) == 0
    # Its snapshot still saw what it saw; a new one sees every reading once,
    # now from blocks.
    assert reader["again"] == reader["fresh"] == n
    assert tenant.count(pg_dsn) == n
    assert fetchval(pg_dsn, "SELECT coalesce(sum(b.n), 0) FROM reading_blocks b JOIN series s"
                    " ON s.id = b.series_id JOIN machines m ON m.id = s.machine_id"
                    " WHERE m.org_id = $1", tenant.org_id) == n


def test_a_reader_does_not_hold_off_the_block_partition_compaction_creates(
        pg_dsn, server, reading_org):
    tenant, url, n = reading_org
    # Readings of a month nobody has written yet: compacting them creates its
    # block partitions, with a reader holding reading_blocks open.
    # A month of the accepted window without partitions. Compaction creates
    # every month between the oldest and newest hour it writes, so the
    # suite's database may have them all: then the first one whose
    # partitions are empty is dropped, to be created again under the reader.
    today = dt.datetime.now(UTC).replace(day=3, hour=12, minute=0, second=0, microsecond=0)
    for back in range(118, 1, -1):
        month = today.replace(year=today.year + (today.month - 1 - back) // 12,
                              month=(today.month - 1 - back) % 12 + 1)
        name = f"reading_blocks_{month.strftime('%Y%m')}"
        timelines = f"reading_timelines_{month.strftime('%Y%m')}"
        if fetchval(pg_dsn, "SELECT to_regclass($1)::text", name) is None:
            break
        if not fetchval(pg_dsn, f"SELECT EXISTS (SELECT 1 FROM {name})"
                        f" OR EXISTS (SELECT 1 FROM {timelines})"):
            fetchval(pg_dsn, f"DROP TABLE {name}, {timelines}")
            break
    else:
        raise AssertionError("no month of the last ten years with empty block partitions")
    old = send(server, tenant, month, 30, metrics=2)

    with reader_held_open(url) as reader:
        out = compact(pg_dsn)
        assert f"compacted {n + old} readings" in out.stdout, out.stdout + out.stderr
    assert reader["seen"] == reader["again"] == reader["fresh"] == n + old
    assert fetchval(pg_dsn, "SELECT to_regclass($1)::text", name) == name
    assert fetchval(pg_dsn, "SELECT count(*) FROM readings WHERE org_id = $1 AND bucket >= $2"
                    " AND bucket < $2 + interval '1 hour'", tenant.org_id, month) == old


def test_retention_waits_for_older_readers_without_blocking_anyone_then_drops(
        pg_dsn, server, reading_org):
    tenant, url, n = reading_org
    gone = dt.datetime.now(UTC) - dt.timedelta(days=90 + random.randint(0, 300))
    fetch(pg_dsn, "SELECT haltless_block_partitions($1, $1)", gone)
    name = f"reading_blocks_{gone.strftime('%Y%m')}"
    retention = {"HALTLESS_RETENTION_DAYS": "30"}

    with reader_held_open(url) as reader:
        # The reader's snapshot is older than the detach: retention cannot
        # finish one now (a parent detaches one partition at a time), says
        # so in one line, and everything else goes on.
        out = compact(pg_dsn, env=retention)
        assert "waits for readers that began before" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert fetchval(pg_dsn, "SELECT to_regclass($1)::text", name) == name
        # Meanwhile writers are not blocked, nor new readers.
        assert send(server, tenant, dt.datetime.now(UTC).replace(microsecond=0), 1,
                    metrics=1) == 1
        assert tenant.count(pg_dsn) == n + 1
    assert reader["again"] == reader["seen"] == n
    out = compact(pg_dsn, env=retention)
    assert "dropped" in out.stdout, out.stdout + out.stderr
    assert fetchval(pg_dsn, "SELECT to_regclass($1)::text", name) is None
    assert tenant.count(pg_dsn) == n + 1


def test_serves_compactors_compact_the_closed_slot_beside_a_reader(pg_dsn, reading_org):
    from haltless.server.compaction import GRACE
    from haltless.server.hot import hot_slot
    from helpers import serve_compactors

    tenant, url, n = reading_org
    t = time.time() // 3600 * 3600 + GRACE + 60
    closed = 1 - hot_slot(t)
    sid = fetchval(pg_dsn, "INSERT INTO series (machine_id, metric_name) VALUES ($1, 'beside')"
                   " RETURNING id", tenant.machines["CNC-001"])
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    fetch(pg_dsn, f"INSERT INTO reading_chunks_{closed} (series_id, bucket, n, ts, vals)"
          " VALUES ($1, $2::timestamptz, 2, haltless_chunk_stamps(ARRAY[$2::timestamptz,"
          " $2::timestamptz + interval '1 s']), ARRAY[1.5, 2.5])", sid, hour)

    with reader_held_open(url) as reader:
        serve_compactors(pg_dsn, t, f"SELECT count(*) = 0 FROM reading_chunks_{closed}"
                         " WHERE series_id = $1", sid)
    assert reader["again"] == reader["seen"]
    assert fetchval(pg_dsn, f"SELECT count(*) FROM reading_chunks_{closed} WHERE series_id = $1",
                    sid) == 0
    assert fetchval(pg_dsn, "SELECT count(*) FROM readings WHERE series_id = $1", sid) == 2


class CompactsBeforeCopy(asyncpg.Connection):
    """A connection on which a real compaction, on another connection,
    commits in the instant between a read's block query and its hot-row
    COPY: the moment a read that is not one snapshot loses the late rows
    that compaction moves from hot rows into a block."""
    other: asyncpg.Connection | None = None

    async def copy_from_query(self, *args, **kwargs):
        if self.other is not None:
            await compact_all(self.other, include_current=True)
            self.other = None
        return await super().copy_from_query(*args, **kwargs)


def test_a_read_is_one_snapshot_when_compaction_merges_late_readings_under_it(pg_dsn, server):
    """Blocks, their timelines and hot rows are read by separate statements;
    a compaction that merges late rows into a block between two of them must
    not make readings vanish from the answer (the query API reads in one
    REPEATABLE READ snapshot). Without the snapshot the same moment loses
    them, which shows the test reaches it."""
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    hour = (dt.datetime.now(UTC) - dt.timedelta(hours=2)).replace(minute=0, second=0,
                                                                 microsecond=0)
    n = send(server, tenant, hour, 60, metrics=5)
    compact(pg_dsn)
    sids = [r[0] for r in fetch(pg_dsn, "SELECT s.id FROM series s JOIN machines m"
                                " ON m.id = s.machine_id WHERE m.org_id = $1", tenant.org_id)]
    t0, t1 = us(hour), us(hour + dt.timedelta(hours=1))

    async def read(snapshot: bool) -> int:
        conn = await asyncpg.connect(pg_dsn, connection_class=CompactsBeforeCopy)
        conn.other = await asyncpg.connect(pg_dsn)
        other = conn.other
        try:
            total = 0
            async with query._snapshot(conn) if snapshot else contextlib.nullcontext():
                async for got in readback.scan(conn, sids, t0, t1):
                    total += sum(len(ts) for ts, _ in got.values())
            assert conn.other is None  # the compaction ran in the window
            return total
        finally:
            await other.close()
            await conn.close()

    late = send(server, tenant, hour + dt.timedelta(minutes=5, microseconds=500), 60, metrics=5)
    assert hot_count(pg_dsn) == late
    assert run(read(snapshot=True)) == n + late
    assert hot_count(pg_dsn) == 0  # merged meanwhile
    more = send(server, tenant, hour + dt.timedelta(minutes=10, microseconds=700), 60, metrics=5)
    assert run(read(snapshot=False)) == n + late  # the control: `more` vanished
    assert tenant.count(pg_dsn) == n + late + more


def test_reads_never_take_the_connections_ingest_needs(pg_dsn, tmp_path):
    """A worker with a pool of 3 (one writer connection) gives reads one
    slot: three reads stuck in the database (a lock held on reading_blocks)
    hold one connection between them; ingest for another organization is
    answered meanwhile, the reads beyond the slot get 503 with Retry-After
    after waiting, and the stuck one completes once the lock goes."""
    from helpers import ServerProcess, post, reading
    srv = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn, "HALTLESS_POOL_SIZE": "3",
                         "HALTLESS_WRITER_CONNECTIONS": "1",
                         "HALTLESS_AUTH_CACHE_SECONDS": "0.5"}, workers=1, data_dir=tmp_path)
    srv.start(tmp_path / "server.log")
    try:
        reader, writer = make_tenant(pg_dsn), make_tenant(pg_dsn)
        start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=10)
        send(srv, reader, start, 60, metrics=3)
        token = srv.token(reader.org_id)
        params = {"machine_identifier": "CNC-001", "interval": "1m",
                  "from": (start - dt.timedelta(hours=1)).isoformat(),
                  "to": (start + dt.timedelta(hours=1)).isoformat()}
        answers: list = []

        def ask():
            r = requests.get(srv.url + "/api/v1/readings/aggregate", params=params, timeout=60,
                             headers={"Authorization": f"Bearer {token}"})
            answers.append((r.status_code, r.headers.get("retry-after"), r.text))

        async def hold_and_check():
            lock = await asyncpg.connect(pg_dsn)
            try:
                tr = lock.transaction()
                await tr.start()
                await lock.execute("LOCK TABLE reading_blocks IN ACCESS EXCLUSIVE MODE")
                threads = [threading.Thread(target=ask) for _ in range(3)]
                for t in threads:
                    t.start()
                await asyncio.sleep(2)  # all three asked; one waits on the lock
                t0 = time.monotonic()
                r = await asyncio.to_thread(post, srv, writer.key, {"readings": [reading()]})
                ingest = (r.status_code, time.monotonic() - t0)
                for _ in range(300):  # the two beyond the slot give up after READ_WAIT
                    if len(answers) >= 2:
                        break
                    await asyncio.sleep(0.1)
                await tr.rollback()
                for t in threads:
                    await asyncio.to_thread(t.join)
                return ingest
            finally:
                await lock.close()

        status, took = run(hold_and_check())
        assert status == 207 and took < 10, (status, took)  # not held up by the reads
        assert sorted(a[0] for a in answers) == [200, 503, 503], answers
        busy = [a for a in answers if a[0] == 503]
        assert all(a[1] == "1" and "read slot" in a[2] for a in busy), busy
    finally:
        srv.stop()
