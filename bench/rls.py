"""What a reader role's row policy costs per row, by how many series its
organization has (issue 20: panels slowed down as the fleet grew).

    .venv/bin/python -m bench.rls [--rows 100000] [--repeat 3]

Against an embedded PostgreSQL: a table of ``--rows`` series ids (random in
1..4,000) and the policy's two forms over an organization of N series ids
(20, 2,000 = 100 machines x 20 metrics, 20,000): ``series_id = ANY (array)``
(migration 0006: each row compared with every element) and ``series_id IN
(SELECT unnest(array))`` (0023: a hashed subplan, one lookup a row), each
under the ``(SELECT ...) IS NULL OR`` of the real policies. Figures: median
milliseconds of ``--repeat`` counts. One JSON line per form and N goes to
bench/results/rls-<date>.jsonl.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench import procstat as ps  # noqa: E402
from bench import results  # noqa: E402

FORMS = {
    "= ANY (array) [0006]": "(SELECT 1) IS NULL OR series_id = ANY ((SELECT org_series({n}))::int[])",
    "IN (SELECT unnest) [0023]": "(SELECT 1) IS NULL OR series_id IN (SELECT unnest(org_series({n})))",
}


async def measure(dsn: str, rows: int, repeat: int) -> list[dict]:
    c = await asyncpg.connect(dsn)
    try:
        await c.execute(f"CREATE TABLE rls_rows AS SELECT (random() * 4000)::int AS series_id"
                        f" FROM generate_series(1, {rows})")
        await c.execute("CREATE FUNCTION org_series(n int) RETURNS int[] LANGUAGE sql STABLE"
                        " AS 'SELECT array_agg(i) FROM generate_series(1, n) i'")
        out = []
        for n in (20, 2000, 20000):
            for form, qual in FORMS.items():
                q = f"SELECT count(*) FROM rls_rows WHERE {qual.format(n=n)}"
                kept = await c.fetchval(q)  # warm
                times = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    await c.fetchval(q)
                    times.append((time.perf_counter() - t) * 1000)
                out.append({"series": n, "form": form, "rows": rows, "kept": kept,
                            "ms": round(statistics.median(times), 1),
                            "us_per_row": round(statistics.median(times) * 1000 / rows, 2)})
                print(f"{n:>6,} series  {form:28s} {out[-1]['ms']:9.1f} ms"
                      f"  ({out[-1]['us_per_row']} us a row)")
        return out
    finally:
        await c.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=results.RESULTS)
    args = ap.parse_args(argv)
    run = results.Run("rls", args.out)
    with ps.bench_postgres("haltless-rls-") as (_work, dsn, _pg_pid, idle):
        run.header(results.versions(dsn=dsn), idle)
        records = asyncio.run(measure(dsn, args.rows, args.repeat))
    print(json.dumps(records))
    run.append(records)


if __name__ == "__main__":
    main()
