"""The storage benchmark's data: a seeded, realistic telemetry mix (issue #8).

A fleet of 50 machines x 20 metrics polled once a second. Per machine:

| metrics | how they move | resolution | example |
|---|---|---|---|
| 6 temperatures | slow random walk, steps of -0.1 / 0 / +0.1 | 0.1 | 72.3 |
| spindle speed (rpm) | noise around a setpoint (sd 15) | 0.1 | 11987.4 |
| motor current (A) | noise around a setpoint (sd 0.3) | 0.01 | 11.37 |
| air pressure (bar) | noise around a setpoint (sd 0.05) | 0.01 | 6.08 |
| 4 vibrations (mm/s) | abs(gauss) x 3.2, full float64 precision | - | 2.0417781553064786 |
| 3 counters | monotonic integers, small random steps, sent as floats | 1 | 15203.0 |
| 4 setpoints | constant | - | 12000.0 |

All 20 metrics of a machine share ONE timestamp per tick: the poll time, on
the 1 s grid plus a uniform jitter of +-500 us at microsecond precision,
sent as ISO 8601 ``Z`` strings (``2026-11-28T00:45:59.000213Z``), as a real
``haltless pollers`` run stamps them. Units and ``raw_tag`` are what a poller
sends: even machines are Modbus (``hr100``, ``hr102``, ...), odd machines
OPC-UA (``ns2_i1001``, ...).

The data set is ``ticks`` seconds of all 1,000 series ending at ``end_us``
(so N readings = N / 1,000 ticks; 2,000,000 readings = 2,000 ticks, ~33
minutes ending now, inside the contract's window of 3,650 days back and 5
minutes ahead). The same data can be framed as three write shapes, each a
sequence of contract bodies ``{"readings": [...]}`` of at most 1,000 readings:

- ``agent``: one machine's 20 metrics x 50 consecutive ticks per body
  (an edge agent that buffers);
- ``live``: one tick of all 50 machines x 20 metrics per body (a gateway that
  sends as it polls);
- ``pollers``: one machine's 20 readings of one tick per body (one ingest
  call per poll, what ``haltless pollers`` writes).

Every shape carries exactly the same readings, each once. Same seed and
``end_us`` -> byte-identical bodies. Pure Python: 2 M readings in a few seconds.
"""
from __future__ import annotations

import datetime as dt
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

MACHINES = 50
SERIES_PER_MACHINE = 20
SERIES = MACHINES * SERIES_PER_MACHINE  # readings per tick
AGENT_TICKS = 50  # ticks per agent body: 20 x 50 = 1,000 readings
SHAPES = ("agent", "live", "pollers")
JITTER_US = 500

# (metric_name, unit, kind, setpoint, scale): kind decides how it moves.
METRICS: list[tuple[str, str, str, float, float]] = [
    ("coolant_temp", "celsius", "temp", 24.0, 0.1),
    ("motor_temp", "celsius", "temp", 61.0, 0.1),
    ("spindle_bearing_temp", "celsius", "temp", 72.3, 0.1),
    ("hydraulic_oil_temp", "celsius", "temp", 45.0, 0.1),
    ("cabinet_temp", "celsius", "temp", 31.5, 0.1),
    ("ambient_temp", "celsius", "temp", 22.0, 0.1),
    ("spindle_speed", "rpm", "noisy", 12000.0, 0.1),
    ("motor_current", "A", "noisy", 11.0, 0.01),
    ("air_pressure", "bar", "noisy", 6.1, 0.01),
    ("vibration_x", "mm/s", "vibration", 0.0, 3.2),
    ("vibration_y", "mm/s", "vibration", 0.0, 3.2),
    ("vibration_z", "mm/s", "vibration", 0.0, 3.2),
    ("vibration_spindle", "mm/s", "vibration", 0.0, 3.2),
    ("cycle_count", "count", "counter", 15000.0, 1.0),
    ("part_count", "count", "counter", 4000.0, 1.0),
    ("energy_total", "Wh", "counter", 250000.0, 1.0),
    ("spindle_speed_setpoint", "rpm", "setpoint", 12000.0, 1.0),
    ("feed_override", "percent", "setpoint", 100.0, 1.0),
    ("coolant_temp_setpoint", "celsius", "setpoint", 22.0, 1.0),
    ("air_pressure_setpoint", "bar", "setpoint", 6.0, 1.0),
]
assert len(METRICS) == SERIES_PER_MACHINE
NOISE_SD = {"spindle_speed": 15.0, "motor_current": 0.3, "air_pressure": 0.05}
COUNTER_STEP = {"cycle_count": 2, "part_count": 1, "energy_total": 5}  # 0..step per second


def machine_id(m: int) -> str:
    return f"CNC-{m + 1:03d}"


def machine_ids() -> list[str]:
    return [machine_id(m) for m in range(MACHINES)]


def raw_tag(m: int, j: int) -> str:
    return f"hr{100 + 2 * j}" if m % 2 == 0 else f"ns2_i{1001 + j}"


def iso_us(us: int) -> str:
    """Microseconds since the epoch as ISO 8601 UTC with a ``Z``, 6 digits."""
    s, frac = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:06d}Z"


@dataclass
class Mix:
    """``ticks`` seconds of the fleet ending at ``end_us``.

    ``ts[m][t]``: machine m's poll time at tick t (us since the epoch);
    ``values[m * 20 + j][t]``: metric j of machine m at tick t."""

    ticks: int
    end_us: int
    seed: int
    ts: list[list[int]]
    values: list[list[float]]

    @property
    def readings(self) -> int:
        return self.ticks * SERIES

    def series(self) -> Iterator[tuple[int, int, list[int], list[float]]]:
        """(machine, metric index, timestamps, values) of every series."""
        for m in range(MACHINES):
            for j in range(SERIES_PER_MACHINE):
                yield m, j, self.ts[m], self.values[m * SERIES_PER_MACHINE + j]


def generate(readings: int, end_us: int | None = None, seed: int = 8) -> Mix:
    """The mix with ``readings`` readings (a multiple of 1,000: whole ticks of
    all series), the last tick at ``end_us`` (default: now, whole second)."""
    if readings <= 0 or readings % SERIES:
        raise ValueError(f"readings must be a positive multiple of {SERIES}, got {readings}")
    ticks = readings // SERIES
    if end_us is None:
        end_us = int(time.time()) * 1_000_000
    first = end_us - (ticks - 1) * 1_000_000
    rnd = random.Random(seed)
    ts = [[first + t * 1_000_000 + rnd.randint(-JITTER_US, JITTER_US) for t in range(ticks)]
          for _ in range(MACHINES)]
    values: list[list[float]] = []
    for m in range(MACHINES):
        for name, _unit, kind, setpoint, scale in METRICS:
            values.append(_series(rnd, m, name, kind, setpoint, scale, ticks))
    return Mix(ticks, end_us, seed, ts, values)


def _series(rnd: random.Random, m: int, name: str, kind: str, setpoint: float, scale: float,
            ticks: int) -> list[float]:
    if kind == "temp":
        # integer tenths, so 72.3 is the double nearest 72.3, as a client would parse it
        k = round((setpoint + rnd.uniform(-3, 3)) * 10)
        out = []
        for _ in range(ticks):
            k += rnd.choice((-1, 0, 0, 0, 1))
            out.append(k / 10)
        return out
    if kind == "noisy":
        per = round(1 / scale)
        sd, g = NOISE_SD[name], rnd.gauss
        return [round((setpoint + g(0, sd)) * per) / per for _ in range(ticks)]
    if kind == "vibration":
        g = rnd.gauss
        return [abs(g(0, 1)) * scale for _ in range(ticks)]
    if kind == "counter":
        v, step, ri = int(setpoint) + m * 17, COUNTER_STEP[name], rnd.randint
        out = []
        for _ in range(ticks):
            v += ri(0, step)
            out.append(float(v))
        return out
    const = setpoint + (m % 3) * (10.0 if setpoint >= 100 else 0.5)  # setpoints differ by machine
    return [const] * ticks


# ------------------------------------------------------------------ bodies

def _prefixes() -> list[list[str]]:
    """Per (machine, metric): the JSON of a reading up to the timestamp's value."""
    return [[(f'{{"machine_identifier":"{machine_id(m)}","metric_name":"{name}",'
              f'"unit":"{unit}","raw_tag":"{raw_tag(m, j)}","timestamp":"')
             for j, (name, unit, *_rest) in enumerate(METRICS)] for m in range(MACHINES)]


def _body(parts: list[str]) -> bytes:
    return ('{"readings":[' + ",".join(parts) + "]}").encode()


def bodies(mix: Mix, shape: str) -> Iterator[bytes]:
    """The request bodies of one write shape; together they hold every reading once."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    pre = _prefixes()
    stamps = [[iso_us(u) for u in row] for row in mix.ts]
    vals = mix.values
    n = SERIES_PER_MACHINE

    def reading(m: int, j: int, t: int) -> str:
        return f'{pre[m][j]}{stamps[m][t]}","value":{vals[m * n + j][t]!r}}}'

    if shape == "live":
        for t in range(mix.ticks):
            yield _body([reading(m, j, t) for m in range(MACHINES) for j in range(n)])
    elif shape == "pollers":
        for t in range(mix.ticks):
            for m in range(MACHINES):
                yield _body([reading(m, j, t) for j in range(n)])
    else:  # agent: each machine's buffer flushed every 50 ticks, machines interleaved
        for t0 in range(0, mix.ticks, AGENT_TICKS):
            for m in range(MACHINES):
                yield _body([reading(m, j, t) for t in range(t0, min(t0 + AGENT_TICKS, mix.ticks))
                             for j in range(n)])


def body_count(mix: Mix, shape: str) -> int:
    return {"live": mix.ticks, "pollers": mix.ticks * MACHINES,
            "agent": math.ceil(mix.ticks / AGENT_TICKS) * MACHINES}[shape]


# ------------------------------------------------------------------ Gorilla

def gorilla_bits(ts: list[int], values: list[float]) -> int:
    """Bits of one series in the Gorilla encoding (Pelkonen et al., VLDB 2015,
    section 4.1), counted exactly.

    Timestamps are in microseconds (what a reading carries; the paper uses
    seconds): a 64-bit first timestamp, then per point the delta of deltas D
    (the first delta against 0) as '0' for D = 0, '10' + 7 bits for
    [-63, 64], '110' + 9 bits for [-255, 256], '1110' + 12 bits for
    [-2047, 2048], else '1111' + 32 bits (64 if it does not fit; never here).
    Values: the first one 64 bits, then the XOR with the previous one: '0' if
    zero, '10' + the meaningful bits if they fall inside the previous window,
    else '11' + 5 bits of leading zeros (capped at 31) + 6 bits of length +
    the meaningful bits."""
    import struct

    n = len(ts)
    if n == 0:
        return 0
    bits = 64 + 64
    prev_delta = 0
    for i in range(1, n):
        delta = ts[i] - ts[i - 1]
        d = delta - prev_delta
        prev_delta = delta
        if d == 0:
            bits += 1
        elif -63 <= d <= 64:
            bits += 2 + 7
        elif -255 <= d <= 256:
            bits += 3 + 9
        elif -2047 <= d <= 2048:
            bits += 4 + 12
        elif -(1 << 31) <= d < (1 << 31):
            bits += 4 + 32
        else:
            bits += 4 + 64
    words = struct.unpack(f"<{n}Q", struct.pack(f"<{n}d", *values))
    prev = words[0]
    lead_w, trail_w = 65, 65  # no window yet
    for w in words[1:]:
        x = w ^ prev
        prev = w
        if x == 0:
            bits += 1
            continue
        lead = min(64 - x.bit_length(), 31)
        trail = (x & -x).bit_length() - 1
        if lead_w <= 64 and lead >= lead_w and trail >= trail_w:
            bits += 2 + (64 - lead_w - trail_w)
        else:
            bits += 2 + 5 + 6 + (64 - lead - trail)
            lead_w, trail_w = lead, trail
    return bits


def gorilla_bytes_per_reading(mix: Mix) -> float:
    total = sum(gorilla_bits(ts, vals) for _m, _j, ts, vals in mix.series())
    return total / 8 / mix.readings


def utc(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=us)
