"""Load generator for POST /api/v1/ingest.

Uses ``wrk`` (with a Lua script that rotates among pre-generated bodies) when
it is on PATH, else a built-in asyncio + uvloop client: raw HTTP/1.1 over
keep-alive sockets, request bytes built once, one coroutine per connection.

Both report the same JSON: requests/s, batch latency percentiles (ms), the
number of non-207 answers and the sum of ``accepted_count`` over the 207s.

Standalone:
    python -m bench.loadgen --url http://127.0.0.1:8000 --key hk_... --duration 10
    python -m bench.loadgen --url ... --key hk_... --once bodies.jsonl   # each body once
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

PATH = "/api/v1/ingest"

# 20 metrics of a CNC machine as an edge agent reads them: (name, unit, typical value).
METRICS = [
    ("spindle_speed", "rpm", 12000.0), ("spindle_load", "percent", 45.0),
    ("feed_rate", "mm/min", 2400.0), ("coolant_temp", "celsius", 24.0),
    ("motor_temp", "celsius", 61.0), ("vibration_x", "mm/s", 2.1),
    ("vibration_y", "mm/s", 1.8), ("vibration_z", "mm/s", 3.2),
    ("axis_x_pos", "mm", 150.0), ("axis_y_pos", "mm", 80.0),
    ("axis_z_pos", "mm", -20.0), ("power", "kW", 7.5),
    ("current_l1", "A", 11.0), ("current_l2", "A", 11.2),
    ("current_l3", "A", 10.9), ("voltage", "V", 400.0),
    ("air_pressure", "bar", 6.1), ("oil_pressure", "bar", 3.4),
    ("cycle_count", "count", 1520.0), ("tool_wear", "percent", 12.0),
]


def machine_ids(n: int) -> list[str]:
    return [f"CNC-{i:03d}" for i in range(1, n + 1)]


def make_bodies(t0: float, n_bodies: int = 100, machines: int = 50, metrics: int = 20,
                steps: int = 50, spacing_ms: int = 10, seed: int = 1,
                shape: str = "agent") -> list[bytes]:
    """``n_bodies`` JSON bodies of ``metrics * steps`` readings each (1,000 by
    default): one machine's metrics at ``steps`` consecutive timestamps
    ``spacing_ms`` apart, as an edge agent buffers them. Body k is machine
    k % machines; the bodies' time windows are spread over the minute before
    ``t0`` (Unix seconds), so every timestamp is in the past but recent.

    ``shape="wide"`` is the worst case for haltless's chunked storage: every
    body holds one reading of each of ``machines * metrics`` series (a
    gateway pushing one snapshot of a whole fleet), so no two readings of a
    body share a series."""
    if shape == "wide":
        return _wide_bodies(t0, n_bodies, machines, metrics, seed)
    rnd = random.Random(seed)
    ids = machine_ids(machines)
    span = 55.0  # seconds before t0 that the first body starts
    bodies = []
    for k in range(n_bodies):
        ident = ids[k % machines]
        start_ms = int((t0 - 60.0 + span * k / max(n_bodies, 1)) * 1000)
        readings = []
        for s in range(steps):
            ms = start_ms + s * spacing_ms
            stamp = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
            ts = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
            for j, (name, unit, base) in enumerate(METRICS[:metrics]):
                readings.append({
                    "machine_identifier": ident, "timestamp": ts, "metric_name": name,
                    "value": round(base * (1 + rnd.gauss(0, 0.02)), 4), "unit": unit,
                    "raw_tag": f"ns2_i{1001 + j}",
                })
        bodies.append(json.dumps({"readings": readings}, separators=(",", ":")).encode())
    return bodies


def _wide_bodies(t0: float, n_bodies: int, machines: int, metrics: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    bodies = []
    for k in range(n_bodies):
        ms = int((t0 - 60.0 + 55.0 * k / max(n_bodies, 1)) * 1000)
        stamp = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
        ts = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
        readings = [{"machine_identifier": ident, "timestamp": ts, "metric_name": name,
                     "value": round(base * (1 + rnd.gauss(0, 0.02)), 4), "unit": unit,
                     "raw_tag": f"ns2_i{1001 + j}"}
                    for ident in machine_ids(machines)
                    for j, (name, unit, base) in enumerate(METRICS[:metrics])]
        bodies.append(json.dumps({"readings": readings}, separators=(",", ":")).encode())
    return bodies


def write_bodies(bodies: list[bytes], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(bodies):
        (directory / f"body-{i:04d}.json").write_bytes(b)


def read_bodies(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob("body-*.json"))]


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[i]


# ------------------------------------------------------------------ built-in

_ACCEPTED = re.compile(rb'"accepted_count"\s*:\s*(\d+)')


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.status: dict[int, int] = {}
        self.accepted = 0
        self.errors = 0
        self.error_samples: list[str] = []


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, close = None, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            close = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size + 2))
        body = b"".join(p[:-2] for p in parts)
    else:
        body = await reader.readexactly(length or 0)
    return status, body, close


async def _connection(host: str, port: int, reqs: list[bytes], todo, stats: _Stats,
                      timeout: float) -> None:
    """Send ``reqs[i]`` for each i of ``todo`` over one keep-alive connection
    (reconnecting after a close or an error). A request whose answer is lost
    is counted, never retried: it may have been committed, and a resend
    would store its readings twice."""
    clock = time.perf_counter
    reader = writer = None
    for i in todo:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            t = clock()
            writer.write(reqs[i])
            status, body, close = await asyncio.wait_for(_read_response(reader), timeout)
            stats.latencies.append(clock() - t)
            stats.status[status] = stats.status.get(status, 0) + 1
            if status == 207:
                m = _ACCEPTED.search(body)
                stats.accepted += int(m.group(1)) if m else 0
            elif len(stats.error_samples) < 5:
                stats.error_samples.append(f"body {i}: {status}: "
                                           f"{body[:300].decode('utf-8', 'replace')}")
            if close:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            stats.errors += 1
            if len(stats.error_samples) < 5:
                stats.error_samples.append(f"body {i}: socket: {exc!r}")
            if writer is not None:
                writer.close()
                writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


def _until(deadline: float, first: int, n: int):
    """Body indices first, first + 1, ... (mod n) until the clock passes ``deadline``."""
    i = first
    while time.perf_counter() < deadline:
        yield i % n
        i += 1


def _request_bytes(url: str, key: str, bodies: list[bytes]) -> tuple[str, int, list[bytes]]:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    head = (f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"X-API-Key: {key}\r\n").encode()
    return host, port, [head + b"Content-Length: %d\r\n\r\n" % len(b) + b for b in bodies]


def _summary(stats: _Stats, elapsed: float, connections: int) -> dict:
    lat = sorted(stats.latencies)
    n = len(lat)
    return {
        "tool": "builtin", "connections": connections, "duration_s": round(elapsed, 3),
        "requests": n, "requests_per_s": round(n / elapsed, 1),
        "latency_ms": {"p50": round(_percentile(lat, 50) * 1e3, 2),
                       "p90": round(_percentile(lat, 90) * 1e3, 2),
                       "p99": round(_percentile(lat, 99) * 1e3, 2),
                       "max": round(lat[-1] * 1e3, 2) if lat else None,
                       "mean": round(sum(lat) / n * 1e3, 2) if n else None},
        "non_207": sum(v for s, v in stats.status.items() if s != 207),
        "status_counts": {str(s): v for s, v in sorted(stats.status.items())},
        "socket_errors": stats.errors, "accepted_readings": stats.accepted,
        "error_samples": stats.error_samples,
    }


async def _builtin(url: str, key: str, bodies: list[bytes], duration: float,
                   connections: int, timeout: float = 60.0) -> dict:
    host, port, reqs = _request_bytes(url, key, bodies)
    stats = _Stats()
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(*[
        _connection(host, port, reqs, _until(deadline, (c * 7) % len(reqs), len(reqs)), stats,
                    timeout)
        for c in range(connections)])
    return _summary(stats, time.perf_counter() - start, connections)


async def _builtin_once(url: str, key: str, bodies: list[bytes], connections: int,
                        timeout: float = 60.0) -> dict:
    """Every body exactly once, in order, over ``connections`` keep-alive
    connections; done when the last answer is in."""
    host, port, reqs = _request_bytes(url, key, bodies)
    stats = _Stats()
    todo = iter(range(len(reqs)))  # shared: each index is taken by one connection
    start = time.perf_counter()
    await asyncio.gather(*[_connection(host, port, reqs, todo, stats, timeout)
                           for _ in range(min(connections, len(reqs)))])
    out = _summary(stats, time.perf_counter() - start, connections)
    out["bodies"] = len(reqs)
    return out


def _run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def send_all(url: str, key: str, bodies: list[bytes], connections: int) -> dict:
    """Send every body exactly once (see ``_builtin_once``); the same JSON as a timed run."""
    return _run(_builtin_once(url, key, bodies, connections))


def read_bodies_file(path: Path) -> list[bytes]:
    """Bodies stored one per line (compact JSON has no raw newline)."""
    return path.read_bytes().split(b"\n")[:-1]


def write_bodies_file(bodies, path: Path) -> int:
    n = 0
    with path.open("wb") as f:
        for b in bodies:
            f.write(b + b"\n")
            n += 1
    return n


def run_builtin(url: str, key: str, bodies: list[bytes], duration: float, connections: int) -> dict:
    return _run(_builtin(url, key, bodies, duration, connections))


# ------------------------------------------------------------------ wrk

WRK_SCRIPT = r"""
-- args: bodies_dir n_bodies api_key. Builds every request once per thread.
local reqs = {}
local counter = 1
local threads = {}
non207 = 0
accepted = 0
responses = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local dir, n, key = args[1], tonumber(args[2]), args[3]
  local headers = {["Content-Type"] = "application/json", ["X-API-Key"] = key}
  for i = 0, n - 1 do
    local f = assert(io.open(string.format("%s/body-%04d.json", dir, i), "rb"))
    local body = f:read("*a")
    f:close()
    reqs[#reqs + 1] = wrk.format("POST", "/api/v1/ingest", headers, body)
  end
  counter = ((tid or 0) * 37) % #reqs + 1
end

function request()
  local r = reqs[counter]
  counter = counter % #reqs + 1
  return r
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 207 then
    non207 = non207 + 1
  else
    local a = string.match(body, '"accepted_count"%s*:%s*(%d+)')
    if a then accepted = accepted + tonumber(a) end
  end
end

function done(summary, latency, requests)
  local non, acc, resp = 0, 0, 0
  for _, t in ipairs(threads) do
    non = non + t:get("non207")
    acc = acc + t:get("accepted")
    resp = resp + t:get("responses")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"responses":%d,"duration_us":%d,"non_207":%d,"accepted_readings":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, resp, summary.duration, non, acc,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_command(url: str, key: str, bodies_dir: Path, n_bodies: int, duration: float,
                connections: int, threads: int = 2) -> list[str]:
    script = bodies_dir / "bench.lua"
    script.write_text(WRK_SCRIPT)
    threads = max(1, min(threads, connections))
    return ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", "60s", "-s", str(script), url.rstrip("/") + PATH,
            "--", str(bodies_dir), str(n_bodies), key]


def parse_wrk(stdout: str, connections: int) -> dict:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{stdout[-2000:]}")
    r = json.loads(line[len("BENCH_JSON "):])
    secs = r["duration_us"] / 1e6
    e = r["errors"]
    return {
        "tool": "wrk", "connections": connections, "duration_s": round(secs, 3),
        "requests": r["responses"], "requests_per_s": round(r["responses"] / secs, 1),
        "latency_ms": {k: round(r[f"{k}_us"] / 1e3, 2) for k in ("p50", "p90", "p99", "max", "mean")},
        "non_207": r["non_207"], "status_counts": None,
        "socket_errors": e["connect"] + e["read"] + e["write"] + e["timeout"],
        "wrk_errors": e, "accepted_readings": r["accepted_readings"], "error_samples": [],
    }


# ------------------------------------------------------------------ driver

def load_command(url: str, key: str, bodies_dir: Path, duration: float, connections: int,
                 use_wrk: bool | None = None) -> tuple[list[str], str]:
    """(argv, tool) of a load run in its own process; its stdout goes to parse_output."""
    n = len(list(bodies_dir.glob("body-*.json")))
    if use_wrk is None:
        use_wrk = shutil.which("wrk") is not None
    if use_wrk:
        return wrk_command(url, key, bodies_dir, n, duration, connections), "wrk"
    return ([sys.executable, "-m", "bench.loadgen", "--url", url, "--key", key,
             "--bodies-dir", str(bodies_dir), "--duration", str(duration),
             "--connections", str(connections), "--builtin"], "builtin")


def parse_output(tool: str, stdout: str, connections: int) -> dict:
    if tool == "wrk":
        return parse_wrk(stdout, connections)
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--key", default=os.environ.get("BENCH_API_KEY"), help="X-API-Key")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--bodies-dir", type=Path, help="pre-generated body-NNNN.json files "
                   "(default: generate 100 bodies now)")
    p.add_argument("--builtin", action="store_true", help="do not use wrk even if installed")
    p.add_argument("--once", type=Path, metavar="BODIES_FILE",
                   help="send every body of this file (one per line) exactly once, then stop "
                        "(built-in client; --duration is ignored)")
    a = p.parse_args(argv)
    if not a.key:
        p.error("--key (or BENCH_API_KEY) is required")
    if a.once:
        print(json.dumps(send_all(a.url, a.key, read_bodies_file(a.once), a.connections)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-bodies-") as tmp:
        bodies_dir = a.bodies_dir
        if bodies_dir is None:
            bodies_dir = Path(tmp)
            write_bodies(make_bodies(time.time()), bodies_dir)
        if a.builtin or shutil.which("wrk") is None:
            result = run_builtin(a.url, a.key, read_bodies(bodies_dir), a.duration, a.connections)
        else:
            argv2, tool = load_command(a.url, a.key, bodies_dir, a.duration, a.connections, True)
            out = subprocess.run(argv2, capture_output=True, text=True, check=True).stdout
            result = parse_output(tool, out, a.connections)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
