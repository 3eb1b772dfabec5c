"""Reader roles' time limits, enforced from outside their sessions.

``haltless grafana-role`` gives a reader role statement,
idle-in-transaction and transaction timeouts as its session defaults; but
those are settings a session may change (``SET statement_timeout = 0``,
even ``ALTER ROLE <itself> SET ...``), and a reader that keeps a statement
running or a transaction open holds its snapshot, its locks and a
connection for as long as it likes. So every ``haltless serve`` worker,
every CHECK_EVERY seconds, takes the limits from ``reader_roles`` (which
readers cannot read, let alone write), and ends (``pg_terminate_backend``:
the session closes, its transaction rolls back, its locks and snapshot go)
every reader backend that has run one statement, sat idle in a
transaction, or held one transaction longer than its role's limit plus
GRACE; and rolls back any transaction a reader prepared (PREPARE
TRANSACTION would keep its locks past its session, where prepared
transactions are enabled: a Citus cluster). One worker at a time does it
(an advisory lock taken without waiting).

The reader cannot undo this: it runs in haltless's session, as the role
that owns the tables (a superuser on the embedded server; elsewhere a
member of each reader role, which ``grafana-role`` grants, so that it may
see and end their sessions).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .db import DB_DOWN

log = logging.getLogger("haltless.readers")

CHECK_EVERY = 5.0   # seconds between checks
GRACE = 2.0         # seconds past a limit: where the reader kept PostgreSQL's own
                    # timeout, that cancels the statement first (the session stays)
WATCH_LOCK = 7_291_845_004  # pg_try_advisory_xact_lock key: one checker at a time

LIMITS = ("SELECT role_name, statement_timeout_s, idle_in_transaction_timeout_s,"
          " transaction_timeout_s FROM reader_roles")

# One row per reader backend past a limit, ended as it is returned. The
# limits come in as arrays, not from a join with reader_roles: on a Citus
# coordinator that is a reference table, and a join could be sent to a
# worker, whose pg_stat_activity is not this node's.
OVERDUE = """
WITH lim AS (
    SELECT * FROM unnest($1::text[], $2::float8[], $3::float8[], $4::float8[])
        AS l(role, statement_s, idle_s, transaction_s)
), seen AS (
    SELECT a.pid, l.*,
           CASE WHEN a.state NOT LIKE 'idle%'
                THEN extract(epoch FROM now() - a.query_start) END AS statement_for,
           CASE WHEN a.state LIKE 'idle in transaction%'
                THEN extract(epoch FROM now() - a.state_change) END AS idle_for,
           extract(epoch FROM now() - a.xact_start) AS transaction_for
    FROM pg_stat_activity a JOIN lim l ON l.role = a.usename
    WHERE a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
), over AS (
    SELECT pid, role,
           CASE WHEN statement_for > statement_s + $5 THEN 'statement'
                WHEN idle_for > idle_s + $5 THEN 'idle in transaction'
                WHEN transaction_for > transaction_s + $5 THEN 'transaction' END AS what,
           CASE WHEN statement_for > statement_s + $5 THEN statement_for
                WHEN idle_for > idle_s + $5 THEN idle_for
                ELSE transaction_for END AS seconds,
           CASE WHEN statement_for > statement_s + $5 THEN statement_s
                WHEN idle_for > idle_s + $5 THEN idle_s
                ELSE transaction_s END AS limit_s
    FROM seen
)
SELECT pid, role, what, seconds, limit_s, pg_terminate_backend(pid) AS ended
FROM over WHERE what IS NOT NULL
"""

PREPARED = ("SELECT gid, owner::text AS role, quote_literal(gid) AS literal"
            " FROM pg_prepared_xacts WHERE owner = ANY($1::text[])"
            " AND database = current_database()")


@dataclass(frozen=True)
class Ended:
    """A reader's session (or prepared transaction) that was ended, and why."""

    role: str
    pid: int | None     # None: a prepared transaction (``gid``)
    what: str           # 'statement', 'idle in transaction', 'transaction', 'prepared'
    seconds: float
    limit_s: float
    gid: str | None = None


async def end_overdue_readers(conn, grace: float = GRACE) -> list[Ended]:
    """One check (see the module docstring); what it ended, each logged."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", WATCH_LOCK):
            return []  # another worker is at it
        limits = await conn.fetch(LIMITS)
        if not limits:
            return []
        roles = [r[0] for r in limits]
        rows = await conn.fetch(OVERDUE, roles, *([float(r[i]) for r in limits] for i in (1, 2, 3)),
                                grace)
        prepared = await conn.fetch(PREPARED, roles)
    ended = []
    for r in rows:
        if not r["ended"]:
            continue
        ended.append(Ended(r["role"], r["pid"], r["what"], r["seconds"], r["limit_s"]))
        log.warning("reader role %s: backend %d was %s for %.0f s, past its limit of %.0f s; "
                    "its session was ended (its transaction rolled back)",
                    r["role"], r["pid"], "in one " + r["what"] if r["what"] != "idle in transaction"
                    else "idle in a transaction", r["seconds"], r["limit_s"])
    for p in prepared:
        try:
            await conn.execute(f"ROLLBACK PREPARED {p['literal']}")
        except Exception as exc:  # noqa: BLE001 - gone meanwhile, or not ours to end
            log.warning("reader role %s prepared transaction %r; it could not be rolled back: "
                        "%s", p["role"], p["gid"], exc)
            continue
        ended.append(Ended(p["role"], None, "prepared", 0.0, 0.0, p["gid"]))
        log.warning("reader role %s prepared transaction %r (which would hold its locks past "
                    "its session); rolled back", p["role"], p["gid"])
    return ended


async def police_readers(pool, every: float = CHECK_EVERY) -> None:
    """Inside every `haltless serve` worker: end_overdue_readers every
    ``every`` seconds, for as long as the worker runs."""
    while True:
        await asyncio.sleep(every)
        try:
            async with pool.acquire() as conn:
                await end_overdue_readers(conn)
        except DB_DOWN:
            continue  # the requests' 503s say so; checked again once it is back
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - retried at the next check; never end the loop
            log.exception("checking the reader roles' limits failed; retrying")
