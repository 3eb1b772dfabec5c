"""Simulated devices for bench/pollers.py: one process each.

    python -m bench.devices modbus [--registers 10] [--port 0]
    python -m bench.devices opcua [--nodes 5000] [--port 0] [--max-nodes-per-read 0]

Each prints "READY <port>" on stdout once it accepts connections on
127.0.0.1, then serves until SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
import time

HOST = "127.0.0.1"


def _device_loop_run(coro) -> None:
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


async def _wait_for_stop() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _modbus_device(registers: int, port: int) -> None:
    import logging

    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    bits = [SimData(0, values=False, datatype=DataType.BITS)]
    hr = [SimData(0, values=[(100 + i) % 65536 for i in range(registers)], datatype=DataType.REGISTERS)]
    ir = [SimData(0, values=0, datatype=DataType.REGISTERS)]
    device = SimDevice(1, simdata=(bits, list(bits), hr, ir))
    server = ModbusTcpServer(device, address=(HOST, port))
    await server.serve_forever(background=True)
    bound = server.transport.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    await _wait_for_stop()
    await server.shutdown()


def _monitored_items_keep_values_uncopied() -> None:
    """asyncua's server deep-copies every value a monitored item sees
    (``MonitoredItemValues.set_current_datavalue``: so that a value changed
    in place later still counts as a change, FreeOpcUa/opcua-asyncio#1243).
    py-spy on this device at 10,000 subscribed nodes: 63 % of its CPU was
    that ``copy.deepcopy``. This device never changes a DataValue after
    handing it over (every tick makes new ones), so the copy only burns
    CPU; in this process the monitored items keep the value itself. The
    rest (change detection, queue, publish, encoding) is asyncua's own."""
    from asyncua.server.monitored_item_service import MonitoredItemValues

    def set_current_datavalue(self, cur_val):
        self.old_dvalue = self.current_dvalue
        self.current_dvalue = cur_val
    MonitoredItemValues.set_current_datavalue = set_current_datavalue


async def _opcua_device(count: int, port: int, max_per_read: int = 0) -> None:
    import logging

    from asyncua import Server, ua

    logging.getLogger("asyncua").setLevel(logging.ERROR)
    t0 = time.monotonic()
    srv = Server()
    await srv.init()
    srv.set_endpoint(f"opc.tcp://{HOST}:{port}")
    await srv.set_application_uri("urn:haltless:bench-device")
    srv.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await srv.register_namespace("urn:haltless:bench")
    assert idx == 2, idx
    objects = srv.nodes.objects
    folder = await objects.add_folder(ua.NodeId("Bench", 2), "Bench")
    for i in range(1, count + 1):
        await folder.add_variable(ua.NodeId(i, 2), f"N{i}", float(i))
    # The Value attributes, updated in place once a second (a real server's
    # values change and carry a fresh SourceTimestamp; write_attribute_value
    # per node would cost this process more than the reads it serves).
    aspace = srv.iserver.aspace
    attrs = [aspace._nodes[ua.NodeId(i, 2)].attributes[ua.AttributeIds.Value] for i in range(1, count + 1)]
    if max_per_read:
        limit = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
        old = (await srv.get_node(limit).read_data_value()).Value
        await srv.write_attribute_value(limit, ua.DataValue(ua.Variant(max_per_read, old.VariantType)))
    await srv.start()
    print(f"READY {port} nodes={count} setup_s={time.monotonic() - t0:.1f}", flush=True)

    _monitored_items_keep_values_uncopied()
    good, double = ua.StatusCode(ua.StatusCodes.Good), ua.VariantType.Double

    async def tick():
        k = 0
        while True:
            k += 1
            now = dt.datetime.now(dt.timezone.utc)
            for i, av in enumerate(attrs):
                # a new DataValue per change, never changed afterwards (see
                # _monitored_items_keep_values_uncopied); a StatusCode is immutable in use
                dv = ua.DataValue(ua.Variant(float(i + (k % 100)), double, is_array=False), good,
                                  SourceTimestamp=now, ServerTimestamp=now)
                av.value = dv
                # Monitored items (subscribe mode) hear of the change as
                # write_attribute_value would tell them; the in-place update
                # alone never reached a subscription (nodes nobody
                # subscribed to have no callbacks and cost nothing here).
                for handle, callback in list(av.datachange_callbacks.items()):
                    await callback(handle, dv)
            await asyncio.sleep(1.0 - (time.time() % 1.0))

    ticker = asyncio.create_task(tick())
    await _wait_for_stop()
    ticker.cancel()
    await srv.stop()


def device_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.devices")
    p.add_argument("kind", choices=["modbus", "opcua"])
    p.add_argument("--registers", type=int, default=10)
    p.add_argument("--nodes", type=int, default=5000)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-nodes-per-read", type=int, default=0)
    a = p.parse_args(argv)
    if a.kind == "modbus":
        _device_loop_run(_modbus_device(a.registers, a.port))
    else:
        _device_loop_run(_opcua_device(a.nodes, a.port, a.max_nodes_per_read))


if __name__ == "__main__":
    device_main(sys.argv[1:])
