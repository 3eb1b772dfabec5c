"""The rollups readings_1m and readings_1h (migration 0013): equal to an
aggregate over the raw readings at every moment, hot, compacted, with late
data waiting to be merged and after the merge, and for blocks stored before
summaries existed; row-level security as for readings; the summaries'
kernel against its twin."""
from __future__ import annotations

import datetime as dt
import math
import random
from array import array

import pytest

from conftest import twins
from helpers import fetch, fetchval, haltless, make_tenant, post
from test_sql_access import as_role, env
from test_storage import compact

blocks_py, blocks_c, BLOCKS = twins("_blocks")
UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)

RAW = """
SELECT m.machine_identifier, s.metric_name, date_bin('1 {unit}', r."timestamp", timestamptz 'epoch') AS "time",
       count(*)::integer AS count, min(r.value) AS min, max(r.value) AS max, sum(r.value) AS sum,
       (array_agg(r.value ORDER BY r."timestamp"))[1] AS first,
       (array_agg(r.value ORDER BY r."timestamp" DESC))[1] AS last
FROM readings r JOIN series s ON s.id = r.series_id JOIN machines m ON m.id = s.machine_id
WHERE m.org_id = $1
GROUP BY 1, 2, 3"""
ROLLUP = """
SELECT machine_identifier, metric_name, "time", count, min, max, sum, first, last, avg
FROM {view} WHERE org_id = $1"""


def iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def send(server, tenant, rs):
    for i in range(0, len(rs), 1000):
        r = post(server, tenant.key, {"readings": rs[i:i + 1000]})
        assert r.status_code in (200, 207) and r.json()["accepted_count"] == len(rs[i:i + 1000]), \
            r.text


def readings(start: dt.datetime, seconds: int, rnd: random.Random, machine="CNC-001",
             step: float = 1.0) -> list[dict]:
    """A decimal gauge, a noisy float and a counter, with jitter; some minutes empty."""
    out = []
    for i in range(seconds):
        if (i // 60) % 7 == 5:  # a minute with nothing in it
            continue
        t = iso(start + dt.timedelta(seconds=i * step, microseconds=rnd.randint(0, 900_000)))
        out += [{"machine_identifier": machine, "timestamp": t, "metric_name": "temp",
                 "value": round(70 + rnd.randint(-30, 30) / 10, 1), "unit": "celsius"},
                {"machine_identifier": machine, "timestamp": t, "metric_name": "vibration",
                 "value": abs(rnd.gauss(0, 1)) * 0.01},
                {"machine_identifier": machine, "timestamp": t, "metric_name": "count",
                 "value": float(1000 + i)}]
    return out


def check(dsn, tenant, stage: str) -> int:
    """readings_1m and readings_1h against the aggregate of the raw readings."""
    total = 0
    for view, unit in (("readings_1m", "minute"), ("readings_1h", "hour")):
        want = {(r[0], r[1], r[2]): r for r in fetch(dsn, RAW.format(unit=unit), tenant.org_id)}
        rows = fetch(dsn, ROLLUP.format(view=view), tenant.org_id)
        got = {(r[0], r[1], r[2]): r for r in rows}
        assert len(got) == len(rows), (stage, view, "one row per series and bucket")
        assert got.keys() == want.keys(), (stage, view, sorted(got.keys() ^ want.keys())[:5])
        for key, w in want.items():
            g = got[key]
            assert (g["count"], g["min"], g["max"], g["first"], g["last"]) == \
                (w["count"], w["min"], w["max"], w["first"], w["last"]), (stage, view, key)
            assert math.isclose(g["sum"], w["sum"], rel_tol=1e-12, abs_tol=1e-12), (stage, key)
            assert math.isclose(g["avg"], w["sum"] / w["count"], rel_tol=1e-12, abs_tol=1e-12)
        total += len(got)
    return total


def test_rollups_equal_the_raw_aggregates_hot_compacted_late_and_merged(server, pg_dsn):
    t = make_tenant(pg_dsn, machines=("CNC-001", "CNC-002"))
    rnd = random.Random(7)
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - 3 * HOUR
    send(server, t, readings(hour, 3600, rnd) + readings(hour + HOUR, 1800, rnd, "CNC-002"))
    now = dt.datetime.now(UTC).replace(microsecond=0)
    send(server, t, readings(now - dt.timedelta(minutes=4), 200, rnd))
    assert check(pg_dsn, t, "hot") > 0
    compact(pg_dsn)
    assert fetchval(pg_dsn, "SELECT count(*) FROM reading_blocks b JOIN series s ON"
                    " s.id = b.series_id JOIN machines m ON m.id = s.machine_id WHERE"
                    " m.org_id = $1 AND b.m_count IS NULL", t.org_id) == 0
    check(pg_dsn, t, "compacted")
    # Late data into a compacted hour: new minutes, and readings before and
    # after the first and last of existing ones (first/last change), and a
    # new minimum.
    late = readings(hour + dt.timedelta(minutes=5), 120, rnd, step=0.5)
    late.append({"machine_identifier": "CNC-001", "timestamp": iso(hour), "metric_name": "temp",
                 "value": -40.5, "unit": "celsius"})
    send(server, t, late)
    check(pg_dsn, t, "late, not merged")
    compact(pg_dsn)
    check(pg_dsn, t, "merged")
    # Blocks stored before migration 0013 have no summaries: aggregated on read.
    fetchval(pg_dsn, "UPDATE reading_blocks SET m_count = NULL, m_k = NULL, m_f = NULL"
             " WHERE series_id IN (SELECT s.id FROM series s JOIN machines m ON"
             " m.id = s.machine_id WHERE m.org_id = $1 AND s.metric_name = 'temp')", t.org_id)
    check(pg_dsn, t, "no summaries")


def rollup_rows(dsn, tenant) -> list:
    return [sorted(map(tuple, fetch(dsn, ROLLUP.format(view=view), tenant.org_id)))
            for view in ("readings_1m", "readings_1h")]


def test_late_readings_outside_a_blocks_span_combine_with_its_summary_undecoded(server, pg_dsn):
    """Hot readings of a compacted hour that all lie before the block's first
    reading or after its last are combined with its summary (migration
    0024); the block is not decoded: with its values made garbage the
    rollups answer the same. One late reading inside the span sends the
    hour through its readings again, still exact."""
    t = make_tenant(pg_dsn, machines=("CNC-001",))
    rnd = random.Random(11)
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - 3 * HOUR
    send(server, t, readings(hour + dt.timedelta(minutes=20), 1200, rnd))  # minutes 20-39
    compact(pg_dsn)
    check(pg_dsn, t, "compacted")
    spans = fetch(pg_dsn, "SELECT s.metric_name, b.t_first, b.t_last FROM reading_blocks b"
                  " JOIN series s ON s.id = b.series_id JOIN machines m ON m.id = s.machine_id"
                  " WHERE m.org_id = $1", t.org_id)
    late = readings(hour + dt.timedelta(minutes=2), 120, rnd) \
        + readings(hour + dt.timedelta(minutes=45), 300, rnd)
    for metric, first, last in spans:  # in the minutes of the block's first and last readings
        late += [{"machine_identifier": "CNC-001", "timestamp": iso(first - dt.timedelta(seconds=0.2)),
                  "metric_name": metric, "value": -1.5},
                 {"machine_identifier": "CNC-001", "timestamp": iso(last + dt.timedelta(seconds=0.2)),
                  "metric_name": metric, "value": 999.5}]
    for r in late:
        if r["metric_name"] == "temp":
            r["unit"] = "celsius"
    send(server, t, late)
    check(pg_dsn, t, "late before and after the span")
    before = rollup_rows(pg_dsn, t)
    org_blocks = ("FROM series s JOIN machines m ON m.id = s.machine_id"
                  " WHERE s.id = reading_blocks.series_id AND m.org_id = $1")
    kept = fetch(pg_dsn, f"SELECT series_id, block_start, part, vals FROM reading_blocks"
                 f" WHERE EXISTS (SELECT 1 {org_blocks})", t.org_id)
    fetchval(pg_dsn, f"UPDATE reading_blocks SET vals = '\\x00'::bytea"
             f" WHERE EXISTS (SELECT 1 {org_blocks})", t.org_id)
    try:
        assert rollup_rows(pg_dsn, t) == before
    finally:
        for k in kept:
            fetchval(pg_dsn, "UPDATE reading_blocks SET vals = $4 WHERE series_id = $1"
                     " AND block_start = $2 AND part = $3", *k)
    inside = {"machine_identifier": "CNC-001", "metric_name": "temp", "unit": "celsius",
              "timestamp": iso(hour + dt.timedelta(minutes=30, seconds=0.5)), "value": -40.5}
    send(server, t, [inside])
    check(pg_dsn, t, "a late reading inside the span")
    compact(pg_dsn)
    check(pg_dsn, t, "merged")


def test_a_decimal_block_stores_exact_mantissas_and_a_float_block_its_values(server, pg_dsn):
    t = make_tenant(pg_dsn)
    rnd = random.Random(8)
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - 2 * HOUR
    send(server, t, readings(hour, 3600, rnd))
    compact(pg_dsn)
    rows = {r["metric_name"]: r for r in fetch(
        pg_dsn, "SELECT s.metric_name, b.m_scale, b.m_minute, b.m_count, b.m_k, b.m_f, b.v_sum"
        " FROM reading_blocks b JOIN series s ON s.id = b.series_id JOIN machines m"
        " ON m.id = s.machine_id WHERE m.org_id = $1", t.org_id)}
    temp, vib, count = rows["temp"], rows["vibration"], rows["count"]
    assert temp["m_scale"] == 1 and temp["m_f"] is None and count["m_scale"] == 0
    assert vib["m_scale"] is None and vib["m_k"] is None
    # minutes 5, 12, 19, ... are empty: m_minute lists the others
    assert temp["m_minute"] == [m for m in range(60) if m % 7 != 5]
    assert sum(temp["m_count"]) == 3600 - 60 * len([m for m in range(60) if m % 7 == 5])
    assert len(temp["m_k"]) == len(temp["m_minute"]) and len(temp["m_k"][0]) == 5
    # the exact sum: the mantissas' sum over 10
    assert temp["v_sum"] == sum(r[0] for r in temp["m_k"]) / 10


def test_a_reader_role_sees_only_its_organization_in_the_rollups(server, pg_dsn):
    a, b = make_tenant(pg_dsn), make_tenant(pg_dsn)
    rnd = random.Random(9)
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - 2 * HOUR
    for tenant in (a, b):
        send(server, tenant, readings(hour, 600, rnd))
    compact(pg_dsn)
    send(server, b, readings(dt.datetime.now(UTC) - dt.timedelta(minutes=2), 60, rnd))
    url = haltless("grafana-role", "--org", a.name, env=env(pg_dsn)).stdout.strip()
    for view in ("readings_1m", "readings_1h"):
        orgs = {r[0] for r in as_role(url, f"SELECT DISTINCT org_id FROM {view}")}
        assert orgs == {a.org_id}, view
        assert as_role(url, f"SELECT sum(count) FROM {view}")[0][0] == \
            fetchval(pg_dsn, "SELECT count(*) FROM readings WHERE org_id = $1", a.org_id)


# ------------------------------------------------------------------ kernel

@pytest.fixture(params=BLOCKS)
def blocks(request):
    return request.param


def test_summarize_gives_exact_mantissas_or_values_per_interval(blocks):
    ts = array("q", [0, 10, 59_999_999, 60_000_000, 180_000_001])
    d, starts, count, fields = blocks.summarize(ts, array("d", [1.5, 2.25, -0.5, 7.0, 1.0]))
    assert d == 2 and starts.tolist() == [0, 60_000_000, 180_000_000]
    assert count.tolist() == [3, 1, 1] and fields.typecode == "q"
    assert fields.tolist() == [325, -50, 225, 150, -50, 700, 700, 700, 700, 700,
                               100, 100, 100, 100, 100]
    d, _, _, fields = blocks.summarize(ts, array("d", [0.1 * 3, 1.0, 2.0, 3.0, -0.0]))
    assert d == -1 and fields.typecode == "d" and fields[0] == 0.1 * 3 + 1.0 + 2.0
    assert math.copysign(1.0, fields[12]) < 0  # a lone -0.0 sums to -0.0
    assert blocks.summarize(array("q"), array("d")) == (-1, array("q"), array("q"), array("d"))
    # sums of mantissas that would leave int64: float sums instead
    big = array("d", [2.0 ** 52] * 3000)
    assert blocks.summarize(array("q", range(3000)), big)[0] == -1
    with pytest.raises(ValueError, match="not sorted at index 1"):
        blocks.summarize(array("q", [5, 4]), array("d", [1.0, 2.0]))
    with pytest.raises(ValueError, match="2 timestamps but 1 values"):
        blocks.summarize(array("q", [4, 5]), array("d", [1.0]))
    with pytest.raises(ValueError, match="at least 1"):
        blocks.summarize(ts, array("d", [1.0] * 5), 0)
    with pytest.raises(TypeError):
        blocks.summarize([1], array("d", [1.0]))


@pytest.mark.skipif(blocks_c is None, reason="extension not built")
def test_summarize_twins_agree_bit_for_bit_on_random_blocks():
    rnd = random.Random(3)
    for _ in range(400):
        n = rnd.choice([0, 1, 2, 5, 100, 3600])
        start = rnd.randint(-10 ** 12, 10 ** 12)
        ts = array("q", sorted(start + rnd.randint(0, 3600 * 10 ** 6) for _ in range(n)))
        kind = rnd.randrange(4)
        vals = array("d", [[round(rnd.uniform(-100, 100), 1), rnd.gauss(0, 1),
                            float(rnd.randint(-2 ** 52, 2 ** 52)),
                            rnd.choice([0.0, -0.0, 1.5, -2.25])][kind] for _ in range(n)])
        interval = rnd.choice([1, 60_000_000, 7_000_001])
        a, b = blocks_c.summarize(ts, vals, interval), blocks_py.summarize(ts, vals, interval)
        assert a[:3] == b[:3] and a[3].typecode == b[3].typecode
        assert a[3].tobytes() == b[3].tobytes()


@pytest.mark.parametrize("interval", ["1m", "5m", "7m", "1h", "1d"])
def test_the_query_api_aggregates_from_summaries_as_from_readings(server, pg_dsn, interval):
    """/readings/aggregate at whole minutes takes compacted hours from their
    summaries and the rest (cut hours at the range's ends, an hour with late
    readings not yet merged, the hot hour) from readings: the same buckets,
    counts, minima, maxima, firsts and lasts as the readings give, sums and
    means to rounding."""
    from haltless.server import rollups
    from helpers import run
    from test_query import get

    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    rnd = random.Random(interval)
    top = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = top - 4 * HOUR
    rs = readings(start, 4 * 3600, rnd, step=1.0)[::4]  # a reading every ~4 s per metric
    send(server, tenant, rs)
    compact(pg_dsn)
    late = [dict(r, timestamp=iso(dt.datetime.fromisoformat(r["timestamp"])
                                  + dt.timedelta(microseconds=7)), value=r["value"] + 1)
            for r in rs if r["timestamp"] >= iso(start + 2 * HOUR)
            and r["timestamp"] < iso(start + 2 * HOUR + dt.timedelta(minutes=3))]
    hot = readings(top, 120, rnd)
    send(server, tenant, late + hot)
    sent = rs + late + hot
    t0 = start + dt.timedelta(minutes=17, seconds=13)
    t1 = top + dt.timedelta(minutes=1, seconds=30)
    r = get(server, "/api/v1/readings/aggregate", server.token(tenant.org_id),
            {"machine_identifier": "CNC-001", "from": iso(t0), "to": iso(t1),
             "interval": interval, "agg": "avg,min,max,count,sum,first,last"})
    assert r.status_code == 200, r.text
    step = {"1m": 60, "5m": 300, "7m": 420, "1h": 3600, "1d": 86400}[interval] * 1_000_000
    def micros(t: dt.datetime) -> int:
        return (t - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1)

    lo, hi = micros(t0), micros(t1)
    for s in r.json()["series"]:
        want: dict[int, list] = {}
        for t, v in sorted((micros(dt.datetime.fromisoformat(x["timestamp"])), x["value"])
                           for x in sent if x["metric_name"] == s["metric_name"]):
            if lo <= t < hi:
                want.setdefault(t // step * step, []).append(v)
        keys = sorted(want)
        assert s["buckets"] == [
            (dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=b))
            .isoformat(timespec="microseconds").replace("+00:00", "Z") for b in keys]
        assert s["count"] == [len(want[b]) for b in keys], s["metric_name"]
        assert s["min"] == [min(want[b]) for b in keys]
        assert s["max"] == [max(want[b]) for b in keys]
        assert s["first"] == [want[b][0] for b in keys]
        assert s["last"] == [want[b][-1] for b in keys]
        assert s["sum"] == pytest.approx([sum(want[b]) for b in keys], rel=1e-12)
        assert s["avg"] == pytest.approx([sum(want[b]) / len(want[b]) for b in keys], rel=1e-12)

    # Which hours came from summaries: the whole compacted hours inside the
    # range, but the one with late readings waiting.
    async def covered():
        import asyncpg
        conn = await asyncpg.connect(pg_dsn)
        try:
            sids = [x[0] for x in await conn.fetch(
                "SELECT s.id FROM series s JOIN machines m ON m.id = s.machine_id"
                " WHERE m.org_id = $1", tenant.org_id)]
            return {(h - int(start.timestamp() * 1e6)) // 3_600_000_000
                    for _, h in await conn.fetch(rollups.HOURS, sids, start + HOUR, top)}
        finally:
            await conn.close()
    assert run(covered()) == {1, 3}
