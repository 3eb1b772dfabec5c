"""The ingest path after HTTP: decode, validate (``haltless.fast``), resolve
series, and commit through one group-commit COPY writer.

    body --msgspec--> Reading structs --kernel--> packed records
         --GroupCommitWriter--> the records of every request queued while the
         previous group committed, sorted into one reading_chunks row per
         (series, hour) by the kernel --> one COPY transaction into the hot
         slot of the current hour --> futures resolved --> 207

Good batches take the fast path (one msgspec decode, one kernel pass, one
dict lookup per reading). A batch with a bad reading, a ``NaN`` literal or a
machine or series not seen before takes the slow path, reading by reading.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import struct
import time
import uuid

import asyncpg
import msgspec

from ..fast import encode_batch, encode_chunks

from .db import DB_DOWN
from .errors import ClientError, DatabaseUnavailable, Unprocessable
from .wire import (
    MAX_READINGS,
    IngestResult,
    Reading,
    ReadingError,
    batch_decoder,
    describe_validation_error,
    encoder,
)

log = logging.getLogger("haltless.ingest")

ERR_MACHINE_NOT_FOUND = "Machine not found"
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = b"\xff\xff"
COPY_COLUMNS = ["series_id", "bucket", "n", "ts", "vals"]


def hot_slot(now: float | None = None) -> int:
    """The reading_chunks slot writers fill now: the arrival hour modulo 2.
    Compaction empties the other one (server/compact.py)."""
    return int((time.time() if now is None else now) // 3600) % 2
SERIES_CACHE_LIMIT = 1_000_000  # per organization; cleared (not evicted) past this



# ------------------------------------------------------------------ decoding

def decode_batch(body: bytes) -> tuple[list, dict[int, str], list]:
    """Returns (readings, errors, raw): readings[i] is a Reading or None when
    errors[i] says why not; raw[i] is the reading as sent (slow path only).

    A body with ``\\u0000`` takes the slow path too: msgspec accepts NUL in
    strings, PostgreSQL refuses it, so it must be found reading by reading."""
    try:
        readings = batch_decoder.decode(body).readings
    except msgspec.ValidationError as exc:
        if str(exc).endswith(f"length <= {MAX_READINGS} - at `$.readings`"):
            raise _too_many(count_readings(body) or None) from None
        return _decode_slow(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return _decode_slow(body)
    if b"\\" in body and b"\\u0000" in body:  # memchr first: most bodies hold no escape
        return _decode_slow(body)
    return readings, {}, []


def count_readings(body: bytes) -> int:
    """How many readings ``body`` holds (0 when it is not a batch at all),
    without validating them: what the rate limiter charges."""
    try:
        return len(_envelope_decoder.decode(body).readings)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        try:
            return len(_decode_slow(body)[0])
        except ClientError:
            return 0


class _Envelope(msgspec.Struct):
    readings: list[msgspec.Raw]


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def _too_many(n: int | None) -> ClientError:
    has = f"{n:,}" if n is not None else f"more than {MAX_READINGS:,}"
    return Unprocessable(
        f"batch has {has} readings; the limit is {MAX_READINGS:,} per request - split it "
        "into several requests")


def _decode_slow(body: bytes) -> tuple[list, dict[int, str], list]:
    """Reading by reading, so one bad reading fails only itself.

    The stdlib scanner accepts the NaN/Infinity literals that json.dumps
    writes by default and turns 1e400 (and integers of more than 4,300
    digits) into inf: those readings then fail as "not finite" on their own.
    The readings array is scanned item by item and refused past the
    1,000th, so a 10 MB body is not parsed whole first (that blocked the
    event loop ~0.5 s per request). Bytes that are not UTF-8 are kept as
    lone surrogates (``surrogateescape``) and fail the reading whose string
    holds them, like a ``\\ud800`` escape does."""
    text = body.decode("utf-8", "surrogateescape")
    raw = _scan_batch(text)
    readings: list = []
    errors: dict[int, str] = {}
    for i, item in enumerate(raw):
        r = None
        if item is _TOO_DEEP:
            errors[i] = ("reading is nested too deeply (unknown fields are ignored, but must "
                         f"nest less than {_MAX_DEPTH} levels)")
        elif not isinstance(item, dict):
            errors[i] = f"reading must be a JSON object; got {_kind(item)}"
        else:
            try:
                r = msgspec.convert(item, Reading)
            except msgspec.ValidationError as exc:
                errors[i] = describe_validation_error(exc)
            except UnicodeEncodeError:  # msgspec met a lone surrogate (a key, a timestamp)
                errors[i] = _unencodable(item)
            else:
                bad = _text_error(r)
                if bad:
                    r, errors[i] = None, bad
        readings.append(r)
    return readings, errors, raw


_TEXT_FIELDS = ("machine_identifier", "metric_name", "unit", "raw_tag")
_MAX_DEPTH = 900  # about where the stdlib scanner gives up (the recursion limit)


def _text_error(r: Reading) -> str | None:
    """Why a string of ``r`` cannot be stored (PostgreSQL text is UTF-8 without NUL)."""
    for name in _TEXT_FIELDS:
        v = getattr(r, name)
        if not v:
            continue
        if "\x00" in v:
            return f"{name}: contains a NUL character (\\u0000), which cannot be stored; remove it"
        if not _utf8(v):
            return (f"{name}: is not valid UTF-8 (invalid bytes, or a lone surrogate escape "
                    "such as \\ud800); send UTF-8 text")
    return None


def _unencodable(item: dict) -> str:
    for k, v in item.items():
        if not _utf8(k):
            return ("a field name is not valid UTF-8 (invalid bytes, or a lone surrogate escape "
                    "such as \\ud800); send UTF-8 text")
        if isinstance(v, str) and not _utf8(v):
            return (f"{k[:100]}: is not valid UTF-8 (invalid bytes, or a lone surrogate escape such "
                    "as \\ud800); send UTF-8 text")
    return "reading is not valid UTF-8 text; send UTF-8 text"


def _utf8(v: str) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_int(digits: str):
    # int() refuses more than 4,300 digits (ValueError); as a float it is +-inf
    return int(digits) if len(digits) <= 4300 else float(digits)


_scan = json.JSONDecoder(parse_int=_parse_int).scan_once
_WS = re.compile(r"[ \t\n\r]*")
_CONTAINER_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_TOO_DEEP = object()
_FIRST = {"[": "an array", '"': "a string", "t": "a boolean", "f": "a boolean", "n": "null",
          "N": "a number", "I": "a number", "-": "a number", **{d: "a number" for d in "0123456789"}}


def _scan_batch(text: str) -> list:
    """The items of the top-level object's "readings" array, scanned one by
    one (at most MAX_READINGS); the other members are parsed and dropped."""
    ws = _WS.match
    i = ws(text, 0).end()
    if i == len(text):
        raise _not_json(text, i, "the body is empty")
    if text[i] != "{":
        kind = _FIRST.get(text[i])
        if kind is None:
            raise _not_json(text, i, "expected a value")
        raise Unprocessable('request body must be a JSON object {"readings": [...]}; '
                            f"got {kind}")
    keys: list[str] = []
    readings = _MISSING = object()
    i = ws(text, i + 1).end()
    if text.startswith("}", i):
        i += 1
    else:
        while True:
            if not text.startswith('"', i):
                raise _not_json(text, i, "expected a property name in double quotes")
            key, i = _scan_value(text, i)
            i = ws(text, i).end()
            if not text.startswith(":", i):
                raise _not_json(text, i, "expected ':'")
            i = ws(text, i + 1).end()
            if key == "readings" and text.startswith("[", i):
                readings, i = _scan_items(text, i)
            else:
                value, i = _scan_value(text, i)
                if key == "readings":
                    readings = value
            if len(keys) < 5:
                keys.append(key)
            i = ws(text, i).end()
            if text.startswith(",", i):
                i = ws(text, i + 1).end()
                continue
            if text.startswith("}", i):
                i += 1
                break
            raise _not_json(text, i, "expected ',' or '}'")
    i = ws(text, i).end()
    if i != len(text):
        raise _not_json(text, i, "extra data after the JSON object")
    if readings is _MISSING:
        raise Unprocessable('request body must be a JSON object {"readings": [...]}; '
                            f"got an object with keys {sorted(keys)}")
    if not isinstance(readings, list):
        raise Unprocessable(f'"readings" must be an array of readings; got {_kind(readings)}')
    return readings


def _scan_items(text: str, i: int) -> tuple[list, int]:
    ws = _WS.match
    items: list = []
    i = ws(text, i + 1).end()
    if text.startswith("]", i):
        return items, i + 1
    while True:
        try:
            item, i = _scan_value(text, i)
        except RecursionError:
            item, i = _TOO_DEEP, _skip_container(text, i)
        items.append(item)
        i = ws(text, i).end()
        if text.startswith(",", i):
            if len(items) == MAX_READINGS:
                raise _too_many(None)
            i = ws(text, i + 1).end()
            continue
        if text.startswith("]", i):
            return items, i + 1
        raise _not_json(text, i, "expected ',' or ']'")


def _scan_value(text: str, i: int):
    try:
        return _scan(text, i)
    except StopIteration:
        raise _not_json(text, i, "expected a value") from None
    except json.JSONDecodeError as exc:
        raise _not_json(text, exc.pos, exc.msg) from None


def _skip_container(text: str, i: int) -> int:
    """The end of the array or object that starts at ``i`` (too deep to parse)."""
    depth = 0
    for m in _CONTAINER_TOKENS.finditer(text, i):
        t = m.group()
        if t in "[{":
            depth += 1
        elif t in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    raise _not_json(text, len(text), "a nested value does not end")


def _not_json(text: str, pos: int, msg: str) -> ClientError:
    where = json.JSONDecodeError(msg, text, pos)
    return ClientError(f"request body is not valid JSON: {msg} at line {where.lineno} column "
                       f"{where.colno} (character {pos})")


def _kind(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _identifier(readings: list, raw: list, i: int) -> str | None:
    """The machine_identifier to echo with reading i's error: only one that
    is valid text of the allowed length (never a 1 MB string back)."""
    r = readings[i]
    if r is not None:
        return r.machine_identifier
    item = raw[i] if i < len(raw) else None
    ident = item.get("machine_identifier") if isinstance(item, dict) else None
    if isinstance(ident, str) and 0 < len(ident) <= 200 and "\x00" not in ident and _utf8(ident):
        return ident
    return None


# ------------------------------------------------------------------ catalog

class OrgCatalog:
    """Series ids of one organization, and recently missed machine identifiers."""

    __slots__ = ("series", "absent")

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str, str], int] = {}
        self.absent: dict[str, float] = {}  # machine_identifier -> until (monotonic)


class Catalog:
    """Resolves (machine_identifier, metric, unit, raw_tag) to series ids,
    creating series on first sight. Machines are never created here: an
    identifier the organization does not own is "Machine not found"."""

    def __init__(self, negative_ttl: float = 2.0) -> None:
        self._orgs: dict[uuid.UUID, OrgCatalog] = {}
        self._negative_ttl = negative_ttl

    def series_of(self, org_id: uuid.UUID) -> dict:
        cat = self._orgs.get(org_id)
        if cat is None:
            cat = self._orgs[org_id] = OrgCatalog()
        return cat.series

    def forget_absent(self, org_id: uuid.UUID, identifier: str) -> None:
        """A machine was just created: stop answering "not found" for it here
        (other workers stop within the negative TTL)."""
        cat = self._orgs.get(org_id)
        if cat is not None:
            cat.absent.pop(identifier, None)

    async def resolve(self, pool: asyncpg.Pool, org_id: uuid.UUID, readings: list,
                      missing: list[int]) -> dict[int, str]:
        """Fill the cache for the readings at ``missing``; return the errors of
        those whose machine the organization does not have."""
        cat = self._orgs[org_id]
        if len(cat.series) > SERIES_CACHE_LIMIT:
            cat.series.clear()
        now = time.monotonic()
        keys = {}
        for i in missing:
            r = readings[i]
            keys.setdefault((r.machine_identifier, r.metric_name, r.unit or "", r.raw_tag or ""), []).append(i)
        idents = {k[0] for k in keys}
        lookup = [m for m in idents if cat.absent.get(m, 0.0) <= now]
        machines: dict[str, uuid.UUID] = {}
        async with pool.acquire() as conn:
            if lookup:
                for row in await conn.fetch(
                        "SELECT machine_identifier, id FROM machines"
                        " WHERE org_id = $1 AND machine_identifier = ANY($2::text[])",
                        org_id, lookup):
                    machines[row[0]] = row[1]
            # Sorted: concurrent resolves insert their keys in one order, so
            # two of them cannot deadlock on each other's unique-index entries.
            todo = sorted(k for k in keys if k[0] in machines)
            if todo:
                cols = list(zip(*[(machines[k[0]], k[1], k[2], k[3]) for k in todo]))
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO series (machine_id, metric_name, unit, raw_tag)"
                        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])"
                        " ON CONFLICT DO NOTHING", *cols)
                rows = await conn.fetch(
                    "SELECT s.id, m.machine_identifier, s.metric_name, s.unit, s.raw_tag"
                    " FROM series s JOIN machines m ON m.id = s.machine_id"
                    " JOIN unnest($1::uuid[], $2::text[], $3::text[], $4::text[])"
                    "   AS k (machine_id, metric_name, unit, raw_tag)"
                    " ON s.machine_id = k.machine_id AND s.metric_name = k.metric_name"
                    "  AND s.unit = k.unit AND s.raw_tag = k.raw_tag", *cols)
                for sid, ident, metric, unit, raw_tag in rows:
                    cat.series[(ident, metric, unit, raw_tag)] = sid
        errors = {}
        for k, idx in keys.items():
            if k[0] not in machines:
                cat.absent[k[0]] = now + self._negative_ttl
                for i in idx:
                    errors[i] = ERR_MACHINE_NOT_FOUND
        if len(cat.absent) > 10_000:
            cat.absent = {m: t for m, t in cat.absent.items() if t > now}
        return errors


# ------------------------------------------------------------------ writer

class GroupCommitWriter:
    """Merges concurrent writes into one COPY transaction.

    Each ``write(payload)`` queues a request's COPY rows and returns once they
    are committed. ``connections`` loops each take everything queued, COPY it
    in one transaction and commit; while one commits (waiting on the WAL
    flush), the next batch fills up behind it. So one fsync serves many
    requests, and throughput does not hinge on one batch = one transaction.
    """

    def __init__(self, pool: asyncpg.Pool, connections: int = 2,
                 timeout: float = 60.0, alive=None) -> None:
        self._pool = pool
        # alive(): False when a commit can no longer be trusted to last (the
        # embedded data dir was deleted): then nothing is acknowledged.
        self._alive = alive
        self._queue: list[tuple[tuple, asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._timeout = timeout
        self._tasks = [asyncio.create_task(self._run()) for _ in range(connections)]

    async def write(self, payload: bytes, idem: tuple | None = None) -> bool:
        """Commit ``payload``; with ``idem`` = (org_id, key, request_hash,
        response), record the key in the same transaction. Returns False, and
        writes nothing, when that key was already recorded."""
        if not payload and idem is None:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(((payload, idem), fut))
        self._wakeup.set()
        return await fut

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(DatabaseUnavailable("server shutting down"))
        self._queue = []

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            group, self._queue = self._queue, []
            self._wakeup.clear()
            if not group:
                continue
            try:
                self._check_alive()
                dups = await self._copy([item for item, _ in group])
                self._check_alive()
            except DatabaseUnavailable as exc:
                self._fail(group, exc)
            except DB_DOWN as exc:
                self._fail(group, DatabaseUnavailable(f"database unavailable: {exc}"))
            except asyncpg.PostgresError:
                # Should not happen (the kernel emits valid rows); keep one bad
                # payload from failing the requests merged with it.
                log.exception("group COPY failed; retrying the %d payloads one by one", len(group))
                for item, fut in group:
                    try:
                        dup = await self._copy([item])
                    except Exception as exc:  # noqa: BLE001 - reported to that request only
                        self._fail([(item, fut)], exc)
                    else:
                        self._done([(item, fut)], dup)
                continue
            except Exception as exc:  # noqa: BLE001 - never let the loop die
                log.exception("group COPY failed")
                self._fail(group, exc)
                continue
            self._done(group, dups)

    async def _copy(self, items: list[tuple]) -> set[int]:
        """One transaction: record idempotency keys first (a key already taken,
        even by a transaction still in flight, drops its payload), then COPY.
        Returns the positions of the items that were duplicates."""
        dups: set[int] = set()
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                keyed = [(i, idem) for i, (_, idem) in enumerate(items) if idem is not None]
                if keyed:
                    first: dict[tuple, int] = {}
                    for i, idem in keyed:
                        if (idem[0], idem[1]) in first:
                            dups.add(i)  # the same key twice in one group
                        else:
                            first[(idem[0], idem[1])] = i
                    rows = [items[i][1] for i in first.values()]
                    taken = await conn.fetch(
                        "INSERT INTO idempotency_keys (org_id, key, request_hash, response)"
                        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[])"
                        " ON CONFLICT DO NOTHING RETURNING org_id, key",
                        *map(list, zip(*rows)), timeout=self._timeout)
                    fresh = {(r[0], r[1]) for r in taken}
                    dups.update(i for k, i in first.items() if k not in fresh)
                records = [p for i, (p, _) in enumerate(items) if p and i not in dups]
                if records:
                    # All requests of the group merge: one row per (series, hour).
                    data = b"".join([COPY_HEADER, encode_chunks(b"".join(records)), COPY_TRAILER])
                    await conn.copy_to_table(f"reading_chunks_{hot_slot()}",
                                             source=memoryview(data), columns=COPY_COLUMNS,
                                             format="binary", timeout=self._timeout)
        return dups

    def _check_alive(self) -> None:
        if self._alive is not None and not self._alive():
            raise DatabaseUnavailable("the embedded PostgreSQL's data directory or postmaster "
                                      "is gone; nothing was acknowledged")

    @staticmethod
    def _done(group, dups) -> None:
        for i, (_, fut) in enumerate(group):
            if not fut.done():
                fut.set_result(i not in dups)

    @staticmethod
    def _fail(group, exc: Exception) -> None:
        for _, fut in group:
            if not fut.done():
                fut.set_exception(exc)


# ------------------------------------------------------------------ ingestor

class Ingestor:
    """Validates readings of one organization and commits the good ones."""

    def __init__(self, pool: asyncpg.Pool, writer: GroupCommitWriter,
                 catalog: Catalog | None = None, retention_days: int | None = None) -> None:
        self.pool = pool
        self.writer = writer
        self.catalog = catalog or Catalog()
        # A retention shorter than the contract's 3,650 days refuses older
        # readings with a message that says why (they would be dropped anyway).
        self.retention_us = (retention_days * 86_400_000_000
                             if retention_days is not None and retention_days < 3650 else None)
        self.too_old = (f"Timestamp is older than the retention period ({retention_days} days)"
                        if self.retention_us is not None else None)

    async def ingest_body(self, org_id: uuid.UUID, body: bytes, idempotency_key: str | None = None
                          ) -> tuple[bytes, IngestResult | None]:
        """The 207 body for ``body``, and the result it encodes; None instead
        of the result when this is a replay of an earlier request with the
        same Idempotency-Key (then nothing was written)."""
        if idempotency_key is None:
            readings, errors, raw = decode_batch(body)
            result = await self.ingest(org_id, readings, errors, raw)
            return encoder.encode(result), result
        digest = hashlib.sha256(body).digest()
        stored = await self._stored(org_id, idempotency_key, digest)
        if stored is not None:
            return stored, None
        payload, result = await self.prepare(org_id, *decode_batch(body))
        encoded = encoder.encode(result)
        if await self.writer.write(payload, (org_id, idempotency_key, digest, encoded)):
            return encoded, result
        # Another request with this key committed first: answer as it was answered.
        stored = await self._stored(org_id, idempotency_key, digest)
        if stored is None:
            raise DatabaseUnavailable("idempotency record vanished; retry")
        return stored, None

    async def _stored(self, org_id: uuid.UUID, key: str, digest: bytes) -> bytes | None:
        row = await self.pool.fetchrow(
            "SELECT request_hash, response FROM idempotency_keys WHERE org_id = $1 AND key = $2",
            org_id, key)
        if row is None:
            return None
        if bytes(row["request_hash"]) != digest:
            raise Unprocessable("Idempotency-Key was already used with a different request body; "
                                "use a new key for a new batch")
        return bytes(row["response"])

    async def ingest(self, org_id: uuid.UUID, readings: list, errors: dict[int, str] | None = None,
                     raw: list | None = None) -> IngestResult:
        """Commit the good readings; the result counts and explains the rest."""
        payload, result = await self.prepare(org_id, readings, errors, raw)
        await self.writer.write(payload)
        return result

    async def prepare(self, org_id: uuid.UUID, readings: list, errors: dict[int, str] | None = None,
                      raw: list | None = None) -> tuple[bytes, IngestResult]:
        """Validate and encode: the COPY rows of the good readings, and the
        result to answer once they are committed."""
        errors = dict(errors or {})
        sent = readings
        series = self.catalog.series_of(org_id)
        # Good batches pass on the first try. A miss resolves the unseen series
        # (or finds the machine absent) and tries again; a second miss means the
        # cache was cleared under us by another request, which is rare.
        for attempt in range(3):
            now_us = time.time_ns() // 1000
            payload, accepted, kerr, missing = encode_batch(
                readings, series, now_us,
                None if self.retention_us is None else now_us - self.retention_us, self.too_old)
            if not missing:
                break
            if attempt == 2:
                raise DatabaseUnavailable("series cache is churning; retry")
            found = await self.catalog.resolve(self.pool, org_id, readings, missing)
            if found:
                readings = list(readings)
                for i, msg in found.items():
                    readings[i] = None
                    errors[i] = msg
        for i, msg in kerr:
            errors[i] = msg
        raw = raw or []
        out = [ReadingError(i, _identifier(sent, raw, i), errors[i]) for i in sorted(errors)]
        return payload, IngestResult(accepted, len(out), out)
