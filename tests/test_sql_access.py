"""SQL access: `haltless db-url`, `haltless psql` (the embedded wheel's psql),
and `haltless grafana-role`: a read-only role that sees one organization's
readings, hot or compacted, through the view, readings_in() and the tables,
and the README's Grafana query run as that role."""
from __future__ import annotations

import datetime as dt
import re

import asyncpg
import pytest

from helpers import ROOT, fetchval, haltless, make_tenant, post, run
from test_query import iso, us
from test_storage import compact

UTC = dt.timezone.utc


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


def readme_grafana_queries() -> list[str]:
    """The ```sql blocks of the README's "SQL: psql and Grafana" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### SQL: psql and Grafana", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


def grafana_expand(sql: str, frm: str, to: str, machine: str) -> str:
    """Grafana's PostgreSQL macros, expanded as its data source does."""
    sql = re.sub(r"\$__timeGroupAlias\(([^,]+), '1m'\)",
                 r'floor(extract(epoch from \1)/60)*60 AS "time"', sql)
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 BETWEEN '{frm}' AND '{to}'", sql)
    return (sql.replace("$__timeFrom()", f"'{frm}'").replace("$__timeTo()", f"'{to}'")
            .replace("$machine", machine))


def test_the_readme_grafana_queries_run_as_the_role_agree_and_prune_partitions(
        server, pg_dsn, two_orgs):
    """Both README queries (readings_in(), and the view with $__timeFilter):
    the same answer, the organization's own readings only, and no block
    partition outside the range read."""
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
    queries = readme_grafana_queries()
    assert len(queries) == 2 and "readings_in(" in queries[0] and "$__timeFilter" in queries[1]
    frm, to = iso(now - 2 * 3_600_000_000), iso(now)
    answers = []
    for query in queries:
        sql = grafana_expand(query, frm, to, "CNC-001")
        rows = as_role(url, sql)
        assert {r["metric"] for r in rows} == {"m0", "m1", "m2"}
        answers.append(sorted((float(r["time"]), r["metric"], r["value"]) for r in rows))
        plan = [r[0] for r in as_role(url, "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql)]
        old = (dt.datetime.now(UTC) - dt.timedelta(days=200)).strftime("%Y%m")
        # Pruned when planned or at run time; the timelines' policy probes
        # one hour's blocks per timeline row (0018), never a whole month.
        touched = [line for line in plan if f"reading_blocks_{old}" in line
                   and "never executed" not in line]
        assert touched == [], "\n".join(plan)
    assert answers[0] == answers[1]
    # organization a sent values 0..89 to its CNC-001, b 0..119 to its own
    assert max(v for _, _, v in answers[0]) < 90
