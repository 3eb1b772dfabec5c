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

An OPC-UA source with ``mode = "subscribe"`` under ``[source.opcua]`` is
subscribed to instead of polled (``pollers/subscribe.py``; its
``poll_interval`` is then the default ``publishing_interval_ms``): its
values go to the same disk queue, and a lost subscription is made again by
itself, with the gap logged.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

from ..core.config import Settings
from ..core.errors import BatchRejected, ConfigError, KeyRefused, RetryLater
from ..core.logs import run_until_signal
from ..core.wire import ERR_MACHINE_NOT_FOUND, Reading, encoder
from .agent_config import AgentConfig, AgentSource, load_config, reader_config
from .base import ReadResult
from .opcua_config import parse_endpoint
from .readers import (
    connected,
    make_reader,
    make_subscriber,
    outer_timeout,
    subscribed,
    subscribes,
)
from .schedule import PollLoop, raise_if_cancelled
from .sender import Sender
from .spool import Spool
from .stats import Stats
from .subscribe import SubscribeLoop
from .textfile import write_textfile
from .trust import FileTrustStore

log = logging.getLogger("haltless.agent")

METRICS_EVERY = 5.0  # seconds between rewrites of the metrics textfile


def reader_for(src: AgentSource, state_dir: Path):
    """The reader of one [[source]]: the same readers as the cloud pollers;
    OPC-UA server certificates trusted on first use are kept in the state dir."""
    section = getattr(src, src.protocol)
    if src.protocol == "opcua":
        host, port = parse_endpoint(section.endpoint)
        return make_reader("opcua", host, port, reader_config(src), pki_dir=state_dir / "pki",
                           trust_store=FileTrustStore(state_dir / "trusted-servers.json"),
                           endpoint=section.endpoint)
    return make_reader("modbus", section.host, section.port, reader_config(src),
                       pki_dir=state_dir / "pki")


def subscriber_for(src: AgentSource, state_dir: Path, stats: Stats | None = None,
                   delivered: list[int] | None = None):
    """The subscriber of an OPC-UA [[source]] in mode "subscribe" (``reader_for``'s twin)."""
    section = src.opcua
    host, port = parse_endpoint(section.endpoint)
    return make_subscriber("opcua", host, port, reader_config(src), interval=section.poll_interval,
                           pki_dir=state_dir / "pki",
                           trust_store=FileTrustStore(state_dir / "trusted-servers.json"),
                           endpoint=section.endpoint, stats=stats, delivered=delivered)


def is_subscribed(src: AgentSource) -> bool:
    return subscribes(src.protocol, getattr(src, src.protocol))


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
        self.counts = {"read": 0, "sent": 0, "rejected": 0, "machine_not_found": 0}
        # machine_identifier -> readings rejected as "Machine not found": the
        # status line names them (the sources' machines, so a handful)
        self.unregistered: dict[str, int] = {}
        metrics = cfg.metrics_file if cfg.metrics_file is not None else str(self.state_dir / "metrics.prom")
        self.metrics_path = (base / metrics).resolve() if metrics else None
        self.new_data = asyncio.Event()
        self.loops: list[PollLoop | SubscribeLoop] = []
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
        except TimeoutError:
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

    def _loop_for(self, src: AgentSource) -> PollLoop | SubscribeLoop:
        section = getattr(src, src.protocol)
        timeout = outer_timeout(section.timeout_seconds)

        async def connect():
            return await connected(reader_for(src, self.state_dir))

        delivered = [-1] * len(section.nodes) if is_subscribed(src) else None

        async def subscribe():
            return await subscribed(subscriber_for(src, self.state_dir, self.stats, delivered))

        async def sink(res: ReadResult) -> None:
            bodies = [encoder.encode(Reading(src.machine_identifier, s.timestamp, s.metric_name,
                                             s.value, s.unit, s.raw_tag)) for s in res.samples]
            for e in res.errors:
                log.warning("%s: %s (%s): %s", src.name, e.raw_tag, e.metric_name, e.message)
            stored = await self.spool.put(bodies)
            self.counts["read"] += stored
            self.new_data.set()

        def gap(since, until) -> None:
            if until is None:
                log.warning("%s: no data since %s", src.name, since.isoformat(timespec="milliseconds"))
            else:
                log.info("%s: data again; no data from %s to %s (%.1f s)", src.name,
                         since.isoformat(timespec="milliseconds"),
                         until.isoformat(timespec="milliseconds"), (until - since).total_seconds())

        def on_error(msg: str) -> None:
            log.warning("%s: %s", src.name, msg)

        if delivered is not None:
            def on_subscribed(errors) -> None:
                for e in errors:
                    log.warning("%s: %s (%s): %s", src.name, e.raw_tag, e.metric_name, e.message)
            return SubscribeLoop(timeout, subscribe, sink, on_error=on_error, stats=self.stats,
                                 on_subscribed=on_subscribed, on_gap=gap, name=f"source-{src.name}")
        return PollLoop(section.poll_interval, timeout, connect, sink, on_error=on_error,
                        stats=self.stats, name=f"source-{src.name}", on_gap=gap)

    async def send_forever(self) -> None:
        failures = 0
        while True:
            raise_if_cancelled()  # shutdown cancels this loop; see its docstring
            batch = await self.spool.next_batch()
            if batch is None:
                self.new_data.clear()
                try:
                    # Not wait_for, which on Python 3.11 can drop the cancel
                    # of shutdown when new data arrives at that moment.
                    async with asyncio.timeout(1.0):
                        await self.new_data.wait()
                except TimeoutError:
                    pass
                continue
            try:
                result = await self.sender.send(batch.body(), batch.key)
            except RetryLater as exc:
                failures += 1
                delay = exc.after if exc.after is not None else min(
                    60.0, 0.5 * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
                log.warning("send failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            except KeyRefused as exc:
                log.error("%s. Sending stopped; readings stay queued on disk. Fix api_key / "
                          "HALTLESS_API_KEY and restart the agent.", exc)
                self.sending = False
                return
            except BatchRejected as exc:
                log.error("%s; dropping its %d readings", exc, len(batch.bodies))
                self.counts["rejected"] += len(batch.bodies)
                await self.spool.ack(batch)
                continue
            failures = 0
            self.count_rejections(result.get("errors", []))
            self.counts["sent"] += result.get("accepted_count", 0)
            self.counts["rejected"] += result.get("rejected_count", 0)
            await self.spool.ack(batch)

    def count_rejections(self, errors: list[dict]) -> None:
        """Log what the server rejected; readings for a machine it does not
        know are counted by machine and logged once per batch (a source
        whose machine is not registered would otherwise log every reading)."""
        missing: dict[str, int] = {}
        others = []
        for err in errors:
            if err.get("error") == ERR_MACHINE_NOT_FOUND:
                m = str(err.get("machine_identifier"))
                missing[m] = missing.get(m, 0) + 1
            else:
                others.append(err)
        for err in others[:20]:
            log.warning("rejected reading %s (%s): %s", err.get("index"),
                        err.get("machine_identifier"), err.get("error"))
        for m, n in missing.items():
            log.warning("%d readings for machine %r rejected: %s; register it on the server "
                        "(haltless machines add) or correct the source's machine_identifier",
                        n, m, ERR_MACHINE_NOT_FOUND)
            self.counts["machine_not_found"] += n
            if m in self.unregistered or len(self.unregistered) < 100:
                self.unregistered[m] = self.unregistered.get(m, 0) + n

    async def status_forever(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(METRICS_EVERY, self.cfg.status_interval))
            await self.write_metrics()
            if time.monotonic() - last >= self.cfg.status_interval - 0.01:
                last = time.monotonic()
                await self.status_line()

    async def write_metrics(self) -> None:
        """The queue's figures as a Prometheus textfile (``pollers/textfile.py``)."""
        path = self.metrics_path
        if path is None:
            return
        age = await self.spool.oldest_age() if self.spool.is_open else None
        figures = (
                ("queue_readings", "gauge", "Readings queued on disk, not yet acknowledged",
                 self.spool.count),
                ("oldest_queued_reading_age_seconds", "gauge",
                 "Age of the oldest queued reading (0: queue empty)", age or 0.0),
                ("readings_read_total", "counter", "Readings read from devices", self.counts["read"]),
                ("readings_sent_total", "counter", "Readings the server accepted",
                 self.counts["sent"]),
                ("readings_rejected_total", "counter", "Readings the server rejected",
                 self.counts["rejected"]),
                ("readings_machine_not_found_total", "counter",
                 ("Readings the server rejected because their machine is not registered "
                  "(Machine not found; also in readings_rejected_total)"),
                 self.counts["machine_not_found"]),
                ("readings_dropped_total", "counter", "Readings dropped because the queue was full",
                 self.spool.dropped),
                ("polls_total", "counter", "Polls started", self.stats.polls),
                ("poll_failures_total", "counter", "Polls (and subscribes) that failed",
                 self.stats.failed),
                ("publishes_total", "counter", ("Publish responses from subscribed devices, "
                                                "keep-alives included"), self.stats.publishes),
                ("subscribed_values_total", "counter", "Values subscribed devices sent",
                 self.stats.notifications),
                ("sending", "gauge", "1 while sending, 0 once the server refused the key",
                 int(self.sending)))
        try:
            write_textfile(path, "haltless_agent_", figures)
        except OSError as exc:
            log.warning("cannot write metrics to %s: %s", path, exc)

    async def status_line(self) -> None:
        age = await self.spool.oldest_age() if self.spool.is_open else None
        log.info("status: read %d, sent %d, rejected %d%s, queued %d, oldest queued %s, "
                 "dropped %d%s", self.counts["read"], self.counts["sent"], self.counts["rejected"],
                 self.unregistered_note(), self.spool.count,
                 f"{age:.1f}s" if age is not None else "-", self.spool.dropped,
                 "" if self.sending else ", SENDING STOPPED (401)")

    def unregistered_note(self) -> str:
        """The status line's word on readings rejected for unregistered
        machines, e.g. ' (12 for unregistered machines: CONV-002)'; "" if none."""
        if not self.unregistered:
            return ""
        names = sorted(self.unregistered)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f" ({self.counts['machine_not_found']} for unregistered machines: {shown})"


def main(config_path: str, settings: Settings) -> int:
    """``haltless agent`` (``--check`` is ``pollers/agent_check.py``)."""
    cfg = load_config(Path(config_path))
    agent = Agent(cfg, Path(config_path))
    lock = lock_state_dir(agent.state_dir)  # held until the process ends
    try:
        run_until_signal(agent.run, settings.log_level)
    finally:
        lock.close()
    return 0


def lock_state_dir(state_dir: Path):
    """An exclusive lock on ``<state_dir>/agent.lock`` for this process's
    life: two agents on one state_dir would send each other's queue twice
    and overwrite each other's trust store. ConfigError when another holds it."""
    import fcntl
    import os

    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        f = open(state_dir / "agent.lock", "a+")  # noqa: SIM115 - held open: it is the lock
    except OSError as exc:
        raise ConfigError(f"state_dir {state_dir}: cannot use it: {exc.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip() or "?"
        f.close()
        raise ConfigError(f"state_dir {state_dir} is in use by another haltless agent "
                          f"(pid {other}); give each agent its own state_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f
