"""The edge agent's store-and-forward queue: SQLite in WAL mode.

Every reading is committed here (synchronous=FULL) before anything is sent,
and leaves only when the server has answered for it. A batch is formed once
and persisted with its Idempotency-Key, so a batch that was sent but not
acknowledged (network loss, kill -9) is resent after a restart with the same
key and the same readings: the server stores it once.

When the queue holds ``max_readings``, the ``when_full`` policy applies:
``drop_oldest`` (default: the newest data is usually the most useful) deletes
the oldest readings not yet in a batch; ``drop_newest`` refuses the new ones.
Either way a warning says how many were dropped.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("haltless.agent.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id INTEGER,
    created REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_batch ON readings (batch_id, id);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idem_key TEXT NOT NULL,
    created REAL NOT NULL
);
"""
MAX_BATCH = 1000
MAX_BATCH_BYTES = 9 * 1024 * 1024  # under the contract's 10 MB with room for the envelope


class Batch:
    __slots__ = ("id", "key", "bodies")

    def __init__(self, id: int, key: str, bodies: list[bytes]) -> None:
        self.id = id
        self.key = key
        self.bodies = bodies

    def body(self) -> bytes:
        return b'{"readings":[' + b",".join(self.bodies) + b"]}"


class Spool:
    """All SQLite work runs on one thread; the async methods hand it over."""

    def __init__(self, path: Path, max_readings: int, when_full: str) -> None:
        self.path = Path(path)
        self.max_readings = max_readings
        self.when_full = when_full
        self.dropped = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._count = 0

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self._db = db
        self._count = db.execute("SELECT count(*) FROM readings").fetchone()[0]

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        def _close():
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._run(_close)
        self._pool.shutdown(wait=True)

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def count(self) -> int:
        return self._count

    # -------------------------------------------------------------- put

    async def put(self, bodies: list[bytes]) -> int:
        """Store readings durably; returns how many were stored."""
        return await self._run(self._put, bodies) if bodies else 0

    def _put(self, bodies: list[bytes]) -> int:
        db = self._db
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            room = self.max_readings - self._count
            dropped = 0
            if len(bodies) > room:
                if self.when_full == "drop_newest":
                    dropped = len(bodies) - max(room, 0)
                    bodies = bodies[:max(room, 0)]
                else:
                    need = len(bodies) - room
                    cur = db.execute(
                        "DELETE FROM readings WHERE id IN (SELECT id FROM readings"
                        " WHERE batch_id IS NULL ORDER BY id LIMIT ?)", (need,))
                    dropped = cur.rowcount
                    self._count -= dropped
                    if dropped < need:  # the rest is in a batch being sent: drop the
                        extra = need - dropped  # oldest of the new ones instead
                        bodies = bodies[extra:]
                        dropped += extra
            db.executemany("INSERT INTO readings (created, body) VALUES (?, ?)",
                           [(now, b) for b in bodies])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._count += len(bodies)
        if dropped:
            self.dropped += dropped
            log.warning("queue full (%d readings): %s dropped %d readings", self.max_readings,
                        self.when_full, dropped)
        return len(bodies)

    # -------------------------------------------------------------- batches

    async def next_batch(self) -> Batch | None:
        """The unacknowledged batch, or a new one of the oldest readings."""
        return await self._run(self._next_batch)

    def _next_batch(self) -> Batch | None:
        db = self._db
        row = db.execute("SELECT id, idem_key FROM batches ORDER BY id LIMIT 1").fetchone()
        if row is not None:
            bodies = [r[0] for r in db.execute(
                "SELECT body FROM readings WHERE batch_id = ? ORDER BY id", (row[0],))]
            if bodies:
                return Batch(row[0], row[1], bodies)
            db.execute("DELETE FROM batches WHERE id = ?", (row[0],))  # all dropped meanwhile
        rows = db.execute("SELECT id, body FROM readings WHERE batch_id IS NULL ORDER BY id LIMIT ?",
                          (MAX_BATCH,)).fetchall()
        if not rows:
            return None
        size = 0
        for n, (_, body) in enumerate(rows):
            size += len(body) + 1
            if size > MAX_BATCH_BYTES:
                rows = rows[:max(n, 1)]
                break
        key = str(uuid.uuid4())
        db.execute("BEGIN IMMEDIATE")
        try:
            bid = db.execute("INSERT INTO batches (idem_key, created) VALUES (?, ?)",
                             (key, time.time())).lastrowid
            db.execute("UPDATE readings SET batch_id = ? WHERE batch_id IS NULL AND id <= ?",
                       (bid, rows[-1][0]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Batch(bid, key, [r[1] for r in rows])

    async def ack(self, batch: Batch) -> None:
        """The server answered for this batch: forget it."""
        await self._run(self._ack, batch.id)

    def _ack(self, batch_id: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            n = db.execute("DELETE FROM readings WHERE batch_id = ?", (batch_id,)).rowcount
            db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._count -= n

    async def oldest_age(self) -> float | None:
        def q():
            row = self._db.execute("SELECT min(created) FROM readings").fetchone()
            return None if row[0] is None else time.time() - row[0]
        return await self._run(q)
