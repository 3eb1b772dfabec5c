"""The management API: JWT auth, machines, ingest sources, test-connection."""
from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import jwt
import pytest
import requests

from helpers import fetch, make_tenant
from peers import ModbusPeer, device
from haltless.core.config import Settings
from haltless.server.netpolicy import AddressPolicy, TargetRefused

MODBUS_BODY = {
    "name": "Conveyor Motor Modbus",
    "protocol": "modbus",
    "host": "127.0.0.1",
    "port": 502,
    "poll_interval_seconds": 10,
    "is_active": True,
    "config": {"registers": [{"address": 100, "count": 1, "register_type": "holding",
                              "metric_name": "temperature", "unit": "celsius",
                              "scale": 0.1, "offset": 0.0}]},
}
OPCUA_BODY = {
    "name": "CNC Mill OPC-UA",
    "protocol": "opcua",
    "host": "127.0.0.1",
    "port": 4840,
    "poll_interval_seconds": 30,
    "is_active": True,
    "config": {"nodes": [{"node_id": "ns=2;i=1001", "metric_name": "temperature", "unit": "celsius"},
                         {"node_id": "ns=2;i=1002", "metric_name": "vibration", "unit": "mm/s"}]},
}


class Api:
    def __init__(self, server, token):
        self.url = server.url
        self.h = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def __getattr__(self, method):
        def call(path, body=None, **kw):
            data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
            return requests.request(method.upper(), self.url + path, data=data,
                                    headers={**self.h, **kw.pop("headers", {})}, timeout=30, **kw)
        return call


@pytest.fixture
def api(server, tenant):
    return Api(server, server.token(tenant.org_id))


# ------------------------------------------------------------------ auth

def test_missing_bad_expired_and_wrong_algorithm_tokens_get_401(server, tenant):
    url = server.url + "/api/v1/machines"
    good = server.token(tenant.org_id)
    assert requests.get(url, headers={"Authorization": f"Bearer {good}"}, timeout=5).status_code == 200
    key_secret = (Path(server.env["HALTLESS_DATA_DIR"]) / "jwt-secret").read_text().strip()
    now = int(time.time())
    claims = {"iss": "haltless", "org": str(tenant.org_id), "iat": now}
    cases = {
        "missing": None,
        "not bearer": f"Basic {base64.b64encode(b'a:b').decode()}",
        "garbage": "Bearer not.a.jwt",
        "expired": "Bearer " + jwt.encode({**claims, "exp": now - 10}, key_secret, "HS256"),
        "no exp": "Bearer " + jwt.encode(claims, key_secret, "HS256"),
        "wrong key": "Bearer " + jwt.encode({**claims, "exp": now + 60}, "x" * 40, "HS256"),
        "HS512": "Bearer " + jwt.encode({**claims, "exp": now + 60}, key_secret, "HS512"),
        "alg none": "Bearer " + jwt.encode({**claims, "exp": now + 60}, None, "none"),
        "api key": f"Bearer {tenant.key}",
    }
    for what, header in cases.items():
        h = {} if header is None else {"Authorization": header}
        r = requests.get(url, headers=h, timeout=5)
        assert r.status_code == 401, what
        assert r.json()["detail"], what
    assert "expired" in requests.get(url, headers={"Authorization": cases["expired"]},
                                     timeout=5).json()["detail"]
    # and a JWT is not an API key
    r = requests.post(server.url + "/api/v1/ingest", data=b'{"readings": []}',
                      headers={"X-API-Key": good}, timeout=5)
    assert r.status_code == 401


# ------------------------------------------------------------------ machines

def test_machines_are_created_listed_and_scoped_to_the_organization(server, api, tenant, pg_dsn):
    r = api.post("/api/v1/machines", {"machine_identifier": "MILL-9", "name": "Mill nine"})
    assert r.status_code == 201
    m = r.json()
    assert m["machine_identifier"] == "MILL-9" and m["name"] == "Mill nine"
    uuid.UUID(m["id"])
    assert api.post("/api/v1/machines", {"machine_identifier": "MILL-9"}).status_code == 409
    assert api.get(f"/api/v1/machines/{m['id']}").json() == m
    assert "MILL-9" in [x["machine_identifier"] for x in api.get("/api/v1/machines").json()]
    r = api.post("/api/v1/machines", {"machine_identifier": ""})
    assert r.status_code == 422 and "machine_identifier" in r.json()["detail"]
    other = make_tenant(pg_dsn, machines=("THEIRS",))
    theirs = Api(server, server.token(other.org_id))
    assert theirs.get(f"/api/v1/machines/{m['id']}").status_code == 404
    assert "MILL-9" not in [x["machine_identifier"] for x in theirs.get("/api/v1/machines").json()]
    assert api.get("/api/v1/machines/not-a-uuid").status_code == 404
    # the new machine accepts readings right away
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    r = requests.post(server.url + "/api/v1/ingest", headers={"X-API-Key": tenant.key}, timeout=5,
                      json={"readings": [{"machine_identifier": "MILL-9", "timestamp": ts,
                                          "metric_name": "t", "value": 1.0}]})
    assert r.json()["accepted_count"] == 1


# ------------------------------------------------------------------ ingest sources

def test_the_contracts_source_bodies_are_accepted_and_secrets_never_returned(api, tenant, pg_dsn):
    mid = str(tenant.machines["CNC-001"])
    r = api.post("/api/v1/ingest-sources", {"machine_id": mid, **MODBUS_BODY})
    assert r.status_code == 201, r.text
    src = r.json()
    assert src["protocol"] == "modbus" and src["poll_interval_seconds"] == 10
    assert src["config"]["registers"][0]["scale"] == 0.1
    assert src["status"] == {"last_poll_at": None, "last_success_at": None, "last_error": None,
                             "last_error_at": None, "readings_written": 0, "points_failed": 0,
                             "polls_missed": 0, "polled_by": None, "server_certificate_sha256": None,
                             "gap_started_at": None, "gap_ended_at": None}
    body = {"machine_id": mid, **OPCUA_BODY}
    body["config"] = {**body["config"], "security_mode": "SignAndEncrypt",
                      "security_policy": "Basic256Sha256", "username": "haltless",
                      "password": "secure_password"}
    r = api.post("/api/v1/ingest-sources", body)
    assert r.status_code == 201, r.text
    o = r.json()
    assert "password" not in o["config"] and o["config"]["password_set"] is True
    assert "secure_password" not in r.text
    assert "secure_password" not in api.get("/api/v1/ingest-sources").text
    assert "secure_password" not in api.get(f"/api/v1/ingest-sources/{o['id']}").text
    stored = fetch(pg_dsn, "SELECT config::text, secrets FROM ingest_sources WHERE id = $1",
                   uuid.UUID(o["id"]))[0]
    assert "secure_password" not in stored[0] and b"secure_password" not in bytes(stored[1])
    ids = [s["id"] for s in api.get("/api/v1/ingest-sources").json()]
    assert ids == [src["id"], o["id"]]
    # PATCH without the password keeps it; the stored ciphertext changes (fresh nonce)
    r = api.patch(f"/api/v1/ingest-sources/{o['id']}", {"poll_interval_seconds": 5, "is_active": False})
    assert r.status_code == 200 and r.json()["poll_interval_seconds"] == 5
    assert r.json()["is_active"] is False and r.json()["config"]["password_set"] is True
    new_cfg = {**body["config"], "nodes": [{"node_id": "ns=2;s=Vibration.X", "metric_name": "v"}]}
    del new_cfg["password"]
    r = api.patch(f"/api/v1/ingest-sources/{o['id']}", {"config": new_cfg})
    assert r.status_code == 200 and r.json()["config"]["password_set"] is True
    assert r.json()["config"]["nodes"][0]["node_id"] == "ns=2;s=Vibration.X"
    assert api.delete(f"/api/v1/ingest-sources/{o['id']}").status_code == 204
    assert api.get(f"/api/v1/ingest-sources/{o['id']}").status_code == 404
    assert api.delete(f"/api/v1/ingest-sources/{o['id']}").status_code == 404


@pytest.mark.parametrize("change, where", [
    ({"protocol": "bacnet"}, "protocol"),
    ({"port": 0}, "port"),
    ({"port": 65536}, "port"),
    ({"poll_interval_seconds": 0}, "poll_interval_seconds"),
    ({"host": ""}, "host"),
    ({"machine_id": "not-a-uuid"}, "machine_id"),
    ({"machine_id": str(uuid.uuid4())}, "machine_id"),
    ({"extra": 1}, "extra"),
    ({"config": {"registers": [{"address": 70000, "metric_name": "t"}]}}, "config.registers[0].address"),
    ({"config": {"registers": [{"address": 1, "count": 126, "metric_name": "t"}]}}, "config.registers[0].count"),
    ({"config": {"registers": [{"address": 1, "metric_name": "t", "register_type": "coil"}]}},
     "config.registers[0].register_type"),
    ({"config": {"registers": [{"address": 1, "metric_name": "t", "scale": "1e400"}]}}, "config.registers[0].scale"),
    ({"config": {"registers": []}}, "config.registers"),
    ({"config": {}}, "config"),
    ({"host": "169.254.169.254"}, "host"),
    ({"host": "10.1.2.3"}, "host"),
])
def test_invalid_modbus_sources_get_422_naming_the_field(api, tenant, change, where):
    body = {"machine_id": str(tenant.machines["CNC-001"]), **MODBUS_BODY, **change}
    body = json.dumps(body).replace('"1e400"', "1e400")  # a number no double holds
    r = api.post("/api/v1/ingest-sources", body)
    assert r.status_code == 422, r.text
    assert where in r.json()["detail"], r.json()


@pytest.mark.parametrize("nodes_or_cfg, where", [
    ({"nodes": [{"node_id": "ns=2;x=1", "metric_name": "t"}]}, "config.nodes[0].node_id"),
    ({"nodes": [{"node_id": "ns=2;g=not-a-guid", "metric_name": "t"}]}, "config.nodes[0].node_id"),
    ({"nodes": [{"node_id": "ns=2;b=***", "metric_name": "t"}]}, "config.nodes[0].node_id"),
    ({"nodes": [{"node_id": "ns=2;i=1", "metric_name": "t"}], "security_mode": "Encrypt"},
     "config.security_mode"),
    ({"nodes": [{"node_id": "ns=2;i=1", "metric_name": "t"}], "security_policy": "Basic128Rsa15"},
     "config.security_policy"),
    ({"nodes": []}, "config.nodes"),
])
def test_invalid_opcua_sources_get_422_naming_the_field(api, tenant, nodes_or_cfg, where):
    body = {"machine_id": str(tenant.machines["CNC-001"]), **OPCUA_BODY, "config": nodes_or_cfg}
    r = api.post("/api/v1/ingest-sources", body)
    assert r.status_code == 422, r.text
    assert where in r.json()["detail"], r.json()


def test_sources_of_another_organization_are_invisible(server, api, tenant, pg_dsn):
    src = api.post("/api/v1/ingest-sources",
                   {"machine_id": str(tenant.machines["CNC-001"]), **MODBUS_BODY}).json()
    other = make_tenant(pg_dsn, machines=("THEIRS",))
    theirs = Api(server, server.token(other.org_id))
    for method in ("get", "patch", "delete"):
        r = getattr(theirs, method)(f"/api/v1/ingest-sources/{src['id']}",
                                    {"name": "x"} if method == "patch" else None)
        assert r.status_code == 404
    assert theirs.post(f"/api/v1/ingest-sources/{src['id']}/test-connection").status_code == 404
    assert theirs.get("/api/v1/ingest-sources").json() == []
    # nor can their sources point at our machines
    r = theirs.post("/api/v1/ingest-sources", {"machine_id": str(tenant.machines["CNC-001"]), **MODBUS_BODY})
    assert r.status_code == 422 and "machine_id" in r.json()["detail"]


# ------------------------------------------------------------------ test-connection

def test_test_connection_reads_a_real_modbus_device_and_explains_failures(api, tenant):
    with ModbusPeer([device(1, {100: 725, 101: 3})]) as peer:
        body = {"machine_id": str(tenant.machines["CNC-001"]), **MODBUS_BODY, "port": peer.port}
        src = api.post("/api/v1/ingest-sources", body).json()
        r = api.post(f"/api/v1/ingest-sources/{src['id']}/test-connection")
        assert r.status_code == 200
        res = r.json()
        assert res["success"] is True and res["message"] == "Connected successfully"
        assert isinstance(res["latency_ms"], int) and res["latency_ms"] >= 0
        # an address the device rejects: that register's Modbus exception, named
        cfg = {"registers": [{"address": 100, "metric_name": "ok"}, {"address": 200, "metric_name": "bad"}]}
        api.patch(f"/api/v1/ingest-sources/{src['id']}", {"config": cfg})
        res = api.post(f"/api/v1/ingest-sources/{src['id']}/test-connection").json()
        assert res["success"] is False
        assert "1 of 2 points failed" in res["message"] and "Illegal Data Address" in res["message"]
        port = peer.port
    # the device is gone: refused
    res = api.post(f"/api/v1/ingest-sources/{src['id']}/test-connection").json()
    assert res["success"] is False and "refused" in res["message"] and str(port) in res["message"]


# ------------------------------------------------------------------ address policy

def test_default_policy_refuses_loopback_link_local_and_metadata():
    p = AddressPolicy()
    for host in ("127.0.0.1", "::1", "169.254.169.254", "169.254.10.1", "fe80::1", "0.0.0.0",
                 "fd00:ec2::254", "metadata.google.internal", "224.0.0.1", "::ffff:127.0.0.1",
                 # IPv4 inside IPv6: 6to4 of loopback and of the metadata address,
                 # Teredo with a loopback client, NAT64 of loopback
                 "2002:7f00:1::1", "2002:a9fe:a9fe::1",
                 "2001:0:4136:e378:8000:63bf:80ff:fffe", "64:ff9b::7f00:1"):
        with pytest.raises(TargetRefused) as e:
            p.check(host, 502)
        assert "HALTLESS_POLL_ALLOW" in str(e.value) or "metadata" in str(e.value), host
    for host in ("10.0.0.5", "192.168.1.100", "172.16.0.9", "8.8.8.8", "2001:db8::1"):
        assert p.check(host, 502)  # resolved locally: IP literals, no lookup


def test_allow_list_replaces_the_default_policy():
    p = AddressPolicy(Settings.from_env({"HALTLESS_POLL_ALLOW": "127.0.0.0/8, 10.0.0.0/8"}).poll_allow)
    assert p.check("127.0.0.1", 502) == ["127.0.0.1"]
    assert p.check("10.9.9.9", 502) == ["10.9.9.9"]
    with pytest.raises(TargetRefused, match="outside HALTLESS_POLL_ALLOW"):
        p.check("192.168.1.1", 502)
    with pytest.raises(Exception, match="not a CIDR"):
        Settings.from_env({"HALTLESS_POLL_ALLOW": "10.0.0.0/8,banana"})
