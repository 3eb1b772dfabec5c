"""Series identity (migration 0020, README "Series identity"): a series is
(machine, metric); unit and raw_tag are attributes whose latest non-empty
value wins and whose changes are recorded. Sent through the real server,
and a database with duplicates made the old way merged by the migration
with every reading kept exactly once, rollups exact, before and after the
next compaction."""
from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import uuid
from types import SimpleNamespace

import asyncpg
import pytest
import requests

from haltless.server import db
from haltless.server.compact import Compactor
from helpers import fetch, fetchval, make_tenant, migrate, post, run, serving
from test_query import bits
from test_rollups import check as check_rollups

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)


def iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def get(server, token, path, **params):
    r = requests.get(server.url + path, params=params, timeout=30,
                     headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r


def attribute_changes(dsn, series_id) -> list[tuple]:
    return [tuple(r) for r in fetch(
        dsn, "SELECT old_unit, new_unit, old_raw_tag, new_raw_tag FROM series_attribute_changes"
        " WHERE series_id = $1 ORDER BY changed_at, ctid", series_id)]


# ------------------------------------------------------------------ ingest

def test_a_batch_alternating_a_cached_series_unit_is_stored_and_its_last_unit_wins(server, pg_dsn):
    # The fuzzer found it (503 "series cache is churning"): a reading that hit
    # the cache under the old unit missed once a later reading of its batch
    # changed the unit, and changing it back made the other miss, three times.
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    t0 = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=5)

    def reading(i, unit):
        return {"machine_identifier": "CNC-001", "metric_name": "temperature", "unit": unit,
                "timestamp": iso(t0 + dt.timedelta(seconds=i)), "value": float(i)}
    for _ in range(2):  # both workers cache it under celsius
        r = post(server, tenant.key, {"readings": [reading(0, "celsius")]})
        assert r.status_code == 207, r.text
    for k, units in enumerate((["celsius", "bar", "celsius", "bar"], ["bar", "celsius"])):
        body = [reading(10 * (k + 1) + i, u) for i, u in enumerate(units)]
        for _ in range(2):  # each worker
            r = post(server, tenant.key, {"readings": body})
            assert r.status_code == 207 and r.json()["accepted_count"] == len(body), r.text
        assert fetchval(pg_dsn, "SELECT unit FROM series s JOIN machines m ON m.id ="
                        " s.machine_id WHERE m.org_id = $1", tenant.org_id) == units[-1]


def test_one_metric_sent_with_and_without_unit_and_raw_tag_is_one_series_whose_latest_unit_wins(
        server, pg_dsn):
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    token = server.token(tenant.org_id)
    t0 = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=10)
    sent = []

    def send(*readings):
        body = []
        for unit, raw_tag in readings:
            r = {"machine_identifier": "CNC-001", "metric_name": "temperature",
                 "timestamp": iso(t0 + dt.timedelta(seconds=len(sent))), "value": float(len(sent))}
            if unit is not None:
                r["unit"] = unit
            if raw_tag is not None:
                r["raw_tag"] = raw_tag
            sent.append(r)
            body.append(r)
        r = post(server, tenant.key, {"readings": body})
        assert r.status_code == 207 and r.json()["accepted_count"] == len(body), r.text

    # The suite's server has two workers: a change made through one reaches
    # the other's cache within HALTLESS_AUTH_CACHE_SECONDS (0.5 s here).
    settle = lambda: __import__("time").sleep(0.7)  # noqa: E731
    send((None, None))
    settle()
    send(("celsius", None), (None, None))
    settle()
    send((None, "ns2_i1001"), (None, None))
    settle()
    send(("fahrenheit", None), ("kelvin", None), (None, None))  # one batch: its last wins
    settle()
    send(("celsius", None))  # back to a value an earlier key agreed with
    settle()
    send((None, None), (None, None))

    rows = fetch(pg_dsn, "SELECT s.id, s.unit, s.raw_tag FROM series s JOIN machines m"
                 " ON m.id = s.machine_id WHERE m.org_id = $1", tenant.org_id)
    assert [(r["unit"], r["raw_tag"]) for r in rows] == [("celsius", "ns2_i1001")]
    sid = rows[0]["id"]
    assert attribute_changes(pg_dsn, sid) == [
        ("", "celsius", "", ""), ("celsius", "celsius", "", "ns2_i1001"),
        ("celsius", "kelvin", "ns2_i1001", "ns2_i1001"),
        ("kelvin", "celsius", "ns2_i1001", "ns2_i1001")]

    frm, to = iso(t0 - dt.timedelta(seconds=1)), iso(t0 + dt.timedelta(minutes=1))
    body = get(server, token, "/api/v1/readings", machine_identifier="CNC-001",
               metric_name="temperature", **{"from": frm, "to": to}).json()
    [s] = body["series"]
    assert (s["unit"], s["raw_tag"]) == ("celsius", "ns2_i1001")
    assert s["values"] == [r["value"] for r in sent]
    [latest] = get(server, token, "/api/v1/readings/latest").json()["series"]
    assert (latest["metric_name"], latest["unit"], latest["value"]) == (
        "temperature", "celsius", sent[-1]["value"])
    [agg] = get(server, token, "/api/v1/readings/aggregate", machine_identifier="CNC-001",
                interval="1h", agg="count", **{"from": frm, "to": to}).json()["series"]
    assert sum(agg["count"]) == len(sent)

    text = get(server, token, "/api/v1/readings", machine_identifier="CNC-001", format="csv",
               **{"from": frm, "to": to}).text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["machine_identifier", "metric_name", "unit", "timestamp", "value", "raw_tag"]
    assert [(r[0], r[1], r[2], r[5]) for r in rows[1:]] == [
        ("CNC-001", "temperature", "celsius", "ns2_i1001")] * len(sent)
    assert [float(r[4]) for r in rows[1:]] == [r["value"] for r in sent]


def test_readings_of_a_known_series_that_change_nothing_write_no_change(server, pg_dsn):
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    now = dt.datetime.now(UTC).replace(microsecond=0)
    for i in range(4):
        r = post(server, tenant.key, {"readings": [
            {"machine_identifier": "CNC-001", "metric_name": "vib", "unit": "mm/s",
             "timestamp": iso(now - dt.timedelta(seconds=10 - i)), "value": 1.0},
            {"machine_identifier": "CNC-001", "metric_name": "vib",
             "timestamp": iso(now - dt.timedelta(seconds=5 - i)), "value": 2.0}]})
        assert r.json()["accepted_count"] == 2, r.text
    [sid] = [r[0] for r in fetch(pg_dsn, "SELECT s.id FROM series s JOIN machines m"
                                 " ON m.id = s.machine_id WHERE m.org_id = $1", tenant.org_id)]
    assert attribute_changes(pg_dsn, sid) == []
    assert fetchval(pg_dsn, "SELECT unit FROM series WHERE id = $1", sid) == "mm/s"


# ------------------------------------------------------------------ the migration

def _dsn_of(base_dsn: str, name: str) -> str:
    base, _, query = base_dsn.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (("?" + query) if query else "")


@pytest.fixture
def old_database(pg_dsn):
    """A new database on the suite's server with every migration but 0020: the
    old series key, and the block layout today's compaction writes (block
    parts, 0022), so that blocks can be made the old way; migrate() then
    applies 0020 last, as it applies any migration that landed out of order."""
    name = f"haltless_old_{uuid.uuid4().hex[:8]}"
    dsn = _dsn_of(pg_dsn, name)

    async def create():
        c = await asyncpg.connect(pg_dsn)
        try:
            await c.execute(f'CREATE DATABASE "{name}"')
        finally:
            await c.close()
        c = await asyncpg.connect(dsn)
        try:
            await c.execute("CREATE TABLE haltless_schema (version integer PRIMARY KEY,"
                            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            for version, mname, sql in db._migrations():
                if version == 20:
                    continue
                async with c.transaction():
                    await c.execute(sql)
                    await c.execute("INSERT INTO haltless_schema (version, name) VALUES ($1, $2)",
                                    version, mname)
            await c.execute(db.ENSURE_PARTITIONS)
        finally:
            await c.close()
    run(create())
    yield dsn

    async def drop():
        c = await asyncpg.connect(pg_dsn)
        try:
            await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await c.close()
    run(drop())


async def _hot_rows(conn, slot: int, sid: int, stamps: list[dt.datetime], values: list[float]):
    """Hot rows as a writer makes them: one per hour, sorted by time."""
    by_hour: dict[dt.datetime, list] = {}
    for t, v in sorted(zip(stamps, values)):
        by_hour.setdefault(t.replace(minute=0, second=0, microsecond=0), []).append((t, v))
    for bucket, rows in by_hour.items():
        await conn.execute(
            "INSERT INTO reading_chunks (slot, series_id, bucket, n, ts, vals)"
            " VALUES ($1, $2, $3, $4, haltless_chunk_stamps($5::timestamptz[]), $6::float8[])",
            slot, sid, bucket, len(rows), [t for t, _ in rows], [v for _, v in rows])


async def _compact_everything(dsn):
    conn = await asyncpg.connect(dsn)
    try:
        for slot in (0, 1):
            await Compactor(conn).compact_slot(slot)
    finally:
        await conn.close()


def _readings(dsn, org_id) -> dict[tuple, list]:
    """{(machine, metric): sorted [(time, value bits)]} of the organization."""
    out: dict[tuple, list] = {}
    for r in fetch(dsn, 'SELECT machine_identifier, metric_name, "timestamp", value FROM readings'
                   " WHERE org_id = $1", org_id):
        out.setdefault((r[0], r[1]), []).append((r[2], bits(r[3])))
    return {k: sorted(v) for k, v in out.items()}


def _sums(dsn, org_id) -> dict[tuple, tuple]:
    return {(r[0], r[1]): (r[2], r[3]) for r in fetch(
        dsn, "SELECT machine_identifier, metric_name, count(*), sum(value) FROM readings"
        " WHERE org_id = $1 GROUP BY 1, 2", org_id)}


def test_the_migration_merges_series_made_the_old_way_keeping_every_reading_once(
        old_database, tmp_path_factory):
    dsn = old_database
    tenant = make_tenant(dsn, machines=("CNC-001", "CNC-002"))
    m1, m2 = tenant.machines["CNC-001"], tenant.machines["CNC-002"]
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - 3 * HOUR

    async def build():
        conn = await asyncpg.connect(dsn)
        try:
            ids = {}
            for key, machine, metric, unit, raw_tag in (
                    ("plain", m1, "temp", "", ""), ("celsius", m1, "temp", "celsius", ""),
                    ("tagged", m1, "temp", "degC", "ns2_i1"), ("vib", m1, "vib", "", ""),
                    ("other", m2, "temp", "F", "")):
                ids[key] = await conn.fetchval(
                    "INSERT INTO series (machine_id, metric_name, unit, raw_tag)"
                    " VALUES ($1, $2, $3, $4) RETURNING id", machine, metric, unit, raw_tag)

            def ticks(offset_s: float, n: int, start=hour, step=3.0):
                return [start + dt.timedelta(seconds=offset_s + i * step) for i in range(n)]
            # The first hour: the three temp series interleaved, one second
            # apart; decimal and binary values; then compacted into blocks.
            await _hot_rows(conn, 0, ids["plain"], ticks(0, 1200), [round(20 + i % 37 / 10, 1)
                                                                   for i in range(1200)])
            await _hot_rows(conn, 0, ids["celsius"], ticks(1, 1200), [0.1 * i for i in range(1200)])
            await _hot_rows(conn, 0, ids["tagged"], ticks(2, 600), [i / 3 for i in range(600)])
            await _hot_rows(conn, 0, ids["vib"], ticks(0.5, 1200), [1.5] * 1200)
            await _hot_rows(conn, 0, ids["other"], ticks(0, 100), [7.0] * 100)
            for slot in (0, 1):
                await Compactor(conn).compact_slot(slot)
            # Late readings for that hour (hot beside the blocks), the next
            # hour hot only, and the tagged series newest of all.
            await _hot_rows(conn, 1, ids["plain"], ticks(1800.25, 50), [5.5] * 50)
            await _hot_rows(conn, 1, ids["celsius"], ticks(1800.75, 50, step=7), [-2.25] * 50)
            await _hot_rows(conn, 0, ids["celsius"], ticks(0, 30, start=hour + HOUR), [1.0] * 30)
            await _hot_rows(conn, 1, ids["tagged"], ticks(0.5, 40, start=hour + 2 * HOUR),
                            [3.0] * 40)
            return ids
        finally:
            await conn.close()
    ids = run(build())
    assert fetchval(dsn, "SELECT count(*) FROM reading_blocks") == 5
    before = _readings(dsn, tenant.org_id)
    sums = _sums(dsn, tenant.org_id)
    assert sum(len(v) for v in before.values()) == 1200 * 3 + 600 + 100 + 50 + 50 + 30 + 40

    assert migrate(dsn) == db.LATEST_VERSION

    series = fetch(dsn, "SELECT s.id, m.machine_identifier, s.metric_name, s.unit, s.raw_tag"
                   " FROM series s JOIN machines m ON m.id = s.machine_id WHERE m.org_id = $1"
                   " ORDER BY s.id", tenant.org_id)
    assert [tuple(r) for r in series] == [
        (ids["plain"], "CNC-001", "temp", "degC", "ns2_i1"),  # the oldest id, the newest attributes
        (ids["vib"], "CNC-001", "vib", "", ""), (ids["other"], "CNC-002", "temp", "F", "")]
    assert attribute_changes(dsn, ids["plain"]) == [("", "degC", "", "ns2_i1")]
    assert fetchval(dsn, "SELECT count(*) FROM reading_blocks WHERE series_id = ANY($1::int[])",
                    [ids["celsius"], ids["tagged"]]) == 0
    assert fetchval(dsn, "SELECT count(*) FROM reading_chunks WHERE series_id = ANY($1::int[])",
                    [ids["celsius"], ids["tagged"]]) == 0
    # No timeline is left that no block uses.
    assert fetchval(dsn, "SELECT count(*) FROM reading_timelines t WHERE NOT EXISTS (SELECT 1"
                    " FROM reading_blocks b WHERE b.block_start = t.block_start"
                    " AND b.timeline = t.id)") == 0
    org = SimpleNamespace(org_id=tenant.org_id)
    for stage in ("merged", "merged and compacted"):
        if stage == "merged and compacted":
            run(_compact_everything(dsn))
            assert fetchval(dsn, "SELECT count(*) FROM reading_chunks") == 0
            assert fetchval(dsn, "SELECT count(*) FROM reading_blocks WHERE series_id = $1"
                            " AND m_count IS NULL", ids["plain"]) == 0
        assert _readings(dsn, tenant.org_id) == before, stage
        after = _sums(dsn, tenant.org_id)
        assert after.keys() == sums.keys()
        for key, (n, total) in sums.items():
            assert after[key][0] == n and after[key][1] == pytest.approx(total, rel=1e-12), stage
        assert check_rollups(dsn, org, stage) > 0
    # A second run finds nothing to merge; the unique key now refuses a duplicate.
    assert fetchval(dsn, "SELECT haltless_merge_series_duplicates()") == 0
    with pytest.raises(asyncpg.UniqueViolationError):
        fetchval(dsn, "INSERT INTO series (machine_id, metric_name, unit) VALUES ($1, 'vib', 'g')",
                 m1)

    gen = serving(dsn, tmp_path_factory, "series-identity-server")
    srv = next(gen)
    try:
        token = srv.token(tenant.org_id)
        frm, to = iso(hour - HOUR), iso(hour + 4 * HOUR)
        body = get(srv, token, "/api/v1/readings", machine_identifier="CNC-001",
                   metric_name="temp", limit=100_000, **{"from": frm, "to": to}).json()
        [s] = body["series"]
        assert (s["unit"], s["raw_tag"]) == ("degC", "ns2_i1")
        assert len(s["values"]) == len(before[("CNC-001", "temp")])
        [agg] = get(srv, token, "/api/v1/readings/aggregate", machine_identifier="CNC-001",
                    metric_name="temp", interval="1h", agg="count,sum",
                    **{"from": frm, "to": to}).json()["series"]
        assert sum(agg["count"]) == sums[("CNC-001", "temp")][0]
        assert sum(agg["sum"]) == pytest.approx(sums[("CNC-001", "temp")][1], rel=1e-12)
        # Ingest keys by (machine, metric) now: the old duplicates' attributes land on one series.
        r = post(srv, tenant.key, {"readings": [
            {"machine_identifier": "CNC-001", "metric_name": "temp", "unit": "celsius",
             "timestamp": iso(dt.datetime.now(UTC)), "value": 1.0}]})
        assert r.json()["accepted_count"] == 1, r.text
        assert fetchval(dsn, "SELECT count(*) FROM series WHERE machine_id = $1"
                        " AND metric_name = 'temp'", m1) == 1
    finally:
        next(gen, None)
