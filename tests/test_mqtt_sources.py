"""MQTT sources end to end: sources created through the API, run by real
`haltless pollers` processes against a real mosquitto on 127.0.0.1, fed
by an edge node of our own (bench/sparkplug_edge.py: the same protobuf
schema, none of the host's code) and by plain MQTT clients for the json
format. Every wait is for something observable (a reading stored, a status
field, a message the edge node received), with a deadline."""
from __future__ import annotations

import datetime as dt
import json
import signal
import time
import uuid

import pytest

from helpers import fetch, make_tenant, wait_for
from mosquitto import Mosquitto, make_tls
from peers import LoopThread
from test_management import Api
from test_pollers import Pollers

from bench.sparkplug_edge import (BOOLEAN, DATASET, DOUBLE, FLOAT, INT8, INT16, INT32, INT64,
                                  STRING, TEMPLATE, UINT16, UINT64, EdgeNode)

GROUP = "Plant1"


@pytest.fixture(autouse=True)
def only_this_tests_sources(pg_dsn):
    """Sources other tests left behind would be run (and counted) too."""
    fetch(pg_dsn, "UPDATE ingest_sources SET is_active = false")
    yield
    fetch(pg_dsn, "UPDATE ingest_sources SET is_active = false")


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def lt():
    """An event loop in a thread for the edge nodes (and MQTT clients) of a
    test; edge nodes made by ``edge`` are disconnected at its end."""
    loop = LoopThread()
    loop.nodes = []
    yield loop
    for node in loop.nodes:
        loop.call(node.shutdown())
    loop.close()


def edge(lt, *args, **kw) -> EdgeNode:
    node = EdgeNode(*args, **kw)
    lt.nodes.append(node)
    return node


@pytest.fixture
def api(server, tenant):
    return Api(server, server.token(tenant.org_id))


def mqtt_source(api, port: int, machine_id=None, name="plant broker", **config) -> dict:
    body = {"name": name, "protocol": "mqtt", "host": "127.0.0.1", "port": port,
            "poll_interval_seconds": 1, "is_active": True,
            "config": {"format": "sparkplug_b", "group_id": GROUP, **config}}
    if machine_id is not None:
        body["machine_id"] = str(machine_id)
    r = api.post("/api/v1/ingest-sources", body)
    assert r.status_code == 201, r.text
    return r.json()


def status(api, src) -> dict:
    return api.get(f"/api/v1/ingest-sources/{src['id']}").json()["status"]


def wait_status(api, src, pred, what: str, timeout: float = 20) -> dict:
    return wait_for(lambda: (s := status(api, src)) and pred(s) and s, timeout=timeout, what=what)


def rows(dsn, org, machine, metric=None) -> list:
    sql = ("SELECT metric_name, value, unit, raw_tag, timestamp FROM readings"
           " WHERE org_id = $1 AND machine_identifier = $2")
    args = [org, machine]
    if metric is not None:
        sql += " AND metric_name = $3"
        args.append(metric)
    return fetch(dsn, sql + " ORDER BY timestamp, metric_name", *args)


def values(dsn, org, machine, metric) -> list[float]:
    return [r["value"] for r in rows(dsn, org, machine, metric)]


def node_state(st: dict, node: str = "Node1") -> dict | None:
    return next((n for n in st["mqtt"]["nodes"] if n["edge_node_id"] == node), None)


def connected(api, src) -> dict:
    return wait_status(api, src, lambda s: s["mqtt"]["connected"], "the source to connect")


# ------------------------------------------------------------------ Sparkplug B

def test_sparkplug_births_and_data_become_readings_of_each_device(server, api, pg_dsn, broker, lt,
                                                                  tmp_path):
    t = make_tenant(pg_dsn, machines=("Node1", "Pump1", "Mixer2"))
    api = Api(server, server.token(t.org_id))
    src = mqtt_source(api, broker.port, host_id="haltless-test")
    devices = {
        "Pump1": [("speed", DOUBLE), ("temp", FLOAT), ("count", INT16), ("offset", INT8),
                  ("delta", INT32), ("big", INT64), ("u16", UINT16), ("u64", UINT64),
                  ("running", BOOLEAN), ("label", STRING), ("table", DATASET),
                  ("udt", TEMPLATE)],
        "Mixer2": [("level", DOUBLE)],
        "Ghost9": [("level", DOUBLE)],  # no such machine: its readings fail, the others go on
    }
    node = edge(lt, broker.port, GROUP, "Node1", devices, metrics=[("uptime", INT64)],
                    units={("Pump1", "temp"): "celsius"})
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        connected(api, src)
        lt.call(node.connect())
        lt.call(node.birth({("Pump1", "speed"): 1500.5, ("Pump1", "offset"): -3,
                            ("Pump1", "running"): True}))
        now = int(time.time() * 1000)
        past, later = now - 60_000, now + 1000  # the data's own timestamps
        lt.call(node.data("Pump1", ts=later, values={"speed": 1400.25, "temp": 71.5, "count": -300,
                                    "offset": -128, "delta": -70000, "big": -(2 ** 40),
                                    "u16": 65535, "u64": 2 ** 53, "running": False,
                                    "label": "hello", "table": 7, "udt": "T"}))
        lt.call(node.data("Pump1", {"speed": None}))  # is_null: no reading

        def historical(p):  # a stored-and-forwarded value from a minute ago
            m = p.metrics.add(alias=node.alias[("Pump1", "speed")], timestamp=past,
                              is_historical=True)
            m.double_value = 999.0
        lt.call(node.data("Pump1", {}, extra=historical))
        lt.call(node.data("Mixer2", {"level": 42.0}))
        lt.call(node.data("Ghost9", {"level": 1.0}))
        lt.call(node.data(None, {"uptime": 3600}))
        wait_for(lambda: values(pg_dsn, t.org_id, "Node1", "uptime") == [0.0, 3600.0],
                 what="the node's own metric, birth and NDATA")
        speed = rows(pg_dsn, t.org_id, "Pump1", "speed")
        assert [r["value"] for r in speed] == [999.0, 1500.5, 1400.25]
        assert speed[0]["timestamp"] == dt.datetime.fromtimestamp(past / 1000, dt.timezone.utc)
        assert speed[1]["raw_tag"] == "Plant1/Node1/Pump1" and speed[1]["unit"] is None
        at_later = dt.datetime.fromtimestamp(later / 1000, dt.timezone.utc)
        got = {r["metric_name"]: r["value"] for r in rows(pg_dsn, t.org_id, "Pump1")
               if r["timestamp"] == at_later}
        assert got == {"speed": 1400.25, "temp": 71.5, "count": -300.0, "offset": -128.0,
                       "delta": -70000.0, "big": float(-(2 ** 40)), "u16": 65535.0,
                       "u64": float(2 ** 53), "running": 0.0}
        assert values(pg_dsn, t.org_id, "Pump1", "offset") == [-3.0, -128.0]
        assert values(pg_dsn, t.org_id, "Pump1", "running") == [1.0, 0.0]
        assert {r["unit"] for r in rows(pg_dsn, t.org_id, "Pump1", "temp")} == {"celsius"}
        assert values(pg_dsn, t.org_id, "Mixer2", "level") == [0.0, 42.0]
        st = wait_status(api, src, lambda s: s["points_failed"] >= 2, "Ghost9's failed points")
        assert st["points_failed"] == 2  # its DBIRTH's and DDATA's level, nothing else
        assert "Ghost9" in st["last_error"] and "Machine not found" in st["last_error"]
        m = st["mqtt"]
        assert m["connected"] and m["discarded"] == 0 and m["rebirths_requested"] == 0
        # label, table and udt in the DBIRTH and the DDATA; speed's null
        assert m["skipped"] == {"string": 2, "dataset": 2, "template": 2, "null": 1}
        n = node_state(st)
        assert n["online"] and n["group_id"] == GROUP and n["bd_seq"] == 0
        assert not n["awaiting_rebirth"]
        assert {d["device_id"]: d["online"] for d in n["devices"]} == {
            "Pump1": True, "Mixer2": True, "Ghost9": True}
        assert m["messages"] == 10 and m["nodes_total"] == 1
        assert not node.ncmds  # no rebirth was needed
    finally:
        pollers.kill(signal.SIGTERM)


def rebirth_asked(node: EdgeNode) -> int:
    return sum(1 for p in node.ncmds for m in p.metrics
               if m.name == "Node Control/Rebirth" and m.boolean_value)


def test_a_host_that_joins_late_asks_for_a_rebirth_and_then_stores_the_data(server, api, tenant,
                                                                            pg_dsn, broker, lt,
                                                                            tmp_path):
    """The edge node was born before the poller subscribed: its DDATA carry
    aliases the poller never learnt. The first is discarded (counted), an
    NCMD Node Control/Rebirth goes out, and the data after the new births
    is stored."""
    src = mqtt_source(api, broker.port)
    node = edge(lt, broker.port, GROUP, "Node1", {"CNC-001": [("temperature", DOUBLE)]})
    lt.call(node.connect())
    lt.call(node.birth())
    lt.call(node.data("CNC-001", {"temperature": 1.0}))  # nobody listening yet
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        connected(api, src)
        lt.call(node.data("CNC-001", {"temperature": 2.0}))
        wait_for(lambda: node.rebirths == 1, what="the rebirth request to reach the edge node")
        assert rebirth_asked(node) == 1
        lt.call(node.data("CNC-001", {"temperature": 3.0}))
        wait_for(lambda: values(pg_dsn, tenant.org_id, "CNC-001", "temperature") == [0.0, 3.0],
                 what="the rebirth's DBIRTH value and the data after it")
        st = wait_status(api, src, lambda s: s["mqtt"]["rebirths_requested"] == 1
                         and s["mqtt"]["discarded"] == 1, "the discard counted")
        n = node_state(st)
        assert n["online"] and not n["awaiting_rebirth"]
        assert [d["device_id"] for d in n["devices"] if d["online"]] == ["CNC-001"]
    finally:
        pollers.kill(signal.SIGTERM)


def test_a_sequence_gap_or_an_unknown_alias_discards_the_node_until_its_rebirth(
        server, api, tenant, pg_dsn, broker, lt, tmp_path):
    src = mqtt_source(api, broker.port)
    node = edge(lt, broker.port, GROUP, "Node1", {"CNC-001": [("temperature", DOUBLE)],
                                                  "CNC-002": [("temperature", DOUBLE)]},
                auto_rebirth=False)
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        connected(api, src)
        lt.call(node.connect())
        lt.call(node.birth())
        lt.call(node.data("CNC-001", {"temperature": 1.0}))
        wait_for(lambda: values(pg_dsn, tenant.org_id, "CNC-001", "temperature") == [0.0, 1.0],
                 what="data before the gap")
        lt.call(node.data("CNC-001", {"temperature": 66.0}, skip_seq=True))  # one message lost
        wait_for(lambda: rebirth_asked(node) == 1, what="a rebirth request after the gap")
        # Until the rebirth comes, the whole node is discarded, its other device too.
        lt.call(node.data("CNC-002", {"temperature": 67.0}))
        wait_status(api, src, lambda s: s["mqtt"]["discarded"] == 2
                    and node_state(s)["awaiting_rebirth"], "both messages discarded")
        lt.call(node.birth({("CNC-001", "temperature"): 5.0}))
        lt.call(node.data("CNC-002", {"temperature": 6.0}))
        wait_for(lambda: values(pg_dsn, tenant.org_id, "CNC-002", "temperature")[-1:] == [6.0],
                 what="data after the rebirth")
        assert values(pg_dsn, tenant.org_id, "CNC-001", "temperature") == [0.0, 1.0, 5.0]
        assert values(pg_dsn, tenant.org_id, "CNC-002", "temperature") == [0.0, 0.0, 6.0]

        def unknown_alias(p):
            p.metrics.add(alias=999, double_value=1.0)
        lt.call(node.data("CNC-001", {"temperature": 68.0}, extra=unknown_alias))
        wait_for(lambda: rebirth_asked(node) == 2, what="a rebirth request for the unknown alias")
        st = wait_status(api, src, lambda s: s["mqtt"]["discarded"] == 3, "the message discarded")
        assert st["mqtt"]["rebirths_requested"] == 2 and node_state(st)["awaiting_rebirth"]
        assert 68.0 not in values(pg_dsn, tenant.org_id, "CNC-001", "temperature")
        assert 66.0 not in values(pg_dsn, tenant.org_id, "CNC-001", "temperature")
    finally:
        pollers.kill(signal.SIGTERM)


def test_deaths_mark_devices_and_nodes_offline_and_a_stale_will_is_ignored(
        server, api, tenant, pg_dsn, broker, lt, tmp_path):
    src = mqtt_source(api, broker.port)
    node = edge(lt, broker.port, GROUP, "Node1", {"CNC-001": [("temperature", DOUBLE)],
                                                  "CNC-002": [("temperature", DOUBLE)]})
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        connected(api, src)
        lt.call(node.connect())
        lt.call(node.birth())
        lt.call(node.ddeath("CNC-002"))
        st = wait_status(api, src, lambda s: (n := node_state(s)) and len(n["devices"]) == 2
                         and not [d for d in n["devices"] if d["device_id"] == "CNC-002"][0]["online"],
                         "CNC-002 offline")
        assert node_state(st)["online"] and node_state(st)["bd_seq"] == 0
        # the node's connection dies: the broker publishes its will (NDEATH, bdSeq 0)
        lt.call(node.die())
        st = wait_status(api, src, lambda s: not node_state(s)["online"], "the node offline")
        assert not [d for d in node_state(st)["devices"] if d["online"]]
        # a new session (bdSeq 1) is born; a late copy of the old will must not kill it
        lt.call(node.connect())
        lt.call(node.birth())
        wait_status(api, src, lambda s: node_state(s)["online"] and node_state(s)["bd_seq"] == 1,
                    "the node online again")
        stale = node._death.__func__  # the NDEATH payload of bdSeq 0, sent by hand
        node.bd_seq = 0
        payload = stale(node)
        node.bd_seq = 1
        lt.call(_publish(node, node.topic("NDEATH"), payload))
        st = wait_status(api, src, lambda s: s["mqtt"]["skipped"].get("stale_death") == 1,
                         "the stale NDEATH counted")
        assert node_state(st)["online"]
        lt.call(node.close())  # NDEATH of bdSeq 1, then DISCONNECT
        wait_status(api, src, lambda s: not node_state(s)["online"], "the node offline at its NDEATH")
    finally:
        pollers.kill(signal.SIGTERM)


async def _publish(node, topic, payload, qos=0):
    node.client.publish(topic, payload, qos=qos)


class Listener:
    """A plain MQTT client of the test's, recording what it receives."""

    def __init__(self, lt, port: int, topic: str) -> None:
        import gmqtt
        self.lt, self.got = lt, []
        self.client = gmqtt.Client(f"listener-{uuid.uuid4().hex[:6]}")

        def on_message(client, topic, payload, qos, properties):
            self.got.append((topic, payload, bool(properties.get("retain"))))
            return 0
        self.client.on_message = on_message

        async def go():
            await self.client.connect("127.0.0.1", port)
            self.client.subscribe(topic, qos=1)
        lt.call(go())

    def states(self) -> list[dict]:
        return [json.loads(p) for _, p, _ in self.got]

    def close(self) -> None:
        self.lt.call(self.client.disconnect())


def test_the_primary_host_says_online_on_connect_and_offline_on_stop_or_death(
        server, api, tenant, broker, lt, tmp_path):
    """Sparkplug 3.0 host session establishment: STATE birth (retained, QoS
    1) after subscribing, with the timestamp of the will registered in
    CONNECT; an offline STATE on our topic is answered with online again;
    a clean stop publishes offline; a killed poller's will does."""
    src = mqtt_source(api, broker.port, host_id="scada")
    listener = Listener(lt, broker.port, "spBv1.0/STATE/scada")
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        wait_for(lambda: listener.states()[-1:] and listener.states()[-1]["online"],
                 what="STATE online")
        born = listener.states()[-1]["timestamp"]
        assert abs(born / 1000 - time.time()) < 60
        # Someone (a stale will) says we are offline: we say online again, same timestamp.
        lt.call(_publish_json(listener.client, "spBv1.0/STATE/scada",
                              {"online": False, "timestamp": born}))
        wait_for(lambda: len(listener.states()) >= 3 and listener.states()[-1]["online"],
                 what="STATE online again")
        assert listener.states()[-1] == {"online": True, "timestamp": born}
        pollers.kill(signal.SIGTERM)
        assert listener.states()[-1]["online"] is False  # published before the DISCONNECT
        assert listener.states()[-1]["timestamp"] >= born
        pollers = Pollers(server, tmp_path / "pollers2.log")
        wait_for(lambda: listener.states()[-1]["online"], what="STATE online after a restart")
        reborn = listener.states()[-1]["timestamp"]
        assert reborn > born
        connected(api, src)
        pollers.kill(signal.SIGKILL)
        wait_for(lambda: listener.states()[-1]["online"] is False, what="the will: offline")
        assert listener.states()[-1]["timestamp"] == reborn  # the will of that CONNECT
        late = Listener(lt, broker.port, "spBv1.0/STATE/scada")  # retained: what a newcomer sees
        wait_for(lambda: late.got, what="the retained STATE")
        assert late.got[0][2] and late.states()[0] == {"online": False, "timestamp": reborn}
        late.close()
    finally:
        pollers.kill(signal.SIGTERM)
        listener.close()


async def _publish_json(client, topic, doc, qos=1, retain=True):
    client.publish(topic, json.dumps(doc).encode(), qos=qos, retain=retain)


def test_a_broker_killed_and_restarted_is_reconnected_without_restarting_the_poller(
        server, api, tenant, pg_dsn, broker, lt, tmp_path):
    src = mqtt_source(api, broker.port, host_id="scada")
    node = edge(lt, broker.port, GROUP, "Node1", {"CNC-001": [("temperature", DOUBLE)]})
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        connected(api, src)
        lt.call(node.connect())
        lt.call(node.birth())
        lt.call(node.data("CNC-001", {"temperature": 1.0}))
        wait_for(lambda: values(pg_dsn, tenant.org_id, "CNC-001", "temperature") == [0.0, 1.0],
                 what="data before the broker dies")
        broker.kill()
        st = wait_status(api, src, lambda s: not s["mqtt"]["connected"] and s["last_error"],
                         "the lost connection reported")
        assert "lost" in st["last_error"] or "refused" in st["last_error"]
        broker.start()  # same port, no sessions, no retained messages
        st = connected(api, src)
        wait_status(api, src, lambda s: s["last_error"] is None, "the error cleared")
        listener = Listener(lt, broker.port, "spBv1.0/STATE/scada")
        wait_for(lambda: listener.states() and listener.states()[-1]["online"],
                 what="STATE online published again to the new broker")
        listener.close()
        lt.call(node.connect())  # the edge node reconnects too: a new session, bdSeq 1
        lt.call(node.birth())
        lt.call(node.data("CNC-001", {"temperature": 2.0}))
        wait_for(lambda: values(pg_dsn, tenant.org_id, "CNC-001", "temperature")[-1:] == [2.0],
                 what="data after the broker came back")
        assert pollers.proc.poll() is None
        assert "exited" not in pollers.log()
    finally:
        pollers.kill(signal.SIGTERM)


@pytest.mark.slow
def test_a_silent_network_drop_is_noticed_by_keepalive_and_reconnected(
        server, api, tenant, pg_dsn, broker, lt, tmp_path):
    """The broker stops answering without closing anything (SIGSTOP: what a
    cut cable or a dead NAT entry looks like): the missing PINGRESP is
    noticed within twice the keepalive, the source reports it and, once
    the broker answers again, reconnects to its persistent session, all in
    the same poller process."""
    src = mqtt_source(api, broker.port, format="json", group_id=None)
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        connected(api, src)
        broker.pause()
        paused = time.monotonic()
        wait_status(api, src, lambda s: not s["mqtt"]["connected"], "the silence noticed",
                    timeout=40)
        # keepalive 10 s: the connection is given up after 20 s of silence,
        # checked every 5 s; status.mqtt is written within a second of that
        assert 15 < time.monotonic() - paused < 32, time.monotonic() - paused
        # (last_error comes with the process's next report of its sources)
        st = wait_status(api, src, lambda s: s["last_error"], "the lost connection reported")
        assert "lost" in st["last_error"] or "CONNACK" in st["last_error"], st
        broker.resume()
        connected(api, src)
        pub = Publisher(lt, broker.port)
        try:
            pub.send("haltless/line1", {"readings": [reading(value=42.0)]})
            wait_for(lambda: values(pg_dsn, tenant.org_id, "CNC-001", "temperature") == [42.0],
                     what="a message after the reconnection")
        finally:
            pub.close()
        assert pollers.proc.poll() is None
    finally:
        broker.resume()
        pollers.kill(signal.SIGTERM)


@pytest.mark.slow
def test_past_its_memory_limit_a_poller_drops_qos0_data_then_asks_for_a_rebirth(
        server, api, tenant, pg_dsn, broker, lt, tmp_path):
    """The database stops taking commits (a transaction holds the hot slots
    locked) while a node publishes 1.5 MB of DDATA: past 1 MB held the poller
    drops the rest and counts it, instead of growing; once the commits land,
    the node's next message shows the gap, a rebirth is asked for, and its
    data is stored again."""
    import asyncpg
    names = [f"m{j}" for j in range(100)]
    src = mqtt_source(api, broker.port)
    node = edge(lt, broker.port, GROUP, "Node1", {"CNC-001": [(n, DOUBLE) for n in names]})
    pollers = Pollers(server, tmp_path / "pollers.log",
                      env={"HALTLESS_MQTT_MEMORY_MB": "1", "HALTLESS_DB_TIMEOUT": "60"})
    lock = None
    try:
        connected(api, src)
        lt.call(node.connect())
        lt.call(node.birth())
        wait_for(lambda: values(pg_dsn, tenant.org_id, "CNC-001", "m0") == [0.0],
                 what="the birth stored")

        async def hold():
            c = await asyncpg.connect(pg_dsn)
            tr = c.transaction()
            await tr.start()
            await c.execute("LOCK TABLE reading_chunks IN ACCESS EXCLUSIVE MODE")
            return c, tr
        lock = lt.call(hold())
        for i in range(700):  # ~2.2 kB each
            lt.call(node.data("CNC-001", {n: float(i + 1) for n in names}))
        st = wait_status(api, src, lambda s: s["mqtt"]["skipped"].get("overload", 0) > 0
                         and s["mqtt"]["messages"] >= 702, "the overload counted")
        dropped = st["mqtt"]["skipped"]["overload"]
        assert 100 < dropped < 700, st["mqtt"]
        assert "dropping QoS 0 data" in pollers.log()
        lt.call(lock[1].rollback())
        lt.call(lock[0].close())
        lock = None
        # the birth and every message not dropped
        wait_for(lambda: len(values(pg_dsn, tenant.org_id, "CNC-001", "m0")) == 1 + 700 - dropped,
                 what="the backlog committed")
        assert "taking every message again" in pollers.log()
        # The drops are a sequence gap: the next message asks for a rebirth
        # (the edge node answers at once), and data flows again.
        lt.call(node.data("CNC-001", {n: 9999.0 for n in names}))
        wait_status(api, src, lambda s: s["mqtt"]["rebirths_requested"] == 1, "a rebirth asked for")
        wait_for(lambda: node.rebirths == 1, what="the edge node's rebirth")
        lt.call(node.data("CNC-001", {n: 4242.0 for n in names}))
        wait_for(lambda: values(pg_dsn, tenant.org_id, "CNC-001", "m0")[-1:] == [4242.0],
                 what="data after the rebirth")
        assert pollers.proc.poll() is None
    finally:
        if lock is not None:
            lt.call(lock[0].close())
        pollers.kill(signal.SIGTERM)


# ------------------------------------------------------------------ json

class Publisher:
    """A plain MQTT client of the test's that publishes (QoS 1: each waits for its PUBACK)."""

    def __init__(self, lt, port: int) -> None:
        import gmqtt
        self.lt = lt
        self.client = gmqtt.Client(f"publisher-{uuid.uuid4().hex[:6]}")
        lt.call(self.client.connect("127.0.0.1", port))

    def send(self, topic: str, body, qos: int = 1) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()

        async def go():
            self.client.publish(topic, data, qos=qos)
            await asyncio.sleep(0)
        self.lt.call(go())

    def close(self) -> None:
        self.lt.call(self.client.disconnect())


import asyncio  # noqa: E402 - used by the clients above, at call time


def reading(machine="CNC-001", metric="temperature", value=1.0, ts=None, **extra) -> dict:
    ts = ts or dt.datetime.now(dt.timezone.utc).isoformat()
    return {"machine_identifier": machine, "timestamp": ts, "metric_name": metric,
            "value": value, **extra}


def test_json_messages_are_validated_as_http_ingest_validates_a_body(server, api, tenant, pg_dsn,
                                                                     broker, lt, tmp_path):
    src = mqtt_source(api, broker.port, format="json", group_id=None,
                      topics=["factory/+/readings"])
    del src["config"]["group_id"]
    fixed = mqtt_source(api, broker.port, machine_id=tenant.machines["PRESS-7"], name="fixed",
                        format="json", topics=["fixed/#"], group_id=None)
    pub = Publisher(lt, broker.port)
    pollers = Pollers(server, tmp_path / "pollers.log")
    try:
        connected(api, src)
        connected(api, fixed)
        pub.send("factory/line1/readings", {"readings": [
            reading(value=1.5, unit="celsius"), reading("NOPE-1"),
            reading(metric="vibration", value=2.5)]})
        pub.send("factory/line1/readings", b'{"readings": [' + json.dumps(reading(
            metric="pressure", value=3.0)).encode() + b', {"machine_identifier": "CNC-001",'
                 b' "timestamp": "2026-01-01T00:00:00Z", "metric_name": "x", "value": NaN}]}')
        pub.send("factory/line2/readings", b"{not json")
        pub.send("fixed/a", {"readings": [reading("CNC-001", metric="force", value=9.0),
                                          reading("WHATEVER", metric="force", value=10.0)]})
        pub.send("elsewhere/readings", {"readings": [reading(metric="ignored")]})
        wait_for(lambda: len(rows(pg_dsn, tenant.org_id, "PRESS-7", "force")) == 2,
                 what="the fixed machine's readings")
        wait_for(lambda: len(rows(pg_dsn, tenant.org_id, "CNC-001")) == 3,
                 what="the three good readings")
        assert {(r["metric_name"], r["value"], r["unit"]) for r in rows(pg_dsn, tenant.org_id,
                                                                       "CNC-001")} == {
            ("temperature", 1.5, "celsius"), ("vibration", 2.5, None), ("pressure", 3.0, None)}
        assert rows(pg_dsn, tenant.org_id, "CNC-001", "force") == []
        # NOPE-1 (machine), NaN (not finite), the message that is not JSON
        wait_status(api, src, lambda s: s["points_failed"] == 3, "the refusals counted")
        assert "not valid JSON" in pollers.log()
        # Alone, so that its error is not one of more than three in a batch
        # (the log and last_error name three, and how many more).
        pub.send("factory/line2/readings", {"readings": [reading()] * 1001})
        st = wait_status(api, src, lambda s: s["points_failed"] == 4, "the 1,001 refused")
        assert st["readings_written"] == 3 and st["mqtt"]["messages"] == 4
        assert st["mqtt"]["skipped"] == {"refused_message": 2}
        fst = wait_status(api, fixed, lambda s: s["readings_written"] == 2, "fixed's status")
        assert fst["points_failed"] == 0 and fst["mqtt"]["messages"] == 1
        assert "1,001 readings" in pollers.log()
    finally:
        pollers.kill(signal.SIGTERM)
        pub.close()


def test_json_qos1_messages_are_acknowledged_after_commit_and_arrive_once(
        server, api, tenant, pg_dsn, broker, lt, tmp_path):
    """A poller killed after receiving messages but before committing them
    (a 60 s flush) acknowledged none of them: the persistent session gives
    them to the next poller, with those published while none ran, once."""
    src = mqtt_source(api, broker.port, format="json", group_id=None)
    pub = Publisher(lt, broker.port)
    pollers = Pollers(server, tmp_path / "pollers.log", flush="60")
    try:
        connected(api, src)
        for i in range(5):
            pub.send("haltless/line1", {"readings": [reading(value=float(i))]})
        wait_status(api, src, lambda s: s["mqtt"]["messages"] == 5, "five messages received")
        pollers.kill(signal.SIGKILL)
        assert rows(pg_dsn, tenant.org_id, "CNC-001") == []  # nothing was committed
        for i in range(5, 8):
            pub.send("haltless/line1", {"readings": [reading(value=float(i))]})
        pollers = Pollers(server, tmp_path / "pollers2.log")
        wait_for(lambda: len(rows(pg_dsn, tenant.org_id, "CNC-001")) >= 8,
                 what="the redelivered and the queued messages")
        pub.send("haltless/line1", {"readings": [reading(metric="sentinel")]})
        # In order on the session: once the sentinel is stored, every
        # redelivery before it has been processed.
        wait_for(lambda: rows(pg_dsn, tenant.org_id, "CNC-001", "sentinel"),
                 what="the sentinel after them")
        assert sorted(values(pg_dsn, tenant.org_id, "CNC-001", "temperature")) == [
            float(i) for i in range(8)]
    finally:
        pollers.kill(signal.SIGTERM)
        pub.close()


def test_a_batch_error_names_three_and_counts_the_rest():
    from haltless.server.mqtt_ingest import _summary
    assert _summary([], 0) is None
    assert _summary(["a", "b"], 2) == "a; b"
    assert _summary(["a", "b", "c", "d"], 7) == "a; b; c; and 4 more"


# ------------------------------------------------------------------ two pollers

@pytest.mark.slow
def test_two_poller_processes_share_an_mqtt_source_through_its_lease(server, api, tenant, pg_dsn,
                                                                     broker, lt, tmp_path):
    """One subscription at a time: the lease holder connects, the other
    process waits; when the holder is killed the other takes the source
    over, joins late (a rebirth) and the data goes on. The broker never saw
    two connections of the source's client id at once (it would have closed
    the older one: "already connected")."""
    src = mqtt_source(api, broker.port, host_id="scada")
    node = edge(lt, broker.port, GROUP, "Node1", {"CNC-001": [("temperature", DOUBLE)]})
    lt.call(node.connect())
    lt.call(node.birth())
    ticking = asyncio.run_coroutine_threadsafe(_tick(node, "CNC-001"), lt.loop)
    a = Pollers(server, tmp_path / "a.log")
    b = Pollers(server, tmp_path / "b.log")

    def owner() -> str | None:
        return fetch(pg_dsn, "SELECT lease_owner FROM ingest_sources WHERE id = $1",
                     uuid.UUID(src["id"]))[0][0]

    def pid(o: str) -> int:
        return int(o.split(":")[1])
    try:
        first = wait_for(owner, what="a process to lease the source")
        holder, other = (a, b) if pid(first) == a.proc.pid else (b, a)
        wait_for(lambda: len(rows(pg_dsn, tenant.org_id, "CNC-001")) >= 3,
                 what="data through the first holder")
        holder.kill(signal.SIGKILL)
        killed = dt.datetime.now(dt.timezone.utc)
        second = wait_for(lambda: (o := owner()) and o != first and o, timeout=15,
                          what="the other process to take the source over")
        assert pid(second) == other.proc.pid
        wait_for(lambda: fetch(pg_dsn, "SELECT count(*) FROM readings WHERE org_id = $1"
                               " AND timestamp > $2", tenant.org_id, killed)[0][0] >= 3,
                 timeout=30, what="data through the new holder")
        assert node.rebirths >= 1  # it joined late and asked
        client = f"haltless-{uuid.UUID(src['id']).hex[:12]}"
        log = broker.log()
        assert log.count(f"connected from 127.0.0.1") >= 2 and client in log
        assert "already connected" not in log
    finally:
        ticking.cancel()
        a.kill(signal.SIGTERM)
        b.kill(signal.SIGTERM)


async def _tick(node, device, every=0.2):
    i = 0
    while True:
        i += 1
        await node.data(device, {"temperature": float(i)})
        await asyncio.sleep(every)


# ------------------------------------------------------------------ the API

def test_an_mqtt_source_needs_no_machine_and_its_password_is_write_only(api, tenant, pg_dsn,
                                                                        tmp_path):
    tls = make_tls(tmp_path / "tls")
    r = api.post("/api/v1/ingest-sources", {
        "name": "secured broker", "protocol": "mqtt", "host": "127.0.0.1", "port": 8883,
        "poll_interval_seconds": 1, "config": {
            "format": "sparkplug_b", "group_id": ["Plant1", "Plant2"], "host_id": "scada",
            "username": "haltless", "password": "s3cret-pass", "client_id": "hl-1",
            "tls": {"ca_certificate": tls.ca_pem, "server_name": "localhost"}}})
    assert r.status_code == 201, r.text
    src = r.json()
    assert src["machine_id"] is None and src["config"]["password_set"] is True
    assert "s3cret-pass" not in r.text and "s3cret-pass" not in api.get(
        f"/api/v1/ingest-sources/{src['id']}").text
    stored = fetch(pg_dsn, "SELECT config::text, secrets FROM ingest_sources WHERE id = $1",
                   uuid.UUID(src["id"]))[0]
    assert "s3cret-pass" not in stored[0] and b"s3cret-pass" not in bytes(stored[1])
    assert src["status"]["mqtt"] == {"connected": False, "messages": 0, "discarded": 0,
                                     "rebirths_requested": 0, "skipped": {}, "nodes": [],
                                     "nodes_total": 0}
    # a PATCH that leaves the password out keeps it; machine_id may be set and cleared
    cfg = {k: v for k, v in src["config"].items() if k != "password_set"}
    r = api.patch(f"/api/v1/ingest-sources/{src['id']}",
                  {"config": {**cfg, "group_id": "Plant3"},
                   "machine_id": str(tenant.machines["CNC-001"])})
    assert r.status_code == 200 and r.json()["config"]["password_set"] is True
    assert r.json()["machine_id"] == str(tenant.machines["CNC-001"])
    r = api.patch(f"/api/v1/ingest-sources/{src['id']}", {"machine_id": None})
    assert r.status_code == 200 and r.json()["machine_id"] is None
    # a Modbus source still needs its machine
    r = api.post("/api/v1/ingest-sources", {
        "name": "m", "protocol": "modbus", "host": "127.0.0.1", "port": 502,
        "poll_interval_seconds": 1, "config": {"registers": [{"address": 1, "metric_name": "t"}]}})
    assert r.status_code == 422 and r.json()["detail"].startswith("machine_id:"), r.text


@pytest.mark.parametrize("config, where", [
    ({}, "config.format"),
    ({"format": "xml"}, "config.format"),
    ({"format": "json", "topics": []}, "config.topics"),
    ({"format": "json", "topics": ["a/#/b"]}, "config.topics[0]"),
    ({"format": "json", "topics": ["ok/#", "line+/x"]}, "config.topics[1]"),
    ({"format": "json", "group_id": "G"}, "config.group_id"),
    ({"format": "json", "host_id": "h"}, "config.host_id"),
    ({"format": "sparkplug_b", "topics": ["x/#"]}, "config.topics"),
    ({"format": "sparkplug_b", "group_id": "Plant/1"}, "config.group_id"),
    ({"format": "sparkplug_b", "group_id": ["A", "B#"]}, "config.group_id[1]"),
    ({"format": "sparkplug_b", "group_id": ["A", "A"]}, "config.group_id"),
    ({"format": "sparkplug_b", "group_id": "STATE"}, "config.group_id"),
    ({"format": "sparkplug_b", "host_id": "scada+1"}, "config.host_id"),
    ({"format": "sparkplug_b", "host_id": ""}, "config.host_id"),
    ({"format": "json", "username": "u", "password": "p"}, "config.password"),
    ({"format": "json", "password": "p", "tls": {}}, "config.username"),
    ({"format": "json", "tls": {"server_certificate_sha256": "abc"}},
     "config.tls.server_certificate_sha256"),
    ({"format": "json", "tls": {"ca_certificate": "not a certificate"}}, "config.tls.ca_certificate"),
    # not ASCII, lone surrogates included (schemathesis found a 500 here)
    ({"format": "json", "tls": {"ca_certificate": "\u00e6\ud932\udff2 PEM"}},
     "config.tls.ca_certificate"),
    ({"format": "json", "tls": {"verify": False}}, "config.tls: Object contains unknown field `verify`"),
    ({"format": "json", "qos": 2}, "config.qos"),
    ({"format": "json", "client_id": "x" * 129}, "config.client_id"),
    ({"format": "json", "timeout_seconds": 0}, "config.timeout_seconds"),
    ({"format": "json", "extra": 1}, "config: Object contains unknown field `extra`"),
])
def test_invalid_mqtt_sources_get_422_naming_the_field(api, config, where):
    r = api.post("/api/v1/ingest-sources", {
        "name": "b", "protocol": "mqtt", "host": "127.0.0.1", "port": 1883,
        "poll_interval_seconds": 1, "config": config})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(where), r.json()


# ------------------------------------------------------------------ test-connection

def test_connection(api, src) -> dict:
    r = api.post(f"/api/v1/ingest-sources/{src['id']}/test-connection")
    assert r.status_code == 200, r.text
    res = r.json()
    assert isinstance(res["latency_ms"], int) and res["latency_ms"] >= 0
    return res


test_connection.__test__ = False  # a helper, not a test


def test_test_connection_subscribes_or_says_what_failed(api, broker, tmp_path):
    ok = mqtt_source(api, broker.port)
    res = test_connection(api, ok)
    assert res["success"] is True and res["message"] == "Connected successfully", res
    assert "haltless-probe-" in broker.log() and "spBv1.0/Plant1/#" in broker.log()
    from helpers import free_port
    nobody = mqtt_source(api, free_port(), name="nobody")
    res = test_connection(api, nobody)
    assert res["success"] is False and "refused" in res["message"]


def test_test_connection_explains_credential_and_tls_failures(api, tmp_path):
    tls = make_tls(tmp_path / "tls")
    secure = Mosquitto(tmp_path / "secure", users={"scada": "right"}, tls=tls)
    with secure:
        def source(**cfg):
            return mqtt_source(api, secure.port, name=f"s-{uuid.uuid4().hex[:6]}", **cfg)
        good = {"username": "scada", "password": "right",
                "tls": {"ca_certificate": tls.ca_pem, "server_name": "localhost"}}
        assert test_connection(api, source(**good))["success"] is True
        pinned = {**good, "tls": {"server_certificate_sha256": tls.cert_sha256.upper()}}
        assert test_connection(api, source(**pinned))["success"] is True
        cases = {
            # mosquitto 2.0 answers a wrong password "not authorized" (0x87), not 0x86
            "bad password": ({**good, "password": "wrong"}, "check the source's username and "
                                                          "password"),
            "unknown CA": ({**good, "tls": {}}, "certificate"),
            "wrong name": ({**good, "tls": {"ca_certificate": tls.ca_pem,
                                            "server_name": "broker.example"}}, "certificate"),
        }
        for what, (cfg, expect) in cases.items():
            res = test_connection(api, source(**cfg))
            assert res["success"] is False and expect in res["message"], (what, res)
        # A pin that does not match fails the handshake: no CONNECT (with the
        # password) reaches the broker.
        clients = secure.log().count("New client connected")
        res = test_connection(api, source(**{**good, "tls": {"server_certificate_sha256": "ab" * 32}}))
        assert res["success"] is False and "pins" in res["message"], res
        assert secure.log().count("New client connected") == clients
        # TLS spoken to the plain listener of another broker, and plain TCP to a TLS port
        with Mosquitto(tmp_path / "plain") as plain:
            res = test_connection(api, mqtt_source(api, plain.port, name="tls-to-plain",
                                                   tls={"ca_certificate": tls.ca_pem}))
            assert res["success"] is False and "TLS" in res["message"], res
        res = test_connection(api, source(timeout_seconds=2))
        assert res["success"] is False and "CONNACK" in res["message"], res
