"""The edge agent: reads OPC-UA and Modbus devices on site with the same
readers as the cloud pollers and pushes to ``POST /api/v1/ingest`` with
store-and-forward (``pollers/spool.py``) and exactly-once delivery
(Idempotency-Key per persisted batch).

Configuration is the contract's TOML ("Edge agent configuration"), plus:

    api_url = "http://127.0.0.1:8000"   # or HALTLESS_API_URL; base URL or full .../api/v1/ingest
    api_key = "hk_..."                  # or HALTLESS_API_KEY
    state_dir = "haltless-agent"        # queue, client certificate, trusted servers
    status_interval = 30                # seconds between status lines
    metrics_file = "haltless-agent/metrics.prom"  # Prometheus textfile, rewritten every 5 s
    shutdown_flush_seconds = 10         # on SIGTERM, try to send what is queued this long

    [buffer]
    path = "haltless-agent/queue.db"    # default: <state_dir>/queue.db
    max_readings = 1000000
    when_full = "drop_oldest"           # or "drop_newest"

    [source.opcua]  poll_interval = 10  # seconds, like [source.modbus]
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import email.utils
import http.client
import json
import logging
import random
import time
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from ..server.config import Settings
from ..server.errors import ConfigError, HaltlessError
from ..server.runtime import run_until_signal
from ..server.wire import Reading, describe_validation_error, encoder

from .base import ReadResult
from .modbus import ModbusConfig, ModbusReader, validate_modbus_config
from .opcua import FileTrustStore, OpcuaConfig, OpcuaReader, validate_opcua_config
from .readers import connected, outer_timeout, probe_reader
from .schedule import PollLoop, Stats
from .spool import Spool

log = logging.getLogger("haltless.agent")

METRICS_EVERY = 5.0  # seconds between rewrites of the metrics textfile

Interval = Annotated[float, Meta(ge=0.1, le=86400)]


class AgentOpcua(OpcuaConfig, forbid_unknown_fields=True, kw_only=True):
    endpoint: Annotated[str, Meta(min_length=1, max_length=512)]
    poll_interval: Interval = 10.0


class AgentModbus(ModbusConfig, forbid_unknown_fields=True, kw_only=True):
    host: Annotated[str, Meta(min_length=1, max_length=253)]
    port: Annotated[int, Meta(ge=1, le=65535)] = 502
    poll_interval: Interval = 10.0


class AgentSource(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    machine_identifier: Annotated[str, Meta(min_length=1, max_length=200)]
    protocol: Literal["opcua", "modbus"]
    opcua: AgentOpcua | None = None
    modbus: AgentModbus | None = None


class Buffer(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None
    max_readings: Annotated[int, Meta(ge=1000, le=100_000_000)] = 1_000_000
    when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    source: Annotated[list[AgentSource], Meta(min_length=1)]
    api_url: str | None = None
    api_key: str | None = None
    state_dir: str = "haltless-agent"
    status_interval: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    metrics_file: str | None = None  # default <state_dir>/metrics.prom; "" = none
    shutdown_flush_seconds: Annotated[float, Meta(ge=0, le=600)] = 10.0
    buffer: Buffer = msgspec.field(default_factory=Buffer)


def load_config(path: Path, env: dict | None = None) -> AgentConfig:
    """Parse and check the whole file; ConfigError names the file and key.
    api_url / api_key come from the file, else from the settings (``env``,
    default the process environment)."""
    settings = Settings.from_env(env)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        cfg = msgspec.toml.decode(raw, type=AgentConfig)
    except msgspec.ValidationError as exc:
        msg = describe_validation_error(exc, AgentConfig)
        raise ConfigError(f"{path}: {msg if not msg.startswith(':') else 'top level' + msg}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    names = set()
    for i, src in enumerate(cfg.source):
        at = f"{path}: source[{i}] ({src.name!r})"
        if src.name in names:
            raise ConfigError(f"{at}: name: another source is called {src.name!r}; names must differ")
        names.add(src.name)
        section = getattr(src, src.protocol)
        other = "modbus" if src.protocol == "opcua" else "opcua"
        if section is None:
            raise ConfigError(f"{at}: protocol is {src.protocol!r} but there is no "
                              f"[source.{src.protocol}] section")
        if getattr(src, other) is not None:
            raise ConfigError(f"{at}: protocol is {src.protocol!r} but it has a [source.{other}] "
                              "section; one source reads one device")
        try:
            reader_config(src)
        except ValueError as exc:
            raise ConfigError(f"{at}.{src.protocol}.{exc}") from None
    cfg.api_url = cfg.api_url or settings.api_url
    cfg.api_key = cfg.api_key or settings.api_key
    if not cfg.api_url:
        raise ConfigError(f"{path}: api_url: not set; put api_url = \"https://...\" in the file "
                          "or set HALTLESS_API_URL")
    parts = urlsplit(cfg.api_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: api_url: {cfg.api_url!r} is not an http(s) URL")
    if not cfg.api_key:
        raise ConfigError(f"{path}: api_key: not set; put api_key = \"hk_...\" in the file or set "
                          "HALTLESS_API_KEY")
    return cfg


def reader_config(src: AgentSource) -> OpcuaConfig | ModbusConfig:
    section = getattr(src, src.protocol)
    fields = msgspec.structs.asdict(section)
    if src.protocol == "opcua":
        cfg = OpcuaConfig(**{k: v for k, v in fields.items() if k not in ("endpoint", "poll_interval")})
        validate_opcua_config(cfg)
    else:
        cfg = ModbusConfig(**{k: v for k, v in fields.items() if k not in ("host", "port", "poll_interval")})
        validate_modbus_config(cfg)
    return cfg


def make_reader(src: AgentSource, state_dir: Path):
    cfg = reader_config(src)
    if src.protocol == "opcua":
        return OpcuaReader(src.opcua.endpoint, cfg, pki_dir=state_dir / "pki",
                           trust_store=FileTrustStore(state_dir / "trusted-servers.json"))
    return ModbusReader(src.modbus.host, src.modbus.port, cfg)


# ------------------------------------------------------------------ sending

class Rejected(HaltlessError):
    """The server will never take this batch (4xx other than 401/429)."""


class Unauthorized(HaltlessError):
    """The server refused the API key (401): sending stops, the queue stays."""


class Retry(HaltlessError):
    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class Sender:
    """POSTs batches over one keep-alive connection (http.client in a thread)."""

    def __init__(self, api_url: str, api_key: str, timeout: float = 30.0) -> None:
        parts = urlsplit(api_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        path = parts.path.rstrip("/")
        self.path = path if path.endswith("/api/v1/ingest") else path + "/api/v1/ingest"
        self.key = api_key
        self.timeout = timeout
        self.conn = None

    def _post(self, body: bytes, idem_key: str):
        if self.conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request("POST", self.path, body=body, headers={
                "Content-Type": "application/json", "X-API-Key": self.key,
                "Idempotency-Key": idem_key, "User-Agent": "haltless-agent"})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        return resp.status, resp.getheader("Retry-After"), data

    async def send(self, body: bytes, idem_key: str) -> dict:
        try:
            status, retry_after, data = await asyncio.to_thread(self._post, body, idem_key)
        except (OSError, http.client.HTTPException) as exc:
            raise Retry(f"cannot reach {self.host}:{self.port}: {exc}") from None
        if status == 207:
            return json.loads(data)
        detail = _detail(data)
        if status == 401:
            raise Unauthorized(f"the server refused the API key (401: {detail})")
        if status == 429 or status >= 500:
            raise Retry(f"server answered {status}: {detail}", _retry_after(retry_after))
        raise Rejected(f"server rejected the batch ({status}: {detail})")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _detail(data: bytes) -> str:
    try:
        return str(json.loads(data).get("detail"))[:500]
    except Exception:  # noqa: BLE001 - a proxy's HTML error page, say
        return data[:200].decode("utf-8", "replace")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None


# ------------------------------------------------------------------ the agent

class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path) -> None:
        self.cfg = cfg
        base = Path(config_path).parent
        self.state_dir = (base / cfg.state_dir).resolve()
        qpath = Path(cfg.buffer.path) if cfg.buffer.path else self.state_dir / "queue.db"
        self.spool = Spool(qpath if qpath.is_absolute() else base / qpath, cfg.buffer.max_readings,
                           cfg.buffer.when_full)
        self.sender = Sender(cfg.api_url, cfg.api_key)
        self.stats = Stats()
        self.counts = {"read": 0, "sent": 0, "rejected": 0}
        metrics = cfg.metrics_file if cfg.metrics_file is not None else str(self.state_dir / "metrics.prom")
        self.metrics_path = (base / metrics).resolve() if metrics else None
        self.new_data = asyncio.Event()
        self.loops: list[PollLoop] = []
        self.sending = True

    async def run(self, stop: asyncio.Event) -> None:
        await self.spool.open()
        log.info("agent started: %d sources, %d readings queued from before", len(self.cfg.source),
                 self.spool.count)
        for src in self.cfg.source:
            self.loops.append(self._loop_for(src))
        sender = asyncio.create_task(self.send_forever())
        status = asyncio.create_task(self.status_forever())
        await stop.wait()
        log.info("stopping: polling ended, flushing the queue for up to %.0f s",
                 self.cfg.shutdown_flush_seconds)
        await asyncio.gather(*(lp.stop() for lp in self.loops))
        for lp in self.loops:  # the last poll's readings are on their way to disk
            if lp.pending_sink is not None:
                await asyncio.gather(lp.pending_sink, return_exceptions=True)
        self.new_data.set()
        try:
            await asyncio.wait_for(self.drained(sender), self.cfg.shutdown_flush_seconds)
        except asyncio.TimeoutError:
            pass
        sender.cancel()
        status.cancel()
        await asyncio.gather(sender, status, return_exceptions=True)
        await self.status_line()
        self.sender.close()
        await self.spool.close()

    async def drained(self, sender: asyncio.Task) -> None:
        while self.spool.count and not sender.done():
            await asyncio.sleep(0.1)

    def _loop_for(self, src: AgentSource) -> PollLoop:
        section = getattr(src, src.protocol)
        timeout = outer_timeout(section.timeout_seconds)

        async def connect():
            return await connected(make_reader(src, self.state_dir))

        async def sink(res: ReadResult) -> None:
            bodies = [encoder.encode(Reading(src.machine_identifier, s.timestamp, s.metric_name,
                                             s.value, s.unit, s.raw_tag)) for s in res.samples]
            for e in res.errors:
                log.warning("%s: %s (%s): %s", src.name, e.raw_tag, e.metric_name, e.message)
            stored = await self.spool.put(bodies)
            self.counts["read"] += stored
            self.new_data.set()

        return PollLoop(section.poll_interval, timeout, connect, sink,
                        on_error=lambda msg: log.warning("%s: %s", src.name, msg),
                        stats=self.stats, name=f"source-{src.name}")

    async def send_forever(self) -> None:
        failures = 0
        while True:
            batch = await self.spool.next_batch()
            if batch is None:
                self.new_data.clear()
                try:
                    await asyncio.wait_for(self.new_data.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                result = await self.sender.send(batch.body(), batch.key)
            except Retry as exc:
                failures += 1
                delay = exc.after if exc.after is not None else min(
                    60.0, 0.5 * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
                log.warning("send failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            except Unauthorized as exc:
                log.error("%s. Sending stopped; readings stay queued on disk. Fix api_key / "
                          "HALTLESS_API_KEY and restart the agent.", exc)
                self.sending = False
                return
            except Rejected as exc:
                log.error("%s; dropping its %d readings", exc, len(batch.bodies))
                self.counts["rejected"] += len(batch.bodies)
                await self.spool.ack(batch)
                continue
            failures = 0
            for err in result.get("errors", [])[:20]:
                log.warning("rejected reading %s (%s): %s", err.get("index"),
                            err.get("machine_identifier"), err.get("error"))
            self.counts["sent"] += result.get("accepted_count", 0)
            self.counts["rejected"] += result.get("rejected_count", 0)
            await self.spool.ack(batch)

    async def status_forever(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(METRICS_EVERY, self.cfg.status_interval))
            await self.write_metrics()
            if time.monotonic() - last >= self.cfg.status_interval - 0.01:
                last = time.monotonic()
                await self.status_line()

    async def write_metrics(self) -> None:
        """The queue's figures in Prometheus text format, for node_exporter's
        textfile collector (the agent runs on site, with no HTTP listener of
        its own): written to a temporary file and renamed, so a scrape never
        reads half a file."""
        path = self.metrics_path
        if path is None:
            return
        age = await self.spool.oldest_age() if self.spool.is_open else None
        lines = []
        for name, kind, doc, value in (
                ("queue_readings", "gauge", "Readings queued on disk, not yet acknowledged",
                 self.spool.count),
                ("oldest_queued_reading_age_seconds", "gauge",
                 "Age of the oldest queued reading (0: queue empty)", age or 0.0),
                ("readings_read_total", "counter", "Readings read from devices", self.counts["read"]),
                ("readings_sent_total", "counter", "Readings the server accepted",
                 self.counts["sent"]),
                ("readings_rejected_total", "counter", "Readings the server rejected",
                 self.counts["rejected"]),
                ("readings_dropped_total", "counter", "Readings dropped because the queue was full",
                 self.spool.dropped),
                ("polls_total", "counter", "Polls started", self.stats.polls),
                ("poll_failures_total", "counter", "Polls that failed", self.stats.failed),
                ("sending", "gauge", "1 while sending, 0 once the server refused the key",
                 int(self.sending))):
            lines += [f"# HELP haltless_agent_{name} {doc}", f"# TYPE haltless_agent_{name} {kind}",
                      f"haltless_agent_{name} {value}"]
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot write metrics to %s: %s", path, exc)

    async def status_line(self) -> None:
        age = await self.spool.oldest_age() if self.spool.is_open else None
        log.info("status: read %d, sent %d, rejected %d, queued %d, oldest queued %s, dropped %d%s",
                 self.counts["read"], self.counts["sent"], self.counts["rejected"],
                 self.spool.count, f"{age:.1f}s" if age is not None else "-", self.spool.dropped,
                 "" if self.sending else ", SENDING STOPPED (401)")


async def check(cfg: AgentConfig, config_path: Path) -> bool:
    """`haltless agent --check`: test every source once and print a table."""
    state_dir = (Path(config_path).parent / cfg.state_dir).resolve()
    rows = []
    for src in cfg.source:
        section = getattr(src, src.protocol)
        start = time.monotonic()
        ok, message = await probe_reader(make_reader(src, state_dir),
                                         outer_timeout(section.timeout_seconds))
        rows.append((src.name, "ok" if ok else "failed",
                     f"{(time.monotonic() - start) * 1000:.0f} ms", message))
    header = ("SOURCE", "RESULT", "LATENCY", "MESSAGE")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return all(r[1] == "ok" for r in rows)


def main(config_path: str, check_only: bool, settings: Settings) -> int:
    cfg = load_config(Path(config_path))
    if check_only:
        print(f"{config_path}: configuration OK ({len(cfg.source)} sources)")
        return 0 if run_until_signal(lambda stop: check(cfg, Path(config_path)),
                                     settings.log_level) else 1
    run_until_signal(Agent(cfg, Path(config_path)).run, settings.log_level)
    return 0
