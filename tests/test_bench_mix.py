"""The storage benchmark's data generator (bench/mix.py) makes what its
docstring says, inside the ingest contract, and the benchmark runs."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import mix  # noqa: E402
from haltless.core import wire  # noqa: E402

END_US = 1_795_000_000_000_000  # a fixed end: byte-identical bodies on every run
N = 100_000  # 100 ticks: two agent buffers of 50 ticks


@pytest.fixture(scope="module")
def data():
    return mix.generate(N, END_US)


def _digest(m: mix.Mix, shape: str) -> str:
    h = hashlib.sha256()
    for b in mix.bodies(m, shape):
        h.update(b)
    return h.hexdigest()


def test_the_same_seed_and_end_give_byte_identical_bodies_and_another_seed_does_not(data):
    again = mix.generate(N, END_US)
    for shape in mix.SHAPES:
        assert _digest(data, shape) == _digest(again, shape)
    assert _digest(mix.generate(N, END_US, seed=9), "live") != _digest(data, "live")


def _readings(m: mix.Mix, shape: str) -> list[list[wire.Reading]]:
    return [wire.batch_decoder.decode(b).readings for b in mix.bodies(m, shape)]


@pytest.mark.parametrize("shape, per_body", [("agent", 1000), ("live", 1000), ("pollers", 20)])
def test_each_shape_sends_every_reading_once_in_bodies_of_its_documented_size(data, shape, per_body):
    batches = _readings(data, shape)
    assert len(batches) == mix.body_count(data, shape) == N // per_body
    assert {len(b) for b in batches} == {per_body}
    keys = Counter((r.machine_identifier, r.metric_name, r.timestamp) for b in batches for r in b)
    assert len(keys) == N and max(keys.values()) == 1
    if shape == "agent":  # one machine per body
        assert all(len({r.machine_identifier for r in b}) == 1 for b in batches)
    else:  # one tick per body (pollers: of one machine)
        assert all(len({(r.machine_identifier, r.timestamp) for r in b})
                   == per_body // mix.SERIES_PER_MACHINE for b in batches)


def test_the_three_shapes_carry_the_same_readings(data):
    def content(shape):
        return sorted((r.machine_identifier, r.metric_name, r.unit, r.raw_tag, r.timestamp, r.value)
                      for b in _readings(data, shape) for r in b)
    agent = content("agent")
    assert content("live") == agent
    assert content("pollers") == agent


def test_readings_fit_the_contract_window_and_limits():
    now_us = time.time_ns() // 1000
    m = mix.generate(20_000)  # ending now, as the benchmark makes it
    lo = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3650)
    hi = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
    for shape in mix.SHAPES:
        for body in mix.bodies(m, shape):
            assert len(body) <= wire.MAX_BODY_BYTES
            readings = wire.batch_decoder.decode(body).readings
            assert 1 <= len(readings) <= wire.MAX_READINGS
            for r in readings:
                assert lo < r.timestamp <= hi
                assert math.isfinite(r.value)
    assert abs(m.end_us - now_us) < 2_000_000


def test_a_machines_20_metrics_share_one_jittered_microsecond_timestamp_per_tick(data):
    for b in mix.bodies(data, "live"):  # one tick of the fleet per body
        per_machine = defaultdict(list)
        for r in json.loads(b)["readings"]:
            per_machine[r["machine_identifier"]].append(r["timestamp"])
        assert len(per_machine) == mix.MACHINES
        for stamps in per_machine.values():
            assert len(stamps) == mix.SERIES_PER_MACHINE and len(set(stamps)) == 1
    offsets = [u - (END_US - (data.ticks - 1 - t) * 1_000_000)
               for row in data.ts for t, u in enumerate(row)]
    assert max(map(abs, offsets)) <= mix.JITTER_US
    assert len(set(offsets)) > 500  # microseconds, not a rounded grid
    sample = json.loads(next(mix.bodies(data, "live")))["readings"][0]["timestamp"]
    assert sample.endswith("Z") and len(sample) == len("2026-11-28T00:45:59.000213Z")


def test_the_metrics_move_as_documented(data):
    kinds = Counter(kind for _n, _u, kind, _s, _sc in mix.METRICS)
    assert kinds == {"temp": 6, "noisy": 3, "vibration": 4, "counter": 3, "setpoint": 4}
    for m, j, _ts, vals in data.series():
        name, _unit, kind, _sp, scale = mix.METRICS[j]
        if kind in ("temp", "noisy"):
            per = round(1 / scale)
            assert all(repr(v) == repr(round(v * per) / per) for v in vals), name
            assert len(set(vals)) > 1
        if kind == "temp":
            assert all(abs(b - a) <= 0.1 + 1e-9 for a, b in zip(vals, vals[1:]))
        elif kind == "counter":
            assert all(v == int(v) for v in vals) and vals == sorted(vals) and vals[-1] > vals[0]
        elif kind == "setpoint":
            assert len(set(vals)) == 1
        elif kind == "vibration":
            assert len(set(vals)) == len(vals) and min(vals) >= 0
            assert any(len(repr(v)) > 12 for v in vals)  # full precision, not decimals


def test_the_gorilla_count_matches_a_hand_count():
    # 3 points 1 s apart, one value: 64 + 64 header bits; first delta of
    # deltas (1e6 us) '1111' + 32 bits; then D = 0: 1 bit; values: XOR 0: 1 bit each
    assert mix.gorilla_bits([0, 1_000_000, 2_000_000], [5.0, 5.0, 5.0]) == 128 + 36 + 1 + 2
    # a value that changes: XOR of 1.0 and 2.0 has 2 meaningful bits, 1 leading
    # zero (bit 62 and 61 differ...): '11' + 5 + 6 + the meaningful bits
    x = 0x3FF0000000000000 ^ 0x4000000000000000
    lead, trail = 64 - x.bit_length(), (x & -x).bit_length() - 1
    assert mix.gorilla_bits([0, 1_000_000], [1.0, 2.0]) == 128 + 36 + 2 + 5 + 6 + (64 - lead - trail)


@pytest.mark.slow
def test_the_storage_benchmark_runs_end_to_end_and_counts_every_reading(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.storage", "--readings", "20000",
                          "--connections", "8", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (jsonl,) = tmp_path.glob("storage-*.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["target"] for r in records] == ["narrow", "agent", "live", "pollers", "push"]
    for r in records:
        assert r["readings_committed"] == 20_000
        assert r["before"]["bytes_per_reading"] > 0
        assert r["vs_narrow"]["bytes_per_reading"] > 0
    assert all(r["exact"] for r in records)
    assert "| narrow |" in next(tmp_path.glob("storage-*.md")).read_text()
