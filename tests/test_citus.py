"""The same server on a Citus cluster (a coordinator and two workers on
127.0.0.1, server/localcluster.py): the migrations distribute the schema, and the
ingest contract, compaction, retention, the read side (view and functions)
and pollers sharing sources through leases all work through the
coordinator. Skipped, with the reason, where Citus cannot be built."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import time
import uuid
from collections import Counter

import asyncpg
import pytest

from haltless.server.localcluster import CitusCluster
from helpers import (fetch, fetchval, haltless, make_tenant, post, run, serve_compactors,
                     serving, wait_for)
from haltless.server import compact_citus, db, store
from haltless.server.compact import CRASH_POINTS
from haltless.server.compaction import compact_all
from haltless.server.reader_roles import create_reader_role, url_for_role
from peers import ModbusPeer, device
from test_management import MODBUS_BODY, Api
from test_pollers import Pollers
from test_rollups import check as check_rollups
from test_rollups import readings as rollup_readings
from test_rollups import send as send_readings
from test_sql_access import as_role
from test_storage import compact, send, snapshot

UTC = dt.timezone.utc

needs_citus = pytest.mark.skipif(CitusCluster.skip_reason() is not None,
                                 reason=f"Citus tests: {CitusCluster.skip_reason()}")


@pytest.fixture(scope="module")
def cluster():
    if reason := CitusCluster.skip_reason():
        pytest.skip(f"Citus tests: {reason}")
    c = CitusCluster(workers=2).start()
    try:
        yield c
    finally:
        c.stop()
    assert c.postmasters_running() == [], "a Citus node outlived the cluster fixture"


@pytest.fixture(scope="module")
def citus_dsn(cluster):
    async def migrate():
        conn = await db.connect(cluster.dsn)
        try:
            return await db.migrate(conn)
        finally:
            await conn.close()
    assert run(migrate()) == db.LATEST_VERSION
    return cluster.dsn


@pytest.fixture(scope="module")
def citus_server(citus_dsn, tmp_path_factory):
    yield from serving(citus_dsn, tmp_path_factory, "citus-server")


def iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def org_series(dsn, org_id) -> list[int]:
    return [r[0] for r in fetch(dsn, "SELECT s.id FROM series s JOIN machines m ON m.id ="
                                " s.machine_id WHERE m.org_id = $1 ORDER BY 1", org_id)]


def test_without_citus_the_migration_changes_nothing(pg_dsn):
    # The single-node schema: timelines shared across series, no Citus catalog.
    assert fetchval(pg_dsn, "SELECT to_regclass('pg_dist_partition')") is None
    assert fetchval(pg_dsn, "SELECT count(*) FROM pg_attribute WHERE attrelid ="
                    " 'reading_timelines'::regclass AND attname = 'series_id'") == 0
    assert fetchval(pg_dsn, "SELECT max(version) FROM haltless_schema") == db.LATEST_VERSION


def test_a_compaction_cancelled_while_it_closes_its_worker_connections_leaves_none_open(pg_dsn):
    """serve stopping just as a run ends cancels the closing of the run's
    worker connections: the one being closed and every one after it are
    terminated, not left for the garbage collector (a leak CI once saw)."""
    async def go():
        conns = [await asyncpg.connect(pg_dsn) for _ in range(3)]
        task = asyncio.create_task(compact_citus.close_all(conns))
        await asyncio.sleep(0)  # the first close() has sent its Terminate and waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [c.is_closed() for c in conns]
    assert run(go()) == [True, True, True]


def test_migrations_distribute_readings_by_series_and_keep_tenancy_on_every_node(citus_dsn):
    rows = {r["t"]: (r["method"], r["model"], r["colo"]) for r in fetch(
        citus_dsn, "SELECT logicalrelid::text AS t, partmethod AS method, repmodel AS model,"
        " colocationid AS colo FROM pg_dist_partition")}
    for t in ("organizations", "machines", "api_keys", "series"):
        assert rows[t][:2] == (b"n", b"t"), (t, rows[t])  # reference: a copy on every node
    readings = {rows[t] for t in ("reading_chunks", "reading_chunks_0", "reading_chunks_1",
                                  "reading_blocks", "reading_timelines")}
    assert len(readings) == 1 and next(iter(readings))[0] == b"h", readings  # co-located
    assert rows["idempotency_keys"][0] == b"h"
    assert rows["ingest_sources"][:2] == (b"n", b"s")  # a Citus local table: leases on one node
    assert "poller_processes" not in rows
    assert fetchval(citus_dsn, "SHOW citus.max_cached_conns_per_worker") == "8"
    workers = fetchval(citus_dsn, "SELECT count(DISTINCT nodeport) FROM citus_shards"
                       " WHERE table_name = 'reading_chunks_0'::regclass")
    assert workers == 2

    async def again():  # a second migrate is a no-op, on the cluster too
        conn = await db.connect(citus_dsn)
        try:
            return await db.migrate(conn)
        finally:
            await conn.close()
    assert run(again()) == db.LATEST_VERSION


def test_the_ingest_contract_holds_on_the_cluster(citus_server, citus_dsn):
    t = make_tenant(citus_dsn, machines=("CNC-001", "CNC-002"))
    now = dt.datetime.now(UTC).replace(microsecond=0)
    rs = [{"machine_identifier": f"CNC-00{1 + m % 2}", "timestamp": iso(now - dt.timedelta(seconds=s)),
           "metric_name": f"m{m}", "value": s + m / 10, "unit": "celsius"}
          for s in range(40) for m in range(12)]
    rs += [{"machine_identifier": "GHOST", "timestamp": iso(now), "metric_name": "x", "value": 1},
           {"machine_identifier": "CNC-001", "timestamp": iso(now + dt.timedelta(hours=1)),
            "metric_name": "x", "value": 1},
           {"machine_identifier": "CNC-001", "timestamp": iso(now), "metric_name": "x"}]
    body = json.dumps({"readings": rs})
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = post(citus_server, t.key, body, headers=key)
    assert first.status_code == 207, first.text
    out = first.json()
    assert out["accepted_count"] == 480 and out["rejected_count"] == 3
    assert [(e["index"], e["error"]) for e in out["errors"]] == [
        (480, "Machine not found"), (481, "Timestamp is more than 5 minutes in the future"),
        (482, "missing required field `value`")]
    again = post(citus_server, t.key, body, headers=key)
    assert again.status_code == 207 and again.headers["idempotency-replayed"] == "true"
    assert again.content == first.content
    other = post(citus_server, t.key, json.dumps({"readings": rs[:1]}), headers=key)
    assert other.status_code == 422
    assert t.count(citus_dsn) == 480
    assert post(citus_server, "hk_wrong", body).status_code == 401
    key_id = fetchval(citus_dsn, "SELECT id FROM api_keys WHERE org_id = $1", t.org_id)

    async def revoke():
        conn = await db.connect(citus_dsn)
        try:
            await store.revoke_key(conn, t.org_id, key_id)
        finally:
            await conn.close()
    run(revoke())
    assert wait_for(lambda: post(citus_server, t.key, body).status_code == 401, timeout=5,
                    what="the revoked key refused")
    # The series landed on both workers, and the coordinator holds no readings.
    series = org_series(citus_dsn, t.org_id)
    assert len(series) == 12
    nodes = fetchval(citus_dsn, "SELECT count(DISTINCT s.nodeport) FROM citus_shards s"
                     " WHERE s.table_name = 'reading_chunks_0'::regclass AND s.shardid IN ("
                     "  SELECT get_shard_id_for_distribution_column('reading_chunks_0', x)"
                     "  FROM unnest($1::int[]) x)", series)
    assert nodes == 2


def test_compaction_on_the_cluster_keeps_every_reading_and_merges_late_data(citus_server,
                                                                            citus_dsn):
    t = make_tenant(citus_dsn, machines=("CNC-001", "CNC-002"))
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
    n = send(citus_server, t, hour + dt.timedelta(minutes=30), 60, metrics=6)
    n += send(citus_server, t, dt.datetime.now(UTC) - dt.timedelta(minutes=2), 30, metrics=6,
              machine="CNC-002")
    before = snapshot(citus_dsn, t.org_id)
    assert len(before) == n
    assert "compacted" in compact(citus_dsn).stdout
    assert fetchval(citus_dsn, "SELECT coalesce(sum(n), 0) FROM reading_chunks") == 0
    assert snapshot(citus_dsn, t.org_id) == before
    # Late data for the compacted hour, and a compaction killed before its
    # commit: nothing lost, nothing doubled, one block per (series, hour).
    n += send(citus_server, t, hour + dt.timedelta(minutes=5), 20, metrics=6)
    before = snapshot(citus_dsn, t.org_id)
    assert compact(citus_dsn, "--crash-at", "before-commit", check=False).returncode == 137
    assert snapshot(citus_dsn, t.org_id) == before
    compact(citus_dsn)
    after = snapshot(citus_dsn, t.org_id)
    assert after == before and len(after) == n
    series = org_series(citus_dsn, t.org_id)
    blocks = fetch(citus_dsn, "SELECT series_id, block_start, n FROM reading_blocks"
                   " WHERE series_id = ANY($1::int[]) AND block_start = $2", series, hour)
    assert sorted(r["n"] for r in blocks) == [80] * 6
    # Every timeline belongs to exactly one block (they are per series here).
    assert fetchval(citus_dsn, "SELECT count(*) FROM reading_timelines t WHERE NOT EXISTS ("
                    " SELECT 1 FROM reading_blocks b WHERE b.series_id = t.series_id"
                    " AND b.block_start = t.block_start AND b.timeline = t.id)") == 0
    # The read functions: one series is one task on one worker, with the index.
    sid = blocks[0]["series_id"]
    rows = fetch(citus_dsn, "SELECT * FROM readings_between($1, $2, $3)", sid, hour,
                 hour + dt.timedelta(hours=1))
    assert len(rows) == 80 and [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    plan = "\n".join(r[0] for r in fetch(
        citus_dsn, "EXPLAIN SELECT * FROM readings WHERE series_id = $1 AND bucket >= $2"
        " AND bucket < $3", sid, hour, hour + dt.timedelta(hours=1)))
    assert "Task Count: 1" in plan and "Index Scan" in plan, plan
    got = fetchval(citus_dsn, "SELECT count(*) FROM readings_in($1, $2) r"
                   " WHERE r.series_id = ANY($3::int[])", hour, hour + dt.timedelta(hours=1),
                   series)
    assert got == 6 * 80


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_kill_at_any_step_of_a_shard_group_compaction_loses_and_duplicates_nothing(
        citus_server, citus_dsn, point):
    t = make_tenant(citus_dsn, machines=("CNC-001", "CNC-002"))
    start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=3)
    send(citus_server, t, start, 40, metrics=8)
    compact(citus_dsn)  # blocks already there: the late data below merges into them
    send(citus_server, t, start + dt.timedelta(seconds=40), 40, metrics=8)
    send(citus_server, t, start, 20, metrics=8, machine="CNC-002")
    before = snapshot(citus_dsn, t.org_id)
    killed = compact(citus_dsn, "--crash-at", point, check=False)
    assert killed.returncode == 137, killed.stderr
    assert snapshot(citus_dsn, t.org_id) == before
    compact(citus_dsn)
    assert snapshot(citus_dsn, t.org_id) == before and len(before) == 800
    assert fetchval(citus_dsn, "SELECT coalesce(sum(n), 0) FROM reading_chunks") == 0
    hours = {(sid, ts.replace(minute=0, second=0, microsecond=0)) for sid, ts, _ in before}
    assert fetchval(citus_dsn, "SELECT count(*) FROM reading_blocks WHERE series_id ="
                    " ANY($1::int[])", org_series(citus_dsn, t.org_id)) == len(hours)
    # No timeline left behind by a replaced block.
    assert fetchval(citus_dsn, "SELECT count(*) FROM reading_timelines t WHERE NOT EXISTS ("
                    " SELECT 1 FROM reading_blocks b WHERE b.series_id = t.series_id"
                    " AND b.block_start = t.block_start AND b.timeline = t.id)") == 0


def test_two_compactors_work_on_different_shard_groups_at_once(citus_server, citus_dsn, cluster):
    """One compactor stuck on a shard group (its worker holds the slot's shard)
    does not stop another from compacting every other group; nothing waits
    for a lock that spans the cluster."""
    t = make_tenant(citus_dsn, machines=("CNC-001", "CNC-002"))
    start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=3)
    send(citus_server, t, start, 30, metrics=12)
    send(citus_server, t, start, 30, metrics=12, machine="CNC-002")
    before = snapshot(citus_dsn, t.org_id)
    series = org_series(citus_dsn, t.org_id)

    async def go():
        coord = [await asyncpg.connect(citus_dsn) for _ in range(3)]
        try:
            groups = await compact_citus.shard_groups(coord[0])
            assert len({(g.host, g.port) for g in groups}) == 2 and len(groups) == 8
            shard_of = {r[0]: r[1] for r in await coord[0].fetch(
                "SELECT x, get_shard_id_for_distribution_column('reading_chunks', x)"
                " FROM unnest($1::int[]) x", series)}
            slot = await coord[0].fetchval("SELECT min(slot) FROM reading_chunks"
                                           " WHERE series_id = ANY($1::int[])", series)
            first = next(g for g in groups if g.key in shard_of.values())
            stuck = [x for x, k in shard_of.items() if k == first.key]
            # The slot's shard of that group is held on its worker (as a long
            # transaction would): compactor A waits there, holding the group.
            w = await asyncpg.connect(compact_citus.node_dsn(citus_dsn, first.host, first.port))
            tx = w.transaction()
            await tx.start()
            await w.execute("SET LOCAL citus.enable_manual_changes_to_shards = on")
            await w.execute(f"LOCK TABLE {first.chunks[slot]} IN ROW SHARE MODE")
            a = asyncio.create_task(compact_all(coord[1], include_current=True, wait=False,
                                                dsn=citus_dsn))
            waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::regclass"
            for _ in range(300):  # A holds the group and waits for its shard
                if await w.fetchval(waiting, first.chunks[slot]):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("compactor A never reached the held shard")
            assert not a.done()
            # B skips a group someone holds (wait=False): A's, and on a busy
            # box now and then one that serve's own compactor is passing
            # through; it is run again until only A's group is left.
            b = (0, 0)
            for _ in range(30):
                got = await compact_all(coord[2], include_current=True, wait=False,
                                        dsn=citus_dsn)
                b = (b[0] + got[0], b[1] + got[1])
                left = await coord[0].fetch("SELECT DISTINCT series_id FROM reading_chunks"
                                            " WHERE series_id = ANY($1::int[])", series)
                if sorted(r[0] for r in left) == sorted(stuck):
                    break
                await asyncio.sleep(0.5)
            assert not a.done()
            await tx.rollback()
            await w.close()
            a_done = await a
            return b, sorted(r[0] for r in left), sorted(stuck), a_done
        finally:
            for c in coord:
                await c.close()

    b, left, stuck, a = run(go())
    assert left == stuck  # B compacted every group but the one A held
    assert 0 < b[0] < len(before) and b[0] + a[0] == len(before)
    assert snapshot(citus_dsn, t.org_id) == before
    assert fetchval(citus_dsn, "SELECT coalesce(sum(n), 0) FROM reading_chunks WHERE"
                    " series_id = ANY($1::int[])", series) == 0


def test_serve_workers_compact_the_closed_slot_per_shard_group_by_themselves(citus_dsn):
    """compact_forever on the cluster (two serve workers): the closed slot's
    shards are compacted, group by group, and the slot being written is left
    alone."""
    from haltless.server.compaction import GRACE
    from haltless.server.hot import hot_slot

    t = make_tenant(citus_dsn, machines=("CNC-001",))
    clock = time.time() // 3600 * 3600 + GRACE + 60
    closed, current = 1 - hot_slot(clock), hot_slot(clock)
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    fetch(citus_dsn, "INSERT INTO series (machine_id, metric_name) SELECT $1, 'm' || i"
          " FROM generate_series(1, 24) i", t.machines["CNC-001"])
    series = org_series(citus_dsn, t.org_id)
    for slot in (closed, current):
        fetch(citus_dsn, f"INSERT INTO reading_chunks_{slot} (series_id, bucket, n, ts, vals)"
              " SELECT x, $2::timestamptz, 2, haltless_chunk_stamps(ARRAY[$2::timestamptz"
              " + $3 * interval '1 s', $2::timestamptz + ($3 + 1) * interval '1 s']),"
              " ARRAY[1.5, 2.5]"
              " FROM unnest($1::int[]) x", series, hour, 10 * slot)

    serve_compactors(citus_dsn, clock, "SELECT count(*) = 0 FROM reading_chunks WHERE slot = $1"
                     " AND series_id = ANY($2::int[])", closed, series, dsn=citus_dsn)
    left = {r[0]: r[1] for r in fetch(citus_dsn, "SELECT slot, count(*) FROM reading_chunks"
                                      " WHERE series_id = ANY($1::int[]) GROUP BY 1", series)}
    assert left == {current: 24}
    assert fetchval(citus_dsn, "SELECT count(*) FROM reading_blocks WHERE series_id ="
                    " ANY($1::int[]) AND n = 2", series) == 24
    assert fetchval(citus_dsn, "SELECT count(*) FROM readings WHERE series_id ="
                    " ANY($1::int[])", series) == 96


def test_a_shard_move_waits_for_the_compaction_of_its_group(citus_server, citus_dsn, cluster):
    """Compaction writes a group's shards on their worker directly; a shard
    move of that group (the rebalancer) must not copy them half way: it waits
    for Citus's shard metadata lock, which the compaction holds."""
    t = make_tenant(citus_dsn, machines=("CNC-001",))
    start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=2)
    send(citus_server, t, start, 20, metrics=6)
    before = snapshot(citus_dsn, t.org_id)
    series = org_series(citus_dsn, t.org_id)

    async def go():
        coord = [await asyncpg.connect(citus_dsn) for _ in range(3)]
        try:
            groups = await compact_citus.shard_groups(coord[0])
            keys = {r[0] for r in await coord[0].fetch(
                "SELECT get_shard_id_for_distribution_column('reading_chunks', x)"
                " FROM unnest($1::int[]) x", series)}
            g = next(g for g in groups if g.key in keys)
            other = next(p for _, p in cluster.nodes[1:] if p != g.port)
            slot = await coord[0].fetchval("SELECT min(slot) FROM reading_chunks"
                                           " WHERE series_id = ANY($1::int[])", series)
            w = await asyncpg.connect(compact_citus.node_dsn(citus_dsn, g.host, g.port))
            tx = w.transaction()
            await tx.start()
            await w.execute("SET LOCAL citus.enable_manual_changes_to_shards = on")
            await w.execute(f"LOCK TABLE {g.chunks[slot]} IN ROW SHARE MODE")
            a = asyncio.create_task(compact_all(coord[1], include_current=True, wait=False,
                                                dsn=citus_dsn))
            waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::regclass"
            for _ in range(100):  # the compactor holds the group and waits for the shard
                if await w.fetchval(waiting, g.chunks[slot]):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the compactor never reached the group's shard")
            move = asyncio.create_task(coord[2].execute(
                "SELECT citus_move_shard_placement($1, $2, $3, $2, $4,"
                " shard_transfer_mode => 'block_writes')", g.key, g.host, g.port, other))
            # The move waits for the compaction: the compactor's coordinator
            # session (its shard metadata lock) blocks it.
            mover, compactor = coord[2].get_server_pid(), coord[1].get_server_pid()
            for _ in range(300):
                if compactor in (await coord[0].fetchval("SELECT pg_blocking_pids($1)", mover)
                                 or []) or move.done():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the move was never blocked by the compaction")
            moving_early = move.done()
            await tx.rollback()
            await w.close()
            compacted = await a
            await move
            return moving_early, compacted, other, g
        finally:
            for c in coord:
                await c.close()

    moving_early, compacted, other, g = run(go())
    assert not moving_early, "the move did not wait for the compaction"
    assert compacted[0] >= len(before)
    assert snapshot(citus_dsn, t.org_id) == before
    assert fetchval(citus_dsn, "SELECT coalesce(sum(n), 0) FROM reading_chunks"
                    " WHERE series_id = ANY($1::int[])", series) == 0
    assert fetchval(citus_dsn, "SELECT nodeport FROM citus_shards WHERE shardid = $1",
                    g.key) == other


def test_a_grafana_role_on_the_cluster_sees_only_its_organization_hot_and_compacted(
        citus_server, citus_dsn):
    a = make_tenant(citus_dsn, machines=("CNC-001", "CNC-002"))
    b = make_tenant(citus_dsn, machines=("CNC-001", "CNC-002"))
    start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=3)
    for t, seconds in ((a, 30), (b, 45)):
        send(citus_server, t, start, seconds, metrics=5)
        send(citus_server, t, start, seconds, metrics=5, machine="CNC-002")
    mine = set(org_series(citus_dsn, a.org_id))
    theirs = set(org_series(citus_dsn, b.org_id))
    # Both organizations' series are spread over both workers.
    nodes = fetchval(citus_dsn, "SELECT count(DISTINCT nodeport) FROM citus_shards WHERE"
                     " table_name = 'reading_chunks_0'::regclass AND shardid IN (SELECT"
                     " get_shard_id_for_distribution_column('reading_chunks_0', x)"
                     " FROM unnest($1::int[]) x)", sorted(theirs))
    assert nodes == 2
    url = haltless("grafana-role", "--org", a.name,
                   env={"HALTLESS_DATABASE_URL": citus_dsn}).stdout.strip()
    frm, to = start - dt.timedelta(minutes=1), start + dt.timedelta(minutes=2)

    def check(stage):
        rows = as_role(url, "SELECT org_id, count(*) FROM readings GROUP BY 1")
        assert [(r[0], r[1]) for r in rows] == [(a.org_id, 300)], stage
        assert as_role(url, "SELECT count(*) FROM readings_in($1, $2)", frm, to)[0][0] == 300
        sid = min(mine)
        assert len(as_role(url, "SELECT * FROM readings_between($1, $2, $3)", sid, frm, to)) == 30
        assert as_role(url, "SELECT * FROM readings_between($1, $2, $3)", min(theirs), frm,
                       to) == []
        for table in ("series", "reading_chunks", "reading_blocks", "reading_timelines"):
            col = "id" if table == "series" else "series_id"
            seen = {r[0] for r in as_role(url, f"SELECT DISTINCT {col} FROM {table}")}
            assert seen <= mine, (stage, table)
        assert [r[0] for r in as_role(url, "SELECT name FROM organizations")] == [a.name]
        assert {r[0] for r in as_role(url, "SELECT org_id FROM machines")} == {a.org_id}
        assert b.count(citus_dsn) == 450  # the owner still sees everything

    check("hot")
    compact(citus_dsn)
    assert fetchval(citus_dsn, "SELECT coalesce(sum(n), 0) FROM reading_chunks") == 0
    check("compacted")
    assert {r[0] for r in as_role(url, "SELECT series_id FROM reading_blocks")} == mine
    for sql in ("SELECT * FROM api_keys", "SELECT * FROM reader_roles",
                "SELECT * FROM ingest_sources"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            as_role(url, sql)
    for sql in ("INSERT INTO organizations (name) VALUES ('mine now')",
                f"DELETE FROM reading_blocks WHERE series_id = {min(theirs)}",
                "UPDATE machines SET machine_identifier = 'x'"):
        with pytest.raises((asyncpg.ReadOnlySQLTransactionError,
                            asyncpg.InsufficientPrivilegeError)):
            as_role(url, sql)
    assert b.count(citus_dsn) == 450


def test_reader_roles_on_the_cluster_are_bounded_too(citus_server, citus_dsn, cluster):
    """The bounds of tests/test_reader_bounds.py through a coordinator: the
    connection limit (and readers at the limit still read every shard), no
    advisory locks on the coordinator nor in shard queries on the workers,
    no temporary tables or large objects, serve's check ends a reader that
    lifted its timeouts, and a transaction a reader prepared is rolled back."""
    t = make_tenant(citus_dsn, machines=("CNC-001",))
    send(citus_server, t, dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=2),
         20, metrics=8)
    out = haltless("grafana-role", "--org", t.name, "--connection-limit", "3",
                   "--statement-timeout", "1", "--idle-in-transaction-timeout", "1",
                   "--transaction-timeout", "30", env={"HALTLESS_DATABASE_URL": citus_dsn})
    assert "warning" not in out.stderr, out.stderr
    url = out.stdout.strip()
    role = url.split("//")[1].split(":")[0]
    for i in range(1, len(cluster.nodes)):  # the lockdown reached every worker
        assert fetchval(cluster.node_dsn(i), "SELECT has_function_privilege('public',"
                        " 'pg_advisory_lock(bigint)', 'EXECUTE') OR has_database_privilege("
                        "'public', current_database(), 'TEMPORARY')") is False
        # Citus gave the role its session defaults there too (work_mem: shard
        # queries run on the workers, as the reader).
        assert "work_mem=64MB" in fetchval(
            cluster.node_dsn(i), "SELECT d.setconfig::text FROM pg_db_role_setting d"
            " JOIN pg_roles r ON r.oid = d.setrole WHERE r.rolname = $1", role)

    # Each session that queries holds one more connection as the reader on
    # every node (to the coordinator itself, and one to each worker): twice.
    assert fetchval(citus_dsn, "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1",
                    role) == 6

    async def go():
        held = [await asyncpg.connect(url) for _ in range(3)]
        try:
            counts = await asyncio.gather(*(c.fetchval("SELECT count(*) FROM readings")
                                            for c in held))
            more = await asyncio.gather(*(asyncpg.connect(url) for _ in range(4)),
                                        return_exceptions=True)
            await asyncio.gather(*(c.close() for c in more if isinstance(c, asyncpg.Connection)))
            assert any(isinstance(c, asyncpg.TooManyConnectionsError)
                       and "too many connections" in str(c) for c in more), more
            refused = []
            for sql in ("SELECT pg_advisory_lock(7291845002)",
                        "SELECT count(pg_try_advisory_xact_lock(series_id)) FROM reading_chunks",
                        "SELECT lo_create(0)", "CREATE TEMP TABLE mine (a int)"):
                await held[0].execute("SET default_transaction_read_only = off")
                try:
                    await held[0].execute(sql)
                    refused.append((sql, None))
                except asyncpg.PostgresError as exc:
                    refused.append((sql, type(exc).__name__))
            # Lifted timeouts: the serve workers' check ends the session.
            await held[1].execute("SET statement_timeout = 0")
            with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError)):
                await asyncio.wait_for(held[1].execute("SELECT pg_sleep(600)"), 90)
            # A prepared transaction (the cluster allows them: Citus's 2PC;
            # Citus refuses one that reached other nodes, not a local one).
            await held[2].execute("BEGIN; SELECT count(*) FROM pg_class;"
                                  " PREPARE TRANSACTION 'reader-held'")
            return counts, refused
        finally:
            for c in held:
                await c.close()

    counts, refused = run(go())
    assert counts == [160] * 3
    assert [why for _, why in refused] == ["InsufficientPrivilegeError"] * 4, refused
    wait_for(lambda: fetchval(citus_dsn, "SELECT count(*) FROM pg_prepared_xacts WHERE"
                              " owner = $1", role) == 0, timeout=30,
             what="the reader's prepared transaction to be rolled back")
    assert f"reader role {role}: backend" in citus_server.log()
    assert f"reader role {role} prepared transaction 'reader-held'" in citus_server.log()


def test_rollups_on_the_cluster_equal_the_raw_aggregates_and_stay_in_their_organization(
        citus_server, citus_dsn):
    import random
    a, b = make_tenant(citus_dsn), make_tenant(citus_dsn)
    rnd = random.Random(17)
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=2)
    for t in (a, b):
        send_readings(citus_server, t, rollup_readings(hour, 900, rnd))
    assert check_rollups(citus_dsn, a, "hot") > 0
    compact(citus_dsn)
    check_rollups(citus_dsn, a, "compacted")
    # After the blocks' last readings: combined with their summaries (0024).
    send_readings(citus_server, a, rollup_readings(hour + dt.timedelta(minutes=30), 60, rnd))
    check_rollups(citus_dsn, a, "late after the blocks")
    # Inside their span: those hours through their readings.
    late = rollup_readings(hour + dt.timedelta(minutes=3), 60, rnd, step=0.5)
    send_readings(citus_server, a, late)
    check_rollups(citus_dsn, a, "late")
    url = haltless("grafana-role", "--org", a.name,
                   env={"HALTLESS_DATABASE_URL": citus_dsn}).stdout.strip()
    for view in ("readings_1m", "readings_1h"):
        assert {r[0] for r in as_role(url, f"SELECT DISTINCT org_id FROM {view}")} == {a.org_id}
        assert as_role(url, f"SELECT sum(count) FROM {view}")[0][0] == a.count(citus_dsn)
    compact(citus_dsn)
    check_rollups(citus_dsn, a, "merged")


def test_series_identity_on_the_cluster_merges_old_duplicates_and_records_changes(
        citus_server, citus_dsn):
    """Migration 0020 on the cluster: a unit change through ingest is one
    series and a recorded change; duplicates made under the old unique key
    (a series with blocks and late hot rows in one hour) merge into one with
    every reading kept once, before and after the next compaction."""
    t = make_tenant(citus_dsn, machines=("CNC-001",))
    now = dt.datetime.now(UTC).replace(microsecond=0)
    for i, unit in enumerate((None, "celsius")):
        r = {"machine_identifier": "CNC-001", "metric_name": "temp", "value": 1.0,
             "timestamp": iso(now - dt.timedelta(seconds=10 - i))}
        if unit:
            r["unit"] = unit
        got = post(citus_server, t.key, {"readings": [r]})
        assert got.status_code == 207 and got.json()["accepted_count"] == 1, got.text
        time.sleep(0.7)  # the other worker sees the change
    [sid] = org_series(citus_dsn, t.org_id)
    assert fetchval(citus_dsn, "SELECT unit FROM series WHERE id = $1", sid) == "celsius"
    assert [tuple(r) for r in fetch(
        citus_dsn, "SELECT old_unit, new_unit FROM series_attribute_changes WHERE series_id = $1",
        sid)] == [("", "celsius")]

    t = make_tenant(citus_dsn, machines=("CNC-001",))
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
    send(citus_server, t, hour + dt.timedelta(minutes=30), 60, metrics=2, values=[1.5])
    compact(citus_dsn)
    keep, dup = org_series(citus_dsn, t.org_id)
    fetchval(citus_dsn, "ALTER TABLE series DROP CONSTRAINT series_machine_metric_key")
    fetchval(citus_dsn, "ALTER TABLE series ADD CONSTRAINT series_old_key"
             " UNIQUE (machine_id, metric_name, unit, raw_tag)")
    try:
        fetchval(citus_dsn, "UPDATE series SET metric_name = 'm0', unit = 'F' WHERE id = $1", dup)
        stamps = [hour + dt.timedelta(minutes=5, seconds=s) for s in range(10)]
        fetchval(citus_dsn, "INSERT INTO reading_chunks (slot, series_id, bucket, n, ts, vals)"
                 " VALUES (0, $1, $2, 10, haltless_chunk_stamps($3::timestamptz[]), $4::float8[])",
                 dup, hour, stamps, [0.5] * 10)

        def everything():
            return sorted((r[0], r[1], r[2]) for r in fetch(
                citus_dsn, 'SELECT metric_name, "timestamp", value FROM readings'
                " WHERE org_id = $1", t.org_id))
        before = everything()
        assert fetchval(citus_dsn, "SELECT haltless_merge_series_duplicates()") == 1
    finally:
        fetchval(citus_dsn, "ALTER TABLE series DROP CONSTRAINT series_old_key")
        fetchval(citus_dsn, "ALTER TABLE series ADD CONSTRAINT series_machine_metric_key"
                 " UNIQUE (machine_id, metric_name)")
    assert org_series(citus_dsn, t.org_id) == [keep]
    assert fetchval(citus_dsn, "SELECT unit FROM series WHERE id = $1", keep) == "F"
    for stage in ("merged", "compacted"):
        if stage == "compacted":
            compact(citus_dsn)
            assert fetchval(citus_dsn, "SELECT count(*) FROM reading_chunks WHERE series_id = $1",
                            keep) == 0
        assert everything() == [("m0", ts, v) for _, ts, v in before], stage
        assert fetchval(citus_dsn, "SELECT count(*) FROM reading_blocks WHERE series_id = $1",
                        dup) == 0
        check_rollups(citus_dsn, t, stage)


def test_retention_drops_whole_months_of_distributed_blocks(citus_dsn):
    old = dt.datetime.now(UTC) - dt.timedelta(days=120)
    fetch(citus_dsn, "SELECT haltless_block_partitions($1, $1)", old)
    name = f"reading_blocks_{old.strftime('%Y%m')}"
    assert fetchval(citus_dsn, "SELECT count(*) FROM pg_dist_partition"
                    " WHERE logicalrelid = to_regclass($1)", name) == 1  # distributed too
    out = compact(citus_dsn, env={"HALTLESS_RETENTION_DAYS": "60"}).stdout
    assert "dropped" in out
    assert fetchval(citus_dsn, "SELECT to_regclass($1)::text", name) is None


def test_two_poller_processes_share_sources_through_leases_on_the_cluster(citus_server,
                                                                          citus_dsn, tmp_path):
    t = make_tenant(citus_dsn, machines=[f"M{i}" for i in range(4)])
    api = Api(citus_server, citus_server.token(t.org_id))
    with ModbusPeer([device(1, {100: 1})]) as peer:
        ids = []
        for i in range(4):
            body = {**MODBUS_BODY, "name": f"s{i}", "machine_id": str(t.machines[f"M{i}"]),
                    "port": peer.port, "poll_interval_seconds": 1}
            r = api.post("/api/v1/ingest-sources", body)
            assert r.status_code == 201, r.text
            ids.append(uuid.UUID(r.json()["id"]))
        a = Pollers(citus_server, tmp_path / "a.log")
        b = Pollers(citus_server, tmp_path / "b.log")
        try:
            def owners():
                return {r[0]: r[1] for r in fetch(
                    citus_dsn, "SELECT id, lease_owner FROM ingest_sources WHERE id = ANY($1::uuid[])",
                    ids)}
            # Settled (two sources each), and read from one look at the table:
            # the rebalancing passes through moments where a source has no owner.
            settled = wait_for(lambda: (o := owners()) and sorted(Counter(o.values()).values()) == [2, 2]
                               and None not in o.values() and o, timeout=60,
                               what="both processes polling two sources each")
            a_owner = next(o for o in set(settled.values()) if o.split(":")[1] != str(b.proc.pid))
            a.kill(signal.SIGKILL)
            killed_at = time.time()
            wait_for(lambda: a_owner not in owners().values() and None not in owners().values(),
                     timeout=15, what="takeover")
            wait_for(lambda: fetch(
                citus_dsn, "SELECT count(*) FROM (SELECT machine_id FROM readings WHERE"
                " machine_id = ANY($1::uuid[]) AND timestamp > to_timestamp($2) GROUP BY 1"
                " HAVING count(*) >= 2) m", list(t.machines.values()), killed_at + 1)[0][0] == 4,
                what="two polls of every source after the kill")
        finally:
            a.kill()
            b.kill(signal.SIGTERM)
        for src in ids:
            api.patch(f"/api/v1/ingest-sources/{src}", {"is_active": False})
    for i in range(4):
        ts = [r[0].timestamp() for r in fetch(
            citus_dsn, "SELECT timestamp FROM readings WHERE machine_id = $1 ORDER BY 1",
            t.machines[f"M{i}"])]
        assert ts, f"source {i} never polled"
        gaps = [y - x for x, y in zip(ts, ts[1:])]
        assert min(gaps) > 0.5, f"source {i} polled twice at once: {gaps}"
        assert ts[-1] > killed_at + 1, f"source {i} not polled after the kill"


@needs_citus
def test_a_worker_added_later_takes_shards_through_the_rebalancer():
    """docs/scaling.md "Adding a worker", on a cluster of its own."""
    with CitusCluster(workers=2) as c:
        async def load():
            conn = await db.connect(c.dsn)
            try:
                await db.migrate(conn)
                await conn.execute(
                    "INSERT INTO reading_chunks_0 (series_id, bucket, n, ts, vals)"
                    " SELECT s, date_trunc('hour', now()), 1, haltless_chunk_stamps(ARRAY[now()]), ARRAY[s]::float8[]"
                    " FROM generate_series(1, 500) s")
            finally:
                await conn.close()
        run(load())
        port = c.add_worker()
        fetch(c.dsn, "SELECT citus_rebalance_start(shard_transfer_mode => 'block_writes')")
        fetch(c.dsn, "SELECT citus_rebalance_wait()")
        moved = fetchval(c.dsn, "SELECT count(*) FROM citus_shards WHERE nodeport = $1"
                         " AND table_name = 'reading_chunks_0'::regclass", port)
        assert moved >= 2, moved  # 8 shards over 3 workers: 3/3/2
        assert fetchval(c.dsn, "SELECT sum(vals[1]) FROM reading_chunks") == sum(range(1, 501))
        # A reader role reads its organization's series from the new worker's
        # shards too (its policies and functions came with them), and
        # compaction runs per shard group there as well.
        t = make_tenant(c.dsn, machines=("CNC-001",))
        other = make_tenant(c.dsn, machines=("CNC-001",))

        async def reader():
            conn = await db.connect(c.dsn)
            try:
                for tenant in (t, other):
                    await conn.execute(
                        "INSERT INTO series (machine_id, metric_name) SELECT $1, 'm' || i"
                        " FROM generate_series(1, 40) i", tenant.machines["CNC-001"])
                await conn.execute(
                    "INSERT INTO reading_chunks_0 (series_id, bucket, n, ts, vals)"
                    " SELECT id, date_trunc('hour', now()), 1, haltless_chunk_stamps(ARRAY[now()]), ARRAY[1.0]"
                    " FROM series")
                role, password = await create_reader_role(conn, t.org_id, t.name)
                return url_for_role(c.dsn, role, password)
            finally:
                await conn.close()
        url = run(reader())
        mine = org_series(c.dsn, t.org_id)
        on_new = fetchval(c.dsn, "SELECT count(*) FROM unnest($1::int[]) x WHERE (SELECT"
                          " nodeport FROM citus_shards WHERE table_name = 'reading_chunks_0'"
                          "::regclass AND shardid = get_shard_id_for_distribution_column("
                          "'reading_chunks_0', x)) = $2", mine, port)
        assert on_new > 0
        assert sorted(r[0] for r in as_role(url, "SELECT DISTINCT series_id FROM readings")) == mine
        compact(c.dsn)
        assert fetchval(c.dsn, "SELECT count(*) FROM reading_chunks") == 0
        assert sorted(r[0] for r in as_role(url, "SELECT DISTINCT series_id FROM readings")) == mine
        assert fetchval(c.dsn, "SELECT sum(n) FROM reading_blocks") == 580


async def _compact_now(dsn):
    conn = await asyncpg.connect(dsn)
    try:
        return await compact_all(conn, include_current=True, wait=False, dsn=dsn)
    finally:
        await conn.close()


def test_a_worker_that_is_down_gets_503_and_ingest_resumes_when_it_is_back(cluster, citus_server,
                                                                           citus_dsn):
    """docs/scaling.md "What fails over": a group commit writes to many
    shards, so while a worker is down nothing is stored and the client is
    told to retry; once it is back, the same batch is accepted."""
    t = make_tenant(citus_dsn, machines=("CNC-001",))
    now = dt.datetime.now(UTC).replace(microsecond=0)
    body = {"readings": [{"machine_identifier": "CNC-001", "timestamp": iso(now),
                          "metric_name": f"m{m}", "value": float(m)} for m in range(40)]}
    assert post(citus_server, t.key, body).status_code == 207  # series created, cached
    down_port = cluster.nodes[2][1]
    on_live = fetchval(citus_dsn, "SELECT min(x) FROM unnest($1::int[]) x WHERE (SELECT nodeport"
                       " FROM citus_shards WHERE shardid = get_shard_id_for_distribution_column("
                       "'reading_chunks_0', x) AND table_name = 'reading_chunks_0'::regclass) <> $2",
                       org_series(citus_dsn, t.org_id), down_port)
    on_down = [r[0] for r in fetch(
        citus_dsn, "SELECT x FROM unnest($1::int[]) x WHERE (SELECT nodeport FROM citus_shards"
        " WHERE shardid = get_shard_id_for_distribution_column('reading_chunks_0', x)"
        " AND table_name = 'reading_chunks_0'::regclass) = $2",
        org_series(citus_dsn, t.org_id), down_port)]
    assert on_down
    cluster.stop_node(2)
    try:
        down = post(citus_server, t.key, body)
        assert down.status_code == 503 and down.headers["retry-after"] == "5", down.text
        # A series whose shards live on the other worker can still be read.
        rows = fetch(citus_dsn, "SELECT * FROM readings_between($1, now() - interval '1 hour',"
                     " now() + interval '1 minute')", on_live)
        assert len(rows) == 1
        # Compaction goes on for the shard groups of the live worker.
        run(_compact_now(citus_dsn))
        assert fetchval(citus_dsn, "SELECT count(*) FROM reading_blocks WHERE series_id = $1",
                        on_live) == 1
        assert len(fetch(citus_dsn, "SELECT * FROM readings_between($1, now() - interval"
                         " '1 hour', now() + interval '1 minute')", on_live)) == 1
    finally:
        cluster.start_node(2)
    assert fetchval(citus_dsn, "SELECT count(DISTINCT series_id) FROM reading_chunks"
                    " WHERE series_id = ANY($1::int[])", on_down) > 0  # waited for its worker
    again = wait_for(lambda: (r := post(citus_server, t.key, body)).status_code == 207 and r,
                     timeout=30, what="ingest after the worker came back")
    assert again.json()["accepted_count"] == 40
    assert t.count(citus_dsn) == 80

