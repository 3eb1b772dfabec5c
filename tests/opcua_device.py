"""An OPC-UA server in a process of its own, for tests that kill it (SIGKILL)
and start it again on the same port, and that need to see from the
server's side what clients did:

    python tests/opcua_device.py PORT EVENTS [--nodes 4] [--every 0.1]

Nodes ``ns=2;s=Sub.Counter<k>`` (k < --nodes) count up together by one
every --every seconds, each value stamped (SourceTimestamp) when it is
written; a started device begins where the wall clock says (ticks since
2026-01-01), so a restarted one goes on from about where it was. It prints
``READY`` once it serves, and appends one JSON
line to EVENTS for every subscription that appears or goes (its id, its
session, the nodes it monitors, when: wall time), looking every 20 ms.
Started and stopped by ``peers.OpcuaDevice``.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import signal
import time

from asyncua import Server, ua

ORIGIN = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()


async def main(port: int, events: str, nodes: int, every: float) -> None:
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    srv = Server()
    await srv.init()
    srv.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    srv.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    assert await srv.register_namespace("urn:haltless:device") == 2
    ids = [ua.NodeId(f"Sub.Counter{k}", 2) for k in range(nodes)]
    for k, nid in enumerate(ids):
        await srv.nodes.objects.add_variable(nid, f"Counter{k}", 0.0)
    await srv.start()
    print("READY", flush=True)

    async def count():
        value = float(round((time.time() - ORIGIN) / every))
        while True:
            value += 1
            stamp = dt.datetime.now(dt.timezone.utc)
            for nid in ids:
                await srv.write_attribute_value(nid, ua.DataValue(
                    ua.Variant(value, ua.VariantType.Double), SourceTimestamp=stamp, ServerTimestamp=stamp))
            await asyncio.sleep(every - (time.time() % every))

    # Every subscription's life, from the service calls themselves: one made
    # and deleted within a few milliseconds (test-connection) is seen too.
    f = open(events, "a", buffering=1)
    known: dict[int, dict] = {}
    service = srv.iserver.subscription_service

    def record(event: str, sid: int) -> None:
        f.write(json.dumps({"event": event, "subscription": sid, **known[sid], "at": time.time()}) + "\n")

    create, create_items, delete = (service.create_subscription, service.create_monitored_items,
                                    service.delete_subscriptions)

    async def created(params, callback, session_id, request_callback=None):
        result = await create(params, callback, session_id, request_callback)
        known[result.SubscriptionId] = {"session": str(session_id), "nodes": []}
        record("created", result.SubscriptionId)
        return result

    async def items(params):
        results = await create_items(params)
        sid = params.SubscriptionId
        if sid in known:
            known[sid]["nodes"] = sorted(known[sid]["nodes"] + [
                i.ItemToMonitor.NodeId.Identifier for i, r in zip(params.ItemsToCreate, results)
                if r.StatusCode.is_good()])
            record("items", sid)
        return results

    deleting: set[int] = set()

    async def deleted(ids):
        deleting.update(ids)  # gone from the service before delete() returns: not an expiry
        try:
            results = await delete(ids)
        finally:
            deleting.difference_update(ids)
        for sid, res in zip(ids, results):
            if sid in known and res.is_good():
                record("deleted", sid)
                del known[sid]
        return results

    service.create_subscription, service.create_monitored_items = created, items
    service.delete_subscriptions = deleted

    async def watch():  # what ends without a DeleteSubscriptions: expiry at the end of its lifetime
        while True:
            for sid in [sid for sid in known if sid not in service.subscriptions and sid not in deleting]:
                record("expired", sid)
                del known[sid]
            await asyncio.sleep(0.02)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(count()), asyncio.create_task(watch())]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await srv.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("events")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--every", type=float, default=0.1)
    a = p.parse_args()
    asyncio.run(main(a.port, a.events, a.nodes, a.every))
