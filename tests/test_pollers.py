"""Direct ingestion end to end: sources created through the API, polled by
real `haltless pollers` processes from real pymodbus devices on 127.0.0.1."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time
import uuid

import pytest

from helpers import HALTLESS, ROOT, fetch, make_tenant, run, wait_for
from peers import ModbusPeer, device
from test_management import MODBUS_BODY, Api


class Pollers:
    """`haltless pollers`; ``flush`` is HALTLESS_POLL_FLUSH_SECONDS (short
    here, so that tests see readings within a poll or two; 10 s by default)."""

    def __init__(self, server, log_path, processes=1, flush="0.3", env=None):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            HALTLESS + ["pollers", "--processes", str(processes)],
            env={**server.env, "HALTLESS_LOG_LEVEL": "info", "HALTLESS_POLL_FLUSH_SECONDS": flush,
                 **(env or {})},
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(20)
        self._log.close()

    def log(self):
        return self.log_path.read_text(errors="replace")


def series_rows(dsn, source_machine, metric):
    return fetch(dsn, "SELECT timestamp, value, unit, raw_tag FROM readings"
                 " WHERE machine_id = $1 AND metric_name = $2 ORDER BY timestamp",
                 source_machine, metric)


@pytest.fixture(autouse=True)
def only_this_tests_sources(pg_dsn):
    """Sources other tests left behind would be polled (and counted) too."""
    fetch(pg_dsn, "UPDATE ingest_sources SET is_active = false")
    yield
    fetch(pg_dsn, "UPDATE ingest_sources SET is_active = false")


@pytest.fixture
def api(server, tenant):
    return Api(server, server.token(tenant.org_id))


def polled_since(dsn, machine, metric, since: dt.datetime) -> int:
    """Readings of ``machine``'s ``metric`` polled after ``since``."""
    return fetch(dsn, "SELECT count(*) FROM readings WHERE machine_id = $1 AND metric_name = $2"
                 " AND timestamp > $3", machine, metric, since)[0][0]


def assert_polled_no_more(dsn, peer, mid, metric, reference) -> int:
    """The poller lets go of ``peer``'s device (closes its connection), and
    while it polls the ``reference`` machine (another source, another device,
    the same process) three more times, ``mid`` gets no reading and the
    device no request. Returns ``mid``'s readings."""
    wait_for(lambda: peer.connections == 0, what="the poller to close the device's connection")
    let_go, requests = dt.datetime.now(dt.timezone.utc), peer.requests
    # One flush per process, in poll order: once a reference reading polled
    # after this moment is stored, every reading polled before it is too.
    wait_for(lambda: polled_since(dsn, reference, "temperature", let_go) >= 1,
             what="a later poll of the reference source")
    n = len(series_rows(dsn, mid, metric))
    wait_for(lambda: polled_since(dsn, reference, "temperature", let_go) >= 4,
             what="three more polls of the reference source")
    assert len(series_rows(dsn, mid, metric)) == n
    assert peer.requests == requests and peer.connections == 0
    return n


def test_modbus_source_is_polled_and_follows_changes_without_restart(server, api, tenant, pg_dsn,
                                                                     tmp_path):
    mid, reference = tenant.machines["CNC-001"], tenant.machines["CNC-002"]
    with ModbusPeer([device(1, {100: 725, 101: 42}, {102: 1500})]) as peer, \
            ModbusPeer([device(1, {100: 1})]) as other:
        body = {**MODBUS_BODY, "machine_id": str(mid), "port": peer.port, "poll_interval_seconds": 1}
        body["config"] = {"registers": [
            *MODBUS_BODY["config"]["registers"],
            {"address": 102, "count": 1, "register_type": "input", "metric_name": "motor_speed",
             "unit": "rpm", "scale": 1.0, "offset": 0.0}]}
        src = api.post("/api/v1/ingest-sources", body).json()
        assert api.post("/api/v1/ingest-sources", {
            **MODBUS_BODY, "name": "reference", "machine_id": str(reference), "port": other.port,
            "poll_interval_seconds": 1}).status_code == 201
        pollers = Pollers(server, tmp_path / "pollers.log")
        try:
            rows = wait_for(lambda: series_rows(pg_dsn, mid, "temperature"), what="first reading")
            assert rows[0]["value"] == pytest.approx(72.5) and rows[0]["unit"] == "celsius"
            assert rows[0]["raw_tag"] == "hr100"
            speed = wait_for(lambda: series_rows(pg_dsn, mid, "motor_speed"), what="input register")
            assert speed[0]["value"] == 1500.0 and speed[0]["raw_tag"] == "ir102"
            st = wait_for(lambda: (s := api.get(f"/api/v1/ingest-sources/{src['id']}").json()["status"])
                          ["readings_written"] >= 2 and s, what="status")
            assert st["last_success_at"] and st["last_error"] is None and st["polled_by"]

            # PATCH: a new register shows up within seconds, no restart
            cfg = {"registers": [{"address": 101, "metric_name": "pressure", "unit": "bar"}]}
            assert api.patch(f"/api/v1/ingest-sources/{src['id']}", {"config": cfg}).status_code == 200
            wait_for(lambda: series_rows(pg_dsn, mid, "pressure"), what="patched register")
            # deactivate: polling stops
            api.patch(f"/api/v1/ingest-sources/{src['id']}", {"is_active": False})
            n = assert_polled_no_more(pg_dsn, peer, mid, "pressure", reference)
            # reactivate, then delete: it stops again
            api.patch(f"/api/v1/ingest-sources/{src['id']}", {"is_active": True})
            wait_for(lambda: len(series_rows(pg_dsn, mid, "pressure")) > n, what="reactivated")
            api.delete(f"/api/v1/ingest-sources/{src['id']}")
            assert_polled_no_more(pg_dsn, peer, mid, "pressure", reference)
        finally:
            pollers.kill(signal.SIGTERM)


def test_a_device_that_goes_away_and_comes_back_is_reported_then_read_again(server, api, tenant,
                                                                            pg_dsn, tmp_path):
    mid = tenant.machines["CNC-002"]
    peer = ModbusPeer([device(1, {100: 725})]).start()
    body = {**MODBUS_BODY, "machine_id": str(mid), "port": peer.port, "poll_interval_seconds": 1}
    src = api.post("/api/v1/ingest-sources", body).json()
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        wait_for(lambda: series_rows(pg_dsn, mid, "temperature"), what="first reading")
        peer.stop()
        st = wait_for(lambda: (s := api.get(f"/api/v1/ingest-sources/{src['id']}").json()["status"])
                      ["last_error"] and s, what="error reported")
        assert str(peer.port) in st["last_error"]
        gone = len(series_rows(pg_dsn, mid, "temperature"))
        peer.start()  # same port
        wait_for(lambda: len(series_rows(pg_dsn, mid, "temperature")) > gone + 1, timeout=30,
                 what="readings after the device returned")
        st = wait_for(lambda: (s := api.get(f"/api/v1/ingest-sources/{src['id']}").json()["status"])
                      ["last_error"] is None and s, what="error cleared")
    finally:
        pollers.kill(signal.SIGTERM)
        peer.close()


@pytest.mark.slow
def test_two_poller_processes_share_sources_hand_them_over_and_survive_a_kill(server, api, pg_dsn,
                                                                             tmp_path):
    """"None is polled twice": every handover (a second process starting and
    taking half, it stopping and giving them back, a kill) keeps each source's
    polls at least half an interval apart. A handover used to poll a source
    again at a random moment of the new owner's first second, which failed
    about 2% of handovers; 30 sources handed over 5 times each way (300
    handovers) caught it in every run."""
    n, cycles = 30, 5
    t = make_tenant(pg_dsn, machines=[f"M{i}" for i in range(n)])
    api = Api(server, server.token(t.org_id))
    with ModbusPeer([device(1, {100: 1})]) as peer:
        ids = []
        for i in range(n):
            body = {**MODBUS_BODY, "name": f"s{i}", "machine_id": str(t.machines[f"M{i}"]),
                    "port": peer.port, "poll_interval_seconds": 1}
            ids.append(uuid.UUID(api.post("/api/v1/ingest-sources", body).json()["id"]))

        def owners():
            return {r[0]: r[1] for r in fetch(
                pg_dsn, "SELECT id, lease_owner FROM ingest_sources WHERE id = ANY($1::uuid[])", ids)}

        def owned_by(pollers):
            return [o for o in owners().values() if o and o.split(":")[1] == str(pollers.proc.pid)]

        def polled_by_all_since(when: dt.datetime, times: int = 1) -> bool:
            return fetch(pg_dsn, "SELECT count(*) FROM (SELECT machine_id FROM readings"
                         " WHERE machine_id = ANY($1::uuid[]) AND timestamp > $2 GROUP BY 1"
                         " HAVING count(*) >= $3) m", list(t.machines.values()), when,
                         times)[0][0] == n

        def now():
            return dt.datetime.now(dt.timezone.utc)

        a = Pollers(server, tmp_path / "a.log")
        b = None
        try:
            wait_for(lambda: len(owned_by(a)) == n, what="the first process polling everything")
            for cycle in range(cycles):
                b = Pollers(server, tmp_path / f"b{cycle}.log")
                wait_for(lambda: len(owned_by(b)) == n // 2 and len(owned_by(a)) == n // 2,
                         what=f"cycle {cycle}: half handed to the second process")
                handed = now()  # each source polled by its new owner before the next handover
                wait_for(lambda: polled_by_all_since(handed), what=f"cycle {cycle}: polls after it")
                b.kill(signal.SIGTERM)
                wait_for(lambda: len(owned_by(a)) == n, what=f"cycle {cycle}: all handed back")
                handed = now()
                wait_for(lambda: polled_by_all_since(handed), what=f"cycle {cycle}: polls after it")
            b = Pollers(server, tmp_path / "b.log")
            wait_for(lambda: len(owned_by(b)) == n // 2, what="both processes polling")
            a_owner = owned_by(a)[0]
            a.kill(signal.SIGKILL)
            killed_at = now()
            # Taken over once the dead process's leases (3 s) expire, at the
            # next tick: 8 s from the kill is "about two poll intervals" and more.
            wait_for(lambda: a_owner not in owners().values() and None not in owners().values(),
                     timeout=8, what="the survivor to take over the killed process's sources")
            wait_for(lambda: polled_by_all_since(killed_at + dt.timedelta(seconds=1), times=2),
                     what="two polls of every source after the kill")
        finally:
            a.kill()
            if b is not None:
                b.kill(signal.SIGTERM)
    twice = []
    for i in range(n):
        ts = [r["timestamp"] for r in series_rows(pg_dsn, t.machines[f"M{i}"], "temperature")]
        assert ts, f"source {i} never polled"
        gaps = [(b - a).total_seconds() for a, b in zip(ts, ts[1:])]
        if min(gaps) <= 0.5:
            twice.append(f"source {i} polled twice at once: {min(gaps):.3f} s apart")
        assert ts[-1] > killed_at + dt.timedelta(seconds=1), f"source {i} not polled after the kill"
    assert not twice, twice


def test_a_dead_device_does_not_delay_the_others(server, api, tenant, pg_dsn, tmp_path):
    """A device that accepts the connection and never answers holds its own
    poll for the 2 s timeout; the good device beside it is polled meanwhile,
    on its 1 s schedule, no slot missed."""
    import asyncio

    from peers import LoopThread
    lt = LoopThread()

    conns = []
    hangs: list[tuple[float, float]] = []  # (a request arrived, the poller gave up on it)

    async def black_hole():  # accepts connections, never answers
        async def handle(reader, writer):
            conns.append(writer)
            asked = None
            while await reader.read(1 << 16):
                asked = asked or time.time()
            if asked is not None:
                hangs.append((asked, time.time()))
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        return srv, srv.sockets[0].getsockname()[1]
    hole, hole_port = lt.call(black_hole())
    good_mid, dead_mid = tenant.machines["CNC-001"], tenant.machines["CNC-002"]
    try:
        with ModbusPeer([device(1, {100: 725})]) as peer:
            for mid, port in ((dead_mid, hole_port), (good_mid, peer.port)):
                body = {**MODBUS_BODY, "machine_id": str(mid), "port": port,
                        "poll_interval_seconds": 1}
                body["config"] = {**body["config"], "timeout_seconds": 2}
                assert api.post("/api/v1/ingest-sources", body).status_code == 201
            pollers = Pollers(server, tmp_path / "pollers.log")
            try:
                wait_for(lambda: len(hangs) >= 2, timeout=30, what="two polls of the dead device")
                # everything polled while they hung is stored by the next flush
                last = hangs[1][1]
                wait_for(lambda: (rows := series_rows(pg_dsn, good_mid, "temperature"))
                         and rows[-1]["timestamp"].timestamp() > last,
                         what="a poll of the good device after them")
            finally:
                pollers.kill(signal.SIGTERM)
    finally:
        lt.call(_close_server(hole, conns))
        lt.close()
    good = [r["timestamp"].timestamp() for r in series_rows(pg_dsn, good_mid, "temperature")]
    for asked, gave_up in hangs[:2]:
        assert [t for t in good if asked < t < gave_up], \
            f"the good device was not polled while the dead one hung ({asked}..{gave_up}): {good}"
    st = fetch(pg_dsn, "SELECT polls_missed FROM ingest_sources WHERE machine_id = $1", good_mid)
    assert st[0]["polls_missed"] == 0  # its schedule kept: no slot skipped
    assert series_rows(pg_dsn, dead_mid, "temperature") == []
    st = fetch(pg_dsn, "SELECT last_error FROM ingest_sources WHERE machine_id = $1", dead_mid)[0]
    assert st["last_error"] and str(hole_port) in st["last_error"]


async def _close_server(srv, conns):
    srv.close()
    for w in conns:
        w.close()
    await srv.wait_closed()


def test_the_address_policy_is_checked_again_at_poll_time(server, api, tenant, pg_dsn, tmp_path):
    # Created while 127.0.0.0/8 was allowed; a poller whose policy says
    # otherwise must refuse to connect (a name can also resolve differently later).
    mid = tenant.machines["PRESS-7"]
    with ModbusPeer([device(1, {100: 725})]) as peer:
        body = {**MODBUS_BODY, "machine_id": str(mid), "port": peer.port, "poll_interval_seconds": 1}
        src = api.post("/api/v1/ingest-sources", body).json()
        strict = type(server)({**server.env, "HALTLESS_POLL_ALLOW": "10.0.0.0/8"})
        pollers = Pollers(strict, tmp_path / "pollers.log")
        try:
            st = wait_for(lambda: (s := api.get(f"/api/v1/ingest-sources/{src['id']}").json()["status"])
                          ["last_error"] and s, what="refusal reported")
        finally:
            pollers.kill(signal.SIGTERM)
    assert "outside HALTLESS_POLL_ALLOW" in st["last_error"]
    assert series_rows(pg_dsn, mid, "temperature") == []


def test_a_device_answering_garbage_is_logged_once_by_name_without_hex_dumps(server, api, tenant,
                                                                             pg_dsn, tmp_path):
    import asyncio

    from peers import LoopThread
    lt = LoopThread()

    conns = []
    asked = []  # one per request

    async def garbage():  # answers every request with bytes that are not Modbus
        async def handle(reader, writer):
            conns.append(writer)
            while await reader.read(1 << 16):
                asked.append(1)
                writer.write(b"\x00\x01\xde\xad\xbe\xef garbage \xff" * 3)
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        return srv, srv.sockets[0].getsockname()[1]
    srv, port = lt.call(garbage())
    mid = tenant.machines["CNC-002"]
    try:
        body = {**MODBUS_BODY, "machine_id": str(mid), "port": port, "poll_interval_seconds": 1}
        body["config"] = {**body["config"], "timeout_seconds": 0.5}
        src = api.post("/api/v1/ingest-sources", body).json()
        res = api.post(f"/api/v1/ingest-sources/{src['id']}/test-connection", {}).json()
        assert res["success"] is False
        pollers = Pollers(server, tmp_path / "pollers.log")
        try:
            wait_for(lambda: src["id"] in pollers.log(), what="the source's failure logged")
            # Several more failed polls: a poll's request comes once the one
            # before it has failed (and was logged, or not), so two more are
            # done when the third more request arrives.
            more = len(asked) + 3
            wait_for(lambda: len(asked) >= more, timeout=30, what="three more requests")
        finally:
            pollers.kill(signal.SIGTERM)
    finally:
        lt.call(_close_server(srv, conns))
        lt.close()
    log = pollers.log()
    named = [ln for ln in log.splitlines() if src["id"] in ln and "WARNING" in ln]
    assert len(named) == 1, log  # once per change of state, not once per poll
    assert f"127.0.0.1:{port}" in named[0]
    for noise in ("pymodbus", "0xde", "0xad", "Processing:"):
        assert noise not in log and noise not in server.log(), noise


def test_polls_are_committed_together_each_flush_and_a_stop_flushes_first(server, api, tenant,
                                                                          pg_dsn, tmp_path):
    # Polled every second, flushed every 4 s: hot rows of several readings
    # each (one per flush and series, not one per poll), and SIGTERM commits
    # what was polled since the last flush before the process exits.
    mid = tenant.machines["PRESS-7"]
    with ModbusPeer([device(1, {100: 725, 101: 42})]) as peer:
        body = {**MODBUS_BODY, "machine_id": str(mid), "port": peer.port,
                "poll_interval_seconds": 1}
        src = api.post("/api/v1/ingest-sources", body).json()
        pollers = Pollers(server, tmp_path / "pollers.log", flush="4")
        try:
            first = wait_for(lambda: len(series_rows(pg_dsn, mid, "temperature")), what="a flush")
            assert first >= 3, first  # ~4 s of polls at once, not one by one
            # Polled since the last flush, not committed yet: 3 more requests
            # than stored readings are 2 polls done (one may be in flight) ...
            seen = {}

            def uncommitted() -> bool:
                seen["committed"] = len(series_rows(pg_dsn, mid, "temperature"))
                return peer.requests - seen["committed"] >= 3
            wait_for(uncommitted, what="polls since the last flush")
        finally:
            pollers.kill(signal.SIGTERM)  # ... until the stop, which commits them
        api.patch(f"/api/v1/ingest-sources/{src['id']}", {"is_active": False})
    ts = [r["timestamp"] for r in series_rows(pg_dsn, mid, "temperature")]
    assert len(ts) >= seen["committed"] + 2, (seen, len(ts))
    rows = fetch(pg_dsn, "SELECT n FROM reading_chunks c JOIN series s ON s.id = c.series_id"
                 " WHERE s.machine_id = $1 AND s.metric_name = 'temperature'", mid)
    assert sum(r["n"] for r in rows) == len(ts)
    assert max(r["n"] for r in rows) >= 3, [r["n"] for r in rows]
    st = api.get(f"/api/v1/ingest-sources/{src['id']}").json()["status"]
    total = fetch(pg_dsn, "SELECT count(*) FROM readings WHERE machine_id = $1", mid)[0][0]
    assert st["readings_written"] == total  # reported once committed, every one of them


def test_the_flusher_commits_in_one_group_reports_each_poll_and_a_failure_to_each(pg_dsn):
    # The Flusher of `haltless pollers` with the real writer: one commit per
    # flush for every poll buffered, each poll told once (None: committed);
    # when the database is gone, each is told the error and nothing is kept
    # to be written twice later.
    import asyncio
    import datetime as dt

    import asyncpg

    from haltless.server.direct import Flusher
    from haltless.server.ingest import Ingestor
    from haltless.server.writer import GroupCommitWriter
    from haltless.core.wire import Reading
    t = make_tenant(pg_dsn, machines=("FL-1",))
    now = dt.datetime.now(dt.timezone.utc)

    async def go():
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
        writer = GroupCommitWriter(pool, connections=1)
        ingestor = Ingestor(pool, writer)
        flusher = Flusher(writer, every=3600)
        told: list = []
        for poll in range(5):
            readings = [Reading("FL-1", now - dt.timedelta(seconds=5 - poll), f"m{j}", float(poll))
                        for j in range(3)]
            payload, result, _ = await ingestor.prepare(t.org_id, readings)
            flusher.add(payload, lambda exc, p=poll: told.append((p, exc)))
        assert told == []  # buffered, not committed yet
        await flusher.flush()
        first = list(told)
        n = await pool.fetchval("SELECT count(*) FROM readings WHERE org_id = $1", t.org_id)
        rows = await pool.fetch("SELECT c.n FROM reading_chunks c JOIN series s ON s.id = c.series_id"
                                " JOIN machines m ON m.id = s.machine_id WHERE m.org_id = $1",
                                t.org_id)
        payload, *_ = await ingestor.prepare(t.org_id, [Reading("FL-1", now, "m0", 9.0)])
        await pool.close()  # no connection to be had any more
        flusher.add(payload, lambda exc: told.append(("late", exc)))
        await asyncio.wait_for(flusher.stop(), 30)
        await writer.close()
        return first, n, sorted(r["n"] for r in rows), told[len(first):], flusher.items
    first, n, per_row, late, left = run(go())
    assert first == [(p, None) for p in range(5)]
    assert n == 15 and per_row == [5, 5, 5]  # one row per series: the 5 polls merged
    assert len(late) == 1 and late[0][0] == "late" and late[0][1] is not None
    assert left == []
