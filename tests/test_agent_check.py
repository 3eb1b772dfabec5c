"""``GET /api/v1/ingest/machines``: which machines an API key's organization has."""
from __future__ import annotations

import re
from urllib.parse import quote

import pytest
import requests
from helpers import make_tenant

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
