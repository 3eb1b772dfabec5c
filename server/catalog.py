"""The catalog: which series id a reading of an organization goes to.

A series is (machine_identifier, metric_name, unit, raw_tag) of one
organization. Ids are cached per organization in the worker; a miss looks
the machines up and creates the series (never the machine: an identifier
the organization does not own is "Machine not found", remembered for a
short while so a client that keeps sending it costs no query each time).
"""
from __future__ import annotations

import time
import uuid

import asyncpg

from ..core.wire import ERR_MACHINE_NOT_FOUND
from ..fast import SeriesIndex

SERIES_CACHE_LIMIT = 1_000_000  # per organization; cleared (not evicted) past this


class OrgCatalog:
    """Series ids of one organization, and recently missed machine identifiers."""

    __slots__ = ("absent", "series")

    def __init__(self) -> None:
        self.series = SeriesIndex()  # (machine, metric, unit, raw_tag) -> series id
        self.absent: dict[str, float] = {}  # machine_identifier -> until (monotonic)


class Catalog:
    """Resolves (machine_identifier, metric, unit, raw_tag) to series ids,
    creating series on first sight. Machines are never created here: an
    identifier the organization does not own is "Machine not found"."""

    def __init__(self, negative_ttl: float = 2.0) -> None:
        self._orgs: dict[uuid.UUID, OrgCatalog] = {}
        self._negative_ttl = negative_ttl

    def series_of(self, org_id: uuid.UUID) -> SeriesIndex:
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
                    cat.series.add(ident, metric, unit, raw_tag, sid)
        errors = {}
        for k, idx in keys.items():
            if k[0] not in machines:
                cat.absent[k[0]] = now + self._negative_ttl
                for i in idx:
                    errors[i] = ERR_MACHINE_NOT_FOUND
        if len(cat.absent) > 10_000:
            cat.absent = {m: t for m, t in cat.absent.items() if t > now}
        return errors
