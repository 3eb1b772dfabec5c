"""The one way from a protocol, an address and a typed config to a reader,
or to a subscriber for an OPC-UA source in ``mode = "subscribe"`` (the
cloud pollers, test-connection and the edge agent all build them here),
and the helpers every user of one shares: connect or close again, probe
once, the outer timeout. The device library of a protocol is imported when
a reader of that protocol is made, not before: an edge agent with Modbus
sources only never loads asyncua."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ..core.errors import ReaderError
from .base import PointError, Reader, Subscriber
from .stats import Stats


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


def subscribes(protocol: str, config) -> bool:
    """Whether a source of ``protocol`` with ``config`` is subscribed to, not polled."""
    return protocol == "opcua" and config.mode == "subscribe"


def make_subscriber(protocol: str, host: str, port: int, config, *, interval: float, pki_dir: Path,
                    trust_store=None, endpoint: str | None = None, stats: Stats | None = None,
                    delivered: list[int] | None = None) -> Subscriber:
    """A (not yet connected) subscriber, as ``make_reader`` makes a reader;
    ``interval`` is the source's poll interval, the default publishing
    interval; ``stats`` counts what it receives; ``delivered`` (one int per
    node, the same list for every subscriber of one source) keeps a
    re-subscribe from delivering a value twice."""
    if not subscribes(protocol, config):
        raise ValueError(f"a {protocol} source in mode {getattr(config, 'mode', 'poll')!r} is polled")
    from .opcua_config import endpoint_url
    from .opcua_subscription import OpcuaSubscription
    return OpcuaSubscription(endpoint or endpoint_url(host, port), config, interval=interval,
                             pki_dir=pki_dir, trust_store=trust_store, stats=stats, delivered=delivered)


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


async def subscribed(subscriber: Subscriber) -> Subscriber:
    """``subscriber``, connected; closed again if subscribing fails."""
    try:
        await subscriber.connect()
    except BaseException:
        await subscriber.close()
        raise
    return subscriber


def _failed_points(errors: list[PointError], total: int, what: str) -> str:
    first = "; ".join(f"{e.raw_tag} ({e.metric_name}): {e.message}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"{what}, but {len(errors)} of {total} points failed: {first}{more}"


async def probe_subscriber(subscriber: Subscriber, points: int, timeout: float) -> tuple[bool, str]:
    """Subscribe, wait for the first notification, delete the subscription:
    (success, a sentence for a person). Used by test-connection and by
    `haltless agent --check` for sources in mode "subscribe"."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            errors = list(await subscriber.connect())
            while True:
                res = await subscriber.receive()
                if res.samples or res.errors:
                    break
        errors += res.errors
    except ReaderError as exc:
        return False, str(exc)
    except TimeoutError:
        return False, f"subscribed, but no notification within {timeout:.0f} s"
    finally:
        await subscriber.close()
    waited = round((time.monotonic() - start) * 1000)
    if errors:
        return False, _failed_points(errors, points, "subscribed")
    return True, f"Subscribed successfully: first notification after {waited} ms"


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
        return False, _failed_points(res.errors, len(res.samples) + len(res.errors), "connected")
    return True, "Connected successfully"
