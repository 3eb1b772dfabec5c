"""Where OPC-UA server certificates trusted on first use are kept, as seen
by a reader: the ``TrustStore`` protocol, and the edge agent's file of them
(the cloud pollers keep theirs on the source's row, ``server/devices.py``)."""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Protocol

from ..core.errors import ReaderError


class TrustStore(Protocol):
    async def get(self, endpoint: str) -> str | None: ...

    async def put(self, endpoint: str, sha256_hex: str) -> None: ...


class FileTrustStore:
    """Fingerprints recorded on first use, as a JSON object {endpoint: sha256_hex}.
    Two processes writing at once can lose a record; it is re-recorded on the next connect."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # not asyncio.Lock: one store may serve several loops

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ReaderError(f"cannot read the server trust store {self.path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ReaderError(f"the server trust store {self.path} is not a JSON object")
        return data

    def _put(self, endpoint: str, sha256_hex: str) -> None:
        with self._lock:
            data = self._load()
            data[endpoint] = sha256_hex
            write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True).encode(), 0o644)

    async def get(self, endpoint: str) -> str | None:
        # no lock needed: os.replace means a reader always sees a whole file
        return (await asyncio.to_thread(self._load)).get(endpoint)

    async def put(self, endpoint: str, sha256_hex: str) -> None:
        await asyncio.to_thread(self._put, endpoint, sha256_hex)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
