"""Direct ingestion (``haltless pollers``): separate uvloop processes that poll every active ingest
source at its poll_interval_seconds and write through the same validation
and COPY path as HTTP ingest (``server/ingest.py``), with no HTTP hop. The
readers are the edge agent's (``pollers/``); this is the side of them that
needs the database.

Sharing work between processes (on one host or many, against one
PostgreSQL) uses leases on the ``ingest_sources`` rows:

* every second a process renews the leases it holds (``lease_expires =
  now() + lease``) and learns from the same statement which of its sources
  were deleted, deactivated or changed (``version``);
* it claims unowned or expired sources with ``FOR UPDATE SKIP LOCKED``, up to
  its fair share (active sources / live processes), and releases sources
  above its share so a newly started process gets work;
* a process that cannot renew stops polling before its lease can have
  expired, so no source is ever polled by two processes; a dead process's
  sources are claimed by the others once its lease (3 s by default) expires;
* a process that lets a source go (rebalancing, shutdown) leaves in
  ``lease_expires`` the time its next poll was due, and the next owner polls
  no earlier. Without it the new owner's first poll came at a random moment
  of its first second, and a handover could poll one source twice within
  0.1 s (the flaky "polled twice at once" of test_pollers).

Each source is one ``PollLoop`` (``pollers/schedule.py``, shared with the edge
agent) with its own schedule; a slow or dead device only delays itself. An
MQTT source is a broker subscription instead (``server/mqtt_ingest.py``),
leased and flushed the same way.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path

from ..core.config import Settings
from ..core.logs import run_until_signal
from ..core.wire import Reading
from ..pollers.readers import connected, outer_timeout
from ..pollers.schedule import PollLoop, Stats
from . import sources
from .db import DB_DOWN
from .devices import reader_for
from .runtime import Runtime, prepare

log = logging.getLogger("haltless.pollers")

TICK = 1.0  # seconds between lease renewals / state flushes


class SourceTask:
    """One leased source: a PollLoop whose readings go to the Ingestor."""

    def __init__(self, proc: "PollerProcess", row, first_at: float | None = None) -> None:
        self.proc = proc
        self.id: uuid.UUID = row["id"]
        self.version: int = row["version"]
        self.org_id = row["org_id"]
        self.machine = row["machine_identifier"]
        self.source = sources.stored(row, proc.rt.box)  # config validated once, here
        self.state: str | None = None  # the last error logged; None = healthy
        self.loop = PollLoop(
            float(row["poll_interval_seconds"]),
            outer_timeout(self.source.config.timeout_seconds),
            self.connect, self.write,
            on_error=self.failed,
            on_missed=lambda n: proc.report(self.id, missed=n),
            may_poll=proc.lease_valid, stats=proc.stats, name=f"source-{self.id}",
            first_at=first_at)
        self.task = self.loop.task

    def describe(self) -> str:
        return f"source {self.id} ({self.source.protocol} {self.source.host}:{self.source.port})"

    def failed(self, message: str) -> None:
        self.proc.report(self.id, error=message, polled=True)
        if message != self.state:  # once per change of state, not every poll
            log.warning("%s: %s", self.describe(), message)
            self.state = message

    def healthy(self) -> None:
        if self.state is not None:
            log.info("%s: polling again", self.describe())
            self.state = None

    async def connect(self):
        rt = self.proc.rt
        reader = await reader_for(self.source, policy=rt.policy, pool=rt.pool, pki_dir=rt.pki_dir)
        async with self.proc.connect_slots:
            return await connected(reader)

    async def write(self, res) -> None:
        """The PollLoop's sink: validate this poll's readings now, and commit
        them with the next flush of the process (or now, without one)."""
        readings = [Reading(self.machine, s.timestamp, s.metric_name, s.value, s.unit, s.raw_tag)
                    for s in res.samples]
        err = "; ".join(f"{e.raw_tag}: {e.message}" for e in res.errors[:3]) or None
        try:
            payload, result, _ = await self.proc.rt.ingestor.prepare(self.org_id, readings)
        except Exception as exc:  # noqa: BLE001 - database down: reported, the next poll retries
            self.failed(f"write: {exc}")
            return

        def done(exc: Exception | None) -> None:
            if exc is None:
                self.landed(res, readings, result, err)
            else:
                self.failed(f"write: {exc}")
        if self.proc.flusher is not None:
            self.proc.flusher.add(payload, done)
            return
        try:
            await self.proc.rt.writer.write(payload)
        except Exception as exc:  # noqa: BLE001 - as above
            done(exc)
            return
        done(None)

    def landed(self, res, readings, result, err: str | None) -> None:
        """This poll's readings are committed: count them, report the state."""
        if result.errors and err is None:
            err = "; ".join(f"{readings[e.index].raw_tag}: {e.error}" for e in result.errors[:3])
        self.proc.stats.readings += result.accepted_count
        if err is None:
            self.healthy()
        elif err != self.state:
            log.warning("%s: %s", self.describe(), err)
            self.state = err
        self.proc.report(self.id, written=result.accepted_count,
                         failed=len(res.errors) + result.rejected_count, error=err,
                         polled=True, success=True)


def source_task(proc: "PollerProcess", row, first_at: float | None):
    """A polled source's loop, or an MQTT source's subscription (its module,
    and gmqtt and protobuf with it, load only where a broker is read)."""
    if row["protocol"] == "mqtt":
        from .mqtt_ingest import MqttSourceTask
        return MqttSourceTask(proc, row)
    return SourceTask(proc, row, first_at)


class Flusher:
    """Commits the readings every source of this process polled, together,
    every ``every`` seconds (``HALTLESS_POLL_FLUSH_SECONDS``, 10 by default,
    as Telegraf's flush_interval). A device polled once a second otherwise
    writes hot rows of one reading each: ~160 bytes a reading, and ~1.3
    CPU-seconds per million readings to compact them, where a flush of 10 s
    writes rows of 10 (bench/README "Storage"). What it costs: readings
    reach the database up to ``every`` seconds later, and a process killed
    with SIGKILL loses what it polled since its last flush (a stop by signal
    flushes first). Polled readings were never acknowledged to anyone; the
    HTTP API still answers only once committed."""

    def __init__(self, writer, every: float) -> None:
        self.writer = writer
        self.every = every
        self.items: list[tuple[bytes, object]] = []  # (records, done(exc | None))
        self.task: asyncio.Task | None = None
        self._current: asyncio.Future | None = None  # the flush under way
        self._soon = asyncio.Event()

    def add(self, payload: bytes, done) -> None:
        self.items.append((payload, done))

    def soon(self) -> None:
        """Flush now rather than at the next interval: an MQTT source holds
        that many messages unacknowledged until their commit (server/mqtt_ingest.py)."""
        self._soon.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="poll-flusher")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._soon.wait(), self.every)
            except asyncio.TimeoutError:
                pass
            self._soon.clear()
            # Shielded: stop() must not cancel a commit and lose its report.
            self._current = asyncio.ensure_future(self.flush())
            await asyncio.shield(self._current)

    async def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        try:
            await self.writer.write(b"".join(p for p, _ in items))
        except Exception as exc:  # noqa: BLE001 - reported per source; the next flush goes on
            for _, done in items:
                done(exc)
            return
        for _, done in items:
            done(None)

    async def stop(self) -> None:
        """Stop the schedule and commit what is buffered."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self._current is not None:
            await asyncio.gather(self._current, return_exceptions=True)
        await self.flush()


class PollerProcess:
    def __init__(self, settings: Settings, lease_seconds: float = 3.0,
                 stats_file: Path | None = None) -> None:
        self.rt = Runtime(settings)
        self.flush_every = settings.poll_flush_seconds
        # Bytes of MQTT messages received and not yet committed, all sources
        # of this process (server/mqtt_ingest.py): QoS 0 data past the limit
        # is dropped, so a database slower than the broker bounds memory.
        self.mqtt_held = 0
        self.mqtt_limit = settings.mqtt_memory_mb * 1024 * 1024
        self.flusher: Flusher | None = None
        self.lease = lease_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.tasks: dict[uuid.UUID, SourceTask] = {}
        self.valid_until = 0.0
        self.pending: dict[uuid.UUID, dict] = {}
        self.stats = Stats()
        self.stats_file = stats_file
        self.pool = None
        self._freeze: asyncio.TimerHandle | None = None
        # Connecting many devices at once must not starve the lease renewal.
        self.connect_slots = asyncio.Semaphore(100)

    def lease_valid(self, now: float) -> bool:
        return now < self.valid_until

    def report(self, sid: uuid.UUID, *, written: int = 0, failed: int = 0, missed: int = 0,
               error: str | None = None, polled: bool = False, success: bool = False) -> None:
        p = self.pending.setdefault(sid, {"written": 0, "failed": 0, "missed": 0, "error": None,
                                          "polled": False, "success": False})
        p["written"] += written
        p["failed"] += failed
        p["missed"] += missed
        p["polled"] |= polled
        p["success"] |= success
        if error is not None:
            p["error"] = error[:1000]

    async def run(self, stop: asyncio.Event) -> None:
        await self.rt.start()
        self.pool = self.rt.pool
        if self.flush_every > 0:
            self.flusher = Flusher(self.rt.writer, self.flush_every)
            self.flusher.start()
        log.info("poller %s started", self.owner)
        last_status = time.monotonic()
        try:
            while not stop.is_set():
                started = asyncio.get_running_loop().time()
                try:
                    await self.tick(started)
                except DB_DOWN as exc:
                    log.warning("poller %s: database unavailable: %s", self.owner, exc)
                if not self.lease_valid(asyncio.get_running_loop().time()) and self.tasks:
                    log.warning("poller %s: leases not renewed in time; stopping %d sources",
                                self.owner, len(self.tasks))
                    await self.stop_tasks(list(self.tasks))
                if time.monotonic() - last_status >= 10:
                    last_status = time.monotonic()
                    self.status_line()
                try:
                    await asyncio.wait_for(stop.wait(), TICK)
                except asyncio.TimeoutError:
                    pass
        finally:
            if self._freeze is not None:
                self._freeze.cancel()
            due = await self.stop_tasks(list(self.tasks))
            try:
                if self.flusher is not None:
                    await self.flusher.stop()
                await self.flush()
                async with self.pool.acquire() as conn:
                    await self.release(conn, due)
                    await conn.execute(
                        "UPDATE ingest_sources SET lease_owner = NULL, lease_expires = NULL"
                        " WHERE lease_owner = $1", self.owner)
                await self.pool.execute("DELETE FROM poller_processes WHERE owner = $1", self.owner)
            except DB_DOWN:
                pass
            await self.rt.close()
            log.info("poller %s stopped", self.owner)

    def status_line(self) -> None:
        snap = self.stats.snapshot()
        snap.update(sources=len(self.tasks), owner=self.owner, at=time.time())
        log.info("poller %s: %d sources, %d polls, %d readings, lag p50 %s ms p99 %s ms, "
                 "%d missed, %d failed", self.owner, snap["sources"], snap["polls"],
                 snap["readings"], snap["lag_ms_p50"], snap["lag_ms_p99"], snap["missed"],
                 snap["failed"])
        if self.stats_file:
            with open(self.stats_file, "a") as f:
                f.write(json.dumps(snap) + "\n")

    async def tick(self, started: float) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO poller_processes (owner, hostname, pid) VALUES ($1, $2, $3)"
                " ON CONFLICT (owner) DO UPDATE SET seen_at = now()",
                self.owner, socket.gethostname(), os.getpid())
            held = {r["id"]: r["version"] for r in await conn.fetch(
                "UPDATE ingest_sources SET lease_expires = now() + $2 * interval '1 second'"
                " WHERE lease_owner = $1 AND is_active RETURNING id, version",
                self.owner, self.lease)}
            # Leases were renewed at a server time no earlier than `started`:
            # stop polling a little before they could possibly expire.
            self.valid_until = started + self.lease - 0.5
            gone = [sid for sid in self.tasks if sid not in held]
            changed = [sid for sid, v in held.items()
                       if sid in self.tasks and self.tasks[sid].version != v]
            # A changed source restarts here; its new loop keeps the old schedule.
            first_at = await self.stop_tasks(gone + changed)
            total, live = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM ingest_sources WHERE is_active),"
                " (SELECT count(*) FROM poller_processes"
                "  WHERE seen_at > now() - $1 * interval '1 second')", self.lease)
            share = math.ceil(total / max(1, live))
            want = share - len(held)
            claimed: list = []
            if want > 0:
                # `wait`: seconds until the poll that a previous owner, letting
                # the source go, said was due next (see release()).
                # The times are computed once in a CTE: Citus allows no stable
                # function on columns in an UPDATE, nor in RETURNING.
                rows = await conn.fetch(
                    "WITH t AS (SELECT now() AS at, now() + $2 * interval '1 second' AS until)"
                    " UPDATE ingest_sources s SET lease_owner = $1, lease_expires = t.until"
                    " FROM t, (SELECT id, lease_owner, lease_expires FROM ingest_sources"
                    "       WHERE is_active AND (lease_owner IS NULL OR lease_expires < now())"
                    "       ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) c"
                    " WHERE s.id = c.id RETURNING s.id, CASE WHEN c.lease_owner IS NULL"
                    "  THEN extract(epoch FROM c.lease_expires - t.at)::float8 END AS wait",
                    self.owner, self.lease, want)
                now = asyncio.get_running_loop().time()
                claimed = [r["id"] for r in rows]
                first_at.update((r["id"], now + r["wait"]) for r in rows if r["wait"] and r["wait"] > 0)
            elif want < 0:
                extra = sorted(held)[:(-want)]
                due = await self.stop_tasks(extra)
                await self.release(conn, {sid: due.get(sid, 0.0) for sid in extra})
                for sid in extra:
                    held.pop(sid, None)
            start = [sid for sid in held if sid not in self.tasks] + claimed
            if start:
                for row in await sources.for_polling(conn, start):
                    try:
                        self.tasks[row["id"]] = source_task(self, row, first_at.get(row["id"]))
                    except Exception as exc:  # noqa: BLE001 - one bad row must not stop the rest
                        log.error("source %s cannot be polled: %s", row["id"], exc)
                        self.report(row["id"], error=f"cannot be polled: {exc}", polled=True)
                self.schedule_gc_freeze()
            await conn.execute("DELETE FROM poller_processes WHERE seen_at < now() - interval '1 hour'")
        await self.flush()

    def schedule_gc_freeze(self) -> None:
        """Once new readers have connected, move the long-lived objects (readers,
        clients, schedules) out of the collector's reach: a full collection of
        them paused the loop ~100 ms at 1,000 sources, and every poll due in the
        pause started late (bench/pollers: p99 lag 129-159 ms at 2,000 sources,
        22 ms with the freeze)."""
        if self._freeze is not None:
            self._freeze.cancel()

        def freeze():
            self._freeze = None
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        self._freeze = asyncio.get_running_loop().call_later(3.0, freeze)

    async def stop_tasks(self, ids) -> dict[uuid.UUID, float]:
        """Stop polling ``ids``; returns, per source, the loop time its next
        poll was due (for ``release``)."""
        tasks = [self.tasks.pop(sid) for sid in ids if sid in self.tasks]
        for t in tasks:
            t.task.cancel()
        if tasks:
            await asyncio.gather(*(t.task for t in tasks), return_exceptions=True)
        return {t.id: t.loop.next_due for t in tasks}

    async def release(self, conn, due: dict[uuid.UUID, float]) -> None:
        """Give up the leases of stopped sources, leaving in lease_expires
        when each one's next poll is due, for the next owner to keep to."""
        ids = list(due)
        if not ids:
            return
        now = asyncio.get_running_loop().time()
        await conn.execute(
            # to_timestamp(epoch) is immutable: Citus allows it on columns.
            "WITH n AS MATERIALIZED (SELECT extract(epoch FROM now())::float8 AS at)"
            " UPDATE ingest_sources s SET lease_owner = NULL,"
            " lease_expires = to_timestamp(n.at + u.wait)"
            " FROM n, unnest($2::uuid[], $3::float8[]) AS u (id, wait)"
            " WHERE s.id = u.id AND s.lease_owner = $1",
            self.owner, ids, [max(0.0, due[sid] - now) for sid in ids])

    async def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        ids = list(pending)
        p = [pending[i] for i in ids]
        # now() is read once in a CTE: Citus refuses a non-immutable function
        # inside CASE in an UPDATE (ingest_sources is a Citus local table there).
        await self.pool.execute(
            "WITH n AS MATERIALIZED (SELECT now() AS at) UPDATE ingest_sources s SET"
            " last_poll_at = CASE WHEN u.polled THEN n.at ELSE s.last_poll_at END,"
            " last_success_at = CASE WHEN u.success THEN n.at ELSE s.last_success_at END,"
            " last_error = CASE WHEN u.error IS NOT NULL THEN u.error"
            "                   WHEN u.success THEN NULL ELSE s.last_error END,"
            " last_error_at = CASE WHEN u.error IS NOT NULL THEN n.at ELSE s.last_error_at END,"
            " readings_written = s.readings_written + u.written,"
            " points_failed = s.points_failed + u.failed,"
            " polls_missed = s.polls_missed + u.missed"
            " FROM unnest($1::uuid[], $2::bool[], $3::bool[], $4::text[], $5::bigint[],"
            "             $6::bigint[], $7::bigint[])"
            "   AS u (id, polled, success, error, written, failed, missed), n"
            " WHERE s.id = u.id",
            ids, [x["polled"] for x in p], [x["success"] for x in p], [x["error"] for x in p],
            [x["written"] for x in p], [x["failed"] for x in p], [x["missed"] for x in p])


# ------------------------------------------------------------------ processes

def run_process(settings: Settings, lease_seconds: float, stats_file: Path | None = None) -> None:
    """Entry point of one poller process (uvloop)."""
    run_until_signal(PollerProcess(settings, lease_seconds, stats_file).run, settings.log_level)


def run_pollers(settings: Settings, processes: int, lease_seconds: float,
                stats_file: Path | None = None) -> None:
    """`haltless pollers`: start ``processes`` poller processes and supervise
    them (a process that dies is restarted; its sources are meanwhile taken
    over by the others)."""
    import multiprocessing
    import signal

    settings = prepare(settings)  # once, before the children
    if processes == 1:
        run_process(settings, lease_seconds, stats_file)
        return
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def start():
        p = ctx.Process(target=run_process, args=(settings, lease_seconds, stats_file))
        p.start()
        return p

    children = [start() for _ in range(processes)]

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        for c in children:
            if c.is_alive():
                c.terminate()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping:
        for i, c in enumerate(children):
            c.join(timeout=0.5)
            if not c.is_alive() and not stopping:
                log.warning("poller process %s exited with %s; restarting", c.pid, c.exitcode)
                time.sleep(1)
                children[i] = start()
    for c in children:
        c.join(10)
        if c.is_alive():
            c.kill()
