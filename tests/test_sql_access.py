"""SQL access: `haltless db-url`, `haltless psql` (the embedded wheel's psql),
and `haltless grafana-role`: a read-only role that sees one organization's
readings, hot or compacted, through the view, readings_in() and the tables,
and the README's Grafana query run as that role."""
from __future__ import annotations

import datetime as dt
import json

import asyncpg
import pytest
from helpers import fetch, fetchval, haltless, make_tenant, post, run
from test_query import iso, us
from test_storage import compact

from bench import grafana
from bench.sql import readme_queries

UTC = dt.UTC


def send(server, tenant, start_us, n, machine="CNC-001"):
    rs = [{"machine_identifier": machine, "metric_name": f"m{i % 3}",
           "timestamp": iso(start_us + i * 1_000_000), "value": float(i)} for i in range(n)]
    r = post(server, tenant.key, {"readings": rs})
    assert r.json()["accepted_count"] == n, r.text


def env(pg_dsn):
    return {"HALTLESS_DATABASE_URL": pg_dsn}


def test_db_url_prints_the_database_url(pg_dsn):
    assert haltless("db-url", env=env(pg_dsn)).stdout.strip() == pg_dsn


def test_psql_runs_the_embedded_psql_on_the_haltless_database(pg_dsn, tenant):
    out = haltless("psql", "--", "-At", "-c", "SELECT current_database(), count(*) FROM machines"
                   " WHERE org_id = '" + str(tenant.org_id) + "'", env=env(pg_dsn)).stdout
    assert out.strip() == "haltless|3"
    bad = haltless("psql", "--", "-c", "SELECT nope", env=env(pg_dsn), check=False)
    assert bad.returncode != 0 and "nope" in bad.stderr


async def _as(url, sql, *args):
    c = await asyncpg.connect(url)
    try:
        return await c.fetch(sql, *args)
    finally:
        await c.close()


def as_role(url, sql, *args):
    return run(_as(url, sql, *args))


@pytest.fixture
def two_orgs(server, pg_dsn):
    a = make_tenant(pg_dsn, machines=("CNC-001", "SHARED-NAME"))
    b = make_tenant(pg_dsn, machines=("CNC-001", "SHARED-NAME"))
    now = us(dt.datetime.now(UTC).replace(microsecond=0))
    for t, n in ((a, 90), (b, 120)):  # same machines, same timestamps: shared timelines
        send(server, t, now - 3_600_000_000, n)
        send(server, t, now - 3_600_000_000, n, machine="SHARED-NAME")
    return a, b, now


def test_a_grafana_role_sees_only_its_organization_hot_and_compacted(server, pg_dsn, two_orgs):
    a, b, now = two_orgs
    url = haltless("grafana-role", "--org", a.name, env=env(pg_dsn)).stdout.strip()
    assert url.startswith("postgresql://grafana_") and "@" in url
    frm, to = dt.datetime.fromtimestamp((now - 2 * 3_600_000_000) / 1e6, UTC), \
        dt.datetime.fromtimestamp(now / 1e6, UTC)

    def check(stage):
        rows = as_role(url, "SELECT org_id, count(*) FROM readings GROUP BY 1")
        assert [(r[0], r[1]) for r in rows] == [(a.org_id, 180)], stage
        assert as_role(url, "SELECT count(*) FROM readings_in($1, $2)", frm, to)[0][0] == 180
        assert as_role(url, "SELECT count(DISTINCT org_id) FROM machines")[0][0] == 1
        assert [r[0] for r in as_role(url, "SELECT name FROM organizations")] == [a.name]
        mine = fetchval(pg_dsn, "SELECT array_agg(s.id) FROM series s JOIN machines m"
                        " ON m.id = s.machine_id WHERE m.org_id = $1", a.org_id)
        for table in ("reading_chunks", "reading_blocks"):
            seen = {r[0] for r in as_role(url, f"SELECT DISTINCT series_id FROM {table}")}
            assert seen <= set(mine), (stage, table)
        # As the owner: the other organization's readings are there.
        assert b.count(pg_dsn) == 240

    check("hot")
    compact(pg_dsn)
    check("compacted")
    assert as_role(url, "SELECT count(*) FROM reading_timelines")[0][0] >= 1
    for sql in ("SELECT * FROM api_keys", "SELECT * FROM ingest_sources",
                "SELECT * FROM reading_chunks_0", "SELECT * FROM reader_roles"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            as_role(url, sql)
    with pytest.raises((asyncpg.ReadOnlySQLTransactionError, asyncpg.InsufficientPrivilegeError)):
        as_role(url, "INSERT INTO organizations (name) VALUES ('mine now')")
    # Run again: a new password, same role; another organization cannot take the name.
    again = haltless("grafana-role", "--org", a.name, env=env(pg_dsn)).stdout.strip()
    assert again.split("@")[0].split(":")[0] == url.split("@")[0].split(":")[0] and again != url
    role = url.split("//")[1].split(":")[0]
    clash = haltless("grafana-role", "--org", b.name, "--role", role, env=env(pg_dsn), check=False)
    assert clash.returncode == 2 and "reads another organization" in clash.stderr
    taken = haltless("grafana-role", "--org", b.name, "--role", "postgres", env=env(pg_dsn),
                     check=False)
    assert taken.returncode == 2 and "not a haltless reader role" in taken.stderr


def test_every_view_runs_with_the_readers_rights(pg_dsn):
    """A view runs as its owner unless security_invoker is set, and then no
    row-level security applies. CREATE OR REPLACE VIEW resets the option, so
    a migration that rebuilds a view must set it again (0024, 0025)."""
    views = {r[0]: r[1] for r in fetch(
        pg_dsn, "SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE c.relkind = 'v' AND n.nspname = 'public'")}
    assert {"readings", "readings_1m", "readings_1h"} <= set(views)
    assert [name for name, opts in views.items()
            if "security_invoker=true" not in (opts or [])] == []


def test_a_readers_policy_is_one_hash_lookup_per_row_not_a_scan_of_the_orgs_series(
        pg_dsn, two_orgs):
    # `series_id = ANY (array of the organization's series)` compared each row
    # with every series (~18 us a row at 2,000 series): panels slowed down as
    # the fleet grew. The policy is a hashed subplan (migration 0023).
    a, _, _ = two_orgs
    url = haltless("grafana-role", "--org", a.name, env=env(pg_dsn)).stdout.strip()
    for table in ("series", "reading_chunks", "reading_blocks"):
        plan = "\n".join(r[0] for r in as_role(url, f"EXPLAIN SELECT count(*) FROM {table}"))
        assert "hashed SubPlan" in plan and "= ANY" not in plan, (table, plan)


def test_the_readme_grafana_dashboard_runs_as_the_role_agrees_and_prunes_partitions(
        server, pg_dsn, two_orgs):
    """Every query of the README's Grafana section, expanded as Grafana 11
    expands it, as a reader role: the organization's own machines and
    readings only; the panel's three arms (raw, readings_1m, readings_1h)
    and the fleet panel give the same means, with late readings hot in a
    compacted hour and after they are merged; no block partition outside the
    range is read."""
    a, b, now = two_orgs
    url = haltless("grafana-role", "--org", a.name, "--role", "grafana_readme_" + a.name[4:],
                   env=env(pg_dsn)).stdout.strip()
    # Readings 200 days old in both organizations: their month's partitions
    # hold blocks of the asked series, which the queries must not read.
    long_ago = us((dt.datetime.now(UTC) - dt.timedelta(days=200)).replace(microsecond=0))
    for t in (a, b):
        send(server, t, long_ago, 60)
    fetchval(pg_dsn, "SELECT haltless_block_partitions(now() - interval '14 months', now())")
    compact(pg_dsn)
    fetchval(pg_dsn, "ANALYZE")
    queries = readme_queries()
    assert set(queries) == {"machine variable", "metric variable (multi-value)",
                            "machine panel", "fleet panel"}, list(queries)
    frm = dt.datetime.fromtimestamp((now - 2 * 3_600_000_000) / 1e6, UTC)
    to = dt.datetime.fromtimestamp(now / 1e6, UTC)
    old = (dt.datetime.now(UTC) - dt.timedelta(days=200)).strftime("%Y%m")
    variables = {"machine": "CNC-001", "metric": "'m0','m1','m2'"}

    def run_query(name, interval="1m"):
        sql = grafana.expand(queries[name], frm, to, variables, interval)
        plan = [r[0] for r in as_role(url, "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql)]
        # Pruned when planned or at run time; the timelines' policy probes
        # one hour's blocks per timeline row (0018), never a whole month.
        touched = [line for line in plan if f"reading_blocks_{old}" in line
                   and "never executed" not in line]
        assert touched == [], "\n".join(plan)
        return as_role(url, sql)

    assert [r[0] for r in run_query("machine variable")] == ["CNC-001", "SHARED-NAME"]
    assert [r[0] for r in run_query("metric variable (multi-value)")] == ["m0", "m1", "m2"]

    def means(name, interval):
        """{(bucket start, line): mean} of a panel."""
        return {(float(r["time"]), r["metric"]): r["value"] for r in run_query(name, interval)}

    def folded(raw, step):
        """The raw arm's per-second values, averaged over buckets of ``step`` s."""
        acc = {}
        for (t, metric), v in raw.items():
            s_, c = acc.get((t // step * step, metric), (0.0, 0))
            acc[(t // step * step, metric)] = (s_ + v, c + 1)
        return {k: s_ / c for k, (s_, c) in acc.items()}

    def check(stage):
        raw = means("machine panel", "1s")
        assert {m for _, m in raw} == {"m0", "m1", "m2"}, stage
        # organization a sent values 0..89 to its CNC-001, b 0..119 to its own
        assert max(raw.values()) < 90, stage
        for interval, step in (("1m", 60), ("5m", 300), ("1h", 3600)):
            got = means("machine panel", interval)
            want = folded(raw, step)
            assert got.keys() == want.keys(), (stage, interval)
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-12), (stage, interval, k)
            fleet = means("fleet panel", interval)
            assert {m for _, m in fleet} == {f"{mc} m{i}" for mc in ("CNC-001", "SHARED-NAME")
                                              for i in range(3)}, (stage, interval)
            for (t, m), v in want.items():
                assert fleet[(t, "CNC-001 " + m)] == pytest.approx(v, rel=1e-12), (stage, t, m)

    check("compacted")
    # Late readings into the compacted hour: hot rows there until merged
    # (each in a second of its own, so that the raw arm's 1 s means are
    # single readings and fold into exact means).
    late = [{"machine_identifier": "CNC-001", "metric_name": f"m{i % 3}",
             "timestamp": iso(now - 3_600_000_000 + (90 + i) * 1_000_000 + 500_000),
             "value": i + 0.25} for i in range(0, 60, 7)]
    assert post(server, a.key, {"readings": late}).json()["accepted_count"] == len(late)
    check("late, hot")
    compact(pg_dsn)
    check("late, merged")


def test_a_raw_panel_reads_the_blocks_of_the_asked_series_in_the_range_and_no_other(
        server, pg_dsn, two_orgs):
    """EXPLAIN (ANALYZE, BUFFERS) of the README machine panel's raw arm, as a
    reader role: the block rows it reads are exactly the blocks of the asked
    machine's series that overlap the range, however many other series and
    hours the organization has."""
    from bench.sql import plan_block_rows

    a, _b, now = two_orgs
    url = haltless("grafana-role", "--org", a.name, "--role", "grafana_plan_" + a.name[4:],
                   env=env(pg_dsn)).stdout.strip()
    for hours_back in (30, 5):  # other hours of the same machine, outside the range
        send(server, a, now - hours_back * 3_600_000_000, 30)
    for m in ("SHARED-NAME",):  # another machine inside the range
        send(server, a, now - 1_800_000_000, 30, machine=m)
    compact(pg_dsn)
    fetchval(pg_dsn, "ANALYZE")
    frm = dt.datetime.fromtimestamp((now - 2 * 3_600_000_000) / 1e6, UTC)
    to = dt.datetime.fromtimestamp(now / 1e6, UTC)
    sql = grafana.expand(readme_queries()["machine panel"], frm, to,
                         {"machine": "CNC-001", "metric": "'m0','m1','m2'"}, "1s")
    plan = json.loads(as_role(url, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql)[0][0])[0]
    asked = fetchval(pg_dsn, "SELECT count(*) FROM reading_blocks b JOIN series s"
                     " ON s.id = b.series_id JOIN machines m ON m.id = s.machine_id"
                     " WHERE m.org_id = $1 AND m.machine_identifier = 'CNC-001'"
                     " AND b.t_last >= $2 AND b.t_first <= $3", a.org_id, frm, to)
    others = fetchval(pg_dsn, "SELECT count(*) FROM reading_blocks b JOIN series s"
                      " ON s.id = b.series_id JOIN machines m ON m.id = s.machine_id"
                      " WHERE m.org_id = $1", a.org_id) - asked
    assert asked > 0 and others >= asked  # there is something not to read
    assert plan_block_rows(plan["Plan"]) == asked, json.dumps(plan, indent=1)[:4000]
