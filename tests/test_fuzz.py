"""A short run of bench/fuzz.py's generator against the suite's server: no
5xx, no traceback in the server's log (the full run, 10,000+ requests, is
`python -m bench.fuzz`; its figures are in bench/results/fuzz-*.jsonl)."""
from __future__ import annotations

import asyncio
import json
import os
import uuid

from bench.fuzz import fuzz
from helpers import make_tenant
from test_management import MODBUS_BODY, Api


def test_fuzzed_requests_get_no_5xx_and_log_no_traceback(server, pg_dsn):
    t = make_tenant(pg_dsn, machines=("CNC-001",))
    token = server.token(t.org_id)
    api = Api(server, token)
    src = api.post("/api/v1/ingest-sources", {**MODBUS_BODY, "is_active": False,
                                              "machine_id": str(t.machines["CNC-001"])}).json()
    mark = len(server.log())
    seed = int(os.environ.get("FUZZ_SEED", uuid.uuid4().int % 10_000))  # a failure names it
    res = asyncio.run(fuzz(server.url, t.key, token, str(t.machines["CNC-001"]), src["id"],
                           n=800, seed=seed, concurrency=8))
    fivexx = {k: v for k, v in res["counts"].items() if k.startswith("5")}
    assert not fivexx, f"seed {seed}: " + json.dumps(res["server_errors"], indent=1)[:4000]
    assert sum(v for k, v in res["counts"].items() if k.isdigit()) >= 750, res["counts"]
    assert "Traceback" not in server.log()[mark:], server.log()[mark:][-4000:]
