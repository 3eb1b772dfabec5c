"""``GET /metrics``: Prometheus text format, correct across workers.

``haltless serve`` gives its workers a private run dir and sets
``PROMETHEUS_MULTIPROC_DIR`` inside it before they start, so every worker
writes its counters to memory-mapped files there and any worker answering a
scrape sums them all (prometheus_client's multiprocess mode; counters of a
worker that died and was replaced are kept, its gauges dropped). Started any
other way (one process), the ordinary in-process registry is used.

Poller figures come from the database at scrape time (sources by protocol
and state, readings written, points failed, polls missed, the most overdue
poll), so they are right however many poller processes, on however many
hosts, do the polling. The edge agent writes its own queue figures to a
textfile (``pollers/agent.py``).
"""
from __future__ import annotations

import os
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily

from .writer import GroupCommitWriter

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

READINGS_ACCEPTED = Counter("haltless_readings_accepted", "Readings committed by HTTP ingest")
READINGS_REJECTED = Counter("haltless_readings_rejected",
                            "Readings refused by HTTP ingest, by reason", ["reason"])
REQUESTS = Counter("haltless_http_requests", "HTTP requests answered, by route, method and status",
                   ["route", "method", "status"])
DURATION = Histogram("haltless_http_request_duration_seconds",
                     "Time from the request's arrival to its response", ["route"],
                     buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
COMMIT_PAYLOADS = Histogram("haltless_group_commit_requests",
                            "Requests merged into one group-commit COPY transaction",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
COMMIT_BYTES = Histogram("haltless_group_commit_bytes", "COPY bytes per group-commit transaction",
                         buckets=(1e3, 1e4, 1e5, 1e6, 4e6, 16e6, 64e6))
COMMIT_SECONDS = Histogram("haltless_group_commit_seconds",
                           "Duration of one group-commit COPY transaction, commit included",
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5))
POOL = Gauge("haltless_db_pool_connections", "Database connections of the HTTP workers, by state",
             ["state"], multiprocess_mode="livesum")
BODIES = Gauge("haltless_request_body_bytes_held", "Bytes of request bodies held in memory",
               multiprocess_mode="livesum")

class MeasuredWriter(GroupCommitWriter):
    """The group-commit writer, timing each transaction and counting what it
    merged (``server/ingest.py`` stays free of metrics)."""

    async def _copy(self, items):
        start = time.perf_counter()
        dups = await super()._copy(items)
        COMMIT_SECONDS.observe(time.perf_counter() - start)
        COMMIT_PAYLOADS.observe(len(items))
        COMMIT_BYTES.observe(sum(len(p) for p, _ in items))
        return dups


class PollerCollector:
    """Poller figures read from the database at scrape time."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def collect(self):
        g = {name: GaugeMetricFamily(f"haltless_poller_{name}", doc, labels=["protocol"])
             for name, doc in (
                 ("sources", "Active ingest sources"),
                 ("sources_failing", "Active sources whose last poll failed"),
                 ("readings_written", "Readings written by the pollers (total)"),
                 ("points_failed", "Points that failed to read (total)"),
                 ("polls_missed", "Poll slots skipped because a poll overran (total)"),
                 ("overdue_seconds", "How long past its interval the most overdue active "
                                     "source's last poll is (0: none overdue; mqtt sources "
                                     "are not polled: always 0)"))}
        for r in self.rows:
            for name, fam in g.items():
                fam.add_metric([r["protocol"]], float(r[name] or 0))
        yield from g.values()


def _forget_dead_workers(path: str) -> None:
    """Drop the gauges of workers that are gone (their counters stay)."""
    from prometheus_client import multiprocess
    for name in os.listdir(path):
        if name.startswith("gauge_live") and name.endswith(".db"):
            try:
                pid = int(name.rsplit("_", 1)[1][:-3])
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, path)
            except (ValueError, PermissionError):
                pass


async def render(pool) -> tuple[bytes, str]:
    """The exposition of every worker (and the pollers' figures)."""
    registry = CollectorRegistry()
    if MULTIPROCESS:
        from prometheus_client import multiprocess
        _forget_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY
        registry = REGISTRY
    extra = CollectorRegistry()
    rows = await pool.fetch(
        "SELECT protocol, count(*) AS sources,"
        " count(*) FILTER (WHERE last_error IS NOT NULL"
        "   AND last_error_at >= coalesce(last_success_at, '-infinity')) AS sources_failing,"
        " sum(readings_written) AS readings_written, sum(points_failed) AS points_failed,"
        " sum(polls_missed) AS polls_missed,"
        " coalesce(max(greatest(0, extract(epoch FROM now() - last_poll_at)"
        "   - poll_interval_seconds)) FILTER (WHERE protocol <> 'mqtt'), 0) AS overdue_seconds"
        " FROM ingest_sources WHERE is_active GROUP BY protocol", timeout=5)
    extra.register(PollerCollector(rows))
    return generate_latest(registry) + generate_latest(extra), CONTENT_TYPE_LATEST


def sample_pool(pool) -> None:
    size, idle = pool.get_size(), pool.get_idle_size()
    POOL.labels("in_use").set(size - idle)
    POOL.labels("idle").set(idle)
    POOL.labels("max").set(pool.get_max_size())
