"""The catalog: which series id a reading of an organization goes to.

A series is (machine_identifier, metric_name) of one organization (README
"Series identity"); unit and raw_tag are its attributes: the latest
non-empty value sent wins, an empty one changes nothing, and every change
is a row of ``series_attribute_changes``. Ids are cached per organization
in the worker; a miss looks the machines up, creates the series (never the
machine: an identifier the organization does not own is "Machine not
found", remembered for a short while so a client that keeps sending it
costs no query each time) and updates the attributes when they change.

The cache (``SeriesIndex``) is keyed by a reading's four fields, and holds
for each series only the keys that agree with its attributes (unit "" or
its unit, raw_tag "" or its raw_tag): a reading that would change them
misses, reaches ``resolve`` and is written there; every other reading of a
known series costs no query. Changes made by other workers reach this one
through ``series_attribute_changes``: at most once every ``negative_ttl``
seconds (not once per batch) ``refresh`` reads the changes recorded since
and forgets the keys that agreed with the values they replaced.
"""
from __future__ import annotations

import datetime
import logging
import time
import uuid

import asyncpg

from ..core.wire import ERR_MACHINE_NOT_FOUND
from ..fast import SeriesIndex

log = logging.getLogger("haltless.catalog")

# refresh reads the changes of this much before its last look again: a change
# is stamped when its transaction starts and may commit after that look.
CHANGES_OVERLAP_SECONDS = 60.0
SERIES_CACHE_LIMIT = 1_000_000  # per organization; cleared (not evicted) past this

Key = tuple[str, str, str, str]  # machine_identifier, metric_name, unit, raw_tag ("" absent)


def agreeing(machine: str, metric: str, unit: str, raw_tag: str) -> list[Key]:
    """The keys of readings that leave a series with these attributes as it is."""
    return [(machine, metric, u, r) for u in {"", unit} for r in {"", raw_tag}]


class OrgCatalog:
    """Series ids of one organization, and recently missed machine identifiers."""

    __slots__ = ("absent", "series")

    def __init__(self) -> None:
        self.series = SeriesIndex()  # agreeing keys -> series id
        self.absent: dict[str, float] = {}  # machine_identifier -> until (monotonic)


class Catalog:
    """Resolves readings to series ids, creating series on first sight and
    recording changes of unit and raw_tag. Machines are never created here:
    an identifier the organization does not own is "Machine not found"."""

    def __init__(self, negative_ttl: float = 2.0) -> None:
        self._orgs: dict[uuid.UUID, OrgCatalog] = {}
        self._negative_ttl = negative_ttl
        self._next_refresh = 0.0  # monotonic
        self._changes_since = None  # the database's clock at the last refresh

    def refresh_due(self) -> bool:
        return time.monotonic() >= self._next_refresh

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """Forget the cached keys that agreed with attributes another worker
        (or this one) has since replaced, so that readings bringing the old
        values back miss and are written. One query per ``negative_ttl``."""
        # Never more than twice a second, even with HALTLESS_AUTH_CACHE_SECONDS=0.
        self._next_refresh = time.monotonic() + max(self._negative_ttl, 0.5)
        try:
            now, rows = None, []
            async with pool.acquire() as conn:
                now = await conn.fetchval("SELECT now()")
                if self._changes_since is not None:
                    rows = await conn.fetch(
                        "SELECT m.org_id, m.machine_identifier, s.metric_name, c.old_unit,"
                        " c.old_raw_tag, s.unit, s.raw_tag FROM series_attribute_changes c"
                        " JOIN series s ON s.id = c.series_id JOIN machines m ON m.id = s.machine_id"
                        " WHERE c.changed_at > $1", self._changes_since
                        - datetime.timedelta(seconds=CHANGES_OVERLAP_SECONDS))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not read series attribute changes (%s); trying again in %.1f s",
                        exc, self._negative_ttl)
            return
        self._changes_since = now
        for org, ident, metric, old_unit, old_raw, unit, raw_tag in rows:
            cat = self._orgs.get(org)
            if cat is not None:
                keep = agreeing(ident, metric, unit, raw_tag)
                for key in agreeing(ident, metric, old_unit, old_raw):
                    if key not in keep:
                        cat.series.forget(*key)

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
                      missing: list[int]) -> tuple[dict[int, str], list[Key]]:
        """Fill the cache for the readings at ``missing``. Returns the errors of
        those whose machine the organization does not have, and the keys the
        caller must ``forget`` once it has encoded this batch: readings of
        this batch whose unit or raw_tag a later reading of it replaced (the
        latest wins), cached only so that this batch's retry finds them."""
        cat = self._orgs[org_id]
        if len(cat.series) > SERIES_CACHE_LIMIT:
            cat.series.clear()
        now = time.monotonic()
        # Per series, in the order sent: its readings' keys and the latest
        # non-empty unit and raw_tag among them.
        wanted: dict[tuple[str, str], list] = {}
        for i in missing:
            r = readings[i]
            w = wanted.setdefault((r.machine_identifier, r.metric_name), ["", "", {}])
            unit, raw_tag = r.unit or "", r.raw_tag or ""
            w[0] = unit or w[0]
            w[1] = raw_tag or w[1]
            w[2].setdefault((unit, raw_tag), []).append(i)
        idents = {k[0] for k in wanted}
        lookup = [m for m in idents if cat.absent.get(m, 0.0) <= now]
        machines: dict[str, uuid.UUID] = {}
        transient: list[Key] = []
        async with pool.acquire() as conn:
            if lookup:
                for row in await conn.fetch(
                        "SELECT machine_identifier, id FROM machines"
                        " WHERE org_id = $1 AND machine_identifier = ANY($2::text[])",
                        org_id, lookup):
                    machines[row[0]] = row[1]
            # Sorted: concurrent resolves insert their keys in one order, so
            # two of them cannot deadlock on each other's unique-index entries.
            todo = sorted(k for k in wanted if k[0] in machines)
            if todo:
                cols = [[machines[k[0]] for k in todo], [k[1] for k in todo],
                        [wanted[k][0] for k in todo], [wanted[k][1] for k in todo]]
                async with conn.transaction():
                    # New series start with the attributes they arrive with.
                    await conn.execute(
                        "INSERT INTO series (machine_id, metric_name, unit, raw_tag)"
                        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])"
                        " ON CONFLICT (machine_id, metric_name) DO NOTHING", *cols)
                rows = await conn.fetch(
                    "SELECT s.id, m.machine_identifier, s.metric_name, s.unit, s.raw_tag"
                    " FROM series s JOIN machines m ON m.id = s.machine_id"
                    " JOIN unnest($1::uuid[], $2::text[]) AS k (machine_id, metric_name)"
                    " ON s.machine_id = k.machine_id AND s.metric_name = k.metric_name",
                    *cols[:2])
                current = {(r[1], r[2]): (r[0], r[3], r[4]) for r in rows}
                changed = [current[k][0] for k in todo if k in current
                           and self._differs(wanted[k], current[k][1], current[k][2])]
                replaced = {k: current[k][1:] for k in todo if k in current}
                if changed:
                    current.update(await self._change(conn, changed, wanted))
                for (ident, metric), (sid, unit, raw_tag) in current.items():
                    keep = agreeing(ident, metric, unit, raw_tag)
                    for key in agreeing(ident, metric, *replaced.get((ident, metric), ("", ""))):
                        if key not in keep:
                            cat.series.forget(*key)
                    for key in keep:
                        cat.series.add(*key, sid)
                    for unit_raw in wanted[(ident, metric)][2]:
                        key = (ident, metric, *unit_raw)
                        if key not in keep:
                            cat.series.add(*key, sid)
                            transient.append(key)
        errors = {}
        for k, w in wanted.items():
            if k[0] not in machines:
                cat.absent[k[0]] = now + self._negative_ttl
                for idx in w[2].values():
                    for i in idx:
                        errors[i] = ERR_MACHINE_NOT_FOUND
        if len(cat.absent) > 10_000:
            cat.absent = {m: t for m, t in cat.absent.items() if t > now}
        return errors, transient

    @staticmethod
    def _differs(want: list, unit: str, raw_tag: str) -> bool:
        return (want[0] != "" and want[0] != unit) or (want[1] != "" and want[1] != raw_tag)

    async def _change(self, conn, ids: list[int], wanted: dict) -> dict:
        """Set the attributes of the series ``ids`` to the latest non-empty
        values sent and record each change; under row locks, so concurrent
        changes of one series are recorded one after the other, each with the
        value it replaced. Rare (a unit or tag was reconfigured), so plain
        statements per series. Returns {(machine, metric): (id, unit, raw_tag)}."""
        out = {}
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT s.id, m.machine_identifier, s.metric_name, s.unit, s.raw_tag"
                " FROM series s JOIN machines m ON m.id = s.machine_id"
                " WHERE s.id = ANY($1::int[]) ORDER BY s.id FOR UPDATE OF s", ids)
            updates = []
            for sid, ident, metric, unit, raw_tag in rows:
                want = wanted[(ident, metric)]
                new_unit, new_raw = want[0] or unit, want[1] or raw_tag
                out[(ident, metric)] = (sid, new_unit, new_raw)
                if (new_unit, new_raw) != (unit, raw_tag):
                    updates.append((sid, unit, new_unit, raw_tag, new_raw))
            if updates:
                await conn.executemany(
                    "UPDATE series SET unit = $2, raw_tag = $3 WHERE id = $1",
                    [(u[0], u[2], u[4]) for u in updates])
                await conn.executemany(
                    "INSERT INTO series_attribute_changes"
                    " (series_id, old_unit, new_unit, old_raw_tag, new_raw_tag)"
                    " VALUES ($1, $2, $3, $4, $5)", updates)
        return out
