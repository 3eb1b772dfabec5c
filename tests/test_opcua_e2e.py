"""OPC-UA end to end: test-connection, the cloud pollers and the edge agent
against a real asyncua server on 127.0.0.1 with SignAndEncrypt and a user."""
from __future__ import annotations

import hashlib
import signal
import textwrap

import pytest

from helpers import fetch, make_tenant, wait_for
from peers import OpcuaPeer
from test_agent import AgentProcess, assert_exactly_once
from test_management import OPCUA_BODY, Api
from test_opcua_reader import PASSWORD, USER
from test_pollers import Pollers, series_rows


@pytest.fixture(scope="module")
def opc():
    with OpcuaPeer() as peer:
        yield peer


@pytest.fixture(autouse=True)
def only_this_tests_sources(pg_dsn):
    fetch(pg_dsn, "UPDATE ingest_sources SET is_active = false")
    yield
    fetch(pg_dsn, "UPDATE ingest_sources SET is_active = false")


def secure_body(tenant, opc, password=PASSWORD, **cfg):
    body = {**OPCUA_BODY, "machine_id": str(tenant.machines["CNC-001"]), "port": opc.port,
            "poll_interval_seconds": 1}
    body["config"] = {**OPCUA_BODY["config"], "security_mode": "SignAndEncrypt",
                      "security_policy": "Basic256Sha256", "username": USER,
                      "password": password, **cfg}
    return body


def test_test_connection_over_sign_and_encrypt_with_a_user(server, tenant, opc):
    api = Api(server, server.token(tenant.org_id))
    src = api.post("/api/v1/ingest-sources", secure_body(tenant, opc)).json()
    res = api.post(f"/api/v1/ingest-sources/{src['id']}/test-connection").json()
    assert res == {"success": True, "message": "Connected successfully",
                   "latency_ms": res["latency_ms"]}
    # trust on first use: the server certificate is now recorded on the source
    st = api.get(f"/api/v1/ingest-sources/{src['id']}").json()["status"]
    assert st["server_certificate_sha256"] == hashlib.sha256(opc.cert[0]).hexdigest()

    bad = api.post("/api/v1/ingest-sources", secure_body(tenant, opc, password="Tr0ub4dor-x9")).json()
    res = api.post(f"/api/v1/ingest-sources/{bad['id']}/test-connection").json()
    assert res["success"] is False and f"rejected user '{USER}'" in res["message"]
    assert "Tr0ub4dor-x9" not in res["message"]  # the password is never echoed

    unknown = secure_body(tenant, opc, nodes=[{"node_id": "ns=2;i=1001", "metric_name": "t"},
                                              {"node_id": "ns=2;i=9999", "metric_name": "ghost"}])
    src2 = api.post("/api/v1/ingest-sources", unknown).json()
    res = api.post(f"/api/v1/ingest-sources/{src2['id']}/test-connection").json()
    assert res["success"] is False and "1 of 2 points failed" in res["message"]
    assert "ns2_i9999" in res["message"]


def test_pollers_read_an_opcua_source_in_all_four_node_id_formats(server, tenant, pg_dsn, opc,
                                                                  tmp_path):
    api = Api(server, server.token(tenant.org_id))
    nodes = [{"node_id": "ns=2;i=1001", "metric_name": "spindle_temperature", "unit": "celsius"},
             {"node_id": "ns=2;s=Vibration.X", "metric_name": "vibration_x", "unit": "mm/s"},
             {"node_id": "ns=2;g=09087e75-8e5e-499b-954f-f2a9603db28a", "metric_name": "guid"},
             {"node_id": "ns=2;b=M/RbKBsRVkePCePcx24oRA==", "metric_name": "opaque"}]
    assert api.post("/api/v1/ingest-sources", secure_body(tenant, opc, nodes=nodes)).status_code == 201
    pollers = Pollers(server, tmp_path / "pollers.log")
    mid = tenant.machines["CNC-001"]
    try:
        for metric, value, tag in [("spindle_temperature", 100.1, "ns2_i1001"),
                                   ("vibration_x", 0.25, "ns2_sVibration.X"),
                                   ("guid", 3.0, "ns2_g09087e75-8e5e-499b-954f-f2a9603db28a"),
                                   ("opaque", -42.0, "ns2_bM/RbKBsRVkePCePcx24oRA")]:
            rows = wait_for(lambda: series_rows(pg_dsn, mid, metric), what=metric)
            assert rows[0]["value"] == pytest.approx(value) and rows[0]["raw_tag"] == tag
    finally:
        pollers.kill(signal.SIGTERM)


def test_agent_reads_opcua_with_sign_and_encrypt_and_delivers_once(server, pg_dsn, opc, tmp_path):
    t = make_tenant(pg_dsn, machines=("CNC-001",))
    f = tmp_path / "agent.toml"
    f.write_text(textwrap.dedent(f'''
        api_url = "{server.url}/api/v1/ingest"
        api_key = "{t.key}"
        state_dir = "state"
        status_interval = 1

        [[source]]
        name = "cnc-mill-1"
        machine_identifier = "CNC-001"
        protocol = "opcua"

        [source.opcua]
        endpoint = "opc.tcp://127.0.0.1:{opc.port}"
        security_mode = "SignAndEncrypt"
        security_policy = "Basic256Sha256"
        username = "{USER}"
        password = "{PASSWORD}"
        poll_interval = 0.2

        [[source.opcua.nodes]]
        node_id = "ns=2;i=1001"
        metric_name = "spindle_temperature"
        unit = "celsius"

        [[source.opcua.nodes]]
        node_id = "ns=2;s=Vibration.X"
        metric_name = "vibration_x"
        unit = "mm/s"
        '''))
    agent = AgentProcess(f, tmp_path / "agent.log")
    try:
        wait_for(lambda: t.count(pg_dsn) >= 6, what="agent readings")
    finally:
        agent.stop()
    assert_exactly_once(pg_dsn, t, tmp_path, timestamps_unique=False)
    assert (tmp_path / "state" / "trusted-servers.json").exists()
