"""Hot rows as the group-commit writer leaves them: at most MAX_ROW readings
each, and never compressed or moved out of line by PostgreSQL (TOAST
compression cost more than the COPY itself; migration 0011)."""
from __future__ import annotations

import datetime as dt

from helpers import fetch, make_tenant, post

UTC = dt.timezone.utc


def test_a_big_series_hour_is_stored_as_uncompressed_rows_of_at_most_max_row(server, pg_dsn):
    from haltless.fast import MAX_ROW

    t = make_tenant(pg_dsn, machines=("BIG-1",))
    start = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    if dt.datetime.now(UTC) - start < dt.timedelta(seconds=2):
        start -= dt.timedelta(hours=1)
    rs = [{"machine_identifier": "BIG-1", "metric_name": "vibration",
           "timestamp": (start + dt.timedelta(milliseconds=i)).isoformat().replace("+00:00", "Z"),
           "value": 1000.0 + i / 7} for i in range(1000)]
    r = post(server, t.key, {"readings": rs})
    assert r.json()["accepted_count"] == 1000, r.text
    rows = fetch(pg_dsn, "SELECT c.n, pg_column_compression(c.ts) AS cts,"
                 " pg_column_compression(c.vals) AS cvals, pg_column_size(c.vals) AS size"
                 " FROM reading_chunks c JOIN series s ON s.id = c.series_id"
                 " JOIN machines m ON m.id = s.machine_id WHERE m.org_id = $1", t.org_id)
    assert [r["n"] for r in rows] == [MAX_ROW, MAX_ROW]  # 1,000 readings
    assert all(r["cts"] is None and r["cvals"] is None for r in rows), rows
    assert max(r["size"] for r in rows) == 24 + 8 * MAX_ROW  # inline: array header + float8s
    assert fetch(pg_dsn, "SELECT reloptions FROM pg_class WHERE relname = 'reading_chunks_0'"
                 )[0][0] == ["toast_tuple_target=8160"]
