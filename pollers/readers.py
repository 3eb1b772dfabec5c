"""The one way from a protocol, an address and a typed config to a reader
(the cloud pollers, test-connection and the edge agent all build readers
here), and the helpers every user of a reader shares: connect or close
again, probe once, the outer timeout. The device library of a protocol is
imported when a reader of that protocol is made, not before: an edge agent
with Modbus sources only never loads asyncua."""
from __future__ import annotations

import asyncio
from pathlib import Path

from ..core.errors import ReaderError
from .base import Reader


def make_reader(protocol: str, host: str, port: int, config, *, pki_dir: Path,
                trust_store=None, endpoint: str | None = None,
                server_name: str | None = None) -> Reader:
    """A (not yet connected) reader. ``config`` is the protocol's typed config,
    secrets included; ``trust_store`` keeps OPC-UA server certificates
    (``opcua.TrustStore``); ``endpoint`` is an OPC-UA URL to use instead of
    ``opc.tcp://host:port`` (the edge agent's TOML names one, path included);
    ``server_name`` is the name TLS verifies when ``host`` is the address it
    resolved to (MQTT). An MQTT "reader" only connects and subscribes: it
    is test-connection's; sources are read by ``mqtt.Subscriber``."""
    if protocol == "modbus":
        from .modbus import ModbusReader
        return ModbusReader(host, port, config)
    if protocol == "opcua":
        from .opcua import OpcuaReader
        from .opcua_config import endpoint_url
        return OpcuaReader(endpoint or endpoint_url(host, port), config, pki_dir=pki_dir,
                           trust_store=trust_store)
    if protocol == "mqtt":
        from .mqtt import MqttProbe
        return MqttProbe(host, port, config, server_name or host)
    raise ValueError(f"unknown protocol {protocol!r}")


def outer_timeout(timeout_seconds: float | None) -> float:
    """How long a connect or a read may take in all, given the reader's own
    per-request timeout (default 5 s): its retries and handshakes fit inside."""
    return float(timeout_seconds or 5.0) * 2 + 1


async def connected(reader: Reader) -> Reader:
    """``reader``, connected; closed again if connecting fails."""
    try:
        await reader.connect()
    except BaseException:
        await reader.close()
        raise
    return reader


async def probe_reader(reader: Reader, timeout: float) -> tuple[bool, str]:
    """Connect, read every point once, close: (success, a sentence for a person).
    Used by test-connection and by `haltless agent --check`."""
    try:
        await asyncio.wait_for(reader.connect(), timeout)
        res = await asyncio.wait_for(reader.read(), timeout)
    except ReaderError as exc:
        return False, str(exc)
    except asyncio.TimeoutError:
        return False, f"no answer within {timeout:.0f} s"
    finally:
        await reader.close()
    if res.errors:
        total = len(res.samples) + len(res.errors)
        first = "; ".join(f"{e.raw_tag} ({e.metric_name}): {e.message}" for e in res.errors[:3])
        more = f" (and {len(res.errors) - 3} more)" if len(res.errors) > 3 else ""
        return False, f"connected, but {len(res.errors)} of {total} points failed: {first}{more}"
    return True, "Connected successfully"
