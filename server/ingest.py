"""The ingestor: one organization's batch from body to committed rows.

    body --decode (server/decode.py: msgspec, or the slow path)--> Reading
    structs --kernel (haltless.fast.encode_batch: finite values, the
    timestamp window, series ids from the catalog)--> packed records
    --GroupCommitWriter (server/writer.py)--> committed --> 207

Good batches take the fast path (one msgspec decode, one kernel pass, one
dict lookup per reading). A machine or series not seen before, or a reading
that changes its series' unit or raw_tag, costs one catalog round trip
(server/catalog.py), then the kernel runs again.
The whole ingest path reads in three files: ``server/app.py`` (HTTP),
this one, and ``server/writer.py``.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import NamedTuple

import asyncpg

from ..core.errors import DatabaseUnavailable, Unprocessable
from ..core.wire import IngestResult, ReadingError, encoder
from ..fast import NOT_FINITE, RECHECK, TOO_NEW, TOO_OLD, encode_batch
from .catalog import Catalog
from .decode import as_reading, decode_batch, echo_identifier
from .writer import GroupCommitWriter

# The contract's messages for what the kernel refuses, and the reason each
# is counted under (haltless_readings_rejected_total{reason=...}).
ERR_NOT_FINITE = "Value must be finite"
ERR_TOO_OLD = "Timestamp is more than 3,650 days in the past"
ERR_TOO_NEW = "Timestamp is more than 5 minutes in the future"
REASON_INVALID = "invalid"                      # malformed: a field missing, wrong or unstorable
REASON_MACHINE = "machine_not_found"
KERNEL_REASONS = {NOT_FINITE: "not_finite", TOO_OLD: "timestamp_window", TOO_NEW: "timestamp_window"}
REASON_RETENTION = "retention"                  # older than HALTLESS_RETENTION_DAYS


class _Recheck(Exception):
    """The kernel returned RECHECK: decode the body strictly (prepare_body)."""


class Prepared(NamedTuple):
    """A validated batch: the records to commit, the answer once they are
    committed, and how many readings were refused for each reason."""

    payload: bytes
    result: IngestResult
    reasons: dict[str, int]


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
        self.kernel_errors = {
            NOT_FINITE: (ERR_NOT_FINITE, KERNEL_REASONS[NOT_FINITE]),
            TOO_NEW: (ERR_TOO_NEW, KERNEL_REASONS[TOO_NEW]),
            TOO_OLD: (ERR_TOO_OLD, KERNEL_REASONS[TOO_OLD]) if self.retention_us is None else
                     (f"Timestamp is older than the retention period ({retention_days} days)",
                      REASON_RETENTION)}

    async def ingest_body(self, org_id: uuid.UUID, body: bytes, idempotency_key: str | None = None
                          ) -> tuple[bytes, Prepared | None]:
        """The 207 body for ``body``, and what was committed (the result it
        encodes, the refusals by reason); None instead when this is a replay
        of an earlier request with the same Idempotency-Key (then nothing
        was written)."""
        if idempotency_key is None:
            done = await self.prepare_body(org_id, body)
            await self.writer.write(done.payload)
            return encoder.encode(done.result), done
        digest = hashlib.sha256(body).digest()
        stored = await self._stored(org_id, idempotency_key, digest)
        if stored is not None:
            return stored, None
        done = await self.prepare_body(org_id, body)
        encoded = encoder.encode(done.result)
        if await self.writer.write(done.payload, (org_id, idempotency_key, digest, encoded)):
            return encoded, done
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

    async def prepare_body(self, org_id: uuid.UUID, body: bytes) -> Prepared:
        """``prepare`` of a request body: decoded fast (FastReading), and again
        strictly when the kernel cannot vouch for a reading (RECHECK: a
        timestamp form it does not parse, a field beyond its bounds); the
        strict decode (and its slow path) then names what is wrong."""
        try:
            return await self.prepare(org_id, *decode_batch(body))
        except _Recheck:
            return await self.prepare(org_id, *decode_batch(body, strict=True))

    async def prepare(self, org_id: uuid.UUID, readings: list, errors: dict[int, str] | None = None,
                      raw: list | None = None) -> Prepared:
        """Validate and encode: the COPY rows of the good readings, and the
        result to answer once they are committed. ``errors`` are the
        decoder's (malformed readings), by index."""
        errors = dict(errors or {})
        reasons: dict[str, int] = {REASON_INVALID: len(errors)} if errors else {}
        sent = readings
        if self.catalog.refresh_due():  # at most once a few seconds, not per batch
            await self.catalog.refresh(self.pool)
        series = self.catalog.series_of(org_id)
        transient: list = []
        try:
            # Good batches pass on the first try. A miss resolves the unseen series
            # (or finds the machine absent) and tries again; a second miss means the
            # cache was cleared under us by another request, which is rare.
            for attempt in range(3):
                now_us = time.time_ns() // 1000
                payload, accepted, kerr, missing = encode_batch(
                    readings, series, now_us,
                    None if self.retention_us is None else now_us - self.retention_us)
                if payload is None and (not missing or any(c == RECHECK for _, c in kerr)):
                    raise _Recheck()  # only FastReadings can make it
                if not missing:
                    break
                if attempt == 2:
                    raise DatabaseUnavailable("series cache is churning; retry")
                readings = list(readings)
                wanted = set()
                for i in missing:
                    r = readings[i] = as_reading(readings[i])
                    wanted.add((r.machine_identifier, r.metric_name))
                # Every reading of the batch of those series, not only the
                # missed ones: the batch's latest unit/raw_tag wins, and each
                # key of the batch stays valid for the retry. (A hit whose
                # unit a missed reading then changed would miss in turn, and
                # a batch alternating units would never settle.)
                bad = {i for i, _ in kerr}
                related = set(missing)
                for i, r in enumerate(readings):
                    if r is None or i in related or i in bad:
                        continue
                    r = as_reading(r)
                    if (r.machine_identifier, r.metric_name) in wanted:
                        readings[i] = r
                        related.add(i)
                found, replaced = await self.catalog.resolve(self.pool, org_id, readings,
                                                             sorted(related))
                transient += replaced
                if found:
                    for i, msg in found.items():
                        readings[i] = None
                        errors[i] = msg
                    reasons[REASON_MACHINE] = reasons.get(REASON_MACHINE, 0) + len(found)
        finally:
            # Keys of this batch whose unit or raw_tag a later reading of it
            # replaced: cached for its retry only.
            for key in transient:
                series.forget(*key)
        for i, code in kerr:
            errors[i], reason = self.kernel_errors[code]
            reasons[reason] = reasons.get(reason, 0) + 1
        raw = raw or []
        out = [ReadingError(i, echo_identifier(sent, raw, i), errors[i]) for i in sorted(errors)]
        return Prepared(payload, IngestResult(accepted, len(out), out), reasons)
