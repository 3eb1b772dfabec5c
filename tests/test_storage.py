"""Storage: compaction of hot chunks into compressed blocks (every reading
kept bit for bit, crash-safe at each step, late data merged), retention by
whole ranges, plain SQL (the view, readings_between, readings_in) over both,
one series' range answered from the index, and migrations (idempotent, a
schema newer than the code refused)."""
from __future__ import annotations

import datetime as dt
import math
import struct
import uuid

import asyncpg
import pytest

from haltless.core.errors import SchemaTooNew
from haltless.server import db
from helpers import (ServerProcess, fetch, fetchval, haltless, make_tenant, post, reading,
                     serve_compactors)
from helpers import run as run_async

UTC = dt.timezone.utc
HARD = [-0.0, 0.0, 5e-324, 2.2250738585072014e-308, 2.225073858507201e-308,
        1.7976931348623157e308, -1.7976931348623157e308, 72.5, 0.1, 1e-300, 123.456789012345]


def bits(v: float) -> bytes:
    return struct.pack(">d", v)


def iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def snapshot(dsn, org_id):
    """Every reading of the organization, as (series, time, value bits), sorted."""
    rows = fetch(dsn, 'SELECT series_id, "timestamp", value FROM readings WHERE org_id = $1',
                 org_id)
    return sorted((r[0], r[1], bits(r[2])) for r in rows)


def hot_count(dsn) -> int:
    return fetchval(dsn, "SELECT coalesce(sum(n), 0) FROM reading_chunks")


def compact(dsn, *extra, check=True, env=None):
    return haltless("compact", *extra, env={"HALTLESS_DATABASE_URL": dsn, **(env or {})},
                    check=check, timeout=120)


def send(server, tenant, start: dt.datetime, seconds: int, metrics=4, machine="CNC-001",
         values=None):
    """`seconds` ticks of `metrics` series sharing one timestamp per tick."""
    rs = []
    for s in range(seconds):
        t = iso(start + dt.timedelta(seconds=s, microseconds=(s * 7919) % 1000))
        for m in range(metrics):
            v = values[(s + m) % len(values)] if values else round(20 + 0.1 * ((s * 3 + m) % 50), 1)
            rs.append({"machine_identifier": machine, "timestamp": t, "metric_name": f"m{m}",
                       "value": v, "unit": "celsius"})
    for i in range(0, len(rs), 1000):
        r = post(server, tenant.key, {"readings": rs[i:i + 1000]})
        assert r.status_code == 207 and r.json()["rejected_count"] == 0, r.text
    return len(rs)


@pytest.fixture
def fresh(pg_dsn, server):
    tenant = make_tenant(pg_dsn, machines=("CNC-001", "CNC-002"))
    compact(pg_dsn)  # start from an empty hot store
    return tenant


def test_compaction_keeps_every_reading_bit_for_bit_and_empties_the_hot_store(server, pg_dsn, fresh):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    n = send(server, fresh, now - dt.timedelta(minutes=3), 120, metrics=5, values=HARD)
    n += send(server, fresh, now - dt.timedelta(minutes=3), 120, machine="CNC-002")
    before = snapshot(pg_dsn, fresh.org_id)
    assert len(before) == n and hot_count(pg_dsn) >= n
    out = compact(pg_dsn).stdout
    assert f"compacted {n} readings" in out
    assert hot_count(pg_dsn) == 0
    assert snapshot(pg_dsn, fresh.org_id) == before
    assert {b for _, _, b in before} >= {bits(v) for v in HARD}  # -0.0, subnormals, extremes
    # Series polled together share one timeline per hour and machine.
    timelines = fetchval(pg_dsn, "SELECT count(DISTINCT (b.block_start, b.timeline))"
                         " FROM reading_blocks b JOIN series s ON s.id = b.series_id"
                         " JOIN machines m ON m.id = s.machine_id WHERE m.org_id = $1",
                         fresh.org_id)
    hours = fetchval(pg_dsn, "SELECT count(DISTINCT date_trunc('hour', \"timestamp\"))"
                     " FROM readings WHERE org_id = $1", fresh.org_id)
    assert timelines <= 2 * hours
    assert compact(pg_dsn).stdout.startswith("compacted 0 readings")  # idempotent


@pytest.mark.parametrize("point", ["after-copy-out", "after-blocks", "before-truncate",
                                   "before-commit"])
def test_a_kill_at_any_step_loses_and_duplicates_nothing(server, pg_dsn, fresh, point):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    send(server, fresh, now - dt.timedelta(minutes=2), 60, metrics=3)
    compact(pg_dsn)  # some data already in blocks: the late data below merges into them
    send(server, fresh, now - dt.timedelta(minutes=2, seconds=30), 60, metrics=3)
    before = snapshot(pg_dsn, fresh.org_id)
    killed = compact(pg_dsn, "--crash-at", point, check=False)
    assert killed.returncode == 137, killed.stderr
    assert snapshot(pg_dsn, fresh.org_id) == before
    compact(pg_dsn)
    assert snapshot(pg_dsn, fresh.org_id) == before
    assert hot_count(pg_dsn) == 0


def test_late_data_for_a_compacted_hour_joins_its_block(server, pg_dsn, fresh):
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=5)
    send(server, fresh, hour + dt.timedelta(minutes=30), 30, metrics=2)
    compact(pg_dsn)
    send(server, fresh, hour + dt.timedelta(minutes=10), 30, metrics=2)  # earlier, same hour
    send(server, fresh, hour - dt.timedelta(days=400), 5, metrics=2)     # over a year late
    before = snapshot(pg_dsn, fresh.org_id)
    compact(pg_dsn)
    assert snapshot(pg_dsn, fresh.org_id) == before
    blocks = fetch(pg_dsn, "SELECT b.series_id, b.block_start, b.n FROM reading_blocks b"
                   " JOIN series s ON s.id = b.series_id JOIN machines m ON m.id = s.machine_id"
                   " WHERE m.org_id = $1 ORDER BY 1, 2", fresh.org_id)
    assert [(r["block_start"], r["n"]) for r in blocks if r["block_start"] == hour] == [(hour, 60)] * 2
    rows = fetch(pg_dsn, "SELECT * FROM readings_between($1, $2, $3)", blocks[0]["series_id"],
                 hour, hour + dt.timedelta(hours=1))
    assert len(rows) == 60 and [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    # No timeline is left that no block uses.
    assert fetchval(pg_dsn, "SELECT count(*) FROM reading_timelines t WHERE NOT EXISTS ("
                    "SELECT 1 FROM reading_blocks b WHERE b.block_start = t.block_start"
                    " AND b.timeline = t.id)") == 0


def test_compacted_blocks_are_small(server, pg_dsn, fresh):
    start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=4)
    n = send(server, fresh, start, 200, metrics=10)
    compact(pg_dsn)
    size = fetchval(pg_dsn, "SELECT sum(length(b.vals)) + (SELECT sum(length(t.ts))"
                    " FROM reading_timelines t WHERE (t.block_start, t.id) IN"
                    "  (SELECT block_start, timeline FROM reading_blocks b2"
                    "   JOIN series s2 ON s2.id = b2.series_id JOIN machines m2 ON m2.id = s2.machine_id"
                    "   WHERE m2.org_id = $1))"
                    " FROM reading_blocks b JOIN series s ON s.id = b.series_id"
                    " JOIN machines m ON m.id = s.machine_id WHERE m.org_id = $1", fresh.org_id)
    assert size / n < 1.5, size / n  # 0.1-step values: ~1 byte each, timestamps shared


def test_a_time_range_on_the_view_prunes_partitions_and_uses_the_indexes(server, pg_dsn, fresh):
    fetch(pg_dsn, "SELECT haltless_block_partitions(now() - interval '14 months', now())")
    q = ("EXPLAIN SELECT * FROM readings WHERE \"timestamp\" >= now() - interval '1 hour'"
         " AND bucket >= date_trunc('hour', now() - interval '1 hour') AND series_id = 7")
    plan = "\n".join(r[0] for r in fetch(pg_dsn, q))
    old = (dt.datetime.now(UTC) - dt.timedelta(days=200)).strftime("%Y%m")
    assert f"reading_blocks_{old}" not in plan, plan  # pruned
    assert "Index" in plan, plan
    plan = "\n".join(r[0] for r in fetch(
        pg_dsn, "EXPLAIN SELECT * FROM readings_in(now() - interval '1 hour', now())"))
    assert f"reading_blocks_{old}" not in plan, plan


def test_retention_refuses_old_readings_and_drops_whole_months(pg_dsn, tmp_path):
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    srv = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn, "HALTLESS_RETENTION_DAYS": "30"},
                        data_dir=tmp_path)
    srv.start(tmp_path / "serve.log")
    try:
        now = dt.datetime.now(UTC).replace(microsecond=0)
        body = {"readings": [
            {"machine_identifier": "CNC-001", "timestamp": iso(now - dt.timedelta(days=d)),
             "metric_name": "t", "value": 1.0} for d in (1, 29, 31, 400)]}
        r = post(srv, tenant.key, body).json()
        assert r["accepted_count"] == 2
        assert [e["index"] for e in r["errors"]] == [2, 3]
        assert all(e["error"] == "Timestamp is older than the retention period (30 days)"
                   for e in r["errors"])
    finally:
        srv.stop()
    old = now - dt.timedelta(days=90)
    fetch(pg_dsn, "SELECT haltless_block_partitions($1, $1)", old)
    name = f"reading_blocks_{old.strftime('%Y%m')}"
    assert fetchval(pg_dsn, "SELECT to_regclass($1)::text", name) == name
    out = compact(pg_dsn, env={"HALTLESS_RETENTION_DAYS": "30"}).stdout
    assert "dropped" in out
    assert fetchval(pg_dsn, "SELECT to_regclass($1)::text", name) is None
    assert fetchval(pg_dsn, "SELECT count(*) FROM readings WHERE org_id = $1", tenant.org_id) == 2


def test_sql_decoders_agree_with_the_kernel_on_hard_values(pg_dsn):
    from haltless.fast import pack_ints, pack_values
    ts = [0, 1, 1_000_000, 1_000_500, 3_600_000_000]
    vals = [-0.0, 5e-324, 1.7976931348623157e308, 0.1, math.ulp(0.0)]
    rows = fetch(pg_dsn, "SELECT ts, float8send(value) AS b FROM haltless_block_readings($1, $2)",
                 pack_ints(ts), pack_values(vals))
    epoch = dt.datetime(1970, 1, 1, tzinfo=UTC)
    assert [r["ts"] for r in rows] == [epoch + dt.timedelta(microseconds=t) for t in ts]
    assert [bytes(r["b"]) for r in rows] == [bits(v) for v in vals]


def test_workers_compact_the_closed_slot_by_themselves_one_at_a_time(pg_dsn, fresh):
    """Every worker runs compact_forever; the advisory lock lets one at a time
    in, and only the slot of an hour that has ended (plus the grace) is touched."""
    from haltless.server.compaction import GRACE
    from haltless.server.hot import hot_slot

    import time
    # A while after the current hour began, by a clock that agrees with the
    # session's server on which slot is being written.
    t = time.time() // 3600 * 3600 + GRACE + 60
    closed, current = 1 - hot_slot(t), hot_slot(t)
    sid = fetchval(pg_dsn, "INSERT INTO series (machine_id, metric_name) VALUES ($1, 'x')"
                   " RETURNING id", fresh.machines["CNC-001"])
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    for slot in (closed, current):
        fetch(pg_dsn, f"INSERT INTO reading_chunks_{slot} (series_id, bucket, n, ts, vals)"
              " VALUES ($1, $2::timestamptz, 2, haltless_chunk_stamps(ARRAY[$2::timestamptz, $2::timestamptz + interval '1 s']),"
              " ARRAY[1.5, 2.5])", sid, hour)

    serve_compactors(pg_dsn, t, f"SELECT count(*) = 0 FROM reading_chunks_{closed}")
    assert fetchval(pg_dsn, f"SELECT count(*) FROM reading_chunks_{closed}") == 0
    assert fetchval(pg_dsn, f"SELECT count(*) FROM reading_chunks_{current} WHERE series_id = $1",
                    sid) == 1  # the hour still being written is left alone
    assert [r["n"] for r in fetch(pg_dsn, "SELECT n FROM reading_blocks WHERE series_id = $1",
                                  sid)] == [2]
    assert fetchval(pg_dsn, 'SELECT count(*) FROM readings WHERE series_id = $1', sid) == 4


def test_migration_0008_turns_hot_timestamps_into_bytes_and_keeps_every_reading(pg_dsn):
    # A database at version 7 with hot rows as 0005 wrote them (timestamptz[])
    # and a reader role, then the rest of the migrations.
    import uuid

    import asyncpg

    from haltless.server import db
    name = f"m8_{uuid.uuid4().hex[:8]}"
    base, _, query = pg_dsn.partition("?")
    dsn = base.rsplit("/", 1)[0] + "/" + name + (("?" + query) if query else "")
    stamps = [dt.datetime(2026, 11, 27, 12, 0, 0, 123456, UTC),
              dt.datetime(2026, 11, 27, 12, 59, 59, 999999, UTC)]

    async def go():
        admin = await asyncpg.connect(pg_dsn)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        c = await asyncpg.connect(dsn)
        try:
            await c.execute("CREATE TABLE haltless_schema (version integer PRIMARY KEY,"
                            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            for version, mname, sql in db._migrations():
                if version <= 7:
                    await c.execute(sql)
                    await c.execute("INSERT INTO haltless_schema (version, name) VALUES ($1, $2)",
                                    version, mname)
            org = await c.fetchval("INSERT INTO organizations (name) VALUES ('o') RETURNING id")
            mid = await c.fetchval("INSERT INTO machines (org_id, machine_identifier)"
                                   " VALUES ($1, 'M') RETURNING id", org)
            sid = await c.fetchval("INSERT INTO series (machine_id, metric_name) VALUES ($1, 't')"
                                   " RETURNING id", mid)
            await c.execute("INSERT INTO reading_chunks_0 (series_id, bucket, n, ts, vals)"
                            " VALUES ($1, '2026-11-27T12:00Z', 2, $2, $3)", sid, stamps, HARD[:2])
            await c.execute("CREATE ROLE m8_reader_" + name[3:] + " LOGIN")
            await c.execute("INSERT INTO reader_roles (role_name, org_id) VALUES ($1, $2)",
                            "m8_reader_" + name[3:], org)
            assert await db.migrate(c) == db.LATEST_VERSION
            got = await c.fetch("SELECT * FROM readings_between($1, '2026-11-27', '2026-11-28')",
                                sid)
            hot = await c.fetchrow("SELECT ts, array_send(vals), haltless_chunk_last(ts)"
                                   " FROM reading_chunks")
            granted = await c.fetchval("SELECT has_table_privilege($1, 'readings', 'SELECT')",
                                       "m8_reader_" + name[3:])
            await c.execute("DROP OWNED BY m8_reader_" + name[3:])
            await c.execute("DROP ROLE m8_reader_" + name[3:])
            return got, hot, granted
        finally:
            await c.close()
            # Not left behind: a database open to PUBLIC is what grafana-role
            # warns about, and test_reader_bounds counts the others.
            admin = await asyncpg.connect(pg_dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()

    got, hot, granted = run_async(go())
    assert [r["ts"] for r in got] == stamps
    assert [bits(r["value"]) for r in got] == [bits(v) for v in HARD[:2]]
    from haltless.fast import from_chunk
    ts, vals = from_chunk(hot[0], hot[1])
    epoch = dt.datetime(1970, 1, 1, tzinfo=UTC)
    assert ts.tolist() == [(s - epoch) // dt.timedelta(microseconds=1) for s in stamps]
    assert hot[2] == ts[-1]
    assert granted


def test_one_series_over_a_time_range_is_answered_from_the_index(server, pg_dsn, tenant):
    body = {"readings": [reading(metric=f"m{i % 50}", value=float(i)) for i in range(1000)]}
    assert post(server, tenant.key, body).json()["accepted_count"] == 1000
    sid = fetchval(pg_dsn, "SELECT s.id FROM series s JOIN machines m ON m.id = s.machine_id"
                   " WHERE m.org_id = $1 AND s.metric_name = 'm7'", tenant.org_id)
    # Enough chunks and blocks of other series that a sequential scan would be
    # the wrong plan, whatever the tests before this one compacted (a block
    # table of a few rows is rightly scanned whole).
    hours = "generate_series(1, 300) s, generate_series(0, 60) h"
    start = "date_trunc('hour', now()) - (h || ' hours')::interval"
    try:
        fetch(pg_dsn, f"INSERT INTO reading_chunks SELECT s % 2, 1000000 + s, {start}, 1,"
              f" haltless_chunk_stamps(ARRAY[now()]), ARRAY[1.0]::float8[] FROM {hours}")
        fetch(pg_dsn, "SELECT haltless_block_partitions(now() - interval '61 hours', now())")
        fetch(pg_dsn, f"INSERT INTO reading_timelines SELECT {start}, -s, 1, '\\x00'::bytea FROM {hours}")
        fetch(pg_dsn, f"INSERT INTO reading_blocks SELECT 1000000 + s, {start}, 1, {start}, {start},"
              f" -s, '\\x00'::bytea FROM {hours}")
        fetch(pg_dsn, "ANALYZE reading_chunks, reading_blocks, reading_timelines")
        plan = "\n".join(r[0] for r in fetch(
            pg_dsn, "EXPLAIN SELECT * FROM readings_between($1, now() - interval '1 hour', now())", sid))
        assert "Index Scan" in plan and "series_bucket" in plan or "series_id_bucket" in plan, plan
        assert "Seq Scan" not in plan, plan
        rows = fetch(pg_dsn, "SELECT * FROM readings_between($1, now() - interval '1 hour', now())",
                     sid)
        assert [r["value"] for r in rows] == [float(i) for i in range(7, 1000, 50)]
    finally:
        fetch(pg_dsn, "DELETE FROM reading_chunks WHERE series_id > 1000000")
        fetch(pg_dsn, "DELETE FROM reading_blocks WHERE series_id > 1000000")
        fetch(pg_dsn, "DELETE FROM reading_timelines WHERE id < 0")


def test_migrations_are_idempotent_and_a_newer_schema_is_a_clear_error(pg_dsn):
    async def go():
        c = await asyncpg.connect(pg_dsn)
        name = f"haltless_mig_{uuid.uuid4().hex[:6]}"
        await c.execute(f'CREATE DATABASE "{name}"')
        await c.close()
        other = pg_dsn.replace("/haltless?", f"/{name}?") if "/haltless?" in pg_dsn else \
            pg_dsn.rsplit("/", 1)[0] + "/" + name
        c = await asyncpg.connect(other)
        try:
            assert await db.migrate(c) == db.LATEST_VERSION
            assert await db.migrate(c) == db.LATEST_VERSION
            assert await c.fetchval("SELECT name FROM organizations WHERE is_default") == "default"
            await c.execute("INSERT INTO haltless_schema (version, name) VALUES (999, 'future')")
            with pytest.raises(SchemaTooNew, match="version 999, newer than this haltless"):
                await db.migrate(c)
        finally:
            await c.close()
        c = await asyncpg.connect(pg_dsn)
        await c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await c.close()
    run_async(go())


def test_a_migration_that_lands_below_the_databases_version_is_still_applied(pg_dsn):
    # Branches reserve migration numbers, so 0016 can land after 0018: a
    # database migrated to 0018 without it must still get it.
    async def go():
        c = await asyncpg.connect(pg_dsn)
        name = f"haltless_gap_{uuid.uuid4().hex[:6]}"
        await c.execute(f'CREATE DATABASE "{name}"')
        await c.close()
        other = pg_dsn.replace("/haltless?", f"/{name}?") if "/haltless?" in pg_dsn else \
            pg_dsn.rsplit("/", 1)[0] + "/" + name
        c = await asyncpg.connect(other)
        try:
            await c.execute("CREATE TABLE haltless_schema (version integer PRIMARY KEY,"
                            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            versions = [v for v, _, _ in db._migrations()]
            assert 16 in versions and max(versions) > 16
            for version, mname, sql in db._migrations():
                if version != 16:
                    await c.execute(sql)
                    await c.execute("INSERT INTO haltless_schema (version, name) VALUES ($1, $2)",
                                    version, mname)
            assert not await c.fetchval("SELECT count(*) FROM information_schema.columns"
                                        " WHERE table_name = 'ingest_sources'"
                                        " AND column_name = 'gap_started_at'")
            assert await db.migrate(c) == db.LATEST_VERSION
            assert await c.fetchval("SELECT count(*) FROM information_schema.columns"
                                    " WHERE table_name = 'ingest_sources'"
                                    " AND column_name IN ('gap_started_at', 'gap_ended_at')") == 2
            assert await c.fetchval("SELECT name FROM haltless_schema WHERE version = 16") == "source_gaps"
        finally:
            await c.close()
        c = await asyncpg.connect(pg_dsn)
        await c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await c.close()
    run_async(go())
