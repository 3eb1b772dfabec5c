"""The one way from a stored source to a reader, used by the cloud pollers
and by test-connection (the edge agent builds the same classes from its
TOML): check the address policy, then build the reader on the address that
was checked, never on a fresh resolution of the name."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from ..server import sources
from ..server.netpolicy import AddressPolicy, TargetRefused
from .base import Reader, ReaderError
from .modbus import ModbusConfig, ModbusReader
from .opcua import OpcuaConfig, OpcuaReader, TrustStore, endpoint_url


def make_reader(protocol: str, host: str, port: int, config: ModbusConfig | OpcuaConfig, *,
                pki_dir: Path, trust_store: TrustStore) -> Reader:
    """``config`` is the typed source config, secrets included."""
    if protocol == "modbus":
        return ModbusReader(host, port, config)
    if protocol == "opcua":
        return OpcuaReader(endpoint_url(host, port), config, pki_dir=pki_dir,
                           trust_store=trust_store)
    raise ValueError(f"unknown protocol {protocol!r}")


async def reader_for(source: sources.StoredSource, *, policy: AddressPolicy, pool,
                     pki_dir: Path) -> Reader:
    """A (not yet connected) reader for ``source``; ReaderError when the
    address policy refuses its host."""
    try:
        addrs = await asyncio.to_thread(policy.check, source.host, source.port)
    except TargetRefused as exc:
        raise ReaderError(str(exc)) from None
    return make_reader(source.protocol, addrs[0], source.port, source.config, pki_dir=pki_dir,
                       trust_store=SourceTrustStore(pool, source.id))


class SourceTrustStore:
    """Trust-on-first-use record of an OPC-UA server certificate, kept on the
    source's row, so every poller process (and test-connection) agrees."""

    def __init__(self, pool, source_id: uuid.UUID) -> None:
        self._pool = pool
        self._id = source_id

    async def get(self, endpoint: str) -> str | None:
        return await sources.certificate_pin(self._pool, self._id)

    async def put(self, endpoint: str, sha256_hex: str) -> None:
        await sources.record_certificate(self._pool, self._id, sha256_hex)


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
