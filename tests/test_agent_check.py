"""``haltless agent --check`` tries what the agent would do, once: the
server and the key, each source's machine (``GET /api/v1/ingest/machines``)
and device, and says what is wrong and where in one line per problem."""
from __future__ import annotations

import http.server
import os
import re
import subprocess
import textwrap
import threading
from urllib.parse import quote

import pytest
import requests
from helpers import HALTLESS, ROOT, free_port, make_tenant
from peers import ModbusPeer, device
from test_agent import agent_toml

MACHINES = "/api/v1/ingest/machines"


# ------------------------------------------------------------------ the server's side

def ask(server, key, *identifiers, query=None):
    q = query if query is not None else "&".join(f"machine_identifier={quote(m, safe='')}"
                                                for m in identifiers)
    return requests.get(f"{server.url}{MACHINES}?{q}", timeout=10,
                        headers={} if key is None else {"X-API-Key": key})


def test_the_machine_check_names_which_machines_the_keys_organization_has(server, pg_dsn):
    mine = make_tenant(pg_dsn, machines=("CNC-001", "CNC-002"))
    other = make_tenant(pg_dsn, machines=("OTHER-1",))
    r = ask(server, mine.key, "NOPE", "CNC-002", "OTHER-1", "CNC-002")
    assert r.status_code == 200, r.text
    # In the order asked, once each; another organization's machine is not found.
    assert r.json() == {"found": ["CNC-002"], "not_found": ["NOPE", "OTHER-1"]}
    assert ask(server, other.key, "OTHER-1", "CNC-001").json() == {
        "found": ["OTHER-1"], "not_found": ["CNC-001"]}


def test_the_machine_check_refuses_a_missing_or_unknown_key(server, pg_dsn):
    t = make_tenant(pg_dsn)
    for key in (None, "hk_unknown", server.token(t.org_id)):
        r = ask(server, key, "CNC-001")
        assert r.status_code == 401 and "found" not in r.json(), (key, r.text)


@pytest.mark.parametrize("query, expect", [
    ("", r"^machine_identifier: required"),
    ("&".join(["machine_identifier=m"] * 101), r"^machine_identifier: given 101 times; at most 100"),
    ("machine_identifier=ok&machine_identifier=" + "x" * 201,
     r"^machine_identifier\[1\]: must be 1 to 200 characters, not 201"),
    ("machine_identifier=", r"^machine_identifier\[0\]: must be 1 to 200"),
    ("machine=CNC-001", r"^machine: unknown query parameter"),
    ("machine_identifier=a%00b", r"^machine_identifier: contains a NUL"),
])
def test_the_machine_check_bounds_its_input_and_names_the_parameter(server, pg_dsn, query, expect):
    t = make_tenant(pg_dsn)
    r = ask(server, t.key, query=query)
    assert r.status_code == 422 and re.search(expect, r.json()["detail"]), r.text


# ------------------------------------------------------------------ the agent's side

def run_check(cfg, *flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HALTLESS_API")}
    p = subprocess.run(HALTLESS + ["agent", "--check", *flags, "--config", str(cfg)], cwd=ROOT,
                       env=env, check=False, capture_output=True, text=True, timeout=90)
    return p.returncode, p.stdout, p.stderr


def with_source(cfg, name, machine, port):
    cfg.write_text(cfg.read_text() + textwrap.dedent(f'''
        [[source]]
        name = "{name}"
        machine_identifier = "{machine}"
        protocol = "modbus"

        [source.modbus]
        host = "127.0.0.1"
        port = {port}
        timeout_seconds = 1

        [[source.modbus.registers]]
        address = 100
        metric_name = "x"
        '''))
    return cfg


def test_check_passes_when_server_key_machines_and_devices_are_right(server, pg_dsn, tmp_path):
    t = make_tenant(pg_dsn, machines=("CONV-001",))
    with ModbusPeer([device(1, {100: 725}, {102: 1500})]) as peer:
        code, out, err = run_check(agent_toml(tmp_path, peer.port, server.url, t.key))
    assert code == 0, out + err
    lines = out.splitlines()
    assert "configuration OK (1 sources)" in lines[0]
    assert lines[1] == (f"ok    server {server.url}/api/v1/ingest: an ingest API; "
                        "api_key accepted")
    assert lines[2] == "ok    machines: all 1 registered (CONV-001)"
    assert lines[3].split() == ["SOURCE", "MACHINE", "DEVICE", "LATENCY", "MESSAGE"]
    assert lines[4].split()[:3] == ["conveyor-motor", "CONV-001", "ok"]
    assert lines[-1] == "check passed"
    assert t.count(pg_dsn) == 0  # the check stores nothing


def test_check_names_the_source_whose_machine_is_unregistered_and_whose_device_fails(
        server, pg_dsn, tmp_path):
    t = make_tenant(pg_dsn, machines=("CONV-001",))
    dead = free_port()
    with ModbusPeer([device(1, {100: 725}, {102: 1500})]) as peer:
        cfg = with_source(agent_toml(tmp_path, peer.port, server.url, t.key),
                          "dead-plc", "CONV-002", dead)
        code, out, err = run_check(cfg)
    assert code == 1, out + err
    fails = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert fails == [(f"FAIL  source 'dead-plc': machine 'CONV-002' is not registered in "
                      f"api_key's organization on {server.url}/: its readings would be rejected; "
                      "register it there (`haltless machines add CONV-002`) or correct "
                      "machine_identifier")], out
    rows = {ln.split()[0]: ln for ln in out.splitlines()
            if ln.startswith(("conveyor-motor", "dead-plc"))}
    assert rows["conveyor-motor"].split()[1:3] == ["CONV-001", "ok"]
    assert rows["dead-plc"].split()[1:3] == ["CONV-002", "failed"]
    assert "refused" in rows["dead-plc"]
    assert out.splitlines()[-1] == "check failed: 2 problems"


def test_check_fails_in_one_line_on_a_wrong_port(pg_dsn, tmp_path):
    port = free_port()  # nothing listens there
    code, out, err = run_check(agent_toml(tmp_path, 1502, f"http://127.0.0.1:{port}", "hk_x"))
    assert code == 1, out + err
    lines = out.splitlines()
    assert lines[1] == (f"FAIL  server http://127.0.0.1:{port}/api/v1/ingest: cannot connect "
                        "(Connection refused); is the server running there, and are api_url's "
                        "host and port right?")
    assert lines[2] == "skip  machines: not checked (the server or the key failed above)"


def test_check_fails_in_one_line_on_a_refused_key_and_never_prints_it(server, tmp_path):
    key = "hk_" + "s3cret" * 5
    code, out, err = run_check(agent_toml(tmp_path, 1502, server.url, key))
    assert code == 1, out + err
    assert out.splitlines()[1] == (f"FAIL  api_key: refused by {server.url}/api/v1/ingest "
                                   "(401: invalid or revoked API key); use a key this server "
                                   "issued (`haltless keys create` on it)")
    assert key not in out + err


def test_check_fails_when_api_url_is_not_an_ingest_api(server, tmp_path):
    # The haltless server under a wrong path prefix ...
    code, out, _ = run_check(agent_toml(tmp_path, 1502, server.url + "/static", "hk_x"))
    assert code == 1
    assert out.splitlines()[1].startswith(
        f"FAIL  server {server.url}/static/api/v1/ingest: answered 404 (application/json) to "
        "an empty batch: nothing takes readings at that path; api_url is the server's base URL")
    # ... and another web server on the port.
    (tmp_path / "www").mkdir()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: http.server.
                                          SimpleHTTPRequestHandler(*a, directory=tmp_path / "www"))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{web.server_address[1]}"
        code, out, _ = run_check(agent_toml(tmp_path, 1502, url, "hk_x"))
    finally:
        web.shutdown()
        web.server_close()
    assert code == 1
    assert out.splitlines()[1].startswith(f"FAIL  server {url}/api/v1/ingest: answered 501 "), out
    assert out.splitlines()[1].endswith(
        "not the 207 of an ingest API; is api_url the haltless server?"), out


def test_check_offline_validates_the_file_only(tmp_path):
    cfg = agent_toml(tmp_path, 1502, f"http://127.0.0.1:{free_port()}", "hk_x")
    code, out, err = run_check(cfg, "--offline")
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"{cfg}: configuration OK (1 sources)",
                                ("offline: the server, the machines and the devices were not "
                                 "checked")]
    code, out, err = run_check(cfg.with_name("missing.toml"), "--offline")
    assert code == 2 and "cannot read" in err and len(err.strip().splitlines()) == 1


def test_offline_without_check_is_refused(tmp_path):
    cfg = agent_toml(tmp_path, 1502, "http://127.0.0.1:1", "hk_x")
    p = subprocess.run(HALTLESS + ["agent", "--offline", "--config", str(cfg)], cwd=ROOT,
                       check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--offline goes with --check" in p.stderr
