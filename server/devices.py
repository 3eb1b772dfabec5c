"""From a stored ingest source to a reader, for the cloud pollers
(``server/direct.py``) and test-connection (``server/management.py``):
check the address policy, then build the reader on the address that was
checked, never on a fresh resolution of the name. The OPC-UA server
certificate trusted on first use is kept on the source's row, so every
poller process (and test-connection) agrees on it."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from ..core.errors import ReaderError, TargetRefused
from ..pollers.base import Reader
from ..pollers.readers import make_reader
from . import sources
from .netpolicy import AddressPolicy


async def reader_for(source: sources.StoredSource, *, policy: AddressPolicy, pool,
                     pki_dir: Path) -> Reader:
    """A (not yet connected) reader for ``source``; ReaderError when the
    address policy refuses its host."""
    try:
        addrs = await asyncio.to_thread(policy.check, source.host, source.port)
    except TargetRefused as exc:
        raise ReaderError(str(exc)) from None
    return make_reader(source.protocol, addrs[0], source.port, source.config, pki_dir=pki_dir,
                       trust_store=SourceTrustStore(pool, source.id), server_name=source.host)


class SourceTrustStore:
    """Trust-on-first-use record of an OPC-UA server certificate, kept on the
    source's row."""

    def __init__(self, pool, source_id: uuid.UUID) -> None:
        self._pool = pool
        self._id = source_id

    async def get(self, endpoint: str) -> str | None:
        return await sources.certificate_pin(self._pool, self._id)

    async def put(self, endpoint: str, sha256_hex: str) -> None:
        await sources.record_certificate(self._pool, self._id, sha256_hex)
