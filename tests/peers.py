"""Protocol peers for tests that drive a server process: a real pymodbus
server or asyncua server on 127.0.0.1, run on an event loop in a thread, or
(``OpcuaDevice``) an asyncua server in a process of its own."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pymodbus.server import ModbusTcpServer

from test_modbus_reader import HOST, device  # noqa: F401 - re-exported for tests


class LoopThread:
    """An asyncio loop in a daemon thread, for peers that must outlive one call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.call(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ModbusPeer:
    """A pymodbus TCP server with the given devices; stop() and start() again
    on the same port to simulate a device that goes away and comes back.
    ``requests`` counts the requests it was sent, ``connections`` the
    connections open to it: what a poller does to the device, seen from it."""

    def __init__(self, devices, port: int = 0) -> None:
        self.devices = devices
        self.port = port
        self.lt = LoopThread()
        self.server = None
        self.requests = 0
        self.connections = 0

    def _pdu(self, sending: bool, pdu):
        if not sending:
            self.requests += 1
        return pdu

    def _connect(self, connected: bool) -> None:
        self.connections += 1 if connected else -1

    def start(self) -> "ModbusPeer":
        async def go():
            self.server = ModbusTcpServer(self.devices, address=(HOST, self.port),
                                          trace_pdu=self._pdu, trace_connect=self._connect)
            await self.server.serve_forever(background=True)
            return self.server.transport.sockets[0].getsockname()[1]
        self.port = self.lt.call(go())
        return self

    def stop(self) -> None:
        if self.server is not None:
            async def go():
                await self.server.shutdown()
                await asyncio.sleep(0.05)
            self.lt.call(go())
            self.server = None

    def close(self) -> None:
        self.stop()
        self.lt.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class OpcuaPeer:
    """The asyncua test server of test_opcua_reader (None, Sign and
    SignAndEncrypt; one user) on its own loop thread."""

    def __init__(self) -> None:
        from helpers import free_port
        from test_opcua_reader import make_server_cert
        self.port = free_port()
        self.cert = make_server_cert("e2e-server")
        self.lt = LoopThread()
        self.server = None

    def start(self) -> "OpcuaPeer":
        from test_opcua_reader import start_server
        self.server = self.lt.call(start_server(self.port, self.cert))
        return self

    def close(self) -> None:
        if self.server is not None:
            self.lt.call(self.server.stop())
            self.server = None
        self.lt.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class OpcuaDevice:
    """tests/opcua_device.py in a process of its own on a fixed port: killed
    (SIGKILL, a power cut) and started again on the same port; ``events()``
    is what it saw clients do with subscriptions."""

    def __init__(self, tmp_path, nodes: int = 4, every: float = 0.1) -> None:
        from helpers import free_port
        self.port = free_port()
        self.events_path = tmp_path / f"device-{self.port}-events.jsonl"
        self.log_path = tmp_path / f"device-{self.port}.log"
        self.args = ["--nodes", str(nodes), "--every", str(every)]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "OpcuaDevice":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("opcua_device.py")), str(self.port),
                 str(self.events_path), *self.args],
                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("READY"):
            self.kill()
            raise RuntimeError(f"the OPC-UA device did not start:\n{self.log_path.read_text()}")
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(20)
            self.proc.stdout.close()
        self.proc = None

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(ln) for ln in self.events_path.read_text().splitlines() if ln.strip()]

    def live(self) -> dict[int, dict]:
        """Subscription id -> its last event, for those created and not ended
        (deleted, or expired at the end of their lifetime)."""
        live: dict[int, dict] = {}
        for e in self.events():
            if e["event"] in ("deleted", "expired"):
                live.pop(e["subscription"], None)
            else:
                live[e["subscription"]] = e
        return live

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
