"""The command line as a new user meets it: help for every command, orgs,
machines, keys and tokens managed from it, flags where they type them, one
clear line for each mistake, a server that stops when told and that never
acknowledges a write it could lose."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jwt
import psutil
import pytest
import requests

from helpers import (HALTLESS, ROOT, ServerProcess, fetchval, free_port, haltless, make_tenant,
                     post, postmasters, reading, source_tree, wait_for,
                     wait_until_every_worker_refuses)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    # argparse puts its usage first (wrapped, indented); the error itself is one line
    lines = [ln for ln in p.stderr.strip().splitlines()
             if not ln.startswith("usage: ") and not ln.startswith(" ")]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


# ------------------------------------------------------------------ flags

def test_data_dir_works_before_and_after_the_command(public_tmp):
    env = {"HALTLESS_DATABASE_URL": None, "HALTLESS_DATA_DIR": None}
    data = public_tmp / "d"
    for args in (["--data-dir", str(data), "migrate"], ["orgs", "list", "--data-dir", str(data)],
                 ["machines", "add", "CNC-9", "--data-dir", str(data)],
                 ["--data-dir", str(data), "machines", "list"]):
        p = haltless(*args, env=env)
        assert "Traceback" not in p.stderr
    assert "CNC-9" in p.stdout
    assert (data / "pg" / "PG_VERSION").exists()
    assert not postmasters((data / "pg").resolve())  # the last command stopped it


def test_the_agent_says_it_takes_no_database_flags(tmp_path):
    line = one_line_error(haltless("--data-dir", str(tmp_path), "agent", "--config", "x.toml",
                                   check=False))
    assert "agent uses no database" in line and "state_dir" in line


def test_workers_and_port_flags_are_bounded_like_their_variables():
    p = haltless("serve", "--workers", "999", check=False)
    assert p.returncode == 2 and "--workers" in p.stderr and "1 to 256" in p.stderr
    p = haltless("serve", "--port", "70000", check=False)
    assert p.returncode == 2 and "--port" in p.stderr and "1 to 65535" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_port_already_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(haltless("serve", "--port", str(port), "--data-dir", str(tmp_path),
                                       check=False))
    assert f"port {port} is already in use" in line
    assert not (tmp_path / "pg").exists()  # checked before PostgreSQL was started


def test_two_servers_cannot_share_a_port(server, tmp_path):
    p = haltless("serve", "--host", "127.0.0.1", "--port", str(server.port),
                 "--data-dir", str(tmp_path), check=False, timeout=30)
    assert f"port {server.port} is already in use" in one_line_error(p)
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an ordinary user")
def test_a_privileged_port_as_an_ordinary_user_names_the_port():
    floor = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if floor <= 80:
        pytest.skip(f"this kernel lets every user bind ports from {floor}")
    from haltless.server.serve import check_port
    import pwd
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes an ordinary user and runs the real check
        os.close(r)
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            check_port("127.0.0.1", 80)
            os.write(w, b"no error")
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, str(exc).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        line = f.read()
    os.waitpid(pid, 0)
    assert "port 80" in line and "permission denied" in line and "--port 8000" in line


# ------------------------------------------------------------------ orgs, machines, keys, settings

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
    wait_until_every_worker_refuses(server, key)
    assert post(server, key, {"readings": [reading()]}).status_code == 401
    assert fetchval(pg_dsn, "SELECT count(*) FROM readings WHERE org_id = $1", org_id) == 1
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


# ------------------------------------------------------------------ bad database URLs

@pytest.mark.parametrize("url, says", [
    ("postgresql://u@127.0.0.1:5432:99/haltless", "port '99'"),
    ("mysql://u:secret@db.example/haltless", "the scheme is mysql://"),
    ("postgresql://u@127.0.0.1:99999/haltless", "port"),
    ("postgresql://u@127.0.0.1:5432", "no database name"),
])
def test_a_malformed_database_url_is_one_line_naming_the_part(url, says):
    line = one_line_error(haltless("orgs", "list", "--database-url", url, check=False))
    assert says in line and "secret" not in line


def test_a_missing_database_or_role_is_one_line(pg_dsn):
    base, _, query = pg_dsn.partition("?")
    missing_db = base.rsplit("/", 1)[0] + "/no_such_db" + ("?" + query if query else "")
    line = one_line_error(haltless("orgs", "list", env={"HALTLESS_DATABASE_URL": missing_db},
                                   check=False))
    assert 'database "no_such_db" does not exist' in line
    missing_role = missing_db.replace("/no_such_db", "/haltless").replace("//postgres:@", "//nosuchrole:@", 1)
    if "nosuchrole" not in missing_role:
        pytest.skip("HALTLESS_DATABASE_URL has another user; the role case needs the embedded one")
    line = one_line_error(haltless("orgs", "list", env={"HALTLESS_DATABASE_URL": missing_role},
                                   check=False))
    assert 'role "nosuchrole" does not exist' in line


def test_an_unreachable_database_is_one_line():
    port = free_port()
    line = one_line_error(haltless("orgs", "list", "--database-url",
                                   f"postgresql://u@127.0.0.1:{port}/x", check=False))
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}/x" in line


# ------------------------------------------------------------------ stopping

def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("after", [0.5, 2.0, "ready"])
def test_sigterm_stops_the_server_within_seconds_at_any_moment(pg_dsn, tmp_path, after):
    srv = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn}, workers=2, data_dir=tmp_path)
    if after == "ready":
        srv.start(tmp_path / "serve.log")
        proc = srv.proc
    else:
        with open(tmp_path / "serve.log", "wb") as log:
            proc = subprocess.Popen(HALTLESS + ["serve", "--port", str(srv.port), "--workers", "2"],
                                    env=srv.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        time.sleep(after)  # the moment of the signal: early in the start, later, or serving
    family = [proc.pid] + [p.pid for p in _descendants(proc.pid)]
    deadline = time.monotonic() + 12
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(12)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("haltless serve ignored SIGTERM for 12 s")

    def left():
        return [p for p in family if _running(p)]
    # Its children are gone by the same deadline (they exit on their own
    # once it has: granian's workers, the embedded PostgreSQL's helpers).
    if left():
        wait_for(lambda: not left(), timeout=max(0.5, deadline - time.monotonic()), every=0.05,
                 what=f"processes left running: {left()}")
    srv.stop()
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", srv.port))


def test_a_sigkilled_server_does_not_leave_postgres_running_forever(public_tmp, tmp_path):
    data = public_tmp / "data"
    srv = ServerProcess({}, data_dir=data)
    srv.env.pop("HALTLESS_DATABASE_URL", None)
    srv.start(tmp_path / "serve.log")
    pgdata = (data / "pg").resolve()
    killed = [srv.proc.pid] + [c.pid for c in _descendants(srv.proc.pid)]
    for p in killed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    srv.proc.wait(10)
    srv.stop()
    # Every process that held it is gone, so nobody is left who would stop it:
    wait_for(lambda: not any(psutil.pid_exists(p) for p in killed), timeout=10, every=0.05,
             what="the killed server's processes to be gone")
    assert postmasters(pgdata), "the postmaster should have outlived the killed server"
    dead = json.loads((pgdata / ".handle_pids.json").read_text())
    assert dead and not any(psutil.pid_exists(p) for p in dead)
    env = {"HALTLESS_DATABASE_URL": None, "HALTLESS_DATA_DIR": str(data)}
    haltless("orgs", "list", env=env)  # joins the orphan, and as its last live holder stops it
    wait_for(lambda: not postmasters(pgdata), timeout=10, what="the orphaned postmaster to stop")
    haltless("orgs", "list", env=env)  # and the next command starts and stops its own
    assert not postmasters(pgdata)


def test_a_deleted_data_dir_answers_503_at_once(public_tmp, tmp_path):
    data = public_tmp / "data"
    srv = ServerProcess({"HALTLESS_AUTH_CACHE_SECONDS": "60"}, data_dir=data)
    srv.env.pop("HALTLESS_DATABASE_URL", None)
    srv.start(tmp_path / "serve.log")
    try:
        env = {"HALTLESS_DATABASE_URL": None, "HALTLESS_DATA_DIR": str(data)}
        haltless("machines", "add", "CNC-001", env=env)
        key = haltless("keys", "create", env=env).stdout.strip()
        assert post(srv, key, {"readings": [reading()]}).status_code == 207
        import shutil
        shutil.rmtree(data / "pg")
        statuses = [post(srv, key, {"readings": [reading()]}).status_code for _ in range(5)]
        assert statuses == [503] * 5
    finally:
        srv.stop()
        for p in postmasters((data / "pg").resolve()):
            p.kill()


# ------------------------------------------------------------------ installing

@pytest.mark.slow
def test_no_c_compiler_names_the_pure_python_way_and_that_way_works(tmp_path):
    env = {**os.environ, "CC": "/nonexistent-cc", "LDSHARED": "/nonexistent-cc -shared"}
    src = source_tree(tmp_path / "src")  # nothing already compiled to fall back on
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(src)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode != 0
    assert "HALTLESS_NO_EXTENSIONS=1" in p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(src)], env={**env, "HALTLESS_NO_EXTENSIONS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    (wheel,) = tmp_path.glob("haltless-*.whl")
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert "haltless/fast/_validate_py.py" in names and not [n for n in names if n.endswith(".so")]


def test_the_readme_needs_nothing_outside_the_clone():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    contract = (ROOT / "docs" / "contract.md").read_text()
    for must in ("POST /api/v1/ingest", "X-API-Key", "207", "1,000", "10 MB", "3,650 days",
                 "Machine not found", "Value must be finite", "test-connection",
                 "ns=2;g=", "register_type"):
        assert must in contract, must


# ------------------------------------------------------------------ agent config

def test_a_typo_in_an_agent_enum_lists_the_allowed_values(tmp_path):
    from haltless.pollers.agent_config import load_config
    from haltless.core.errors import ConfigError
    f = tmp_path / "agent.toml"
    f.write_text('api_url = "http://127.0.0.1:9"\napi_key = "hk_x"\n[[source]]\nname = "a"\n'
                 'machine_identifier = "M"\nprotocol = "opcua"\n[source.opcua]\n'
                 'endpoint = "opc.tcp://127.0.0.1:4840"\nsecurity_mode = "SignAndEncript"\n'
                 '[[source.opcua.nodes]]\nnode_id = "ns=2;i=1"\nmetric_name = "t"\n')
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    msg = str(e.value)
    assert "source[0].opcua.security_mode" in msg and "'SignAndEncript'" in msg
    assert "'None', 'Sign', 'SignAndEncrypt'" in msg


def test_token_revoke_refuses_every_earlier_token_of_the_organization(server, pg_dsn):
    """`haltless token revoke`: the organization's tokens issued before it
    are refused by every worker within seconds, new ones work, and another
    organization's tokens are untouched; a lifetime over 30 days is refused."""
    a, b = make_tenant(pg_dsn), make_tenant(pg_dsn)
    old_a, old_b = server.token(a.org_id), server.token(b.org_id)

    def status(token):
        return requests.get(server.url + "/api/v1/machines", timeout=10,
                            headers={"Authorization": f"Bearer {token}"}).status_code

    assert status(old_a) == status(old_b) == 200
    out = haltless("token", "revoke", "--org", a.name, env={"HALTLESS_DATABASE_URL": pg_dsn})
    assert "are refused" in out.stdout
    new_a = server.token(a.org_id)
    # Every worker (each has its own 5 s cache) refuses the old token.
    wait_for(lambda: all(status(old_a) == 401 for _ in range(8)), timeout=15,
             what="the revoked token refused by every worker")
    r = requests.get(server.url + "/api/v1/machines", timeout=10,
                     headers={"Authorization": f"Bearer {old_a}"})
    assert "token revoked" in r.json()["detail"]
    assert status(new_a) == 200 and status(old_b) == 200
    long = haltless("token", "create", "--org", a.name, "--ttl", str(31 * 86400),
                    env={"HALTLESS_DATABASE_URL": pg_dsn}, check=False)
    assert long.returncode == 2 and "more than 30 days" in long.stderr
