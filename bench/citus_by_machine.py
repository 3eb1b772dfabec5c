"""Probe: can a Citus cluster keep a machine's metrics on one shared timeline
(as one node does) without changing how hot chunks are distributed?

    python -m bench.citus_by_machine

On a fresh cluster (coordinator + 2 workers, 8 shards, migrated): series ids
are allocated so that every series of a machine hashes into the shard of the
machine's first series (its "anchor"); scratch tables ``blocks_m`` and
``timelines_m`` are distributed by ``anchor`` and co-located with
``reading_chunks``. It prints the allocation cost, whether every block sits
in its series' chunk shard group, the task count of one series' block join
given its anchor, and what Citus says to a join without the anchor. A
probe, not a design: docs/scaling.md "Distributing by machine" has the
finding.
"""
import asyncio
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from haltless.server.localcluster import CitusCluster  # noqa: E402
from haltless.server import db  # noqa: E402


def main() -> None:
    with CitusCluster(workers=2) as c:
        async def go():
            conn = await db.connect(c.dsn); await db.migrate(conn)
            # 1. series ids chosen so that all of a machine's series hash into the shard of its first
            t0 = time.perf_counter()
            n_machines, per = 200, 20
            ids = {}
            used = set()
            for m in range(n_machines):
                anchor = await conn.fetchval("SELECT coalesce(max(x), 0) + 1 FROM unnest($1::int[]) x", list(used) or [0])
                used.add(anchor)
                shard = await conn.fetchval("SELECT get_shard_id_for_distribution_column('reading_chunks', $1::int)", anchor)
                got = await conn.fetch(
                    "SELECT x FROM generate_series($1::int + 1, $1::int + 100000) x"
                    " WHERE get_shard_id_for_distribution_column('reading_chunks', x) = $2"
                    " AND NOT x = ANY($3::int[]) LIMIT $4::int", anchor, shard, list(used), per - 1)
                ids[anchor] = [anchor] + [r[0] for r in got]
                used.update(ids[anchor])
            dt_alloc = time.perf_counter() - t0
            spread = max(max(v) for v in ids.values())
            print(f"allocated {n_machines * per} series ids, {per} per machine, one shard per machine, in {dt_alloc:.2f} s ({dt_alloc / (n_machines * per) * 1e6:.0f} us/id, naive loop); largest id {spread}")
            # 2. blocks and timelines distributed by the machine's anchor, co-located with chunks
            await conn.execute("""
              CREATE TABLE blocks_m (anchor int NOT NULL, series_id int NOT NULL, block_start timestamptz NOT NULL, timeline bigint NOT NULL, vals bytea);
              CREATE TABLE timelines_m (anchor int NOT NULL, block_start timestamptz NOT NULL, id bigint NOT NULL, ts bytea, PRIMARY KEY (anchor, block_start, id));
              CREATE INDEX ON blocks_m (series_id, block_start);
            """)
            await conn.execute("SELECT create_distributed_table('blocks_m', 'anchor', colocate_with => 'reading_chunks')")
            await conn.execute("SELECT create_distributed_table('timelines_m', 'anchor', colocate_with => 'reading_chunks')")
            rows = []
            tl = []
            for a, ss in ids.items():
                tl.append((a, 1, b'x' * 100))
                for s in ss:
                    rows.append((a, s, 1, b'v'))
            await conn.execute("INSERT INTO timelines_m SELECT a, now(), id, ts FROM unnest($1::int[], $2::bigint[], $3::bytea[]) AS u(a, id, ts)",
                               [r[0] for r in tl], [r[1] for r in tl], [r[2] for r in tl])
            await conn.execute("INSERT INTO blocks_m SELECT a, s, (SELECT min(block_start) FROM timelines_m), t, v FROM unnest($1::int[], $2::int[], $3::bigint[], $4::bytea[]) AS u(a, s, t, v)",
                               [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
            a0 = next(iter(ids)); s0 = ids[a0][5]
            # co-location check: series on the same worker as its chunks shard
            pairs = await conn.fetch("SELECT anchor, series_id FROM blocks_m")
            same = await conn.fetchval("""SELECT bool_and(
                  (SELECT shardminvalue FROM pg_dist_shard WHERE shardid = get_shard_id_for_distribution_column('reading_chunks', s))
                = (SELECT shardminvalue FROM pg_dist_shard WHERE shardid = get_shard_id_for_distribution_column('blocks_m', a)))
                FROM unnest($1::int[], $2::int[]) u (a, s)""", [p[0] for p in pairs], [p[1] for p in pairs])
            print("every block's shard range equals its series' chunk shard range:", same)
            q = ("SELECT count(*) FROM blocks_m b JOIN timelines_m t ON t.anchor = b.anchor AND t.block_start = b.block_start AND t.id = b.timeline"
                 " WHERE b.anchor = $1 AND b.series_id = $2")
            print("one series via its anchor:", await conn.fetchval(q, a0, s0))
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + q, a0, s0))
            print([l.strip() for l in plan.splitlines() if "Task Count" in l])
            q2 = ("SELECT count(*) FROM blocks_m b JOIN timelines_m t ON t.anchor = b.anchor AND t.block_start = b.block_start AND t.id = b.timeline")
            print("all blocks joined (pushdown on anchor):", await conn.fetchval(q2))
            try:
                await conn.fetchval("SELECT count(*) FROM blocks_m b JOIN timelines_m t ON t.block_start = b.block_start AND t.id = b.timeline")
                print("join without anchor: ok")
            except Exception as e:
                print("join without the distribution column:", type(e).__name__, str(e).splitlines()[0])
            await conn.close()
        asyncio.run(go())


if __name__ == "__main__":
    main()
