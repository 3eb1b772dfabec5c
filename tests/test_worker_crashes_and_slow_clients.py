"""The server keeps serving through crashed workers and slow or hostile
clients: a killed worker is replaced while the other serves (and granian's
crash loop exit is survived), idle and stalled connections are closed after
their timeouts, a request that may not write is answered without its body
being read, the memory held for bodies in flight is bounded, and a client
leaving mid-body is one log line.

One server of its own (2 workers) with short timeouts, so the tests wait
seconds, not the production defaults."""
from __future__ import annotations

import json
import resource
import signal
import socket
import time

import psutil
import pytest
import requests

from helpers import ServerProcess, make_tenant, metric, post, reading, scrape, wait_for, workers

HEADER_TIMEOUT = 5  # room to open 2,520 connections and use /healthz before it
BODY_TIMEOUT = 2
BODY_MEMORY_MB = 32  # per worker: three 10 MB bodies at once


@pytest.fixture(scope="module")
def srv(pg_dsn, tmp_path_factory):
    d = tmp_path_factory.mktemp("availability")
    s = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn, "HALTLESS_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
                       "HALTLESS_BODY_TIMEOUT": str(BODY_TIMEOUT),
                       "HALTLESS_BODY_MEMORY_MB": str(BODY_MEMORY_MB)}, workers=2, data_dir=d)
    s.start(d / "server.log")
    yield s
    s.stop()


def granian_main(srv) -> psutil.Process:
    return psutil.Process(srv.proc.pid).children()[0]


def healthz_answered(srv, n: int) -> None:
    """n /healthz requests, each on a fresh connection, each answered 200."""
    for _ in range(n):
        assert requests.get(srv.url + "/healthz", timeout=10).status_code == 200


def raw(srv, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
    if data:
        s.sendall(data)
    return s


def head(key: str | None, length: int, extra: bytes = b"") -> bytes:
    h = b"POST /api/v1/ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if key:
        h += b"X-API-Key: " + key.encode() + b"\r\n"
    return h + b"Content-Length: %d\r\n" % length + extra + b"\r\n"


def status_of(s: socket.socket) -> int:
    """The status of the next answer on ``s`` (waiting up to its timeout); 0 if it was closed."""
    data = s.recv(4096)
    return int(data.split(b" ", 2)[1]) if data else 0


# Expect: 100-continue makes reading the body observable: granian answers
# "100 Continue" when the app first asks for the body, and only then.
EXPECT = b"Expect: 100-continue\r\n"


def answer_so_far(s: socket.socket) -> bytes | None:
    """What the server has sent on ``s``, without waiting: None if nothing yet,
    b"" if it closed the connection."""
    s.settimeout(0)
    try:
        return s.recv(4096)
    except BlockingIOError:
        return None
    finally:
        s.settimeout(15)


def closed_by_server(s: socket.socket, wait: float) -> bool:
    """True once the server closes ``s`` cleanly (a reset is not counted),
    waiting up to ``wait`` seconds for it."""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        return False


# ------------------------------------------------------------------ workers

@pytest.mark.slow
def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(srv, pg_dsn):
    t = make_tenant(pg_dsn)
    before = {w.pid for w in workers(srv)}
    assert len(before) == 2
    victim = sorted(before)[0]
    psutil.Process(victim).send_signal(signal.SIGKILL)
    failures = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # every request in these seconds is answered
        try:
            r = post(srv, t.key, {"readings": [reading()]})
            failures += r.status_code != 207
        except requests.ConnectionError:
            failures += 1  # one that was on the dying worker's connection
        now = {w.pid for w in workers(srv)}
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.05)
    assert failures <= 1
    wait_for(lambda: len(workers(srv)) == 2 and victim not in {w.pid for w in workers(srv)},
             timeout=30, every=0.1, what="a new worker")
    wait_for(lambda: srv.workers_listening() == 2, timeout=30, every=0.1,
             what="the new worker listening")
    assert post(srv, t.key, {"readings": [reading()]}).status_code == 207


@pytest.mark.slow
def test_a_worker_dying_twice_quickly_does_not_take_the_service_down(srv, pg_dsn):
    """granian exits when a respawned worker dies again within 5.5 s ("crash
    loop"); the supervisor starts granian again, the database staying up."""
    t = make_tenant(pg_dsn)
    first = granian_main(srv).pid
    before = {w.pid for w in workers(srv)}
    psutil.Process(min(before)).send_signal(signal.SIGKILL)
    new = wait_for(lambda: [w.pid for w in workers(srv) if w.pid not in before],
                   timeout=30, every=0.1, what="the respawned worker")
    psutil.Process(new[0]).send_signal(signal.SIGKILL)  # again, at once
    wait_for(lambda: _granian_pid(srv) not in (None, first), timeout=20, every=0.1,
             what="granian started again")
    wait_for(lambda: _up(srv), timeout=40, every=0.1, what="the service back")
    assert srv.proc.poll() is None  # `haltless serve` itself never stopped
    assert post(srv, t.key, {"readings": [reading()]}).status_code == 207
    assert "starting it again" in srv.log()


def _granian_pid(srv) -> int | None:
    try:
        return granian_main(srv).pid
    except (psutil.NoSuchProcess, IndexError):
        return None


def _up(srv) -> bool:
    try:
        return requests.get(srv.url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


# ------------------------------------------------------------------ connections

@pytest.mark.slow
def test_2500_idle_connections_do_not_hold_up_healthz_and_are_closed_after_the_timeout(srv):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 3000:
        pytest.skip(f"open-files hard limit {hard} is below 3,000")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle: list[socket.socket] = []
    half: list[socket.socket] = []
    try:
        for _ in range(2500):
            idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        for _ in range(20):  # headers begun, never ended
            half.append(raw(srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"))
        # Answered while all of them are held: no /healthz waited for the
        # header timeout to free a connection.
        healthz_answered(srv, 9)
        gone = [i for i, c in enumerate(idle + half) if answer_so_far(c) is not None]
        assert not gone, f"{len(gone)} of 2,520 connections closed before /healthz was answered"
        # Then the header timeout closes them, idle and half-sent alike.
        closed = sum(closed_by_server(c, wait=HEADER_TIMEOUT + 10) for c in idle[:50] + half)
        assert closed == 70, f"{closed} of 70 idle or half-sent connections closed by the server"
    finally:
        for c in idle + half:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_stalled_body_gets_408_and_one_that_keeps_coming_is_read(srv, pg_dsn):
    """Five bodies stall after their first bytes and get 408 (the timeout
    counts from the last byte); one sent beside them a byte at a time, a
    quarter of the timeout apart, is still read after they were cut off and
    is stored."""
    t = make_tenant(pg_dsn)
    body = b" " * 200 + json.dumps({"readings": [reading()]}).encode()
    stalled = [raw(srv, head(t.key, 1000, EXPECT)) for _ in range(5)]
    steady = raw(srv, head(t.key, len(body), EXPECT))
    for c in stalled + [steady]:
        assert status_of(c) == 100  # each one's body is being read
    for c in stalled:
        c.sendall(b'{"readings": [')
    answers: dict[int, bytes] = {}
    sent = 0
    while len(answers) < len(stalled):  # until every stalled one is answered
        assert sent < 120, "no 408 while 120 bytes of the steady body were sent"
        steady.sendall(body[sent:sent + 1])
        sent += 1
        time.sleep(BODY_TIMEOUT / 4)  # the steady sender's pace
        for i, c in enumerate(stalled):
            if i not in answers and (a := answer_so_far(c)) is not None:
                answers[i] = a
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers.values()), answers
    assert answer_so_far(steady) is None  # still being read
    steady.sendall(body[sent:])
    assert status_of(steady) == 207
    for c in stalled + [steady]:
        c.close()
    assert t.count(pg_dsn) == 1


def test_a_bad_key_is_answered_401_without_waiting_for_the_body(srv, pg_dsn):
    # No body is ever sent: a server that waited for it would answer 408.
    for key in ("hk_not_a_real_key", None):
        s = raw(srv, head(key, 10 * 1024 * 1024 - 1))
        assert status_of(s) == 401, key
        s.close()
    # Nor does it ask for the body: 401 comes instead of "100 Continue",
    # which a good key gets.
    s = raw(srv, head("hk_not_a_real_key", 10 * 1024 * 1024 - 1, EXPECT))
    assert s.recv(4096).startswith(b"HTTP/1.1 401 ")
    s.close()
    s = raw(srv, head(make_tenant(pg_dsn).key, 10 * 1024 * 1024 - 1, EXPECT))
    assert status_of(s) == 100
    s.close()


def test_bodies_held_beyond_the_workers_budget_get_503_with_retry_after(srv, pg_dsn):
    t = make_tenant(pg_dsn)
    big = 10 * 1024 * 1024 - 1
    conns = [raw(srv, head(t.key, big, EXPECT)) for _ in range(12)]
    try:
        # Each is either held (its body asked for: "100 Continue") or refused
        # at once: 2 workers x 32 MB hold at most 6 bodies of 10 MB, and at
        # least one worker holds its 3.
        first = [c.recv(4096) for c in conns]
        held = [c for c, a in zip(conns, first) if a == b"HTTP/1.1 100 Continue\r\n\r\n"]
        refused = [a for a in first if a.startswith(b"HTTP/1.1 503")]
        assert len(held) + len(refused) == 12, first
        assert len(refused) >= 6 and len(held) >= 3, first
        assert all(b"retry-after: 1" in a.lower() for a in refused)
        # Answered while the bodies are held (their senders keep them coming,
        # a byte at a time, well inside the stall timeout):
        for c in held:
            c.sendall(b'{"readings": [')
        for _ in range(5):
            for c in held:
                c.sendall(b" ")
            healthz_answered(srv, 1)
        assert [answer_so_far(c) for c in held] == [None] * len(held)  # still held
    finally:
        for c in conns:
            c.close()
    assert t.count(pg_dsn) == 0


def test_a_client_going_away_mid_body_is_one_short_log_line(srv, pg_dsn):
    t = make_tenant(pg_dsn)
    mark = len(srv.log())
    counted = dict(route="/api/v1/ingest", status="400")
    before = metric(scrape(srv), "haltless_http_requests_total", **counted)
    s = raw(srv, head(t.key, 5000, EXPECT))
    assert status_of(s) == 100  # the server is reading the body
    s.sendall(b'{"readings": [' + b" " * 100)
    s.close()
    # Done with it once it is counted: answered 400 (to nobody), its log written.
    wait_for(lambda: metric(scrape(srv), "haltless_http_requests_total", **counted) > before,
             timeout=20, every=0.1, what="the abandoned request to be finished")
    new = srv.log()[mark:]
    assert "Traceback" not in new
    assert len(new.strip().splitlines()) <= 1, new
