"""No 500 for bad input: every input the fuzzer turned into a 500
is a clear 4xx, or in an ingest batch a per-reading error with the rest
accepted (the agent retries a 5xx forever)."""
from __future__ import annotations

import asyncio
import json
import socket
import uuid

import jwt
import pytest
import requests

from helpers import make_tenant, now_iso, post, reading
from test_management import MODBUS_BODY, Api

HUGE = "1" * 5000  # int() refuses more than 4,300 digits


def body_with(bad: str) -> bytes:
    """A batch of three readings whose middle one carries ``bad`` (raw JSON text
    spliced in for the "@@" placeholder)."""
    good = json.dumps(reading())
    return ('{"readings": [%s, %s, %s]}' % (good, bad, good)).encode("utf-8", "surrogatepass")


def bad_reading(**raw: str) -> str:
    """A reading whose fields are given as raw JSON text."""
    fields = {"machine_identifier": '"CNC-001"', "timestamp": json.dumps(now_iso()),
              "metric_name": '"temperature"', "value": "1.5", **raw}
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


PER_READING = {
    "huge integer value": (bad_reading(value=HUGE), "Value must be finite"),
    "huge negative integer value": (bad_reading(value="-" + HUGE), "Value must be finite"),
    "huge integer in an unknown field": (bad_reading(extra=HUGE), None),
    "huge integer as identifier": (bad_reading(machine_identifier=HUGE), "machine_identifier:"),
    "lone surrogate in identifier": (bad_reading(machine_identifier='"\\ud800"'), "machine_identifier: is not valid UTF-8"),
    "lone surrogate in metric": (bad_reading(metric_name='"t\\udfff"'), "metric_name: is not valid UTF-8"),
    "lone surrogate in timestamp": (bad_reading(timestamp='"2026-01-01T00:00:00\\ud800"'),
                                    "timestamp: is not valid UTF-8"),
    "lone surrogate in a field name": (bad_reading(**{"x\\udc80": "1"}), "a field name is not valid UTF-8"),
    "NUL in identifier": (bad_reading(machine_identifier='"CNC\\u0000-001"'), "machine_identifier: contains a NUL"),
    "NUL in metric_name": (bad_reading(metric_name='"temp\\u0000"'), "metric_name: contains a NUL"),
    "NUL in unit": (bad_reading(unit='"\\u0000"'), "unit: contains a NUL"),
    "NUL in raw_tag": (bad_reading(raw_tag='"ns2\\u0000"'), "raw_tag: contains a NUL"),
    "deeply nested unknown field": (bad_reading(extra="[" * 50_000 + "]" * 50_000), "nested too deeply"),
    "deeply nested objects": (bad_reading(extra='{"a":' * 5000 + "1" + "}" * 5000), "nested too deeply"),
    "identifier of 1 MB": (bad_reading(machine_identifier=json.dumps("x" * 1_000_000)), "machine_identifier:"),
}


@pytest.mark.parametrize("case", sorted(PER_READING))
def test_a_bad_reading_is_a_per_reading_error_and_the_rest_is_stored(server, pg_dsn, case):
    t = make_tenant(pg_dsn)
    bad, says = PER_READING[case]
    r = post(server, t.key, body_with(bad))
    assert r.status_code == 207, r.text[:300]
    res = r.json()
    if says is None:  # nothing wrong with what is stored: all three accepted
        assert res["accepted_count"] == 3, res
        return
    assert res["accepted_count"] == 2 and res["rejected_count"] == 1, res
    err = res["errors"][0]
    assert err["index"] == 1 and says in err["error"], err
    assert len(r.content) < 2000  # nothing of a 1 MB identifier is echoed back
    assert t.count(pg_dsn) == 2


def test_bytes_that_are_not_utf8_inside_a_string_fail_only_that_reading(server, pg_dsn):
    t = make_tenant(pg_dsn)
    body = body_with(bad_reading(machine_identifier='"CNC-@@"')).replace(b"@@", b"\xff\xfe")
    r = post(server, t.key, body)
    assert r.status_code == 207, r.text
    assert r.json()["errors"][0]["error"].startswith("machine_identifier: is not valid UTF-8")
    assert t.count(pg_dsn) == 2


def test_a_10_mb_body_of_slow_path_readings_is_refused_without_parsing_it_all(server, tenant):
    one = json.dumps(reading(value=float("nan")))  # NaN literal: the slow path
    body = ('{"readings": [' + ", ".join([one] * 80_000) + "]}").encode()
    assert 9_000_000 < len(body) < 10 * 1024 * 1024
    r = post(server, tenant.key, body)
    assert r.status_code == 422 and "more than 1,000 readings" in r.json()["detail"]


# ------------------------------------------------------------------ management bodies

@pytest.fixture
def api(server, tenant):
    return Api(server, server.token(tenant.org_id))


MANAGEMENT = {
    "huge integer port": ('{"machine_identifier": "M", "port": %s}' % HUGE, "/api/v1/machines"),
    "huge integer identifier": ('{"machine_identifier": %s}' % HUGE, "/api/v1/machines"),
    "NUL in identifier": ('{"machine_identifier": "M\\u0000"}', "/api/v1/machines"),
    "NUL in name": ('{"machine_identifier": "M-nul", "name": "\\u0000"}', "/api/v1/machines"),
    "lone surrogate": ('{"machine_identifier": "\\ud800"}', "/api/v1/machines"),
    "deep nesting": ('{"machine_identifier": "M", "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
                     "/api/v1/machines"),
}


@pytest.mark.parametrize("case", sorted(MANAGEMENT))
def test_bad_management_bodies_get_422_naming_the_problem(api, case):
    body, path = MANAGEMENT[case]
    r = api.post(path, body.encode("utf-8", "surrogatepass"))
    assert r.status_code == 422, r.text[:300]
    assert r.json()["detail"]


def test_nul_and_bad_text_anywhere_in_a_source_body_get_422(api, tenant):
    base = {**MODBUS_BODY, "machine_id": str(tenant.machines["CNC-001"])}
    for where in ("name", "host"):
        r = api.post("/api/v1/ingest-sources", json.dumps({**base, where: "a\u0000b"}))
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{where}:"), r.text
    cfg = {"registers": [{**MODBUS_BODY["config"]["registers"][0], "metric_name": "t\u0000"}]}
    r = api.post("/api/v1/ingest-sources", json.dumps({**base, "config": cfg}))
    assert r.status_code == 422 and "config.registers[0].metric_name" in r.json()["detail"], r.text
    r = api.post("/api/v1/ingest-sources", json.dumps({**base, "config": {"\u0000": 1}}))
    assert r.status_code == 422, r.text
    r = api.post("/api/v1/ingest-sources",
                 json.dumps({**base, "name": "x"}).replace('"x"', '"\\udc80"'))
    assert r.status_code == 422 and "not valid UTF-8" in r.json()["detail"], r.text


@pytest.mark.parametrize("host", ["a" * 64 + ".example.com", "", "a..b", ".", "x" * 254])
def test_hosts_with_bad_dns_labels_get_422(api, tenant, host):
    body = {**MODBUS_BODY, "machine_id": str(tenant.machines["CNC-001"]), "host": host}
    r = api.post("/api/v1/ingest-sources", body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("host:")


def test_a_non_string_org_claim_and_a_token_for_a_missing_org_get_401(server, tenant):
    secret = server.token(tenant.org_id)  # makes sure the secret exists
    from pathlib import Path
    key = (Path(server.env["HALTLESS_DATA_DIR"]) / "jwt-secret").read_text().strip()
    import time
    now = int(time.time())
    for org in (12345, ["x"], {"a": 1}, None, True):
        token = jwt.encode({"iss": "haltless", "org": org, "iat": now, "exp": now + 60}, key,
                           algorithm="HS256")
        r = requests.get(server.url + "/api/v1/machines",
                         headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 401, (org, r.text)
    ghost = server.token(uuid.uuid4())
    for method, path, body in (("GET", "/api/v1/machines", None),
                               ("POST", "/api/v1/machines", {"machine_identifier": "X"})):
        r = requests.request(method, server.url + path, json=body,
                             headers={"Authorization": f"Bearer {ghost}"}, timeout=10)
        assert r.status_code == 401 and "does not exist" in r.json()["detail"], r.text
    assert secret


# ------------------------------------------------------------------ test-connection

def test_test_connection_to_a_device_that_accepts_and_closes_explains_it(api, tenant):
    from peers import LoopThread
    lt = LoopThread()

    async def slammer():
        async def handle(reader, writer):
            writer.close()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        return srv, srv.sockets[0].getsockname()[1]
    srv, port = lt.call(slammer())
    try:
        for body in (MODBUS_BODY, {**MODBUS_BODY, "protocol": "opcua",
                                   "config": {"nodes": [{"node_id": "ns=2;i=1",
                                                         "metric_name": "t"}],
                                              "timeout_seconds": 2}}):
            body = {**body, "machine_id": str(tenant.machines["CNC-001"]), "port": port}
            src = api.post("/api/v1/ingest-sources", body)
            assert src.status_code == 201, src.text
            for _ in range(5):  # the close races the first request: try it a few times
                r = api.post(f"/api/v1/ingest-sources/{src.json()['id']}/test-connection", {})
                assert r.status_code == 200, (body["protocol"], r.text)
                assert r.json()["success"] is False and r.json()["message"], r.json()
    finally:
        async def close():
            srv.close()
            await srv.wait_closed()
        lt.call(close())
        lt.close()


# ------------------------------------------------------------------ framing

@pytest.mark.parametrize("size", [b"zz", b"1234567890123456789", b"-1"])
def test_malformed_chunked_framing_gets_400_not_500(server, tenant, size):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/ingest HTTP/1.1\r\nHost: x\r\nX-API-Key: " + tenant.key.encode()
                  + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc\r\n0\r\n\r\n")
        head = s.recv(4096)
    assert head.split(b" ", 2)[1] == b"400", head


def test_the_hosts_own_addresses_are_refused_by_default():
    from haltless.server.netpolicy import AddressPolicy, TargetRefused, own_addresses
    own = [a for a in own_addresses() if not a.is_loopback and not a.is_link_local]
    if not own:
        pytest.skip("this host has no address besides loopback and link-local")
    for a in own:
        with pytest.raises(TargetRefused, match="this server's own host"):
            AddressPolicy().check(str(a), 502)
        AddressPolicy([__import__("ipaddress").ip_network(f"{a}/128" if a.version == 6
                                                          else f"{a}/32")]).check(str(a), 502)


def test_a_reading_error_for_a_bad_machine_echoes_no_invalid_text(server, pg_dsn):
    t = make_tenant(pg_dsn)
    r = post(server, t.key, body_with(bad_reading(machine_identifier='"\\ud800x"')))
    err = r.json()["errors"][0]
    assert err["index"] == 1 and err["machine_identifier"] is None
