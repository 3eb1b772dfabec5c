"""MQTT sources in ``haltless pollers``: one broker subscription per leased
source, its messages turned into readings and committed through the same
Ingestor and Flusher as polled readings (``server/direct.py``).

    broker --Subscriber (pollers/mqtt.py)--> message
      sparkplug_b --SparkplugHost (pollers/sparkplug.py)--> Readings
      json        --decoded as POST /api/v1/ingest decodes a body-->
    --Ingestor.prepare--> Flusher --> committed --> QoS 1 messages acknowledged

Messages that arrive together (one read from the socket) are prepared and
committed as one batch. A QoS 1 message is acknowledged only once its
batch is committed: a poller killed before that leaves it unacknowledged,
and the broker delivers it again to the next session (the json format's
session persists across connections and lease handovers, as its client id
does). Past ``HURRY`` messages waiting, the process commits early, so the
broker's in-flight window (RECEIVE_MAXIMUM) never stalls the subscription.

Memory is bounded: past ``HALTLESS_MQTT_MEMORY_MB`` of messages received and
not yet committed in the process (the database slower than the broker),
QoS 0 data messages (Sparkplug NDATA/DDATA, json) are dropped as they come
and counted (``skipped.overload``); a Sparkplug node then shows a sequence
gap, and is asked for a rebirth once it can be taken again. QoS 1 messages
are bounded by the Receive Maximum instead, and never dropped.

A Sparkplug source with ``host_id`` is the primary host: its STATE birth
(retained, QoS 1) is published on every connect, its will says offline,
and a clean stop publishes offline before disconnecting (Sparkplug 3.0,
host session establishment). What the subscription heard is written to
the source's ``protocol_status`` once a second when it changed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import gmqtt
import msgspec

from ..core.errors import ClientError, ReaderError, TargetRefused
from ..core.wire import MAX_BODY_BYTES, MqttStatus, SparkplugDevice, SparkplugNode
from ..pollers.mqtt import RECEIVE_MAXIMUM, Subscriber
from ..pollers.mqtt_config import client_id, state_topic
from ..pollers.sparkplug import SparkplugHost, rebirth_request
from . import sources
from .db import DB_DOWN
from .decode import decode_batch

log = logging.getLogger("haltless.pollers")

HURRY = RECEIVE_MAXIMUM // 2  # QoS 1 messages waiting for a commit before it is hurried
STATUS_EVERY = 1.0            # s between writes of protocol_status (when it changed)
MAX_STATUS_NODES = 1000
# A stop waits this long for the commits under way (a flush takes milliseconds);
# what is later is redelivered. Short, because a stop inside the lease tick
# (a changed or rebalanced source) holds up the renewal of every other lease.
FINISH_SECONDS = 2.0


class MqttSourceTask:
    """One leased MQTT source, for ``PollerProcess`` (which holds ``task``
    and cancels it to stop the source)."""

    next_due = 0.0  # stop_tasks hands a poll schedule over; a subscription has none

    def __init__(self, proc, row) -> None:
        self.proc = proc
        self.id: uuid.UUID = row["id"]
        self.version: int = row["version"]
        self.org_id = row["org_id"]
        self.machine: str | None = row["machine_identifier"]  # None: messages name it
        self.source = sources.stored(row, proc.rt.box)
        cfg = self.cfg = self.source.config
        self.host = SparkplugHost(self.machine) if cfg.format == "sparkplug_b" else None
        self.state_topic = state_topic(cfg.host_id) if self.host and cfg.host_id else None
        stored = sources.mqtt_status(row["protocol_status"])
        self.base = stored  # counters of earlier owners; ours are added to them
        self.messages = 0  # json (a Sparkplug host counts its own)
        self.failed_messages = 0
        self.connected = False
        self.state: str | None = None  # the last error logged; None = healthy
        self.will_ms = 0
        self.batch: list = []  # readings (sparkplug) or (topic, body) (json)
        self.batch_future: asyncio.Future | None = None
        self.batch_unacked = 0
        self.batch_bytes = 0  # of the messages in batch, counted in proc.mqtt_held
        self.overload = 0  # QoS 0 data messages dropped past proc.mqtt_limit
        self.shedding = False
        self.pending: set[asyncio.Future] = set()  # batches not yet committed
        self.unacked = 0
        self.draining: asyncio.Task | None = None
        self.status_dirty = True
        self.subscriber = Subscriber(
            self.address, self.source.port, cfg, server_name=self.source.host,
            client_id=client_id(cfg, self.id), clean_start=self.host is not None,
            on_message=self.on_message, on_connected=self.on_connected, on_lost=self.on_lost,
            on_error=self.failed, will=self.will)
        self.task = asyncio.create_task(self.run(), name=f"source-{self.id}")

    @property
    def loop(self):  # PollerProcess.stop_tasks reads t.loop.next_due
        return self

    def describe(self) -> str:
        return f"source {self.id} (mqtt {self.source.host}:{self.source.port})"

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        status = asyncio.create_task(self._write_status_forever())
        try:
            await self.subscriber.run()
        except asyncio.CancelledError:
            await self._finish()
            raise
        finally:
            status.cancel()
            await asyncio.gather(status, return_exceptions=True)
            self.connected = False
            await self._write_status()

    async def _finish(self) -> None:
        """A stop (lease handed over, source changed, process ending): let the
        commits under way land and their messages be acknowledged, say
        goodbye as the primary host, disconnect. What is still uncommitted
        then is redelivered to the next session (QoS 1)."""
        waiting = set(self.pending)
        if waiting:
            if self.proc.flusher is not None:
                self.proc.flusher.soon()
            await asyncio.wait(waiting, timeout=FINISH_SECONDS)
        await self.subscriber.settle()
        await self.subscriber.close(goodbye=self.goodbye)

    async def address(self) -> str:
        """The broker's address, checked by the address policy at every connect."""
        try:
            addrs = await asyncio.to_thread(self.proc.rt.policy.check, self.source.host,
                                            self.source.port)
        except TargetRefused as exc:
            raise ReaderError(str(exc)) from None
        return addrs[0]

    # ------------------------------------------------------------------ the session

    def will(self) -> gmqtt.Message | None:
        if self.state_topic is None:
            return None
        self.will_ms = int(time.time() * 1000)
        return gmqtt.Message(self.state_topic, _state(False, self.will_ms), qos=1, retain=True)

    async def on_connected(self, client) -> None:
        if self.state_topic is not None:  # after the subscriptions, as Sparkplug 3.0 asks
            client.publish(self.state_topic, _state(True, self.will_ms), qos=1, retain=True)
        self.connected = True
        self.status_dirty = True
        if self.state is not None:
            log.info("%s: connected again", self.describe())
            self.state = None
        self.proc.report(self.id, polled=True, success=True)

    def goodbye(self, client) -> None:
        if self.state_topic is not None:
            client.publish(self.state_topic, _state(False, int(time.time() * 1000)), qos=1,
                           retain=True)

    def on_lost(self) -> None:
        self.connected = False
        self.status_dirty = True
        if self.host is not None:
            self.host.connection_lost()
        self.failed("connection to the broker lost; reconnecting")

    def failed(self, message: str) -> None:
        self.proc.report(self.id, error=message, polled=True)
        if message != self.state:
            log.warning("%s: %s", self.describe(), message)
            self.state = message

    # ------------------------------------------------------------------ messages

    def on_message(self, topic: str, payload: bytes, qos: int) -> asyncio.Future | None:
        """Called in arrival order; returns the future of the commit a QoS 1
        message waits for before it is acknowledged (None: nothing to wait for)."""
        self.status_dirty = True
        if qos == 0 and self.proc.mqtt_held >= self.proc.mqtt_limit and self._data(topic):
            self._shed()
            return None
        if self.host is None:
            self.messages += 1
            item = (topic, payload)
        else:
            if topic == self.state_topic:
                self._own_state(payload)
                return None
            readings, ncmd = self.host.handle(topic, payload)
            if ncmd is not None:
                self.subscriber.publish(ncmd, rebirth_request(), qos=0)
            if not readings:
                return None
            item = readings
        self.batch.append(item)
        self.batch_bytes += len(payload)
        self.proc.mqtt_held += len(payload)
        if self.batch_future is None:
            self.batch_future = asyncio.get_running_loop().create_future()
            self.pending.add(self.batch_future)
        if qos > 0:
            self.batch_unacked += 1
            self.unacked += 1
            if self.unacked >= HURRY and self.proc.flusher is not None:
                self.proc.flusher.soon()
        if self.draining is None or self.draining.done():
            self.draining = asyncio.create_task(self._drain())
        return self.batch_future

    def _data(self, topic: str) -> bool:
        """Data that may be dropped under overload: any json message, and
        Sparkplug NDATA / DDATA (never births, deaths or STATE, which are
        small and which the host's state needs)."""
        if self.host is None:
            return True
        verb = topic.split("/", 3)[2:3]
        return verb == ["DDATA"] or verb == ["NDATA"]

    def _shed(self) -> None:
        self.overload += 1
        if not self.shedding:
            self.shedding = True
            log.warning("%s: %d MB of MQTT messages wait for the database; dropping QoS 0 "
                        "data until they are committed (HALTLESS_MQTT_MEMORY_MB)",
                        self.describe(), self.proc.mqtt_limit >> 20)

    def _own_state(self, payload: bytes) -> None:
        """Our STATE topic says offline (our own will, from a connection that
        died, or another client): say online again, with our will's
        timestamp (Sparkplug 3.0, host session establishment)."""
        try:
            online = json.loads(payload).get("online")
        except (ValueError, AttributeError):
            return
        if online is False and self.connected:
            self.subscriber.publish(self.state_topic, _state(True, self.will_ms), qos=1,
                                    retain=True)

    async def _drain(self) -> None:
        """Prepare the batches that arrived, one after the other, and hand
        them to the Flusher (or commit them, without one)."""
        await asyncio.sleep(0)  # let the messages of this read join the batch
        while self.batch:
            items, fut, unacked, held = (self.batch, self.batch_future, self.batch_unacked,
                                         self.batch_bytes)
            self.batch, self.batch_future, self.batch_unacked, self.batch_bytes = [], None, 0, 0
            try:
                payload, report = await self._prepare(items)
            except Exception as exc:  # noqa: BLE001 - the database is down: reported, not acknowledged
                self._landed(fut, unacked, held, exc, None)
                continue
            if self.proc.flusher is not None:
                self.proc.flusher.add(payload, lambda exc, f=fut, u=unacked, h=held, r=report:
                                      self._landed(f, u, h, exc, r))
                continue
            try:
                await self.proc.rt.writer.write(payload)
            except Exception as exc:  # noqa: BLE001 - as above
                self._landed(fut, unacked, held, exc, None)
            else:
                self._landed(fut, unacked, held, None, report)

    async def _prepare(self, items: list) -> tuple[bytes, tuple[int, int, str | None]]:
        """The COPY records of a batch, and (accepted, refused, error text)."""
        ing = self.proc.rt.ingestor
        if self.host is not None:
            readings = [r for rs in items for r in rs]
            done = await ing.prepare(self.org_id, readings)
            errors = _summary([f"{readings[e.index].raw_tag} ({e.machine_identifier}): {e.error}"
                               for e in done.result.errors[:4]], len(done.result.errors))
            return done.payload, (done.result.accepted_count, done.result.rejected_count, errors)
        payloads, accepted, refused, errors, more = [], 0, 0, [], 0
        for topic, body in items:
            try:
                done = await self._prepare_json(body)
            except ClientError as exc:  # the whole message: refused, and never retried
                self.failed_messages += 1
                refused += 1
                errors.append(f"{topic}: {exc}")
                continue
            payloads.append(done.payload)
            accepted += done.result.accepted_count
            refused += done.result.rejected_count
            errors += [f"{topic}: readings[{e.index}] ({e.machine_identifier}): {e.error}"
                       for e in done.result.errors[:4]]
            more += max(0, len(done.result.errors) - 4)
        return b"".join(payloads), (accepted, refused, _summary(errors, len(errors) + more))

    async def _prepare_json(self, body: bytes):
        """A message as POST /api/v1/ingest takes a body: the same decoding,
        limits and per-reading errors. With the source's machine, every
        reading goes to it."""
        ing = self.proc.rt.ingestor
        if len(body) > MAX_BODY_BYTES:
            raise ClientError(f"message of {len(body):,} bytes; the limit is {MAX_BODY_BYTES:,} "
                              "(as for a request body) - send fewer readings per message")
        if self.machine is None:
            return await ing.prepare_body(self.org_id, body)
        readings, errors, raw = decode_batch(body, strict=True)
        readings = [None if r is None else msgspec.structs.replace(r, machine_identifier=self.machine)
                    for r in readings]
        return await ing.prepare(self.org_id, readings, errors, raw)

    def _landed(self, fut: asyncio.Future, unacked: int, held: int, exc: Exception | None,
                report) -> None:
        """A batch is committed (exc None) or not: its QoS 1 messages may be
        acknowledged, or their connection is dropped unacknowledged."""
        self.pending.discard(fut)
        self.unacked -= unacked
        self.proc.mqtt_held -= held
        if self.shedding and self.proc.mqtt_held < self.proc.mqtt_limit:
            self.shedding = False
            log.warning("%s: taking every message again; %d dropped so far", self.describe(),
                        self.overload)
        if exc is not None:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here: a QoS 0 batch has no one waiting
            self.failed(f"write: {exc}")
            return
        if not fut.done():
            fut.set_result(None)
        accepted, refused, error = report
        self.proc.stats.readings += accepted
        if error is None:
            if self.state is not None and self.connected:
                log.info("%s: receiving again", self.describe())
                self.state = None
        elif error != self.state:
            log.warning("%s: %s", self.describe(), error)
            self.state = error
        self.proc.report(self.id, written=accepted, failed=refused, error=error, polled=True,
                         success=True)

    # ------------------------------------------------------------------ status

    def status(self) -> MqttStatus:
        b = self.base
        host = self.host
        nodes = host.state() if host is not None else []
        skipped = dict(b.skipped)
        if host is not None:
            for k, v in host.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
        if self.failed_messages:
            skipped["refused_message"] = skipped.get("refused_message", 0) + self.failed_messages
        if self.overload:
            skipped["overload"] = skipped.get("overload", 0) + self.overload
        return MqttStatus(
            connected=self.connected,
            messages=b.messages + self.overload + (host.messages if host is not None
                                                   else self.messages),
            discarded=b.discarded + (host.discarded if host is not None else 0),
            rebirths_requested=b.rebirths_requested + (host.rebirths_requested if host else 0),
            skipped=skipped,
            nodes=[SparkplugNode(n.group, n.node_id, n.online, _when(n.since),
                                 n.awaiting, n.bd_seq,
                                 [SparkplugDevice(d.device_id, d.online, _when(d.since))
                                  for d in n.devices.values()])
                   for n in nodes[:MAX_STATUS_NODES]],
            nodes_total=len(nodes))

    async def _write_status_forever(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            if self.status_dirty:
                await self._write_status()

    async def _write_status(self) -> None:
        self.status_dirty = False
        try:
            await self.proc.pool.execute(
                "UPDATE ingest_sources SET protocol_status = $2::jsonb"
                " WHERE id = $1 AND lease_owner = $3",
                self.id, msgspec.json.encode(self.status()).decode(), self.proc.owner)
        except DB_DOWN:
            self.status_dirty = True


def _summary(errors: list[str], total: int) -> str | None:
    """The first three errors of a batch, and how many more there were."""
    if not errors:
        return None
    text = "; ".join(errors[:3])
    return text + (f"; and {total - 3} more" if total > 3 else "")


def _state(online: bool, ms: int) -> bytes:
    """A Sparkplug host's STATE payload: JSON, not protobuf (Sparkplug 3.0)."""
    return json.dumps({"online": online, "timestamp": ms}).encode()


def _when(t: float | None):
    import datetime as dt
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc)
