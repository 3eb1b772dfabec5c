"""A Sparkplug B edge node of our own, for the tests and the MQTT benchmark:
an independent publisher built on the same schema (``haltless.pollers.
sparkplug_b``) and nothing else of haltless, doing what Sparkplug 3.0 asks
of an edge node: NDEATH as the will with a bdSeq, NBIRTH (seq 0, bdSeq,
``Node Control/Rebirth``) then a DBIRTH per device, data with aliases and
seq +1 mod 256, NDEATH/DDEATH, and a new birth sequence when an NCMD
``Node Control/Rebirth`` asks for one. The tests break the rules on
purpose through ``skip_seq``, unknown aliases, data before any birth.

    python -m bench.sparkplug_edge --port 1883 --group Plant1 --node Node1 \\
        --devices 4 --metrics 100 --rate 1000 --duration 30

publishes DDATA of ``--metrics`` doubles round-robin over the devices at
``--rate`` messages per second (0: as fast as it can) and prints one JSON
line: messages and metrics published.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import gmqtt

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from haltless.pollers import sparkplug_b as pb  # noqa: E402

NS = "spBv1.0"
INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64 = 1, 2, 3, 4, 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15
DATASET, BYTES, FILE, TEMPLATE = 16, 17, 18, 19
WIDTH = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}


def now_ms() -> int:
    return int(time.time() * 1000)


def set_value(m, datatype: int, value) -> None:
    """A metric's value in the field its datatype travels in (Sparkplug 3.0
    "Datatype Details"); None is is_null."""
    if value is None:
        m.is_null = True
    elif datatype in (INT8, INT16, INT32):
        m.int_value = value % (1 << WIDTH[datatype])  # two's complement of the width
    elif datatype == INT64:
        m.long_value = value % (1 << 64)
    elif datatype in (UINT8, UINT16, UINT32):
        m.int_value = value
    elif datatype in (UINT64, DATETIME):
        m.long_value = value
    elif datatype == FLOAT:
        m.float_value = value
    elif datatype == DOUBLE:
        m.double_value = value
    elif datatype == BOOLEAN:
        m.boolean_value = value
    elif datatype in (STRING, TEXT, UUID):
        m.string_value = value
    elif datatype in (BYTES, FILE):
        m.bytes_value = value
    elif datatype == DATASET:
        m.dataset_value.num_of_columns = 1
        m.dataset_value.columns.append("c")
        m.dataset_value.types.append(INT32)
        m.dataset_value.rows.add().elements.add().int_value = value
    elif datatype == TEMPLATE:
        m.template_value.template_ref = value
    else:
        raise ValueError(f"datatype {datatype}")


class EdgeNode:
    """One edge node (and its devices) on its own MQTT connection.
    ``devices``: device id -> [(metric name, datatype), ...]; node metrics
    likewise in ``metrics``. Aliases are numbered across the node and its
    devices (Sparkplug 3.0: unique per edge node)."""

    def __init__(self, port: int, group: str, node_id: str,
                 devices: dict[str, list[tuple[str, int]]] | None = None,
                 metrics: list[tuple[str, int]] | None = None, host: str = "127.0.0.1",
                 aliases: bool = True, auto_rebirth: bool = True, units: dict | None = None) -> None:
        self.host, self.port, self.group, self.node_id = host, port, group, node_id
        self.devices = devices or {}
        self.metrics = metrics or []
        self.units = units or {}
        self.use_aliases = aliases
        self.auto_rebirth = auto_rebirth
        self.bd_seq = 0
        self.seq = 0
        self.client: gmqtt.Client | None = None
        self.ncmds: list = []  # Payloads of the NCMDs received
        self.rebirths = 0  # births sent because an NCMD asked
        self.alias: dict[tuple[str | None, str], int] = {}
        n = 0
        for name, _ in self.metrics:
            n += 1
            self.alias[(None, name)] = n
        for dev, ms in self.devices.items():
            for name, _ in ms:
                n += 1
                self.alias[(dev, name)] = n
        self.types = {(None, name): t for name, t in self.metrics}
        self.types.update({(dev, name): t for dev, ms in self.devices.items() for name, t in ms})

    def topic(self, verb: str, device: str | None = None) -> str:
        return f"{NS}/{self.group}/{verb}/{self.node_id}" + (f"/{device}" if device else "")

    def _death(self) -> bytes:
        p = pb.Payload(timestamp=now_ms())
        p.metrics.add(name="bdSeq", datatype=INT64, long_value=self.bd_seq)
        return p.SerializeToString()

    async def connect(self) -> None:
        """A new MQTT session: the next bdSeq in the will, NCMD subscribed."""
        if self.client is not None:  # a new session: the old client must not reconnect
            self.bd_seq = (self.bd_seq + 1) % 256
            old, self.client = self.client, None
            try:
                await asyncio.wait_for(old.disconnect(), 2)
            except Exception:  # noqa: BLE001 - it may be gone with its broker already
                pass
        will = gmqtt.Message(self.topic("NDEATH"), self._death(), qos=1, retain=False)
        self.client = gmqtt.Client(f"edge-{self.group}-{self.node_id}-{self.bd_seq}",
                                   will_message=will)
        self.client.on_message = self._on_message
        await self.client.connect(self.host, self.port, keepalive=10)
        self.client.subscribe(self.topic("NCMD"), qos=1)
        self.client.subscribe(f"{NS}/{self.group}/DCMD/{self.node_id}/#", qos=1)
        await asyncio.sleep(0.1)

    async def _on_message(self, client, topic, payload, qos, properties):
        p = pb.Payload()
        p.ParseFromString(payload)
        if topic == self.topic("NCMD"):
            self.ncmds.append(p)
            if self.auto_rebirth and any(m.name == "Node Control/Rebirth" and m.boolean_value
                                         for m in p.metrics):
                self.rebirths += 1
                await self.birth()
        return 0

    def _next_seq(self) -> int:
        s = self.seq
        self.seq = (self.seq + 1) % 256
        return s

    def _add(self, p, device: str | None, name: str, value, ts: int, birth: bool) -> None:
        t = self.types[(device, name)]
        m = p.metrics.add(timestamp=ts)
        if birth or not self.use_aliases:
            m.name = name
        if birth:
            m.datatype = t
            unit = self.units.get((device, name))
            if unit is not None:
                m.properties.keys.append("engUnit")
                m.properties.values.add(type=STRING, string_value=unit)
        if self.use_aliases:
            m.alias = self.alias[(device, name)]
        set_value(m, t, value)

    async def birth(self, values: dict | None = None) -> None:
        """NBIRTH (seq 0) and a DBIRTH per device, every metric with a value
        (``values``: (device or None, name) -> value; default 0 / 0.0)."""
        values = values or {}
        ts = now_ms()
        self.seq = 0
        p = pb.Payload(timestamp=ts, seq=self._next_seq())
        p.metrics.add(name="bdSeq", datatype=INT64, long_value=self.bd_seq, timestamp=ts)
        p.metrics.add(name="Node Control/Rebirth", datatype=BOOLEAN, boolean_value=False,
                      timestamp=ts)
        for name, t in self.metrics:
            self._add(p, None, name, values.get((None, name), _zero(t)), ts, True)
        self.client.publish(self.topic("NBIRTH"), p.SerializeToString(), qos=0)
        for dev, ms in self.devices.items():
            d = pb.Payload(timestamp=ts, seq=self._next_seq())
            for name, t in ms:
                self._add(d, dev, name, values.get((dev, name), _zero(t)), ts, True)
            self.client.publish(self.topic("DBIRTH", dev), d.SerializeToString(), qos=0)
        await asyncio.sleep(0)

    def payload(self, device: str | None, values: dict, ts: int | None = None,
                skip_seq: bool = False, extra=None) -> bytes:
        ts = now_ms() if ts is None else ts
        if skip_seq:
            self._next_seq()
        p = pb.Payload(timestamp=ts, seq=self._next_seq())
        for name, value in values.items():
            self._add(p, device, name, value, ts, False)
        if extra is not None:
            extra(p)
        return p.SerializeToString()

    async def data(self, device: str | None, values: dict, ts: int | None = None,
                   skip_seq: bool = False, extra=None, qos: int = 0) -> None:
        """NDATA (device None) or DDATA of ``values`` (name -> value);
        ``skip_seq`` leaves out one sequence number (a lost message);
        ``extra(payload)`` adds metrics by hand (an unknown alias)."""
        verb = "DDATA" if device else "NDATA"
        self.client.publish(self.topic(verb, device),
                            self.payload(device, values, ts, skip_seq, extra), qos=qos)
        await asyncio.sleep(0)

    async def ddeath(self, device: str) -> None:
        p = pb.Payload(timestamp=now_ms(), seq=self._next_seq())
        self.client.publish(self.topic("DDEATH", device), p.SerializeToString(), qos=0)
        await asyncio.sleep(0)

    async def close(self) -> None:
        """An intentional disconnect: NDEATH first, then DISCONNECT (no will)."""
        if self.client is not None:
            self.client.publish(self.topic("NDEATH"), self._death(), qos=1)
            await asyncio.sleep(0.05)
            await self.client.disconnect()

    async def shutdown(self) -> None:
        """Close the connection, whatever state it is in (tests' teardown)."""
        client, self.client = self.client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.disconnect(), 2)
            except Exception:  # noqa: BLE001 - the broker may be gone
                pass

    async def die(self) -> None:
        """The connection ends without an NDEATH of ours: the broker
        publishes the will (DISCONNECT reason 4, as a crash would)."""
        if self.client is not None:
            await self.client.disconnect(reason_code=4)


def _zero(t: int):
    if t in (STRING, TEXT, UUID):
        return ""
    if t == BOOLEAN:
        return False
    if t in (FLOAT, DOUBLE):
        return 0.0
    if t in (BYTES, FILE):
        return b""
    if t == TEMPLATE:
        return "T"
    return 0


async def publish_load(args) -> dict:
    """The benchmark's load: DDATA of args.metrics doubles per message."""
    devices = {f"{args.node}-D{i}": [(f"m{j}", DOUBLE) for j in range(args.metrics)]
               for i in range(args.devices)}
    node = EdgeNode(args.port, args.group, args.node, devices)
    await node.connect()
    await node.birth()
    names = [f"m{j}" for j in range(args.metrics)]
    devs = list(devices)
    # One payload object per device, refilled in place: building 100 metrics
    # anew each time would limit the publisher, not the host under test.
    templates = {}
    for dev in devs:
        p = pb.Payload(timestamp=now_ms(), seq=0)
        for j, name in enumerate(names):
            p.metrics.add(alias=node.alias[(dev, name)], timestamp=0, double_value=0.0)
        templates[dev] = p
    sent = 0
    start = time.monotonic()
    end = start + args.duration
    topics = {dev: node.topic("DDATA", dev) for dev in devs}
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if args.rate:
            due = start + sent / args.rate
            if due > now:
                await asyncio.sleep(due - now)
        dev = devs[sent % len(devs)]
        p = templates[dev]
        ts = now_ms()
        p.timestamp = ts
        p.seq = node._next_seq()
        for j, m in enumerate(p.metrics):
            m.timestamp = ts
            m.double_value = (sent + j) % 1000 / 10.0
        node.client.publish(topics[dev], p.SerializeToString(), qos=0)
        sent += 1
        if sent % 50 == 0:
            await asyncio.sleep(0)  # let the transport write
    await asyncio.sleep(0.5)
    await node.client.disconnect()
    return {"messages": sent, "metrics": sent * args.metrics,
            "seconds": round(time.monotonic() - start, 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--group", default="Plant1")
    ap.add_argument("--node", default="Node1")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--metrics", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0, help="messages/s; 0 = as fast as it can")
    ap.add_argument("--duration", type=float, default=30)
    args = ap.parse_args(argv)
    import uvloop
    print(json.dumps(uvloop.run(publish_load(args))), flush=True)


if __name__ == "__main__":
    main()
