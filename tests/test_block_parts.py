"""A series-hour with more readings than one block holds (#21: one ingest
key wrote over 16,777,216 into one hour, and compaction stopped for every
tenant): compaction cuts it into parts, every reading kept once, late data
re-cut, and every read (API pages, aggregates, latest, the readings view,
the rollups) unchanged; a read inside a huge hour decodes the parts that
overlap it, not the hour, and one that would decode too much at once is a
422 naming the limit.

The part size is a Compactor argument: the tests cut at 1,000 readings
what production cuts at compact.PART_READINGS (1,048,576), so that the
split is exercised on thousands of readings instead of millions."""
from __future__ import annotations

import datetime as dt
import struct

import asyncpg
import pytest
import requests

from haltless.fast import MAX_COUNT, group_chunks
from haltless.server import compact as compact_mod
from haltless.server import readback
from haltless.server.compaction import COMPACT_LOCK
from helpers import fetch, fetchval, make_tenant, post, run
from test_storage import compact

UTC = dt.timezone.utc
PART = 1000


def iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def bits(v: float) -> bytes:
    return struct.pack(">d", v)


async def _compact_in_parts(dsn: str, part: int) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", COMPACT_LOCK)
        c = compact_mod.Compactor(conn, part_readings=part)
        for slot in (0, 1):
            if await c.slot_has_rows(slot):
                await c.compact_slot(slot)
        await c.vacuum()
        return c.readings, c.blocks
    finally:
        await conn.close()


def send(server, tenant, hour: dt.datetime, seconds, metric: str, machine="CNC-001",
         offset_us: int = 0) -> int:
    rs = [{"machine_identifier": machine, "metric_name": metric,
           "timestamp": iso(hour + dt.timedelta(seconds=s, microseconds=offset_us)),
           "value": round(0.1 * (s % 997) - 20, 1)} for s in seconds]
    for i in range(0, len(rs), 1000):
        r = post(server, tenant.key, {"readings": rs[i:i + 1000]})
        assert r.status_code == 207 and r.json()["rejected_count"] == 0, r.text
    return len(rs)


def snapshot(dsn, org_id):
    rows = fetch(dsn, 'SELECT series_id, "timestamp", value FROM readings WHERE org_id = $1',
                 org_id)
    return sorted((r[0], r[1], bits(r[2])) for r in rows)


def rollups(dsn, org_id, view):
    """The rows of a rollup view; sums to 12 digits: a compacted hour's sum is
    the exact decimal one, a hot hour's a running float sum (README)."""
    rows = fetch(dsn, f'SELECT metric_name, "time", count, min, max, sum, first, last FROM {view}'
                 " WHERE org_id = $1 ORDER BY 1, 2", org_id)
    return [(*r[:5], float(f"{r[5]:.12g}"), *r[6:]) for r in rows]


def blocks(dsn, org_id):
    return fetch(dsn, "SELECT s.metric_name, b.block_start, b.part, b.n, b.t_first, b.t_last,"
                 " b.m_count IS NOT NULL AS summarised FROM reading_blocks b"
                 " JOIN series s ON s.id = b.series_id JOIN machines m ON m.id = s.machine_id"
                 " WHERE m.org_id = $1 ORDER BY 1, 2, 3", org_id)


def get(server, token, path, **params):
    return requests.get(server.url + path, params=params, timeout=30,
                        headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def big_hour(server, pg_dsn):
    """CNC-001 `fast`: one reading a second over a whole past hour (3,600, so
    four parts of at most 1,000), `slow` every minute (one block); compacted
    with parts of 1,000 after the state before compaction was recorded."""
    compact(pg_dsn)  # only this test's rows are hot when it compacts in parts
    tenant = make_tenant(pg_dsn)
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
    n = send(server, tenant, hour, range(3600), "fast")
    n += send(server, tenant, hour, range(0, 3600, 60), "slow", offset_us=500)
    before = {"readings": snapshot(pg_dsn, tenant.org_id),
              "1m": rollups(pg_dsn, tenant.org_id, "readings_1m"),
              "1h": rollups(pg_dsn, tenant.org_id, "readings_1h")}
    assert len(before["readings"]) == n
    moved, _ = run(_compact_in_parts(pg_dsn, PART))
    assert moved == n
    return tenant, hour, before


def test_an_hour_over_the_part_size_is_cut_into_parts_in_time_order(pg_dsn, big_hour):
    tenant, hour, before = big_hour
    got = blocks(pg_dsn, tenant.org_id)
    fast = [b for b in got if b["metric_name"] == "fast"]
    assert [(b["part"], b["n"]) for b in fast] == [(0, 1000), (1, 1000), (2, 1000), (3, 600)]
    assert all(b["block_start"] == hour for b in fast)
    for a, b in zip(fast, fast[1:]):  # parts follow each other in time
        assert a["t_last"] < b["t_first"]
    assert [b["summarised"] for b in fast] == [True, False, False, False]  # the hour's, on part 0
    slow = [(b["part"], b["n"], b["summarised"]) for b in got if b["metric_name"] == "slow"]
    assert slow == [(0, 60, True)]  # the other series of the same run: compacted as ever
    # Every reading once, bit for bit; the rollups the same as before compaction.
    assert snapshot(pg_dsn, tenant.org_id) == before["readings"]
    assert rollups(pg_dsn, tenant.org_id, "readings_1m") == before["1m"]
    assert rollups(pg_dsn, tenant.org_id, "readings_1h") == before["1h"]
    assert fetchval(pg_dsn, "SELECT sum(n) FROM reading_chunks c JOIN series s ON s.id ="
                    " c.series_id JOIN machines m ON m.id = s.machine_id WHERE m.org_id = $1",
                    tenant.org_id) is None


def test_the_api_reads_a_cut_hour_as_one(server, pg_dsn, big_hour):
    tenant, hour, before = big_hour
    token = server.token(tenant.org_id)
    t0, t1 = iso(hour), iso(hour + dt.timedelta(hours=1))
    sid = fetchval(pg_dsn, "SELECT id FROM series WHERE metric_name = 'fast' AND machine_id = $1",
                   tenant.machines["CNC-001"])
    want = [(b[1], b[2]) for b in before["readings"] if b[0] == sid]
    # Pages of 700 across part boundaries: every reading once, in order.
    got, cursor = [], None
    while True:
        params = {"machine_identifier": "CNC-001", "metric_name": "fast", "from": t0, "to": t1,
                  "limit": 700}
        if cursor:
            params["cursor"] = cursor
        r = get(server, token, "/api/v1/readings", **params)
        assert r.status_code == 200, r.text
        page = r.json()
        s = page["series"][0]
        got += list(zip(s["timestamps"], s["values"]))
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(got) == len(want) == 3600
    assert [bits(v) for _, v in got] == [v for _, v in want]
    assert [t for t, _ in got] == sorted(t for t, _ in got)
    # Aggregates over the hour (summaries of part 0) and over a cut inside it (readings).
    r = get(server, token, "/api/v1/readings/aggregate", machine_identifier="CNC-001",
            metric_name="fast", **{"from": t0, "to": t1}, interval="1h", agg="count")
    assert r.status_code == 200, r.text
    assert r.json()["series"][0]["count"] == [3600]
    inner0, inner1 = hour + dt.timedelta(minutes=10), hour + dt.timedelta(minutes=40, seconds=30)
    r = get(server, token, "/api/v1/readings/aggregate", machine_identifier="CNC-001",
            metric_name="fast", **{"from": iso(inner0), "to": iso(inner1)}, interval="1h",
            agg="count")
    assert r.json()["series"][0]["count"] == [1830]
    r = get(server, token, "/api/v1/readings/latest", machine_identifier="CNC-001")
    last = {x["metric_name"]: x for x in r.json()["series"]}
    assert last["fast"]["timestamp"].startswith(iso(hour + dt.timedelta(seconds=3599))[:19])
    assert last["fast"]["value"] == round(0.1 * (3599 % 997) - 20, 1)


def test_late_data_into_a_cut_hour_is_merged_and_cut_again(server, pg_dsn, big_hour):
    tenant, hour, before = big_hour
    # Between the readings already there, across parts 1 and 2.
    late = send(server, tenant, hour, range(1500, 2500), "fast", offset_us=250_000)
    want = snapshot(pg_dsn, tenant.org_id)
    assert len(want) == len(before["readings"]) + late
    want_1m = rollups(pg_dsn, tenant.org_id, "readings_1m")
    run(_compact_in_parts(pg_dsn, PART))
    fast = [(b["part"], b["n"]) for b in blocks(pg_dsn, tenant.org_id) if b["metric_name"] == "fast"]
    assert fast == [(0, 1000), (1, 1000), (2, 1000), (3, 1000), (4, 600)]
    assert snapshot(pg_dsn, tenant.org_id) == want
    assert rollups(pg_dsn, tenant.org_id, "readings_1m") == want_1m
    # The default part size joins the hour into one block again.
    compact(pg_dsn)  # nothing hot: nothing moves
    send(server, tenant, hour, [3599], "fast", offset_us=900_000)
    compact(pg_dsn)
    fast = [(b["part"], b["n"], b["summarised"]) for b in blocks(pg_dsn, tenant.org_id)
            if b["metric_name"] == "fast"]
    assert fast == [(0, 4601, True)]
    assert len(snapshot(pg_dsn, tenant.org_id)) == len(want) + 1


def test_a_read_inside_a_cut_hour_decodes_only_the_parts_it_overlaps(pg_dsn, big_hour):
    tenant, hour, _ = big_hour
    sid = fetchval(pg_dsn, "SELECT id FROM series WHERE metric_name = 'fast' AND machine_id = $1",
                   tenant.machines["CNC-001"])
    h = int(hour.timestamp()) * 1_000_000

    async def go():
        conn = await asyncpg.connect(pg_dsn)
        try:
            one_second = await readback.hour_counts(conn, [sid], h + 1_500_000_000,
                                                    h + 1_501_000_000)
            whole = await readback.hour_counts(conn, [sid], h, h + 3_600_000_000)
            # A scan with a small budget walks the hour in spans of about a
            # part, and gives every reading once, in order.
            got = []
            cuts = await readback.spans(conn, [sid], h, h + 3_600_000_000, 500)
            sizes = [await conn.fetchval(readback.LOAD_COUNT, *readback._args([sid], a, b))
                     for a, b in cuts]
            async for piece in readback.scan(conn, [sid], h, h + 3_600_000_000, budget=500):
                got.extend(piece[sid][0])
            return one_second, whole, cuts, sizes, got
        finally:
            await conn.close()
    one_second, whole, cuts, sizes, got = run(go())
    assert one_second == [(h, 1000)]  # part 1 alone
    assert whole == [(h, 3600)]
    # Cut where cutting helps: no span decodes more than the two parts around a cut.
    assert len(cuts) >= 2 and cuts[0][0] == h and cuts[-1][1] == h + 3_600_000_000
    assert max(sizes) <= 2 * PART
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert got == sorted(got) and len(got) == 3600 and len(set(got)) == 3600


def test_a_read_that_would_decode_too_much_at_once_is_refused_naming_the_limit(
        pg_dsn, big_hour, monkeypatch):
    tenant, hour, _ = big_hour
    sids = [r[0] for r in fetch(pg_dsn, "SELECT id FROM series WHERE machine_id = $1",
                                tenant.machines["CNC-001"])]
    h = int(hour.timestamp()) * 1_000_000
    monkeypatch.setattr(readback, "MAX_LOAD", 999)  # below one part: no span can be small enough

    async def go():
        conn = await asyncpg.connect(pg_dsn)
        try:
            async for _ in readback.scan(conn, sids, h, h + 3_600_000_000, budget=500):
                pass
        finally:
            await conn.close()
    with pytest.raises(readback.TooMuchAtOnce) as e:
        run(go())
    assert e.value.status == 422
    assert "more than 999 at once" in str(e.value) and "metric_name" in str(e.value)


def _copy_rows(n: int, rows: int = 2) -> bytes:
    """``rows`` rows of one (series, hour) of n readings each, in PostgreSQL's
    binary COPY format (as compaction COPYs hot rows out)."""
    ts = (1_767_225_600_000_000).to_bytes(8, "big") * n
    vals = struct.pack(">iiiii", 1, 0, 701, n, 1) + (b"\x00\x00\x00\x08" + bytes(8)) * n
    row = (struct.pack(">hi", 4, 4) + (1).to_bytes(4, "big")
           + struct.pack(">i", 8) + (820_454_400_000_000).to_bytes(8, "big")  # 2026-01-01, PG epoch
           + struct.pack(">i", len(ts)) + ts + struct.pack(">i", len(vals)) + vals)
    return b"PGCOPY\n\xff\r\n\x00" + bytes(8) + row * rows + struct.pack(">h", -1)


def test_group_chunks_joins_an_hour_beyond_one_blocks_limit():
    """The kernel that joins an hour's hot rows no longer stops at a block's
    limit (the error that stopped compaction): two rows, each just over half
    of MAX_COUNT readings, join into one group of more."""
    from haltless.fast import CODEC_COMPILED
    if not CODEC_COMPILED:
        pytest.skip("the codec kernels are not built (the twin's case is below)")
    n = MAX_COUNT // 2 + 1
    (sid, _, ts, vals), = group_chunks(_copy_rows(n))
    assert sid == 1 and len(ts) == len(vals) == 2 * n > MAX_COUNT


def test_the_twin_joins_an_hour_beyond_one_blocks_limit_and_holds_each_row_to_it(monkeypatch):
    """The same for the pure-Python twin, with the limit lowered to 1,000 (at
    16,777,216 it takes minutes): rows of 600 join into 1,200; a row of
    1,001 is refused."""
    from haltless.fast import _chunks_py, _shared_py
    monkeypatch.setattr(_shared_py, "MAX_COUNT", 1000)
    (sid, _, ts, vals), = _chunks_py.group_chunks(_copy_rows(600))
    assert sid == 1 and len(ts) == len(vals) == 1200
    with pytest.raises(ValueError, match="at most 1,000 readings"):
        _chunks_py.group_chunks(_copy_rows(1001, rows=1))
