"""The query API: stored readings back out, for the management token only
(``Authorization: Bearer <JWT>``; API keys are write-only), scoped to the
token's organization.

    GET /api/v1/readings            raw readings, paged by an opaque cursor; CSV streamed
    GET /api/v1/readings/aggregate  avg/min/max/count/sum/first/last per interval bucket
    GET /api/v1/readings/latest     the newest reading of every series

Timestamps are ISO 8601 in and out (``Z``), ranges half open [from, to).
Readings come from ``readback`` (kernel-decoded hot chunks and blocks);
bad input is a 422 or 404 naming the parameter.
"""
from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import datetime as _dt
import hashlib
import heapq
import hmac
import math
import re
import uuid
from array import array
from urllib.parse import parse_qs

import msgspec

from ..core.errors import NotFound, Overloaded, Unprocessable
from ..core.times import to_us
from ..core.wire import (AggregatePage, LatestPage, LatestReading, ReadCursor, ReadingsPage,
                         SeriesBuckets, SeriesReadings)
from ..fast import aggregate, iso_json, iso_timestamps, unpack_values
from . import readback, rollups
from .http import Request, Response, StreamingResponse

DEFAULT_LIMIT = 10_000
MAX_LIMIT = 100_000
MAX_BUCKETS = 100_000
MAX_CELLS = 200_000  # series x buckets of one aggregate answer (~25 MB of JSON at most)
MAX_FLEET_SERIES = 10_000
MIN_INTERVAL_US = 1_000_000
MAX_INTERVAL_US = 31 * 86_400_000_000
AGGREGATES = ("avg", "min", "max", "count", "sum", "first", "last")
DEFAULT_AGGREGATES = "avg,min,max,count"
UNITS_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
# raw_tag came last (README "Reading data"): the earlier columns keep their places.
CSV_HEADER = b"machine_identifier,metric_name,unit,timestamp,value,raw_tag\n"
CSV_ROWS_PER_CHUNK = 10_000
MEAN_SCALE = 2.0 ** -64  # see _scaled_means
CURSOR_VERSION = 2
FIRST_YEAR, LAST_YEAR = 1900, 9000
# The query parameters each route takes (any other is a 422); the API
# document (server/openapi.py) describes exactly these.
READINGS_PARAMS = ("machine_identifier", "metric_name", "from", "to", "limit", "cursor", "format")
AGGREGATE_PARAMS = ("machine_identifier", "metric_name", "from", "to", "interval", "agg")
LATEST_PARAMS = ("machine_identifier",)

_cursor_encoder = msgspec.msgpack.Encoder()
_cursor_decoder = msgspec.msgpack.Decoder(ReadCursor)


# ------------------------------------------------------------------ parameters

class Params:
    """The query string, strictly: a parameter this route does not take is an
    error (a typo like ``metric=`` must not silently mean "every metric")."""

    def __init__(self, req: Request, allowed: tuple[str, ...]) -> None:
        raw = req.scope.get("query_string", b"").decode("latin-1")
        try:
            self.values = parse_qs(raw, keep_blank_values=True, strict_parsing=False,
                                   encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            raise Unprocessable("query string: not valid UTF-8") from None
        unknown = sorted(set(self.values) - set(allowed))
        if unknown:
            raise Unprocessable(f"{unknown[0]}: unknown query parameter; this endpoint takes "
                                f"{', '.join(allowed)}")

    def one(self, name: str, required: bool = False) -> str | None:
        got = self.many(name)
        if not got:
            if required:
                raise Unprocessable(f"{name}: required")
            return None
        if len(got) > 1:
            raise Unprocessable(f"{name}: given {len(got)} times; give it once")
        return got[0]

    def many(self, name: str) -> list[str]:
        got = self.values.get(name, [])
        if any("\x00" in v for v in got):
            raise Unprocessable(f"{name}: contains a NUL character")
        return got

    def time(self, name: str) -> int:
        raw = self.one(name)
        if raw is None:
            raise Unprocessable(f"{name}: required; an ISO 8601 timestamp such as "
                                "2026-11-28T00:00:00Z")
        try:  # RFC 3339 (the API document's date-time) allows a lowercase t and z
            t = _dt.datetime.fromisoformat(raw.upper())
        except ValueError:
            raise Unprocessable(f"{name}: {raw!r} is not an ISO 8601 timestamp; "
                                "use e.g. 2026-11-28T00:00:00Z") from None
        if t.tzinfo is None:  # as on ingest: no offset means UTC
            t = t.replace(tzinfo=_dt.timezone.utc)
        if not FIRST_YEAR <= t.year < LAST_YEAR:  # bucket starts stay printable
            raise Unprocessable(f"{name}: {raw!r} is outside the years {FIRST_YEAR} to "
                                f"{LAST_YEAR - 1}")
        return to_us(t)

    def range(self) -> tuple[int, int]:
        t0, t1 = self.time("from"), self.time("to")
        if t1 <= t0:
            raise Unprocessable("to: must be after from (the range is [from, to))")
        return t0, t1


def _org(app, req: Request) -> uuid.UUID:
    return req.org  # the app checked the bearer token (route auth "jwt") before anything else


# What a series is described by in every answer (_describe).
SERIES_COLUMNS = ("SELECT s.id, m.machine_identifier, s.metric_name, NULLIF(s.unit, '') AS unit,"
                  " NULLIF(s.raw_tag, '') AS raw_tag")


async def _series(conn, org: uuid.UUID, machine: str, metrics: list[str]) -> list:
    """The series of one machine of the organization, in a stable order;
    404 naming the machine or the metric that is not there."""
    rows = await conn.fetch(
        SERIES_COLUMNS + " FROM machines m LEFT JOIN series s ON s.machine_id = m.id"
        " WHERE m.org_id = $1 AND m.machine_identifier = $2"
        ' ORDER BY s.metric_name COLLATE "C", s.id',
        org, machine)
    if not rows:
        raise NotFound(f"machine_identifier: no machine {machine!r} in your organization")
    rows = [r for r in rows if r["id"] is not None]
    if metrics:
        have = {r["metric_name"] for r in rows}
        for name in metrics:
            if name not in have:
                known = ", ".join(sorted(have)[:20]) or "none yet"
                raise NotFound(f"metric_name: machine {machine!r} has no metric {name!r}; "
                               f"it has: {known}")
        rows = [r for r in rows if r["metric_name"] in metrics]
    return rows


async def _fleet_series(conn, org: uuid.UUID, metrics: list[str]) -> list:
    """The series of every machine of the organization (only the named
    metrics, when any), in a stable order; 404 for a metric no machine has,
    422 beyond MAX_FLEET_SERIES."""
    rows = await conn.fetch(
        SERIES_COLUMNS + " FROM machines m JOIN series s ON s.machine_id = m.id"
        " WHERE m.org_id = $1 AND (cardinality($2::text[]) = 0 OR s.metric_name = ANY($2))"
        ' ORDER BY m.machine_identifier COLLATE "C", s.metric_name COLLATE "C", s.id LIMIT $3',
        org, metrics, MAX_FLEET_SERIES + 1)
    if len(rows) > MAX_FLEET_SERIES:
        raise Unprocessable(f"machine_identifier: more than {MAX_FLEET_SERIES:,} series match; "
                            "name a machine or fewer metrics")
    missing = set(metrics) - {r["metric_name"] for r in rows}
    if missing:
        raise NotFound(f"metric_name: no machine in your organization has metric "
                       f"{sorted(missing)[0]!r}")
    return rows


READ_WAIT = 10.0  # seconds a read waits for one of the worker's read slots


async def _take_read_slot(app) -> None:
    """One of the worker's read slots (runtime.read_slots), or 503: reads
    never take the connections ingest needs."""
    try:
        await asyncio.wait_for(app.rt.read_slots.acquire(), READ_WAIT)
    except TimeoutError:
        raise Overloaded(f"every read slot of this worker has been busy for {READ_WAIT:.0f} s "
                         "(long exports or aggregates); retry later") from None


@contextlib.asynccontextmanager
async def _read_slot(app):
    await _take_read_slot(app)
    try:
        yield
    finally:
        app.rt.read_slots.release()


def _snapshot(conn):
    """One snapshot for every statement of a read: blocks, their timelines
    and hot rows are separate statements, and a compaction that commits
    between two of them (moving late rows from hot rows into a block) would
    otherwise make readings vanish from, or appear twice in, the answer."""
    return conn.transaction(isolation="repeatable_read", readonly=True)


def _describe(r) -> dict:
    return {"machine_identifier": r["machine_identifier"], "metric_name": r["metric_name"],
            "unit": r["unit"], "raw_tag": r["raw_tag"]}


# ------------------------------------------------------------------ the cursor

def _cursor_key(app) -> bytes:
    return hmac.new(app.rt.jwt_secret.encode(), b"haltless read cursor", hashlib.sha256).digest()


def _query_id(org: uuid.UUID, sids: list[int], t0: int, t1: int) -> str:
    h = hashlib.blake2b(f"{org}|{sids}|{t0}|{t1}".encode(), digest_size=12)
    return h.hexdigest()


def _encode_cursor(app, query: str, position: tuple[int, int]) -> str:
    body = _cursor_encoder.encode(ReadCursor(CURSOR_VERSION, query, *position))
    mac = hmac.new(_cursor_key(app), body, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac + body).decode().rstrip("=")


def _decode_cursor(app, raw: str, query: str) -> tuple[int, int]:
    bad = Unprocessable("cursor: not a cursor of this query; pass next_cursor from the previous "
                        "page with the same machine_identifier, metric_name, from and to")
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except ValueError:
        raise bad from None
    mac, body = data[:16], data[16:]
    if not hmac.compare_digest(mac, hmac.new(_cursor_key(app), body, hashlib.sha256).digest()[:16]):
        raise bad
    try:
        cur = _cursor_decoder.decode(body)
    except msgspec.DecodeError:
        raise bad from None
    if cur.version != CURSOR_VERSION or cur.query != query or cur.given < 0:
        raise bad
    return cur.t, cur.given


def _at(ts: array, t: int) -> tuple[int, int]:
    """[first, end) indexes of the readings at time ``t``."""
    return bisect.bisect_left(ts, t), bisect.bisect_right(ts, t)


# ------------------------------------------------------------------ raw readings

async def _page(conn, sids: list[int], t0: int, t1: int, limit: int,
                position: tuple[int, int] | None):
    """The first ``limit`` readings after ``position`` in (time, series)
    order: ({sid: (ts, vals)}, the next page's position, more to come).

    A position (T, m) resumes every series at T, past the first m readings
    at T in ``sids`` order: a page ends at the smallest T with ``limit``
    readings at or before it, every reading before T given, and of those at
    T the first ones in series order."""
    if not sids:  # a machine that has sent nothing yet
        return {}, None, False
    start, skip = position if position is not None else (t0, 0)
    start = max(t0, start)
    acc: dict[int, list] = {s: [] for s in sids}
    total = 0
    more = False
    first = True
    async for got in readback.scan(conn, sids, start, t1, budget=max(limit, 100_000)):
        for sid in sids:
            if sid not in got:
                continue
            ts, vals = got[sid]
            i = 0
            if first and skip:  # the first span starts at T: skip what was given there
                i = min(skip, _at(ts, start)[1])
                skip -= i
            if i < len(ts):
                acc[sid].append((ts[i:] if i else ts, vals[i:] if i else vals))
                total += len(ts) - i
        first = False
        if total > limit:
            more = True
            break
    merged: dict[int, tuple[array, array]] = {}
    for sid, parts in acc.items():
        ts, vals = array("q"), array("d")
        for t, v in parts:
            ts.extend(t)
            vals.extend(v)
        merged[sid] = (ts, vals)
    if not more:
        return merged, None, False  # the last page: no cursor
    # The smallest T with `limit` readings at or before it; all before T
    # go out, and what is left of the limit from the readings at T, in
    # series order.
    lo = min(ts[0] for ts, _ in merged.values() if ts)
    hi = max(ts[-1] for ts, _ in merged.values() if ts)
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(bisect.bisect_right(ts, mid) for ts, _ in merged.values()) >= limit:
            hi = mid
        else:
            lo = mid + 1
    left = limit - sum(bisect.bisect_left(ts, lo) for ts, _ in merged.values())
    given = left
    for sid in sids:
        ts, vals = merged[sid]
        below, end = _at(ts, lo)
        at = min(left, end - below)
        left -= at
        merged[sid] = (ts[:below + at], vals[:below + at])
    # Resuming at the same T again: what earlier pages gave at T counts too.
    if position is not None and position[0] == lo:
        given += position[1]
    return merged, (lo, given), True


async def readings(app, req: Request) -> Response | StreamingResponse:
    """GET /api/v1/readings: every stored reading of a machine's series in [from, to)."""
    org = _org(app, req)
    p = Params(req, READINGS_PARAMS)
    machine = p.one("machine_identifier", required=True)
    t0, t1 = p.range()
    fmt = p.one("format")
    if fmt not in (None, "json", "csv"):
        raise Unprocessable(f"format: {fmt!r} is not json or csv")
    csv = fmt == "csv" or (fmt is None and b"text/csv" in req.headers.get(b"accept", b""))
    limit_raw = p.one("limit")
    if csv and (limit_raw is not None or p.one("cursor") is not None):
        raise Unprocessable("limit: CSV streams every reading of the range; leave out limit "
                            "and cursor (or narrow from/to)")
    limit = DEFAULT_LIMIT
    if limit_raw is not None:
        if not re.fullmatch(r"[0-9]{1,9}", limit_raw):  # int() would take " 1_000" and "+5"
            raise Unprocessable(f"limit: {limit_raw!r} is not a whole number")
        limit = int(limit_raw)
        if not 1 <= limit <= MAX_LIMIT:
            raise Unprocessable(f"limit: {limit} is outside 1 to {MAX_LIMIT:,}")
    async with app.rt.pool.acquire() as conn:
        rows = await _series(conn, org, machine, p.many("metric_name"))
    if csv:
        # The slot is taken before the 200 goes out (else a 503 could not be
        # sent) and given back when the stream is over, however it ends.
        await _take_read_slot(app)
        return StreamingResponse(200, _csv(app, rows, t0, t1), b"text/csv; charset=utf-8",
                                 [(b"content-disposition",
                                   b'attachment; filename="readings.csv"')],
                                 on_close=app.rt.read_slots.release)
    sids = [r["id"] for r in rows]
    query = _query_id(org, sids, t0, t1)
    cursor = p.one("cursor")
    position = _decode_cursor(app, cursor, query) if cursor is not None else None
    async with _read_slot(app), app.rt.pool.acquire() as conn, _snapshot(conn):
        got, position, more = await _page(conn, sids, t0, t1, limit, position)
    series = []
    for r in rows:
        ts, vals = got.get(r["id"], (array("q"), array("d")))
        series.append(SeriesReadings(**_describe(r), timestamps=msgspec.Raw(iso_json(ts)),
                                     values=vals.tolist()))
    nxt = _encode_cursor(app, query, position) if more else None
    return Response(200, ReadingsPage(series, nxt))


def _csv_field(s: str | None) -> str:
    if s is None:
        return ""
    if any(c in s for c in ',"\r\n'):
        return '"' + s.replace('"', '""') + '"'
    return s


async def _csv(app, rows: list, t0: int, t1: int):
    """CSV rows in time order, one batch of hours at a time."""
    yield CSV_HEADER
    prefix = {r["id"]: ",".join(_csv_field(r[k]) for k in
                                ("machine_identifier", "metric_name", "unit")) + ","
              for r in rows}
    suffix = {r["id"]: "," + _csv_field(r["raw_tag"]) + "\n" for r in rows}
    sids = [r["id"] for r in rows]
    async with app.rt.pool.acquire() as conn, _snapshot(conn):
        async for got in readback.scan(conn, sids, t0, t1, budget=200_000):
            streams = [zip(ts, iso_timestamps(ts), vals, [prefix[sid]] * len(ts),
                           [suffix[sid]] * len(ts))
                       for sid, (ts, vals) in got.items()]
            out: list[str] = []
            for _, stamp, v, pre, post in heapq.merge(*streams, key=lambda x: x[0]):
                out.append(f"{pre}{stamp},{v!r}{post}")
                if len(out) >= CSV_ROWS_PER_CHUNK:
                    yield "".join(out).encode()
                    out = []
            if out:
                yield "".join(out).encode()


# ------------------------------------------------------------------ aggregates

def _interval(raw: str | None) -> int:
    if raw is None:
        raise Unprocessable("interval: required, e.g. 1s, 1m, 15m, 1h, 1d (1s to 31d)")
    m = re.fullmatch(r"([1-9][0-9]{0,6})([smhd])", raw)
    if not m:
        raise Unprocessable(f"interval: {raw!r} is not a number with s, m, h or d "
                            "(e.g. 1s, 1m, 15m, 1h, 1d)")
    us = int(m.group(1)) * UNITS_US[m.group(2)]
    if not MIN_INTERVAL_US <= us <= MAX_INTERVAL_US:
        raise Unprocessable(f"interval: {raw} is outside 1s to 31d")
    return us


def _aggs(raw: list[str]) -> list[str]:
    names = [a.strip() for part in (raw or [DEFAULT_AGGREGATES]) for a in part.split(",")]
    for a in names:
        if a not in AGGREGATES:
            raise Unprocessable(f"agg: {a!r} is not one of {', '.join(AGGREGATES)}")
    return list(dict.fromkeys(names))


def _merge_buckets(have: list | None, new: tuple) -> list:
    """Join the buckets of consecutive spans: a bucket cut by a span's end
    (intervals that do not divide an hour) is combined with its other part."""
    new = list(new)
    if have is None:
        return new
    if len(have[0]) and len(new[0]) and have[0][-1] == new[0][0]:
        have[1][-1] += new[1][0]
        have[2][-1] += new[2][0]
        have[3][-1] = min(have[3][-1], new[3][0])
        have[4][-1] = max(have[4][-1], new[4][0])
        have[6][-1] = new[6][0]
        new = [a[1:] for a in new]
    for h, n in zip(have, new):
        h.extend(n)
    return have


async def _scaled_means(conn, sid: int, t0: int, t1: int, step: int) -> dict[int, float]:
    """{bucket start: mean} of a series whose bucket sums overflow float64
    (two readings of 1.8e308 have that mean, but their sum is inf, and so
    was s / c). Summed once more with every value times 2**-64, which is
    exact (a power of two) for all but values under 2**-958, too small to
    change such a sum, and keeps sums of up to 2**64 readings finite."""
    scaled = None
    async for got in readback.scan(conn, [sid], t0, t1):
        for ts, vals in got.values():
            scaled = _merge_buckets(scaled, aggregate(
                ts, array("d", [v * MEAN_SCALE for v in vals]), step))
    if scaled is None:  # deleted meanwhile
        return {}
    starts, count, total = scaled[:3]
    return {b: s / c / MEAN_SCALE for b, s, c in zip(starts, total, count)}


async def aggregates(app, req: Request) -> Response:
    """GET /api/v1/readings/aggregate: per series, one value per aggregate and
    bucket; of one machine, or without machine_identifier of the whole fleet."""
    org = _org(app, req)
    p = Params(req, AGGREGATE_PARAMS)
    machine = p.one("machine_identifier")
    t0, t1 = p.range()
    step = _interval(p.one("interval"))
    names = _aggs(p.many("agg"))
    buckets = (t1 - 1) // step - t0 // step + 1
    if buckets > MAX_BUCKETS:
        raise Unprocessable(f"interval: {buckets:,} buckets over this range; at most "
                            f"{MAX_BUCKETS:,}: choose a longer interval or a shorter range")
    async with _read_slot(app), app.rt.pool.acquire() as conn, _snapshot(conn):
        if machine is None:  # the fleet: every machine's series (of the named metrics)
            rows = await _fleet_series(conn, org, p.many("metric_name"))
        else:
            rows = await _series(conn, org, machine, p.many("metric_name"))
        if len(rows) * buckets > MAX_CELLS:
            raise Unprocessable(
                f"interval: {len(rows):,} series x {buckets:,} buckets is more than "
                f"{MAX_CELLS:,} per answer: choose a longer interval, a shorter range, "
                "or fewer series (machine_identifier, metric_name)")
        sids = [r["id"] for r in rows]
        per: dict[int, list] = {}
        if rollups.usable(step):  # whole minutes: compacted hours from their summaries
            per = await rollups.aggregates(conn, sids, t0, t1, step)
        else:
            async for got in readback.scan(conn, sids, t0, t1):
                for sid, (ts, vals) in got.items():
                    per[sid] = _merge_buckets(per.get(sid), aggregate(ts, vals, step))
        means: dict[int, dict[int, float]] = {}
        if "avg" in names:
            for sid, agg in per.items():
                if not all(map(math.isfinite, agg[2])):  # rare: readings near ±1.8e308
                    means[sid] = await _scaled_means(conn, sid, t0, t1, step)
    out = []
    empty = (array("q"),) * 2 + (array("d"),) * 5
    for r in rows:
        starts, count, total, lo, hi, first, last = per.get(r["id"], empty)
        fields = {}
        for a in names:
            if a == "avg":
                fields[a] = [s / c for s, c in zip(total, count)]
                exact = means.get(r["id"])
                if exact is not None:  # the mean lies between min and max; rounding may not
                    fields[a] = [min(max(exact.get(b, m), low), high) for b, m, low, high
                                 in zip(starts, fields[a], lo, hi)]
            elif a == "count":
                fields[a] = count.tolist()
            else:
                fields[a] = {"sum": total, "min": lo, "max": hi, "first": first,
                             "last": last}[a].tolist()
        out.append(SeriesBuckets(**_describe(r), buckets=iso_timestamps(starts),
                                 **fields))
    return Response(200, AggregatePage(step // 1_000_000, out))


# ------------------------------------------------------------------ latest

LATEST = """
SELECT s.id, m.machine_identifier, s.metric_name, NULLIF(s.unit, '') AS unit,
       NULLIF(s.raw_tag, '') AS raw_tag,
       h.t AS hot_t, h.v AS hot_v,
       (extract(epoch FROM b.t_last) * 1000000)::int8 AS block_t, b.v_last AS block_v,
       CASE WHEN b.v_last IS NULL THEN b.vals END AS block_vals
FROM machines m
JOIN series s ON s.machine_id = m.id
LEFT JOIN LATERAL (
    SELECT haltless_chunk_last(c.ts) AS t, c.vals[c.n] AS v FROM reading_chunks c
    WHERE c.series_id = s.id ORDER BY c.bucket DESC, haltless_chunk_last(c.ts) DESC LIMIT 1) h ON true
LEFT JOIN LATERAL (
    SELECT rb.t_last, rb.v_last, rb.vals FROM reading_blocks rb
    WHERE rb.series_id = s.id ORDER BY rb.block_start DESC, rb.part DESC LIMIT 1) b ON true
WHERE m.org_id = $1 AND ($2::text IS NULL OR m.machine_identifier = $2)
  AND (h.t IS NOT NULL OR b.t_last IS NOT NULL)
ORDER BY m.machine_identifier COLLATE "C", s.metric_name COLLATE "C", s.id"""


async def latest(app, req: Request) -> Response:
    """GET /api/v1/readings/latest: the newest reading of every series of the
    organization, or of one machine. Index probes only (migration 0006)."""
    org = _org(app, req)
    p = Params(req, LATEST_PARAMS)
    machine = p.one("machine_identifier")
    async with app.rt.pool.acquire() as conn:
        rows = await conn.fetch(LATEST, org, machine)
        if machine is not None and not rows and not await conn.fetchval(
                "SELECT 1 FROM machines WHERE org_id = $1 AND machine_identifier = $2",
                org, machine):
            raise NotFound(f"machine_identifier: no machine {machine!r} in your organization")
    stamps, values = array("q"), []  # timestamps as µs from SQL: no datetime per row
    for r in rows:
        hot_t, block_t = r[5], r[7]
        if block_t is None or (hot_t is not None and hot_t >= block_t):
            stamps.append(hot_t)
            values.append(r[6])
        else:
            stamps.append(block_t)
            v = r[8]
            values.append(v if v is not None else  # a block written before migration 0006
                          unpack_values(r[9])[-1])
    return Response(200, LatestPage([
        LatestReading(r[1], r[2], r[3], r[4], t, v)
        for r, t, v in zip(rows, iso_timestamps(stamps), values)]))


ROUTES = [
    ("GET", "/api/v1/readings", readings, 0, "jwt"),
    ("GET", "/api/v1/readings/aggregate", aggregates, 0, "jwt"),
    ("GET", "/api/v1/readings/latest", latest, 0, "jwt"),
]
