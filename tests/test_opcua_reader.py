"""OpcuaReader against a real in-process asyncua server on 127.0.0.1.

The servers live in one module-wide event loop (``loop`` fixture); each test
drives it with ``loop.run_until_complete``. asyncua servers take ~1.5 s to
start, so one server (``opc``) serves most tests.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import socket
import stat
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from haltless.pollers import opcua_session
from haltless.core.errors import ReaderError
from haltless.pollers.opcua import OpcuaReader
from haltless.pollers.trust import FileTrustStore
from haltless.pollers.opcua_config import (OpcuaConfig, OpcuaNode, endpoint_url, parse_endpoint,
                                           raw_tag, validate_opcua_config)
from helpers import free_port

USER, PASSWORD = "operator", "s3cret-pw"
GUID = "09087e75-8e5e-499b-954f-f2a9603db28a"
OPAQUE = "M/RbKBsRVkePCePcx24oRA=="
STAMP = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
ALL_POLICIES = [
    ua.SecurityPolicyType.NoSecurity,
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
]
MAX_NODES_PER_READ = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)


class OneUserManager:
    """Anonymous sessions (for security None) or exactly one username/password."""

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username is None or (username == USER and password == PASSWORD):
            return User(role=UserRole.User)
        return None


def make_server_cert(name: str) -> tuple[bytes, bytes]:
    """(certificate DER, private key PEM) for a test server."""
    key = cert_gen.generate_private_key()
    uri = "urn:haltless:test-server"
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName(socket.gethostname())],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    return cert.public_bytes(Encoding.DER), cert_gen.dump_private_key_as_pem(key)


async def start_server(port: int, cert: tuple[bytes, bytes] | None, policies=ALL_POLICIES) -> Server:
    srv = Server(user_manager=OneUserManager())
    await srv.init()
    srv.set_endpoint(endpoint_url("127.0.0.1", port))
    await srv.set_application_uri("urn:haltless:test-server")
    srv.set_security_policy(policies)
    if cert is not None:
        await srv.load_certificate(cert[0], format="der")
        await srv.load_private_key(cert[1], format="pem")
    idx = await srv.register_namespace("urn:haltless:test")
    assert idx == 2
    objects = srv.nodes.objects
    for i in range(1001, 1013):
        await objects.add_variable(ua.NodeId(i, 2), f"N{i}", i / 10)
    await objects.add_variable(ua.NodeId("Vibration.X", 2), "VibX", 0.25)
    await objects.add_variable(ua.NodeId(uuid.UUID(GUID), 2), "Guid", ua.Variant(3, ua.VariantType.UInt16))
    await objects.add_variable(ua.NodeId(base64.b64decode(OPAQUE), 2), "Opaque", ua.Variant(-42, ua.VariantType.Int64))
    await objects.add_variable(ua.NodeId("Pump.Running", 2), "Running", True)
    await objects.add_variable(ua.NodeId("Pump.Name", 2), "Name", "P-101")
    for name in ("Sensor.Broken", "Sensor.Uncertain", "Stamped", "Unstamped"):
        await objects.add_variable(ua.NodeId(name, 2), name, 0.0)
    await srv.write_attribute_value(ua.NodeId("Sensor.Broken", 2), ua.DataValue(
        ua.Variant(1.0), StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure)))
    await srv.write_attribute_value(ua.NodeId("Sensor.Uncertain", 2), ua.DataValue(
        ua.Variant(5.0), StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)))
    await srv.write_attribute_value(ua.NodeId("Stamped", 2), ua.DataValue(ua.Variant(7.5), SourceTimestamp=STAMP))
    await srv.write_attribute_value(ua.NodeId("Unstamped", 2), ua.DataValue(ua.Variant(8.5), SourceTimestamp=None))
    await srv.start()
    return srv


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop

    async def cancel_leftovers():
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    loop.run_until_complete(cancel_leftovers())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


@pytest.fixture(scope="module")
def opc(loop):
    """The shared server: all three security modes, one certificate."""
    cert = make_server_cert("server-a")
    port = free_port()
    srv = loop.run_until_complete(start_server(port, cert))
    yield SimpleNamespace(
        server=srv, endpoint=endpoint_url("127.0.0.1", port), port=port,
        fingerprint=hashlib.sha256(cert[0]).hexdigest(),
    )
    loop.run_until_complete(srv.stop())


def cfg(*node_ids: str, **kw) -> OpcuaConfig:
    nodes = [OpcuaNode(node_id=n, metric_name=f"m.{raw_tag(n)}", unit="u") for n in node_ids]
    config = OpcuaConfig(nodes=nodes, **{"timeout_seconds": 3.0, **kw})
    validate_opcua_config(config)
    return config


def secure(mode: str = "SignAndEncrypt", **kw) -> dict:
    return {"security_mode": mode, "username": USER, "password": PASSWORD, **kw}


def make_reader(endpoint: str, config: OpcuaConfig, tmp_path: Path) -> OpcuaReader:
    return OpcuaReader(endpoint, config, pki_dir=tmp_path / "pki", trust_store=FileTrustStore(tmp_path / "trust.json"))


def read_once(loop, reader: OpcuaReader):
    async def go():
        await reader.connect()
        try:
            return await reader.read()
        finally:
            await reader.close()
    return loop.run_until_complete(go())


def by_tag(result):
    return {s.raw_tag: s for s in result.samples}, {e.raw_tag: e for e in result.errors}


# ---------------------------------------------------------------- reading

def test_each_node_id_format_reads_its_value_under_the_contract_raw_tag(loop, opc, tmp_path):
    ids = ["ns=2;i=1001", "ns=2;s=Vibration.X", f"ns=2;g={GUID}", f"ns=2;b={OPAQUE}"]
    result = read_once(loop, make_reader(opc.endpoint, cfg(*ids), tmp_path))
    assert result.errors == []
    got = {s.raw_tag: (s.metric_name, s.unit, s.value) for s in result.samples}
    assert got == {
        "ns2_i1001": ("m.ns2_i1001", "u", 100.1),
        "ns2_sVibration.X": ("m.ns2_sVibration.X", "u", 0.25),
        f"ns2_g{GUID}": (f"m.ns2_g{GUID}", "u", 3.0),
        "ns2_bM/RbKBsRVkePCePcx24oRA": ("m.ns2_bM/RbKBsRVkePCePcx24oRA", "u", -42.0),
    }


def test_boolean_reads_as_one_and_string_value_is_a_not_numeric_point_error(loop, opc, tmp_path):
    result = read_once(loop, make_reader(opc.endpoint, cfg("ns=2;s=Pump.Running", "ns=2;s=Pump.Name"), tmp_path))
    samples, errors = by_tag(result)
    assert samples["ns2_sPump.Running"].value == 1.0
    assert errors["ns2_sPump.Name"].message == "value of type String is not numeric"
    assert errors["ns2_sPump.Name"].metric_name == "m.ns2_sPump.Name"


def test_unknown_node_is_that_points_error_and_the_others_still_read(loop, opc, tmp_path):
    result = read_once(loop, make_reader(opc.endpoint, cfg("ns=2;i=1001", "ns=2;i=999999", "ns=2;i=1002"), tmp_path))
    samples, errors = by_tag(result)
    assert set(samples) == {"ns2_i1001", "ns2_i1002"}
    assert list(errors) == ["ns2_i999999"]
    assert "does not exist on the server" in errors["ns2_i999999"].message
    assert "BadNodeIdUnknown" in errors["ns2_i999999"].message


def test_bad_and_uncertain_status_values_are_point_errors_not_samples(loop, opc, tmp_path):
    config = cfg("ns=2;s=Sensor.Broken", "ns=2;s=Sensor.Uncertain")
    result = read_once(loop, make_reader(opc.endpoint, config, tmp_path))
    samples, errors = by_tag(result)
    assert samples == {}
    assert "BadSensorFailure" in errors["ns2_sSensor.Broken"].message
    assert "UncertainLastUsableValue" in errors["ns2_sSensor.Uncertain"].message


def test_source_timestamp_is_used_when_given_else_the_poll_time(loop, opc, tmp_path):
    before = dt.datetime.now(dt.timezone.utc)
    result = read_once(loop, make_reader(opc.endpoint, cfg("ns=2;s=Stamped", "ns=2;s=Unstamped"), tmp_path))
    after = dt.datetime.now(dt.timezone.utc)
    samples, _ = by_tag(result)
    assert (samples["ns2_sStamped"].value, samples["ns2_sStamped"].timestamp) == (7.5, STAMP)
    assert samples["ns2_sUnstamped"].value == 8.5
    unstamped = samples["ns2_sUnstamped"].timestamp
    assert unstamped.tzinfo is not None and before <= unstamped <= after


def test_reads_are_split_into_batches_of_the_servers_max_nodes_per_read(loop, opc, tmp_path):
    batches: list[int] = []

    def count_reads(event, _dispatcher):
        nodes = event.request_params.NodesToRead
        if any(n.NodeId.NamespaceIndex == 2 for n in nodes):  # ignore the client's keep-alive probes
            batches.append(len(nodes))

    ids = [f"ns=2;i={i}" for i in range(1001, 1013)]
    reader = make_reader(opc.endpoint, cfg(*ids), tmp_path)

    async def go():
        limit = opc.server.get_node(MAX_NODES_PER_READ)
        await limit.write_value(ua.Variant(5, ua.VariantType.UInt32))
        opc.server.subscribe_server_callback(CallbackType.PreRead, count_reads)
        try:
            await reader.connect()
            try:
                return await reader.read()
            finally:
                await reader.close()
        finally:
            opc.server.unsubscribe_server_callback(CallbackType.PreRead, count_reads)
            await limit.write_value(ua.Variant(10000, ua.VariantType.UInt32))

    result = loop.run_until_complete(go())
    assert reader.max_nodes_per_read == 5
    assert batches == [5, 5, 2]
    assert sorted(s.value for s in result.samples) == pytest.approx([i / 10 for i in range(1001, 1013)])


# ---------------------------------------------------------------- security

def test_sign_and_encrypt_with_username_and_password_reads_values(loop, opc, tmp_path):
    result = read_once(loop, make_reader(opc.endpoint, cfg("ns=2;i=1002", **secure()), tmp_path))
    assert [(s.raw_tag, s.value) for s in result.samples] == [("ns2_i1002", 100.2)]


def test_sign_mode_with_username_reads_values(loop, opc, tmp_path):
    result = read_once(loop, make_reader(opc.endpoint, cfg("ns=2;i=1003", **secure("Sign")), tmp_path))
    assert [(s.raw_tag, s.value) for s in result.samples] == [("ns2_i1003", 100.3)]


def test_wrong_password_is_a_reader_error_naming_the_rejected_user(loop, opc, tmp_path):
    reader = make_reader(opc.endpoint, cfg("ns=2;i=1001", **secure(password="nope")), tmp_path)
    with pytest.raises(ReaderError) as err:
        loop.run_until_complete(reader.connect())
    assert str(err.value) == (
        "the server rejected user 'operator': wrong username or password (BadUserAccessDenied)"
    )


def test_first_connection_records_the_server_fingerprint_and_a_matching_pin_connects(loop, opc, tmp_path):
    read_once(loop, make_reader(opc.endpoint, cfg("ns=2;i=1001", **secure()), tmp_path))
    recorded = json.loads((tmp_path / "trust.json").read_text())
    assert recorded == {opc.endpoint: opc.fingerprint}
    pinned = cfg("ns=2;i=1001", **secure(server_certificate_sha256=opc.fingerprint.upper()))
    assert len(read_once(loop, make_reader(opc.endpoint, pinned, tmp_path / "other")).samples) == 1


def test_pinned_fingerprint_mismatch_is_refused_before_logging_in(loop, opc, tmp_path):
    pin = "ab" * 32
    reader = make_reader(opc.endpoint, cfg("ns=2;i=1001", **secure(server_certificate_sha256=pin)), tmp_path)
    with pytest.raises(ReaderError) as err:
        loop.run_until_complete(reader.connect())
    msg = str(err.value)
    assert "does not match the pinned fingerprint" in msg
    assert pin in msg and opc.fingerprint in msg
    assert not (tmp_path / "trust.json").exists()


def test_changed_server_certificate_is_refused_with_both_fingerprints(loop, tmp_path):
    port = free_port()
    first, second = make_server_cert("first"), make_server_cert("second")
    endpoint = endpoint_url("127.0.0.1", port)
    config = cfg("ns=2;i=1001", **secure())

    async def go():
        srv = await start_server(port, first)
        try:
            reader = make_reader(endpoint, config, tmp_path)
            await reader.connect()
            await reader.close()
        finally:
            await srv.stop()
        srv = await start_server(port, second)
        try:
            await make_reader(endpoint, config, tmp_path).connect()
        finally:
            await srv.stop()

    with pytest.raises(ReaderError) as err:
        loop.run_until_complete(go())
    old, new = (hashlib.sha256(c[0]).hexdigest() for c in (first, second))
    msg = str(err.value)
    assert "certificate" in msg and "changed" in msg
    assert old in msg and new in msg
    assert f"server_certificate_sha256 to {new}" in msg
    assert json.loads((tmp_path / "trust.json").read_text()) == {endpoint: old}


def test_server_rejecting_our_certificate_names_its_path_and_fingerprint(loop, opc, tmp_path):
    async def untrusted(_cert, _app):
        raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    reader = make_reader(opc.endpoint, cfg("ns=2;i=1001", **secure()), tmp_path)
    opc.server.iserver.certificate_validator = untrusted
    try:
        with pytest.raises(ReaderError) as err:
            loop.run_until_complete(reader.connect())
    finally:
        opc.server.iserver.certificate_validator = None
    client_der = (tmp_path / "pki" / "client_cert.der").read_bytes()
    msg = str(err.value)
    assert "BadCertificateUntrusted" in msg and "must be trusted on the server" in msg
    assert str(tmp_path / "pki" / "client_cert.der") in msg
    assert hashlib.sha256(client_der).hexdigest() in msg


def test_client_certificate_is_generated_once_and_reused(loop, opc, tmp_path, monkeypatch):
    calls = []
    real = opcua_session.cert_gen.generate_private_key
    monkeypatch.setattr(opcua_session.cert_gen, "generate_private_key", lambda: calls.append(1) or real())
    pki = tmp_path / "pki"
    threads = [threading.Thread(target=opcua_session.ensure_client_certificate, args=(pki,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert stat.S_IMODE((pki / "client_key.pem").stat().st_mode) == 0o600
    files = {p.name: p.read_bytes() for p in pki.iterdir()}
    assert set(files) == {"client_cert.der", "client_key.pem"}
    config = cfg("ns=2;i=1001", **secure())

    async def two_readers_at_once():
        readers = [make_reader(opc.endpoint, config, tmp_path) for _ in range(2)]
        await asyncio.gather(*(r.connect() for r in readers))
        results = await asyncio.gather(*(r.read() for r in readers))
        await asyncio.gather(*(r.close() for r in readers))
        return results

    results = loop.run_until_complete(two_readers_at_once())
    assert all(len(r.samples) == 1 for r in results)
    assert len(calls) == 1
    assert {p.name: p.read_bytes() for p in pki.iterdir()} == files


# ---------------------------------------------------------------- connection failures

def test_refused_port_is_a_reader_error_saying_refused(loop, tmp_path):
    port = free_port()
    reader = make_reader(endpoint_url("127.0.0.1", port), cfg("ns=2;i=1001"), tmp_path)
    with pytest.raises(ReaderError) as err:
        loop.run_until_complete(reader.connect())
    assert str(err.value) == f"connection refused by 127.0.0.1:{port} - is the OPC-UA server running?"


def test_silent_server_is_a_reader_error_saying_no_answer_within_the_timeout(loop, tmp_path):
    async def go():
        accepted: list[asyncio.StreamWriter] = []
        silent = await asyncio.start_server(lambda _r, w: accepted.append(w), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        try:
            reader = make_reader(endpoint_url("127.0.0.1", port), cfg("ns=2;i=1001", timeout_seconds=0.3), tmp_path)
            await reader.connect()
        finally:
            for writer in accepted:
                writer.close()
                await writer.wait_closed()
            silent.close()
            await silent.wait_closed()

    with pytest.raises(ReaderError, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.3s"):
        loop.run_until_complete(go())


def test_security_mode_the_server_does_not_offer_is_explained(loop, tmp_path):
    port = free_port()
    reader = make_reader(endpoint_url("127.0.0.1", port), cfg("ns=2;i=1001", **secure("Sign")), tmp_path)

    async def go():
        srv = await start_server(port, None, [ua.SecurityPolicyType.NoSecurity])
        try:
            await reader.connect()
        finally:
            await srv.stop()

    with pytest.raises(ReaderError) as err:
        loop.run_until_complete(go())
    assert "does not offer security mode Sign with policy Basic256Sha256; it offers: None/None" in str(err.value)


def test_server_restart_makes_read_fail_then_close_and_connect_recover(loop, opc, tmp_path):
    port = free_port()
    reader = make_reader(endpoint_url("127.0.0.1", port), cfg("ns=2;i=1004", "ns=2;s=Vibration.X"), tmp_path)

    async def go():
        srv = await start_server(port, None, [ua.SecurityPolicyType.NoSecurity])
        try:
            await reader.connect()
            assert len((await reader.read()).samples) == 2
            await srv.stop()
            with pytest.raises(ReaderError, match="lost the connection"):
                await reader.read()
            await reader.close()
            await srv.start()
            await reader.connect()
            return await reader.read()
        finally:
            await reader.close()
            await srv.stop()

    result = loop.run_until_complete(go())
    assert sorted(s.value for s in result.samples) == [0.25, 100.4]


def test_close_never_raises_and_read_before_connect_is_a_reader_error(loop, opc, tmp_path):
    reader = make_reader(opc.endpoint, cfg("ns=2;i=1001"), tmp_path)

    async def go():
        await reader.close()
        with pytest.raises(ReaderError, match="not connected"):
            await reader.read()
        await reader.connect()
        await reader.close()
        await reader.close()

    loop.run_until_complete(go())


# ---------------------------------------------------------------- config, tags, endpoints, trust store

def test_raw_tag_drops_equals_and_turns_semicolons_into_underscores():
    assert raw_tag("ns=2;i=1001") == "ns2_i1001"
    assert raw_tag("ns=2;s=Temperature.Value") == "ns2_sTemperature.Value"
    assert raw_tag(f"ns=2;g={GUID}") == f"ns2_g{GUID}"
    assert raw_tag(f"ns=2;b={OPAQUE}") == "ns2_bM/RbKBsRVkePCePcx24oRA"
    assert raw_tag("i=85") == "i85"


@pytest.mark.parametrize("node_id", [
    "ns=2;i=1001", "i=85", "ns=2;s=Temperature.Value", "s=a;b=c", f"ns=2;g={GUID}", f"ns=2;g={GUID.upper()}",
    f"ns=2;b={OPAQUE}", "ns=65535;i=4294967295",
])
def test_contract_node_id_formats_are_accepted(node_id):
    validate_opcua_config(OpcuaConfig(nodes=[OpcuaNode(node_id=node_id, metric_name="m")]))


@pytest.mark.parametrize(("node_id", "reason"), [
    ("ns=2;x=1", "is not a node id; use ns=<n>;i=<number>, ns=<n>;s=<string>, ns=<n>;g=<guid>, or ns=<n>;b=<base64>"),
    ("Temperature", "is not a node id"),
    ("ns=2;i=", "is not a node id"),
    ("ns=2;i=12a", "numeric identifier"),
    ("ns=2;i=4294967296", "numeric identifier"),
    ("ns=70000;i=1", "namespace index 70000 is out of range"),
    ("ns=2;g=09087e75-8e5e-499b-954f-f2a9603db28", "GUID"),
    ("ns=2;g={09087e75-8e5e-499b-954f-f2a9603db28a}", "GUID"),
    ("ns=2;b=M/RbKBsRVkePCePcx24oRA", "base64"),
    ("ns=2;b=not base64!", "base64"),
])
def test_bad_node_ids_are_rejected_naming_the_node_path(node_id, reason):
    config = OpcuaConfig(nodes=[OpcuaNode(node_id="i=1", metric_name="a"), OpcuaNode(node_id=node_id, metric_name="b")])
    with pytest.raises(ValueError) as err:
        validate_opcua_config(config)
    assert str(err.value).startswith(f"nodes[1].node_id: {node_id!r}")
    assert reason in str(err.value)


@pytest.mark.parametrize(("fields", "message"), [
    ({"username": "u", "security_mode": "Sign"}, "password: required when username is set"),
    ({"password": "p", "security_mode": "Sign"}, "username: required when password is set"),
    ({"username": "u", "password": "p"}, "password would travel in clear text"),
    ({"security_mode": "Sign", "server_certificate_sha256": "abc"}, "server_certificate_sha256: 'abc' must be 64 hex"),
    ({"server_certificate_sha256": "a" * 64}, "server_certificate_sha256: a pin only takes effect"),
])
def test_inconsistent_security_settings_are_rejected_naming_the_field(fields, message):
    config = OpcuaConfig(nodes=[OpcuaNode(node_id="i=1", metric_name="m")], **fields)
    with pytest.raises(ValueError, match=message):
        validate_opcua_config(config)


def test_config_wire_type_defaults_and_unknown_fields():
    config = msgspec.json.decode(b'{"nodes": [{"node_id": "ns=2;i=1", "metric_name": "t"}]}', type=OpcuaConfig)
    assert (config.security_mode, config.security_policy, config.timeout_seconds) == ("None", "Basic256Sha256", 5.0)
    assert (config.username, config.password, config.server_certificate_sha256) == (None, None, None)
    with pytest.raises(msgspec.ValidationError, match="unknown field `tls`"):
        msgspec.convert({"nodes": [{"node_id": "i=1", "metric_name": "t"}], "tls": True}, OpcuaConfig)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.nodes\[0\]\.metric_name"):
        msgspec.convert({"nodes": [{"node_id": "i=1", "metric_name": ""}]}, OpcuaConfig)


def test_endpoint_parsing_and_formatting():
    assert parse_endpoint("opc.tcp://plc-7.local:4840") == ("plc-7.local", 4840)
    assert parse_endpoint("opc.tcp://10.0.0.5:48010/UA/Server") == ("10.0.0.5", 48010)
    assert parse_endpoint("opc.tcp://[::1]:4840") == ("::1", 4840)
    assert endpoint_url("10.0.0.5", 4840) == "opc.tcp://10.0.0.5:4840"
    assert endpoint_url("::1", 4840) == "opc.tcp://[::1]:4840"
    for bad, why in [
        ("http://h:4840", "is not an opc.tcp:// URL"), ("opc.tcp://h", "has no port"),
        ("opc.tcp://:4840", "has no host"), ("opc.tcp://h:99999", "invalid port"),
        ("opc.tcp://u:p@h:4840", "contains credentials"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_endpoint(bad)


def test_file_trust_store_round_trips_and_leaves_no_temp_files(loop, tmp_path):
    store = FileTrustStore(tmp_path / "state" / "trust.json")

    async def go():
        assert await store.get("opc.tcp://a:1") is None
        await store.put("opc.tcp://a:1", "11" * 32)
        await store.put("opc.tcp://b:2", "22" * 32)
        await store.put("opc.tcp://a:1", "33" * 32)
        return await store.get("opc.tcp://a:1"), await store.get("opc.tcp://b:2")

    assert loop.run_until_complete(go()) == ("33" * 32, "22" * 32)
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["trust.json"]
