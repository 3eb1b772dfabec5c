"""OPC-UA subscriptions end to end: the management API (config checks,
test-connection), `haltless pollers` processes and the edge agent against an
asyncua server in a process of its own (tests/opcua_device.py), which the
tests kill with SIGKILL and start again on the same port, and which records
every subscription clients made and deleted."""
from __future__ import annotations

import datetime as dt
import itertools
import re
import signal
import subprocess
import textwrap
import uuid

import pytest
from haltless.core.errors import ConfigError
from haltless.pollers.agent_config import load_config
from helpers import HALTLESS, ROOT, ServerProcess, fetch, make_tenant, wait_for
from peers import OpcuaDevice
from test_agent import AgentProcess, agent_queue, assert_exactly_once, spooled_total
from test_management import Api
from test_pollers import Pollers, series_rows

UTC = dt.UTC


@pytest.fixture(autouse=True)
def only_this_tests_sources(pg_dsn):
    fetch(pg_dsn, "UPDATE ingest_sources SET is_active = false")
    yield
    fetch(pg_dsn, "UPDATE ingest_sources SET is_active = false")


def body(machine_id, port: int, nodes=(0,), **cfg) -> dict:
    return {"machine_id": str(machine_id), "name": f"line {uuid.uuid4().hex[:6]}", "protocol": "opcua",
            "host": "127.0.0.1", "port": port, "poll_interval_seconds": 1, "is_active": True,
            "config": {"mode": "subscribe", "publishing_interval_ms": 500,
                       "nodes": [{"node_id": f"ns=2;s=Sub.Counter{k}", "metric_name": f"counter{k}",
                                  "sampling_interval_ms": 100} for k in nodes], **cfg}}


def status(api, sid) -> dict:
    return api.get(f"/api/v1/ingest-sources/{sid}").json()["status"]


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def assert_consecutive(rows) -> None:
    """Every value the device counted while subscribed to, once, in order."""
    values = [r["value"] for r in rows]
    assert values == [values[0] + i for i in range(len(values))], values
    stamps = [r["timestamp"] for r in rows]
    assert stamps == sorted(set(stamps))


# ------------------------------------------------------------------ management API

@pytest.mark.parametrize("change, field, says", [
    ({"mode": "poll"}, "config.nodes[0].sampling_interval_ms", 'takes effect only with mode "subscribe"'),
    ({"nodes": [{"node_id": "ns=2;s=A", "metric_name": "a", "deadband_absolute": 1,
                 "deadband_percent": 2}]}, "config.nodes[0].deadband_percent",
     "set deadband_absolute or deadband_percent, not both"),
    ({"nodes": [{"node_id": "ns=2;s=A", "metric_name": "a", "deadband_percent": 150}]},
     "config.nodes[0].deadband_percent", "<= 100"),
    ({"nodes": [{"node_id": "ns=2;s=A", "metric_name": "a", "deadband_absolute": -1}]},
     "config.nodes[0].deadband_absolute", ">= 0"),
    ({"nodes": [{"node_id": "ns=2;s=A", "metric_name": "a", "queue_size": 0}]},
     "config.nodes[0].queue_size", ">= 1"),
    ({"publishing_interval_ms": 5}, "config.publishing_interval_ms", ">= 10"),
    ({"mode": "push"}, "config.mode", "poll"),
    ({"nodes": [{"node_id": "ns=2;s=A", "metric_name": "a", "deadband": 1}]}, "config.nodes[0]",
     "deadband"),
])
def test_subscribe_settings_are_checked_and_a_mistake_is_a_422_naming_the_field(server, tenant, change,
                                                                               field, says):
    api = Api(server, server.token(tenant.org_id))
    b = body(tenant.machines["CNC-001"], 4840)
    b["config"] = {**b["config"], **change}
    r = api.post("/api/v1/ingest-sources", b)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(field) and says in detail, detail
    # the same check on PATCH
    good = api.post("/api/v1/ingest-sources", body(tenant.machines["CNC-001"], 4840)).json()
    r = api.patch(f"/api/v1/ingest-sources/{good['id']}", {"config": b["config"]})
    assert r.status_code == 422 and r.json()["detail"] == detail


def test_test_connection_subscribes_waits_for_the_first_notification_and_deletes_it(server, tenant,
                                                                                    tmp_path):
    api = Api(server, server.token(tenant.org_id))
    with OpcuaDevice(tmp_path) as dev:
        src = api.post("/api/v1/ingest-sources", body(tenant.machines["CNC-001"], dev.port, (0, 1))).json()
        res = api.post(f"/api/v1/ingest-sources/{src['id']}/test-connection").json()
        assert res["success"] is True, res
        assert re.fullmatch(r"Subscribed successfully: first notification after \d+ ms", res["message"])
        assert res["latency_ms"] > 0
        # seen from the device: one subscription on both nodes, deleted again
        wait_for(lambda: dev.events() and not dev.live(), what="the subscription deleted")
        made = {e["subscription"] for e in dev.events() if e["event"] == "created"}
        assert len(made) == 1
        assert [e["nodes"] for e in dev.events() if e["event"] == "deleted"] == [
            ["Sub.Counter0", "Sub.Counter1"]]

        b = body(tenant.machines["CNC-001"], dev.port, (0,))
        b["config"]["nodes"].append({"node_id": "ns=2;s=Sub.Nope", "metric_name": "nope"})
        bad = api.post("/api/v1/ingest-sources", b).json()
        res = api.post(f"/api/v1/ingest-sources/{bad['id']}/test-connection").json()
        assert res["success"] is False
        assert "subscribed, but 1 of 2 points failed" in res["message"]
        assert "ns2_sSub.Nope (nope): node ns=2;s=Sub.Nope does not exist on the server" in res["message"]
    res = api.post(f"/api/v1/ingest-sources/{src['id']}/test-connection").json()
    assert res["success"] is False and "refused" in res["message"]


# ------------------------------------------------------------------ haltless pollers

def test_pollers_store_every_change_of_a_subscribed_source_and_report_it(server, tenant, pg_dsn,
                                                                         tmp_path):
    api = Api(server, server.token(tenant.org_id))
    mid = tenant.machines["CNC-001"]
    with OpcuaDevice(tmp_path, nodes=2) as dev:
        src = api.post("/api/v1/ingest-sources", body(mid, dev.port, (0, 1))).json()
        pollers = Pollers(server, tmp_path / "pollers.log")
        try:
            wait_for(lambda: len(series_rows(pg_dsn, mid, "counter1")) >= 30, timeout=40,
                     what="30 changes stored")
            st = wait_for(lambda: (s := status(api, src["id"]))["readings_written"] >= 30 and s,
                          what="the status")
        finally:
            pollers.kill(signal.SIGTERM)
    for metric in ("counter0", "counter1"):
        rows = series_rows(pg_dsn, mid, metric)
        assert_consecutive(rows)
        assert rows[0]["raw_tag"] == f"ns2_sSub.{metric.capitalize()}"
    assert st["last_error"] is None and st["last_poll_at"] and st["last_success_at"]
    assert st["polled_by"] and st["points_failed"] == 0
    assert st["gap_started_at"] is None and st["gap_ended_at"] is None


def test_a_device_killed_and_restarted_is_subscribed_again_by_the_same_poller_process(
        server, tenant, pg_dsn, tmp_path):
    api = Api(server, server.token(tenant.org_id))
    mid = tenant.machines["CNC-002"]
    dev = OpcuaDevice(tmp_path, nodes=1).start()
    src = api.post("/api/v1/ingest-sources", body(mid, dev.port)).json()
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        wait_for(lambda: len(series_rows(pg_dsn, mid, "counter0")) >= 5, what="readings")
        dev.kill()  # SIGKILL: no goodbye to the client
        st = wait_for(lambda: (s := status(api, src["id"]))["last_error"] and s["gap_started_at"] and s,
                      what="the loss in the status")
        assert st["gap_ended_at"] is None and str(dev.port) in st["last_error"]
        restarted = now()
        dev.start()  # the same port
        wait_for(lambda: [r for r in series_rows(pg_dsn, mid, "counter0")
                          if r["timestamp"] > restarted], timeout=40, what="readings after the restart")
        st = wait_for(lambda: (s := status(api, src["id"]))["gap_ended_at"] and s["last_error"] is None
                      and s, what="the gap's end in the status")
        assert pollers.proc.poll() is None  # the same process, never restarted
    finally:
        pollers.kill(signal.SIGTERM)
        dev.kill()
    since = dt.datetime.fromisoformat(st["gap_started_at"])
    until = dt.datetime.fromisoformat(st["gap_ended_at"])
    assert since < restarted < until
    rows = series_rows(pg_dsn, mid, "counter0")
    before = [r for r in rows if r["timestamp"] <= since]
    after = [r for r in rows if r["timestamp"] > since]
    assert before and after and not [r for r in rows if since < r["timestamp"] < restarted]
    assert_consecutive(before)
    assert_consecutive(after)
    log = pollers.log()
    assert f"source {src['id']}" in log and "data again" in log


def test_two_poller_processes_hand_subscriptions_over_and_no_two_ever_overlap(server, pg_dsn,
                                                                             tmp_path):
    n = 4
    t = make_tenant(pg_dsn, machines=[f"S{i}" for i in range(n)])
    api = Api(server, server.token(t.org_id))
    with OpcuaDevice(tmp_path, nodes=n) as dev:
        ids = [api.post("/api/v1/ingest-sources", body(t.machines[f"S{i}"], dev.port, (i,))).json()["id"]
               for i in range(n)]

        def owned_by(p) -> int:
            rows = fetch(pg_dsn, "SELECT lease_owner FROM ingest_sources WHERE id = ANY($1::uuid[])",
                         [uuid.UUID(i) for i in ids])
            return sum(1 for r in rows if r[0] and r[0].split(":")[1] == str(p.proc.pid))

        def all_stored_since(when) -> bool:
            return all(fetch(pg_dsn, "SELECT count(*) FROM readings WHERE machine_id = $1"
                             " AND timestamp > $2", t.machines[f"S{i}"], when)[0][0] >= 3
                       for i in range(n))

        a = Pollers(server, tmp_path / "a.log")
        b = None
        try:
            wait_for(lambda: owned_by(a) == n, what="the first process holding everything")
            mark = now()
            wait_for(lambda: all_stored_since(mark), what="every source stored")
            b = Pollers(server, tmp_path / "b.log")
            wait_for(lambda: owned_by(a) == n // 2 and owned_by(b) == n // 2, what="half handed over")
            mark = now()
            wait_for(lambda: all_stored_since(mark), what="every source stored after the hand-over")
            b.kill(signal.SIGTERM)
            wait_for(lambda: owned_by(a) == n, what="all handed back")
            mark = now()
            wait_for(lambda: all_stored_since(mark), what="every source stored after the hand-back")
        finally:
            a.kill(signal.SIGTERM)
            if b is not None:
                b.kill(signal.SIGTERM)
        wait_for(lambda: not dev.live(), what="every subscription deleted")
        events = dev.events()
    # Seen from the device: per node, subscriptions one after another, each
    # deleted (not left to expire) before the next was created.
    spans: dict[str, list] = {}
    created = {}
    for e in events:
        if e["event"] == "created":
            created[e["subscription"]] = e["at"]
        elif e["event"] == "deleted":
            for node in e["nodes"]:
                spans.setdefault(node, []).append((created[e["subscription"]], e["at"]))
    assert sorted(spans) == [f"Sub.Counter{i}" for i in range(n)]
    handed = 0
    for node, s in spans.items():
        s.sort()
        assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(s)), f"{node}: overlapping {s}"
        assert len(s) in (1, 3), (node, s)  # kept by the first process, or there and back
        handed += len(s) == 3
    assert handed == n // 2


# ------------------------------------------------------------------ the edge agent

def agent_toml(tmp_path, url, key, port) -> object:
    f = tmp_path / "agent.toml"
    f.write_text(textwrap.dedent(f'''
        api_url = "{url}"
        api_key = "{key}"
        state_dir = "state"
        status_interval = 1

        [[source]]
        name = "line"
        machine_identifier = "CNC-001"
        protocol = "opcua"

        [source.opcua]
        endpoint = "opc.tcp://127.0.0.1:{port}"
        mode = "subscribe"
        publishing_interval_ms = 500
        timeout_seconds = 2

        [[source.opcua.nodes]]
        node_id = "ns=2;s=Sub.Counter0"
        metric_name = "counter0"
        sampling_interval_ms = 100

        [[source.opcua.nodes]]
        node_id = "ns=2;s=Sub.Counter1"
        metric_name = "counter1"
        sampling_interval_ms = 100
        deadband_absolute = 0.5
        '''))
    return f


def test_agent_subscribes_and_stores_and_forwards_through_server_and_device_outages(pg_dsn, tmp_path):
    t = make_tenant(pg_dsn, machines=("CNC-001",))
    srv = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn}, data_dir=tmp_path / "srv")
    srv.start(tmp_path / "server.log")
    dev = OpcuaDevice(tmp_path, nodes=2).start()
    agent = AgentProcess(agent_toml(tmp_path, srv.url, t.key, dev.port), tmp_path / "agent.log")
    try:
        wait_for(lambda: t.count(pg_dsn) >= 20, what="readings delivered")
        srv.stop()  # the ingest API goes away: readings queue on disk
        wait_for(lambda: spooled_total(tmp_path)[1] > 20, what="readings queued")
        dev.kill()  # and the device, meanwhile
        wait_for(lambda: "no data since" in agent.log(), what="the gap logged")
        restarted = now()
        dev.start()
        wait_for(lambda: "data again" in agent.log(), timeout=40, what="the device subscribed again")
        srv.start(tmp_path / "server.log")
        wait_for(lambda: agent_queue(tmp_path)[0] == 0 and fetch(
            pg_dsn, "SELECT count(*) FROM readings WHERE org_id = $1 AND timestamp > $2", t.org_id,
            restarted)[0][0] >= 10, timeout=60, what="the queue drained, readings after the restart in")
        assert agent.proc.poll() is None  # the same agent process throughout
    finally:
        agent.stop()
        dev.kill()
        srv.stop()
    assert_exactly_once(pg_dsn, t, tmp_path)  # each change has its own SourceTimestamp
    mid = t.machines["CNC-001"]
    for metric in ("counter0", "counter1"):
        rows = series_rows(pg_dsn, mid, metric)
        gap = [r for r in rows if r["timestamp"] > restarted]
        assert_consecutive([r for r in rows if r["timestamp"] <= restarted])
        assert_consecutive(gap)
    prom = (tmp_path / "state" / "metrics.prom").read_text()
    assert re.search(r"^haltless_agent_subscribed_values_total [1-9]", prom, re.MULTILINE), prom


def test_agent_config_mistakes_in_subscribe_mode_name_the_file_and_key(tmp_path):
    f = agent_toml(tmp_path, "http://127.0.0.1:1", "hk_x", 4840)
    text = f.read_text()
    for edit, key in [
        (lambda s: s.replace("deadband_absolute = 0.5", "deadband_absolute = 0.5\ndeadband_percent = 3"),
         "opcua.nodes[1].deadband_percent: set deadband_absolute or deadband_percent, not both"),
        (lambda s: s.replace('mode = "subscribe"', 'mode = "poll"'),
         'opcua.nodes[0].sampling_interval_ms: takes effect only with mode "subscribe"'),
        (lambda s: s.replace("publishing_interval_ms = 500", "publishing_interval_ms = 1"),
         "opcua.publishing_interval_ms"),
    ]:
        f.write_text(edit(text))
        with pytest.raises(ConfigError) as e:
            load_config(f)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{f}: ") and key in msg, msg


def source_row(out: str) -> str:
    """The check table's row of the source "line"."""
    return next(ln for ln in out.splitlines() if ln.startswith("line "))


def test_agent_check_subscribes_to_each_subscribed_source_once_and_deletes_it(
        server, tenant, tmp_path):
    with OpcuaDevice(tmp_path, nodes=2) as dev:
        f = agent_toml(tmp_path, server.url, tenant.key, dev.port)
        p = subprocess.run(HALTLESS + ["agent", "--check", "--config", str(f)], cwd=ROOT,
                           check=False, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        line = source_row(p.stdout)
        assert " ok " in line, p.stdout
        assert re.search(r"Subscribed successfully: first notification after \d+ ms", line), line
        wait_for(lambda: dev.events() and not dev.live(), what="the subscription deleted")
        assert [e["nodes"] for e in dev.events() if e["event"] == "deleted"] == [
            ["Sub.Counter0", "Sub.Counter1"]]
    p = subprocess.run(HALTLESS + ["agent", "--check", "--config", str(f)], cwd=ROOT,
                       check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and " failed " in source_row(p.stdout), p.stdout
