"""The edge agent: the contract's TOML, store-and-forward, exactly-once."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import textwrap
import time

import pytest
from haltless.core.errors import ConfigError
from haltless.pollers.agent_config import load_config
from haltless.pollers.sender import Sender
from haltless.pollers.spool import Spool
from helpers import (
    HALTLESS,
    ROOT,
    ServerProcess,
    fetch,
    fetchval,
    make_tenant,
    reading,
    wait_for,
)
from peers import ModbusPeer, device

CONTRACT_TOML = '''
[[source]]
name = "cnc-mill-1"
machine_identifier = "CNC-001"
protocol = "opcua"

[source.opcua]
endpoint = "opc.tcp://192.168.1.100:4840"
security_mode = "SignAndEncrypt"
security_policy = "Basic256Sha256"
username = "haltless"
password = "secure_password"

[[source.opcua.nodes]]
node_id = "ns=2;i=1001"
metric_name = "spindle_temperature"
unit = "celsius"

[[source.opcua.nodes]]
node_id = "ns=2;s=Vibration.X"
metric_name = "vibration_x"
unit = "mm/s"

[[source]]
name = "conveyor-motor"
machine_identifier = "CONV-001"
protocol = "modbus"

[source.modbus]
host = "192.168.1.101"
port = 502
unit_id = 1
poll_interval = 10

[[source.modbus.registers]]
address = 100
count = 1
register_type = "holding"
metric_name = "motor_temperature"
unit = "celsius"
scale = 0.1
offset = 0.0

[[source.modbus.registers]]
address = 102
count = 1
register_type = "input"
metric_name = "motor_speed"
unit = "rpm"
scale = 1.0
offset = 0.0
'''

ENV = {"HALTLESS_API_URL": "http://127.0.0.1:1", "HALTLESS_API_KEY": "hk_x"}


def test_the_contracts_toml_is_read_verbatim(tmp_path):
    # Parsing only: nothing connects to the contract's 192.168.x addresses.
    f = tmp_path / "agent.toml"
    f.write_text(CONTRACT_TOML)
    cfg = load_config(f, env=ENV)
    opc, mb = cfg.source
    assert (opc.name, opc.machine_identifier, opc.protocol) == ("cnc-mill-1", "CNC-001", "opcua")
    assert opc.opcua.endpoint == "opc.tcp://192.168.1.100:4840"
    assert (opc.opcua.security_mode, opc.opcua.security_policy) == ("SignAndEncrypt", "Basic256Sha256")
    assert (opc.opcua.username, opc.opcua.password) == ("haltless", "secure_password")
    assert [n.node_id for n in opc.opcua.nodes] == ["ns=2;i=1001", "ns=2;s=Vibration.X"]
    assert opc.opcua.poll_interval == 10.0
    assert (mb.modbus.host, mb.modbus.port, mb.modbus.unit_id, mb.modbus.poll_interval) == (
        "192.168.1.101", 502, 1, 10)
    r0, r1 = mb.modbus.registers
    assert (r0.address, r0.register_type, r0.scale, r0.unit) == (100, "holding", 0.1, "celsius")
    assert (r1.address, r1.register_type, r1.metric_name) == (102, "input", "motor_speed")
    assert (cfg.api_url, cfg.api_key) == (ENV["HALTLESS_API_URL"], ENV["HALTLESS_API_KEY"])


@pytest.mark.parametrize("edit, expect", [
    (lambda t: t.replace('protocol = "modbus"', 'protocol = "bacnet"'), r"source\[1\]\.protocol"),
    (lambda t: t.replace("port = 502", 'port = "502"'), r"source\[1\]\.modbus\.port"),
    (lambda t: t.replace("port = 502", "port = 70000"), r"source\[1\]\.modbus\.port"),
    (lambda t: t.replace("count = 1\nregister_type = \"input\"", "count = 2\nregister_type = \"input\""),
     r"registers\[1\]\.count"),
    (lambda t: t.replace('node_id = "ns=2;i=1001"', 'node_id = "ns=2;q=1"'), r"nodes\[0\]\.node_id"),
    (lambda t: t.replace("[source.modbus]\n", "[source.modbus]\nspeed = 3\n"), r"speed"),
    (lambda t: t.replace('protocol = "opcua"', 'protocol = "modbus"'), r"no \[source\.modbus\] section"),
    (lambda t: t + "\n[buffer]\nwhen_full = \"explode\"\n", r"buffer\.when_full"),
    (lambda t: t.replace("[[source.opcua.nodes]]", "[[source.opcua.nodes", 1), r"not valid TOML"),
])
def test_a_bad_file_is_refused_naming_the_file_and_key(tmp_path, edit, expect):
    f = tmp_path / "agent.toml"
    f.write_text(edit(CONTRACT_TOML))
    with pytest.raises(ConfigError) as e:
        load_config(f, env=ENV)
    assert str(f) in str(e.value) and re.search(expect, str(e.value)), str(e.value)


def test_missing_api_url_or_key_is_refused(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text(CONTRACT_TOML)
    with pytest.raises(ConfigError, match="api_url: not set"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="api_key: not set"):
        load_config(f, env={"HALTLESS_API_URL": "http://127.0.0.1:9"})


# ------------------------------------------------------------------ queue

def test_a_full_queue_drops_oldest_or_newest_as_configured(tmp_path):
    async def go(policy):
        sp = Spool(tmp_path / f"{policy}.db", 1000, policy)
        await sp.open()
        await sp.put([b'{"n":%d}' % i for i in range(900)])
        batch = await sp.next_batch()  # 900 in flight: never dropped
        await sp.put([b'{"n":%d}' % i for i in range(900, 1200)])
        assert sp.count == 1000 and sp.dropped == 200
        await sp.ack(batch)
        left = (await sp.next_batch()).bodies
        await sp.close()
        return batch.bodies, left
    sent, left = asyncio.run(go("drop_oldest"))
    assert len(sent) == 900 and left == [b'{"n":%d}' % i for i in range(1100, 1200)]
    sent, left = asyncio.run(go("drop_newest"))
    assert left == [b'{"n":%d}' % i for i in range(900, 1000)]


def test_a_batch_sent_but_not_acknowledged_is_resent_with_its_key_and_stored_once(
        server, pg_dsn, tmp_path):
    t = make_tenant(pg_dsn, machines=("CNC-001",))
    import json

    async def go():
        sp = Spool(tmp_path / "q.db", 10_000, "drop_oldest")
        await sp.open()
        await sp.put([json.dumps(reading(metric=f"m{i}")).encode() for i in range(50)])
        b1 = await sp.next_batch()
        s = Sender(server.url, t.key)
        first = await s.send(b1.body(), b1.key)
        await sp.close()  # "killed" after sending, before the ack
        sp = Spool(tmp_path / "q.db", 10_000, "drop_oldest")
        await sp.open()
        b2 = await sp.next_batch()
        assert (b2.key, b2.bodies) == (b1.key, b1.bodies)
        again = await s.send(b2.body(), b2.key)
        await sp.ack(b2)
        assert await sp.next_batch() is None
        await sp.close()
        s.close()
        return first, again
    first, again = asyncio.run(go())
    assert first == again and first["accepted_count"] == 50
    assert t.count(pg_dsn) == 50


# ------------------------------------------------------------------ the agent process

def agent_toml(tmp_path, port, url, key, interval=0.2, extra=""):
    f = tmp_path / "agent.toml"
    f.write_text(textwrap.dedent(f'''
        api_url = "{url}"
        api_key = "{key}"
        state_dir = "state"
        status_interval = 1
        {extra}

        [[source]]
        name = "conveyor-motor"
        machine_identifier = "CONV-001"
        protocol = "modbus"

        [source.modbus]
        host = "127.0.0.1"
        port = {port}
        unit_id = 1
        poll_interval = {interval}

        [[source.modbus.registers]]
        address = 100
        metric_name = "motor_temperature"
        unit = "celsius"
        scale = 0.1

        [[source.modbus.registers]]
        address = 102
        register_type = "input"
        metric_name = "motor_speed"
        unit = "rpm"
        '''))
    return f


class AgentProcess:
    def __init__(self, config, log_path):
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - the process's output until stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HALTLESS_API")}
        self.proc = subprocess.Popen(HALTLESS + ["agent", "--config", str(config)], env=env, cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout)
        self._log.close()

    def log(self):
        return self.log_path.read_text(errors="replace")


def agent_queue(tmp_path) -> tuple[int, float]:
    """(queued readings, oldest queued age) from the agent's metrics textfile."""
    prom = (tmp_path / "state" / "metrics.prom").read_text()
    queued = int(re.search(r"^haltless_agent_queue_readings (\d+)$", prom, re.MULTILINE).group(1))
    age = float(re.search(r"^haltless_agent_oldest_queued_reading_age_seconds (\S+)$",
                          prom, re.MULTILINE).group(1))
    return queued, age


def spooled_total(tmp_path) -> int:
    """Readings the agent ever queued: AUTOINCREMENT ids are never reused."""
    db = sqlite3.connect(tmp_path / "state" / "queue.db")
    try:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
        left = db.execute("SELECT count(*) FROM readings").fetchone()[0]
        return (row[0] if row else 0), left
    finally:
        db.close()


def assert_exactly_once(pg_dsn, tenant, tmp_path, timestamps_unique=True):
    """Everything the agent ever queued is in the database exactly once.
    (Modbus readings carry the poll time, so a repeated timestamp would mean
    a batch stored twice; OPC-UA ones carry the server's source timestamp,
    which repeats while a value does not change.)"""
    total, left = spooled_total(tmp_path)
    assert left == 0
    assert total > 0
    assert tenant.count(pg_dsn) == total
    if not timestamps_unique:
        return
    dup = fetchval(pg_dsn, "SELECT count(*) FROM (SELECT metric_name, timestamp FROM readings"
                   " WHERE org_id = $1 GROUP BY 1, 2 HAVING count(*) > 1) d", tenant.org_id)
    assert dup == 0


def test_agent_survives_a_server_outage_and_delivers_every_reading_once(pg_dsn, tmp_path):
    t = make_tenant(pg_dsn, machines=("CONV-001",))
    srv = ServerProcess({"HALTLESS_DATABASE_URL": pg_dsn}, data_dir=tmp_path / "srv")
    srv.start(tmp_path / "server.log")
    with ModbusPeer([device(1, {100: 725}, {102: 1500})]) as peer:
        agent = AgentProcess(agent_toml(tmp_path, peer.port, srv.url, t.key), tmp_path / "agent.log")
        try:
            wait_for(lambda: t.count(pg_dsn) >= 10, what="ten readings delivered")
            srv.stop()
            # Readings pile up on disk meanwhile, and the agent's own metrics
            # textfile says so.
            wait_for(lambda: spooled_total(tmp_path)[1] > 0, what="readings queued on disk")
            wait_for(lambda: (q := agent_queue(tmp_path))[0] > 0 and q[1] > 0,
                     what="the metrics file to show a queue")
            srv.start(tmp_path / "server.log")
            # Delivered once the server is back: the metrics file shows the queue drained.
            wait_for(lambda: agent_queue(tmp_path)[0] == 0, timeout=40, what="the queue drained")
        finally:
            agent.stop()
            srv.stop()
    log = agent.log()
    assert "send failed" in log and "retrying" in log
    prom = (tmp_path / "state" / "metrics.prom").read_text()
    assert re.search(r"^haltless_agent_queue_readings 0$", prom, re.MULTILINE), prom
    assert re.search(r"^haltless_agent_oldest_queued_reading_age_seconds 0", prom, re.MULTILINE), prom
    sent = int(re.search(r"^haltless_agent_readings_sent_total (\d+)$", prom, re.MULTILINE).group(1))
    assert sent >= 10
    assert re.search(r"status: read \d+, sent \d+, rejected 0, queued 0", log), log[-2000:]
    assert_exactly_once(pg_dsn, t, tmp_path)
    v = fetch(pg_dsn, "SELECT DISTINCT value, unit, raw_tag FROM readings WHERE org_id = $1"
              " AND metric_name = 'motor_temperature'", t.org_id)
    assert [tuple(r) for r in v] == [(72.5, "celsius", "hr100")]


def test_agent_killed_mid_send_and_restarted_loses_and_duplicates_nothing(server, pg_dsn, tmp_path):
    t = make_tenant(pg_dsn, machines=("CONV-001",))
    with ModbusPeer([device(1, {100: 725}, {102: 1500})]) as peer:
        cfg = agent_toml(tmp_path, peer.port, server.url, t.key, interval=0.1)
        for n in range(3):
            agent = AgentProcess(cfg, tmp_path / f"agent{n}.log")
            time.sleep(1.5 + 0.37 * n)  # the moment of the kill, a different one each time
            agent.stop(signal.SIGKILL)
        queued_before = spooled_total(tmp_path)[0]
        agent = AgentProcess(cfg, tmp_path / "agent-last.log")
        # The last one sends what the killed ones left queued (the queue's ids
        # are sent in order, so they are in once that many are stored). It
        # must have started first: a batch stored whose answer the kill cut
        # off is already counted, yet still queued, and a SIGTERM before the
        # agent handles it ends the process before it sends anything.
        wait_for(lambda: "agent started" in agent.log() and t.count(pg_dsn) >= queued_before,
                 timeout=30, what="the killed agents' queue delivered")
        agent.stop()
    assert queued_before > 0
    assert_exactly_once(pg_dsn, t, tmp_path)


def test_a_refused_api_key_stops_sending_and_keeps_readings_queued(server, pg_dsn, tmp_path):
    with ModbusPeer([device(1, {100: 725}, {102: 1500})]) as peer:
        agent = AgentProcess(agent_toml(tmp_path, peer.port, server.url, "hk_wrong"),
                             tmp_path / "agent.log")
        wait_for(lambda: "Sending stopped" in agent.log(), what="the refusal logged")
        wait_for(lambda: spooled_total(tmp_path)[0] > 0, what="readings queued")
        agent.stop()
    log = agent.log()
    assert "refused the API key (401" in log and "Sending stopped" in log
    total, left = spooled_total(tmp_path)
    assert left == total > 0


def test_readings_for_an_unregistered_machine_are_counted_and_named_in_the_status_line(
        server, pg_dsn, tmp_path):
    t = make_tenant(pg_dsn, machines=("CNC-001",))  # not CONV-001, the source's machine
    with ModbusPeer([device(1, {100: 725}, {102: 1500})]) as peer:
        agent = AgentProcess(agent_toml(tmp_path, peer.port, server.url, t.key),
                             tmp_path / "agent.log")
        try:
            wait_for(lambda: metric(tmp_path, "readings_machine_not_found_total") >= 4,
                     what="the metrics file to count readings for the unregistered machine")
            wait_for(lambda: re.search(r"status: read \d+, sent 0, rejected [1-9]\d* \([1-9]\d* "
                                       r"for unregistered machines: CONV-001\), queued",
                                       agent.log()),
                     what="the status line to name the unregistered machine")
        finally:
            agent.stop()
    assert metric(tmp_path, "readings_sent_total") == 0
    assert metric(tmp_path, "readings_rejected_total") >= metric(
        tmp_path, "readings_machine_not_found_total") >= 4
    assert "readings for machine 'CONV-001' rejected: Machine not found" in agent.log()
    assert t.count(pg_dsn) == 0


def metric(tmp_path, name: str) -> float:
    """One figure of the agent's metrics textfile (-1 while it has none)."""
    path = tmp_path / "state" / "metrics.prom"
    found = re.search(rf"^haltless_agent_{name} (\S+)$", path.read_text(), re.MULTILINE) \
        if path.exists() else None
    return float(found.group(1)) if found else -1


def test_retry_after_is_read_as_seconds_or_an_http_date():
    import email.utils

    from haltless.pollers.sender import _retry_after
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(later) <= 31
    assert _retry_after(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0


def test_two_agents_cannot_share_a_state_dir(server, tmp_path):
    """The second agent on one state_dir is refused in one line (exit 2)
    naming the directory and the first agent's pid; the first keeps running."""
    with ModbusPeer([device(1, {100: 725}, {102: 1500})]) as peer:
        cfg = agent_toml(tmp_path, peer.port, server.url, "hk_wrong")
        first = AgentProcess(cfg, tmp_path / "agent.log")
        try:
            wait_for(lambda: (tmp_path / "state" / "agent.lock").exists()
                     and (tmp_path / "state" / "agent.lock").read_text().strip()
                     == str(first.proc.pid), what="the first agent's lock")
            env = {k: v for k, v in os.environ.items() if not k.startswith("HALTLESS_API")}
            second = subprocess.run(HALTLESS + ["agent", "--config", str(cfg)], env=env, cwd=ROOT,
                                    check=False, capture_output=True, text=True, timeout=60)
            assert second.returncode == 2, second.stderr
            assert "is in use by another haltless agent" in second.stderr
            assert f"pid {first.proc.pid}" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1, second.stderr
            assert first.proc.poll() is None
        finally:
            first.stop()
