"""What a process that ingests holds, started and closed as one object.

An HTTP worker (``server/app.py``) and a poller process (``server/direct.py``)
hold the same things: settings, a pool, the group-commit writer, the
ingestor, the secret box that opens source secrets, the address policy and
the OPC-UA PKI dir. ``prepare()`` runs once per process tree, in the parent
(start or join the embedded PostgreSQL, migrate, generate the secrets), and
returns settings that its children take as they are; ``Runtime.start()`` in
each child then only opens a pool.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..core.config import Settings
from . import db
from .auth import ApiKeyCache, jwt_secret
from .catalog import Catalog
from .ingest import Ingestor
from .netpolicy import AddressPolicy
from .secretbox import SecretBox
from .writer import GroupCommitWriter

log = logging.getLogger("haltless.runtime")


def prepare(settings: Settings, *, create: bool = True, on_create=None) -> Settings:
    """Once per process tree: the database (embedded started or joined, schema
    migrated; a new embedded one made only when ``create``) and the
    generated secrets. The result names them all, so a child given it
    (``to_env()`` or pickled) repeats none of this."""
    if settings.prepared:
        return settings
    s = settings.but(data_dir=Path(settings.data_dir).expanduser().resolve())
    embedded = not s.database_url
    dsn = db.migrated_url(s, create=create, on_create=on_create)
    return s.but(database_url=dsn, prepared="embedded" if embedded else "external",
                 jwt_secret=jwt_secret(s.jwt_secret, s.data_dir),
                 encryption_key=SecretBox.key_for(s.data_dir, s.encryption_key))


class Runtime:
    """The shared state of one process; ``await Runtime(s).start()``, then
    ``await rt.close()``."""

    def __init__(self, settings: Settings, writer_class=GroupCommitWriter) -> None:
        self.settings = settings
        self.writer_class = writer_class
        self.pool = None
        self.writer: GroupCommitWriter | None = None
        self.ingestor: Ingestor | None = None
        self.read_slots: asyncio.Semaphore | None = None
        self.keys = ApiKeyCache(settings.auth_cache_seconds)
        self.policy = AddressPolicy(settings.poll_allow)
        self.box: SecretBox | None = None
        self.jwt_secret: str | None = None
        self.pki_dir = Path(settings.data_dir) / "pki"

    async def start(self) -> "Runtime":
        s = self.settings
        if not s.prepared:  # started on its own (e.g. `granian haltless.server.app:app`)
            s = self.settings = await asyncio.to_thread(prepare, s)
        self.box = SecretBox(s.encryption_key)
        self.jwt_secret = s.jwt_secret
        self.pool = await db.create_pool(s.database_url, s)
        alive = None
        if s.prepared == "embedded":
            data_dir = s.data_dir
            alive = lambda: db.embedded_alive(data_dir)  # noqa: E731
        self.writer = self.writer_class(self.pool, s.writer_connections,
                                        timeout=s.db_timeout * 6, alive=alive)
        self.ingestor = Ingestor(self.pool, self.writer,
                                 Catalog(negative_ttl=s.auth_cache_seconds), s.retention_days)
        # Reads (the query API, CSV exports) may hold at most this many of
        # the pool's connections at once: the writer's and one for the
        # catalog and management stay free, so readers never starve ingest.
        self.read_slots = asyncio.Semaphore(max(1, s.pool_size - s.writer_connections - 1))
        return self

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        if self.pool is not None:
            await self.pool.close()
