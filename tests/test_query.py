"""The query API against the real server: raw readings (JSON pages and CSV),
aggregates and latest values, each from hot chunks and from compacted blocks
with late hot data beside them, bit for bit; and every bad input a 4xx
naming the parameter."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import struct

import pytest
import requests

from helpers import fetch, fetchval, make_tenant, post, run
from test_storage import compact

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
HARD = [-0.0, 0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 72.5, 0.1,
        1e-300, 123.456789012345, -3.5]


def bits(v: float) -> bytes:
    return struct.pack(">d", v)


def us(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(microseconds=1)


def iso(u: int) -> str:
    return (EPOCH + dt.timedelta(microseconds=u)).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


class Data:
    """What was sent: {(metric, unit, raw_tag): sorted [(µs, value)]}."""

    def __init__(self, tenant, token, start_us):
        self.tenant, self.token, self.start_us = tenant, token, start_us
        self.series: dict[tuple, list] = {}

    def add(self, key, t_us, v):
        self.series.setdefault(key, []).append((t_us, v))

    def sorted(self, key, t0=None, t1=None):
        rows = sorted(self.series[key], key=lambda r: (r[0], bits(r[1])))
        return [r for r in rows if (t0 is None or r[0] >= t0) and (t1 is None or r[0] < t1)]


def ingest(server, tenant, data: Data, readings: list) -> None:
    body = []
    for machine, metric, unit, tag, t_us, v in readings:
        r = {"machine_identifier": machine, "metric_name": metric, "timestamp": iso(t_us),
             "value": v}
        if unit:
            r["unit"] = unit
        if tag:
            r["raw_tag"] = tag
        body.append(r)
        if machine == "CNC-001":
            data.add((metric, unit, tag), t_us, v)
    for i in range(0, len(body), 1000):
        r = post(server, tenant.key, {"readings": body[i:i + 1000]})
        assert r.status_code == 207 and r.json()["rejected_count"] == 0, r.text


def where(pg_dsn, org_id) -> tuple[int, int]:
    """(readings in hot chunks, readings in blocks) of the organization."""
    q = ("SELECT coalesce(sum(x.n), 0) FROM {} x JOIN series s ON s.id = x.series_id"
         " JOIN machines m ON m.id = s.machine_id WHERE m.org_id = $1")
    return (fetchval(pg_dsn, q.format("reading_chunks"), org_id),
            fetchval(pg_dsn, q.format("reading_blocks"), org_id))


@pytest.fixture(scope="module", params=["hot", "compacted+late"])
def stored(request, server, pg_dsn):
    """CNC-001: `temp` every 10 s over 2.5 hours (three hour buckets, a tie of
    three readings at one timestamp), `vib` with hard floats; CNC-002 other
    data. "hot": nothing compacted; "compacted+late": compacted, then late
    readings sent into the same hours stay hot beside the blocks."""
    tenant = make_tenant(pg_dsn, machines=("CNC-001", "CNC-002"))
    data = Data(tenant, server.token(tenant.org_id), 0)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    start = us(now - dt.timedelta(hours=2, minutes=40))
    data.start_us = start
    rs = []
    for i in range(900):
        t = start + i * 10_000_000 + (i * 7919) % 1000
        rs.append(("CNC-001", "temp", "celsius", "t1", t, round(20 + 0.1 * (i % 37), 1)))
        rs.append(("CNC-001", "vib", None, None, t, HARD[i % len(HARD)]))
        rs.append(("CNC-002", "temp", "celsius", "t1", t, 1.0))
    tie = start + 100 * 10_000_000 + 5
    rs += [("CNC-001", "temp", "celsius", "t1", tie, v) for v in (9.5, -1.0, 3.25)]
    ingest(server, tenant, data, rs)
    if request.param == "hot":
        hot, blocks = where(pg_dsn, tenant.org_id)
        assert hot == len(rs) and blocks == 0
    else:
        compact(pg_dsn)
        late = [("CNC-001", m, u, g, start + i * 10_000_000 + 3_000_000, 0.5 + i)
                for i in range(0, 900, 45) for m, u, g in (("temp", "celsius", "t1"),
                                                           ("vib", None, None))]
        ingest(server, tenant, data, late)
        hot, blocks = where(pg_dsn, tenant.org_id)
        assert hot == len(late) and blocks == len(rs)
    return data


def get(server, path, token, params=None, **kw):
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(server.url + path, params=params, headers=headers, timeout=30, **kw)


def check_same(got_ts, got_vals, want):
    assert got_ts == [iso(t) for t, _ in want]
    assert [bits(v) for v in got_vals] == [bits(v) for _, v in want]


# ------------------------------------------------------------------ raw readings

def test_readings_are_every_reading_of_the_range_in_time_order_bit_for_bit(server, stored):
    t0 = stored.start_us + 30 * 10_000_000  # exactly on a reading: included
    t1 = stored.start_us + 800 * 10_000_000 + (800 * 7919) % 1000  # exactly on one: left out
    r = get(server, "/api/v1/readings", stored.token,
            {"machine_identifier": "CNC-001", "from": iso(t0), "to": iso(t1)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["next_cursor"] is None
    got = {(s["metric_name"], s["unit"], s["raw_tag"]): s for s in body["series"]}
    assert set(got) == {("temp", "celsius", "t1"), ("vib", None, None)}
    for key, s in got.items():
        assert s["machine_identifier"] == "CNC-001"
        check_same(s["timestamps"], s["values"], stored.sorted(key, t0, t1))
    assert any(math.copysign(1, v) < 0 and v == 0 for v in got[("vib", None, None)]["values"])
    assert '"values":[' in r.text and "-0.0" in r.text


def test_from_and_to_take_rfc_3339_with_a_lowercase_t_and_z(server, stored):
    """The API document says date-time (RFC 3339), which allows them."""
    t0, t1 = iso(stored.start_us), iso(stored.start_us + 600_000_000)
    params = {"machine_identifier": "CNC-001", "metric_name": "temp"}
    upper = get(server, "/api/v1/readings", stored.token, {**params, "from": t0, "to": t1})
    lower = get(server, "/api/v1/readings", stored.token,
                {**params, "from": t0.lower(), "to": t1.replace("T", "t")})
    assert upper.status_code == lower.status_code == 200, lower.text
    assert lower.json() == upper.json() and lower.json()["series"][0]["values"]


def test_metric_name_repeats_and_selects_series(server, stored):
    r = get(server, "/api/v1/readings", stored.token,
            [("machine_identifier", "CNC-001"), ("metric_name", "vib"),
             ("from", iso(stored.start_us)), ("to", iso(stored.start_us + 60_000_000))])
    assert [s["metric_name"] for s in r.json()["series"]] == ["vib"]
    r = get(server, "/api/v1/readings", stored.token,
            [("machine_identifier", "CNC-001"), ("metric_name", "vib"), ("metric_name", "temp"),
             ("from", iso(stored.start_us)), ("to", iso(stored.start_us + 60_000_000))])
    assert [s["metric_name"] for s in r.json()["series"]] == ["temp", "vib"]


def test_pages_of_a_cursor_hold_each_reading_once_in_time_order(server, stored):
    t0, t1 = stored.start_us, stored.start_us + 3 * 3600 * 1_000_000
    seen: dict[str, list] = {"temp": [], "vib": []}
    cursor, pages = None, 0
    while True:
        params = {"machine_identifier": "CNC-001", "from": iso(t0), "to": iso(t1), "limit": 97}
        if cursor:
            params["cursor"] = cursor
        body = get(server, "/api/v1/readings", stored.token, params).json()
        n = sum(len(s["timestamps"]) for s in body["series"])
        for s in body["series"]:
            seen[s["metric_name"]] += list(zip(s["timestamps"], s["values"]))
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            assert n <= 97
            break
        assert n == 97  # a full page, cut across series in time order
    for name, key in (("temp", ("temp", "celsius", "t1")), ("vib", ("vib", None, None))):
        want = stored.sorted(key, t0, t1)
        assert [t for t, _ in seen[name]] == [iso(t) for t, _ in want]
        assert [bits(v) for _, v in seen[name]] == [bits(v) for _, v in want]
    total = sum(len(stored.sorted(k, t0, t1)) for k in stored.series)
    assert pages == -(-total // 97)  # no empty last page


def test_csv_streams_every_reading_in_time_order(server, stored):
    t0, t1 = stored.start_us, stored.start_us + 3 * 3600 * 1_000_000
    r = get(server, "/api/v1/readings", stored.token,
            {"machine_identifier": "CNC-001", "from": iso(t0), "to": iso(t1)},
            headers={"Accept": "text/csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert "content-length" not in r.headers  # streamed in chunks
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["machine_identifier", "metric_name", "unit", "timestamp", "value", "raw_tag"]
    want = sorted(
        [("CNC-001", k[0], k[1] or "", iso(t), v, k[2] or "") for k in stored.series
         for t, v in stored.sorted(k, t0, t1)], key=lambda x: x[3])
    got = [(a, b, c, d, float(e), f) for a, b, c, d, e, f in rows[1:]]
    assert [g[3] for g in got] == sorted(g[3] for g in got)
    assert sorted(got, key=lambda x: (x[3], x[1], bits(x[4]))) == sorted(
        want, key=lambda x: (x[3], x[1], bits(x[4])))
    assert all(bits(g[4]) == bits(float(e)) for g, (*_, e, _) in zip(got, rows[1:]))
    same = get(server, "/api/v1/readings", stored.token,
               {"machine_identifier": "CNC-001", "from": iso(t0), "to": iso(t1),
                "format": "csv"})
    assert same.text == r.text


# ------------------------------------------------------------------ aggregates

def expected_buckets(rows, step):
    out: dict[int, list] = {}
    for t, v in rows:
        out.setdefault(t // step * step, []).append(v)
    return out


@pytest.mark.parametrize("interval,step", [("1m", 60_000_000), ("7m", 420_000_000),
                                           ("1h", 3_600_000_000), ("1d", 86_400_000_000)])
def test_aggregates_per_bucket_aligned_to_the_epoch(server, stored, interval, step):
    t0 = stored.start_us + 12_345_678
    t1 = stored.start_us + 2 * 3600 * 1_000_000
    r = get(server, "/api/v1/readings/aggregate", stored.token,
            {"machine_identifier": "CNC-001", "metric_name": "temp", "from": iso(t0),
             "to": iso(t1), "interval": interval, "agg": "avg,min,max,count,first,last,sum"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["interval_seconds"] == step // 1_000_000
    [s] = body["series"]
    want = expected_buckets(stored.sorted(("temp", "celsius", "t1"), t0, t1), step)
    assert s["buckets"] == [iso(b) for b in sorted(want)]
    assert s["count"] == [len(want[b]) for b in sorted(want)]
    assert s["min"] == [min(want[b]) for b in sorted(want)]
    assert s["max"] == [max(want[b]) for b in sorted(want)]
    assert s["first"] == [want[b][0] for b in sorted(want)]
    assert s["last"] == [want[b][-1] for b in sorted(want)]
    assert s["avg"] == pytest.approx([sum(want[b]) / len(want[b]) for b in sorted(want)])
    assert s["sum"] == pytest.approx([sum(want[b]) for b in sorted(want)])


def test_a_fleet_aggregate_is_every_machine_in_one_request(server, stored):
    """Without machine_identifier: one entry per machine and series of the
    organization (only the named metrics, when any), each the same as the
    machine's own answer."""
    t0, t1 = stored.start_us, stored.start_us + 2 * 3600 * 1_000_000
    params = {"from": iso(t0), "to": iso(t1), "interval": "5m", "agg": "avg,count,last"}
    fleet = get(server, "/api/v1/readings/aggregate", stored.token,
                {**params, "metric_name": "temp"}).json()
    assert [(s["machine_identifier"], s["metric_name"]) for s in fleet["series"]] == [
        ("CNC-001", "temp"), ("CNC-002", "temp")]
    for s in fleet["series"]:
        [own] = get(server, "/api/v1/readings/aggregate", stored.token,
                    {**params, "metric_name": "temp",
                     "machine_identifier": s["machine_identifier"]}).json()["series"]
        assert s == own
    everything = get(server, "/api/v1/readings/aggregate", stored.token, params).json()
    assert sorted((s["machine_identifier"], s["metric_name"]) for s in everything["series"]) == [
        ("CNC-001", "temp"), ("CNC-001", "vib"), ("CNC-002", "temp")]


def test_aggregates_leave_out_empty_buckets_and_unasked_aggregates(server, stored):
    r = get(server, "/api/v1/readings/aggregate", stored.token,
            {"machine_identifier": "CNC-001", "metric_name": "vib", "interval": "1s",
             "from": iso(stored.start_us), "to": iso(stored.start_us + 600_000_000),
             "agg": "count"})
    [s] = r.json()["series"]
    assert set(s) == {"machine_identifier", "metric_name", "unit", "raw_tag", "buckets", "count"}
    want = expected_buckets(stored.sorted(("vib", None, None), stored.start_us,
                                          stored.start_us + 600_000_000), 1_000_000)
    assert len(s["buckets"]) == len(want) and len(want) < 600  # 1 s buckets, a reading per 10 s


def test_the_mean_of_readings_near_the_float_limit_is_not_lost_to_an_overflowing_sum(server, pg_dsn):
    """Two readings of 1.7976931348623157e308 in a minute have that mean;
    their sum overflows float64 (JSON null, as the document says), and the
    mean used to be null with it. Hot and compacted alike."""
    from fractions import Fraction
    big = 1.7976931348623157e308
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    data = Data(tenant, server.token(tenant.org_id), 0)
    minute = us(dt.datetime.now(UTC).replace(second=0, microsecond=0)) - 10 * 60_000_000
    values = [big, big, big, -big / 3, 0.5, 5e-324]  # one bucket; then an ordinary one
    ingest(server, tenant, data,
           [("CNC-001", "huge", None, None, minute + i * 1_000_000, v) for i, v in enumerate(values)]
           + [("CNC-001", "huge", None, None, minute + 60_000_000 + i, float(i)) for i in range(3)])
    params = {"machine_identifier": "CNC-001", "from": iso(minute), "to": iso(minute + 120_000_000),
              "interval": "1m", "agg": "avg,sum,min,max,count"}
    for stage in ("hot", "compacted"):
        if stage == "compacted":
            compact(pg_dsn)
            assert where(pg_dsn, tenant.org_id) == (0, len(values) + 3)
        r = get(server, "/api/v1/readings/aggregate", data.token, params)
        assert r.status_code == 200, r.text
        [s] = r.json()["series"]
        assert s["count"] == [6, 3] and s["max"] == [big, 2.0]
        assert s["sum"] == [None, 3.0]
        exact = float(sum(map(Fraction, values)) / len(values))
        assert s["avg"][0] == pytest.approx(exact, rel=1e-15) and s["avg"][1] == 1.0
        assert abs(s["avg"][0]) <= big
        errors = [e.message for e in answer_schema(server, "/api/v1/readings/aggregate")
                  .iter_errors(r.json())]
        assert errors == []


# ------------------------------------------------------------------ latest

def test_latest_is_the_newest_reading_of_every_series(server, stored):
    r = get(server, "/api/v1/readings/latest", stored.token)
    assert r.status_code == 200, r.text
    got = {(s["machine_identifier"], s["metric_name"]): s for s in r.json()["series"]}
    assert set(got) == {("CNC-001", "temp"), ("CNC-001", "vib"), ("CNC-002", "temp")}
    for key in stored.series:
        t, v = stored.sorted(key)[-1]
        s = got[("CNC-001", key[0])]
        assert (s["timestamp"], bits(s["value"])) == (iso(t), bits(v))
        assert (s["unit"], s["raw_tag"]) == (key[1], key[2])
    one = get(server, "/api/v1/readings/latest", stored.token,
              {"machine_identifier": "CNC-002"}).json()["series"]
    assert [(s["machine_identifier"], s["metric_name"], s["value"]) for s in one] == [
        ("CNC-002", "temp", 1.0)]


# ------------------------------------------------------------------ the API document

def answer_schema(server, path, media="application/json", status="200"):
    from openapi_schema_validator import OAS31Validator
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    schema = doc["paths"][path]["get"]["responses"][status]["content"][media]["schema"]
    return OAS31Validator({**schema, "components": doc["components"]},
                          format_checker=OAS31Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("path,params", [
    ("/api/v1/readings", {"limit": 50}),
    ("/api/v1/readings/aggregate", {"interval": "7m", "agg": "avg,min,max,count,sum,first,last"}),
    ("/api/v1/readings/latest", {}),
])
def test_read_answers_match_their_schema_in_the_api_document(server, stored, path, params):
    if path != "/api/v1/readings/latest":
        params = {**params, "machine_identifier": "CNC-001", "from": iso(stored.start_us),
                  "to": iso(stored.start_us + 3 * 3600 * 10**6)}
    r = get(server, path, stored.token, params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["series"] and all(s.get("timestamps") or s.get("buckets") or s.get("timestamp")
                                  for s in body["series"])
    errors = [e.message for e in answer_schema(server, path).iter_errors(body)]
    assert errors == []
    bad = get(server, path, stored.token, {"machine_identifier": "NOPE"})
    assert bad.status_code in (404, 422)
    errors = [e.message for e in answer_schema(server, path, status=str(bad.status_code))
              .iter_errors(bad.json())]
    assert errors == []


# ------------------------------------------------------------------ auth and scope

ROUTES = ["/api/v1/readings", "/api/v1/readings/aggregate", "/api/v1/readings/latest"]


@pytest.mark.parametrize("path", ROUTES)
def test_read_routes_take_the_management_token_only(server, stored, path):
    r = requests.get(server.url + path, headers={"X-API-Key": stored.tenant.key}, timeout=10)
    assert r.status_code == 401 and "Authorization" in r.json()["detail"]
    r = get(server, path, stored.tenant.key)
    assert r.status_code == 401
    assert r.json()["detail"] == "an API key is not a management token; use `haltless token create`"
    r = get(server, path, stored.token + "x")
    assert r.status_code == 401 and r.json()["detail"] == "invalid token"


def test_another_organization_sees_none_of_it(server, pg_dsn, stored):
    other = make_tenant(pg_dsn, machines=("CNC-001",))
    token = server.token(other.org_id)
    r = get(server, "/api/v1/readings", token,
            {"machine_identifier": "CNC-002", "from": iso(stored.start_us),
             "to": iso(stored.start_us + 10**9)})
    assert r.status_code == 404
    r = get(server, "/api/v1/readings", token,
            {"machine_identifier": "CNC-001", "from": iso(stored.start_us),
             "to": iso(stored.start_us + 10**10)})
    assert r.status_code == 200 and r.json()["series"] == []
    assert get(server, "/api/v1/readings/latest", token).json() == {"series": []}


# ------------------------------------------------------------------ bad input

BAD = [
    ("/api/v1/readings", {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}, 422,
     "machine_identifier: required"),
    ("/api/v1/readings", {"machine_identifier": "NOPE", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z"}, 404, "machine_identifier: no machine"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "metric_name": "nope",
                          "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}, 404,
     "metric_name: machine 'CNC-001' has no metric 'nope'; it has: temp, vib"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "to": "2026-01-02T00:00:00Z"}, 422,
     "from: required"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z"}, 422,
     "to: required"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "yesterday",
                          "to": "2026-01-02T00:00:00Z"}, 422, "from: 'yesterday' is not an ISO"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-02T00:00:00Z",
                          "to": "2026-01-01T00:00:00Z"}, 422, "to: must be after from"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-02T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z"}, 422, "to: must be after from"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "limit": "0"}, 422,
     "limit: 0 is outside 1 to 100,000"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "limit": "100001"}, 422, "limit: 100001"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "limit": "ten"}, 422,
     "limit: 'ten' is not a whole number"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "limit": "1_000"}, 422,
     "limit: '1_000' is not a whole number"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "limit": " +5"}, 422,
     "limit: ' +5' is not a whole number"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "cursor": "AAAA"}, 422,
     "cursor: not a cursor of this query"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "cursor": "!!%%"}, 422, "cursor:"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "format": "xml"}, 422,
     "format: 'xml' is not json or csv"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z", "format": "csv", "limit": "5"}, 422,
     "limit: CSV streams every reading"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "metric": "temp",
                          "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}, 422,
     "metric: unknown query parameter"),
    ("/api/v1/readings", [("machine_identifier", "CNC-001"), ("machine_identifier", "CNC-002"),
                          ("from", "2026-01-01T00:00:00Z"), ("to", "2026-01-02T00:00:00Z")], 422,
     "machine_identifier: given 2 times"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "0001-01-01T00:00:00+01:00",
                          "to": "2026-01-02T00:00:00Z"}, 422,
     "from: '0001-01-01T00:00:00+01:00' is outside the years 1900 to 8999"),
    ("/api/v1/readings", {"machine_identifier": "CNC-001", "from": "2026-01-01T00:00:00Z",
                          "to": "9999-12-31T23:59:59-01:00"}, 422, "to: '9999-12-31T23:59:59-01:00'"),
    ("/api/v1/readings", {"machine_identifier": "CNC\x00-001", "from": "2026-01-01T00:00:00Z",
                          "to": "2026-01-02T00:00:00Z"}, 422,
     "machine_identifier: contains a NUL character"),
    ("/api/v1/readings/aggregate", {"machine_identifier": "CNC-001",
                                    "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-01-02T00:00:00Z"}, 422, "interval: required"),
    ("/api/v1/readings/aggregate", {"machine_identifier": "CNC-001", "interval": "5x",
                                    "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-01-02T00:00:00Z"}, 422,
     "interval: '5x' is not a number"),
    ("/api/v1/readings/aggregate", {"machine_identifier": "CNC-001", "interval": "0s",
                                    "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-01-02T00:00:00Z"}, 422, "interval: '0s'"),
    ("/api/v1/readings/aggregate", {"machine_identifier": "CNC-001", "interval": "32d",
                                    "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-03-02T00:00:00Z"}, 422,
     "interval: 32d is outside 1s to 31d"),
    ("/api/v1/readings/aggregate", {"machine_identifier": "CNC-001", "interval": "1s",
                                    "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-02-01T00:00:00Z"}, 422,
     "interval: 2,678,400 buckets over this range; at most 100,000"),
    ("/api/v1/readings/aggregate", {"machine_identifier": "CNC-001", "interval": "1m",
                                    "agg": "avg,median", "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-01-02T00:00:00Z"}, 422,
     "agg: 'median' is not one of avg, min, max, count, sum, first, last"),
    ("/api/v1/readings/aggregate", {"machine_identifier": "NOPE", "interval": "1m",
                                    "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-01-02T00:00:00Z"}, 404,
     "machine_identifier: no machine 'NOPE'"),
    ("/api/v1/readings/aggregate", {"machine_identifier": "CNC-001", "interval": "1m",
                                    "from": "2026-01-01T00:00:00Z"}, 422, "to: required"),
    ("/api/v1/readings/aggregate", {"metric_name": "nope", "interval": "1m",
                                    "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-01-02T00:00:00Z"}, 404,
     "metric_name: no machine in your organization has metric 'nope'"),
    ("/api/v1/readings/aggregate", {"interval": "1s", "from": "2026-01-01T00:00:00Z",
                                    "to": "2026-01-02T00:00:00Z"}, 422,
     "interval: 3 series x 86,400 buckets is more than 200,000 per answer"),
    ("/api/v1/readings/latest", {"machine_identifier": "NOPE"}, 404,
     "machine_identifier: no machine 'NOPE' in your organization"),
    ("/api/v1/readings/latest", {"machine": "CNC-001"}, 422, "machine: unknown query parameter"),
]


@pytest.mark.parametrize("path,params,status,detail", BAD,
                         ids=[f"{p.rsplit('/', 1)[1]}-{d.split(':')[0]}-{i}"
                              for i, (p, _, _, d) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_parameter(server, stored, path, params, status, detail):
    r = get(server, path, stored.token, params)
    assert r.status_code == status, r.text
    assert r.json()["detail"].startswith(detail), r.json()["detail"]


def test_a_cursor_of_another_query_is_refused(server, stored):
    base = {"machine_identifier": "CNC-001", "from": iso(stored.start_us),
            "to": iso(stored.start_us + 3600 * 10**6), "limit": 5}
    cursor = get(server, "/api/v1/readings", stored.token, base).json()["next_cursor"]
    assert cursor
    other = {**base, "to": iso(stored.start_us + 3601 * 10**6), "cursor": cursor}
    r = get(server, "/api/v1/readings", stored.token, other)
    assert r.status_code == 422 and r.json()["detail"].startswith("cursor: not a cursor")
    tampered = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
    r = get(server, "/api/v1/readings", stored.token, {**base, "cursor": tampered})
    assert r.status_code == 422
    assert json.loads(r.text)["detail"].startswith("cursor:")


def test_a_bucket_cut_by_the_end_of_a_span_is_joined(pg_dsn, stored):
    """Long ranges are read in spans of whole hours; a 7-minute bucket across
    an hour's end is summed from both spans."""
    import asyncpg
    from array import array
    from haltless.fast import aggregate
    from haltless.server import query, readback

    key = ("temp", "celsius", "t1")
    t0, t1 = stored.start_us, stored.start_us + 3 * 3600 * 10**6
    step = 420_000_000

    async def go():
        conn = await asyncpg.connect(pg_dsn)
        try:
            sid = await conn.fetchval(
                "SELECT s.id FROM series s JOIN machines m ON m.id = s.machine_id"
                " WHERE m.org_id = $1 AND m.machine_identifier = 'CNC-001'"
                " AND s.metric_name = 'temp'", stored.tenant.org_id)
            per, spans = None, 0
            async for got in readback.scan(conn, [sid], t0, t1, budget=1):  # an hour each
                per = query._merge_buckets(per, aggregate(*got[sid], step))
                spans += 1
            return per, spans
        finally:
            await conn.close()
    per, spans = run(go())
    assert spans >= 3
    want = stored.sorted(key, t0, t1)
    whole = aggregate(array("q", [t for t, _ in want]), array("d", [v for _, v in want]), step)
    exact = (0, 1, 3, 4, 5, 6)  # starts, count, min, max, first, last; sums differ in rounding
    assert [per[i].tobytes() for i in exact] == [whole[i].tobytes() for i in exact]
    assert list(per[2]) == pytest.approx(list(whole[2]))


def test_latest_decodes_blocks_written_before_migration_0006(server, pg_dsn):
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    data = Data(tenant, server.token(tenant.org_id), 0)
    start = us(dt.datetime.now(UTC).replace(microsecond=0)) - 600_000_000
    ingest(server, tenant, data, [("CNC-001", "vib", None, None, start + i * 1_000_000,
                                   HARD[i % len(HARD)] + i) for i in range(50)])
    compact(pg_dsn)
    fetch(pg_dsn, "UPDATE reading_blocks b SET v_last = NULL FROM series s, machines m"
          " WHERE s.id = b.series_id AND m.id = s.machine_id AND m.org_id = $1", tenant.org_id)
    assert where(pg_dsn, tenant.org_id) == (0, 50)
    [s] = get(server, "/api/v1/readings/latest", data.token).json()["series"]
    t, v = data.sorted(("vib", None, None))[-1]
    assert (s["timestamp"], bits(s["value"])) == (iso(t), bits(v))


def test_pages_over_series_that_do_not_overlap_in_time(server, pg_dsn):
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    data = Data(tenant, server.token(tenant.org_id), 0)
    start = us(dt.datetime.now(UTC).replace(microsecond=0)) - 3 * 3600 * 10**6
    ingest(server, tenant, data,
           [("CNC-001", "early", None, None, start + i * 10**6, float(i)) for i in range(40)]
           + [("CNC-001", "late", None, None, start + 2 * 3600 * 10**6 + i * 10**6, -float(i))
              for i in range(40)]
           + [("CNC-001", "late", None, None, start + 5 * 10**6, 0.5)])  # one early reading
    params = {"machine_identifier": "CNC-001", "from": iso(start), "to": iso(start + 3 * 3600 * 10**6),
              "limit": 7}
    seen = {"early": [], "late": []}
    while True:
        body = get(server, "/api/v1/readings", data.token, params).json()
        for s in body["series"]:
            seen[s["metric_name"]] += s["values"]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert seen["early"] == [v for _, v in data.sorted(("early", None, None))]
    assert seen["late"] == [v for _, v in data.sorted(("late", None, None))]


def test_a_cursor_stays_small_at_6000_series_sharing_their_timestamps(server, pg_dsn):
    # One cursor entry per series was 112 KB at 6,000 series (page 2: 414).
    # The series here share every timestamp, so pages end among readings at
    # one T, series by series: the hardest case for resuming.
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    data = Data(tenant, server.token(tenant.org_id), 0)
    start = us(dt.datetime.now(UTC).replace(microsecond=0)) - 3600 * 10**6
    ingest(server, tenant, data, [("CNC-001", f"m{j:04d}", None, None, start + i * 10**6,
                                   float(i * 10_000 + j)) for i in range(3) for j in range(6000)])
    params = {"machine_identifier": "CNC-001", "from": iso(start),
              "to": iso(start + 3600 * 10**6), "limit": 2500}
    seen, sizes = [], []
    while True:
        r = get(server, "/api/v1/readings", data.token, params)
        assert r.status_code == 200, r.text[:200]
        body = r.json()
        for s in body["series"]:
            seen += s["values"]
        if body["next_cursor"] is None:
            break
        sizes.append(len(body["next_cursor"]))
        params["cursor"] = body["next_cursor"]
    assert len(sizes) == 7 and max(sizes) < 120
    assert sorted(seen) == [float(i * 10_000 + j) for i in range(3) for j in range(6000)]


def test_latest_probes_the_index_of_the_newest_hot_row(pg_dsn):
    # 3,600 one-reading rows per series (a poller's hour): the newest is found
    # by a backward probe of (series_id, bucket, haltless_chunk_last(ts)), not
    # by reading the series' rows and sorting them.
    from haltless.server.query import LATEST
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    sid = fetchval(pg_dsn, "INSERT INTO series (machine_id, metric_name) VALUES ($1, 'p')"
                   " RETURNING id", tenant.machines["CNC-001"])
    fetch(pg_dsn, "INSERT INTO reading_chunks (slot, series_id, bucket, n, ts, vals)"
          " SELECT 0, $1, date_trunc('hour', now()), 1,"
          "  haltless_chunk_stamps(ARRAY[date_trunc('hour', now()) + i * interval '1 s']),"
          "  ARRAY[i]::float8[] FROM generate_series(0, 3599) i", sid)
    fetch(pg_dsn, "ANALYZE reading_chunks")
    plan = "\n".join(r[0] for r in fetch(pg_dsn, "EXPLAIN " + LATEST, tenant.org_id, "CNC-001"))
    hot = plan[plan.index("Merge Append"):plan.index("reading_blocks")]
    assert "Index Scan Backward using reading_chunks_0_series_id_bucket_haltless_chunk_last" in hot, plan
    assert "Sort  " not in hot and "Seq Scan" not in hot, plan
    row = fetch(pg_dsn, LATEST, tenant.org_id, "CNC-001")[0]
    assert row["hot_v"] == 3599.0
    assert row["hot_t"] == fetchval(pg_dsn, "SELECT (extract(epoch FROM date_trunc('hour', now())"
                                    " + interval '3599 s') * 1000000)::int8")
    fetch(pg_dsn, "DELETE FROM reading_chunks WHERE series_id = $1", sid)


def test_answers_carry_the_servers_own_time_in_server_timing(server, stored):
    # bench/query.py reads it: the targets are about server time.
    import re
    r = get(server, "/api/v1/readings/latest", stored.token)
    assert r.status_code == 200
    m = re.fullmatch(r"app;dur=(\d+\.\d\d)", r.headers["server-timing"])
    assert m and 0 < float(m.group(1)) < 10_000, r.headers["server-timing"]
    assert re.fullmatch(r"app;dur=\d+\.\d\d", requests.get(server.url + "/healthz").headers[
        "server-timing"])
