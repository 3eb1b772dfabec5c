-- The rollup views ask "are there hot rows in this block's hour?" once per
-- block, before the block's minutes are unnested, instead of once per minute
-- row after it (bench/README "SQL reads", 2026-12-08: one machine's
-- 20-metric panel from readings_1m spent ~40 % of its time there, and the
-- combinable arm decoded every hot reading of the series to learn that none
-- lay in a compacted hour).
--
-- Each block's answer is computed in a one-row lateral subquery fenced with
-- OFFSET 0 and the unnest takes its minute array from that subquery, so the
-- planner cannot move the check after the unnest; the block scan itself is
-- not fenced, so a machine, metric or bucket predicate still selects the
-- blocks (and partitions) first. The rule is 0024's, unchanged: the
-- views' rows are the same.
--
-- Only the single-node views change: on Citus the 0024 views stay (a lateral
-- subquery with OFFSET cannot be pushed down to the workers).
DO $fns$
DECLARE
    citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
    hot_in_hour text := $q$EXISTS (SELECT 1 FROM reading_chunks c
        WHERE c.series_id = b.series_id AND c.bucket = b.block_start)$q$;
    hot_inside text := $q$EXISTS (SELECT 1 FROM reading_chunks c
        CROSS JOIN LATERAL generate_series(1, length(c.ts) / 8) AS g (i)
        WHERE c.series_id = b.series_id AND c.bucket = b.block_start
          AND haltless_chunk_us(c.ts, g.i)
              BETWEEN (extract(epoch FROM b.t_first) * 1000000)::bigint
                  AND (extract(epoch FROM b.t_last) * 1000000)::bigint)$q$;
    -- A compacted hour whose summary is the whole answer: the block's own
    -- columns (checked at its scan), then the hot rows (once per block).
    summarised_b text := 'b.part = 0 AND b.m_count IS NOT NULL';
    summarised_hot text := 'NOT ' || hot_in_hour;
    -- A compacted hour whose summary and its hot rows together are; the
    -- inside check runs only for a block that has hot rows in its hour.
    combinable_b text := 'b.part = 0 AND b.m_count IS NOT NULL AND b.hour_n IS NULL';
    combinable_hot text := hot_in_hour || ' AND NOT ' || hot_inside;
    unsummarised text := 'CASE WHEN b.part = 0 THEN NOT (b.m_count IS NOT NULL AND (NOT '
        || hot_in_hour || ' OR (b.hour_n IS NULL AND NOT ' || hot_inside || $q$)))
        ELSE NOT EXISTS (SELECT 1 FROM reading_blocks b0 WHERE b0.series_id = b.series_id
                AND b0.block_start = b.block_start AND b0.part = 0 AND b0.m_count IS NOT NULL)
            OR EXISTS (SELECT 1 FROM reading_chunks c
                WHERE c.series_id = b.series_id AND c.bucket = b.block_start) END$q$;
    -- As 0024: partial rows aggregated on read. %1$s: series predicate on c,
    -- %2$s on b, %3$s / %4$s the bucket "time" of a hot / decoded reading,
    -- %5$s the combinable blocks' summary rows.
    raw text := $q$
        SELECT c.series_id, c.bucket, %3$s AS "time", u.ts AS tf, u.ts AS tl, 1 AS n,
               u.value AS mn, u.value AS mx, u.value AS s, u.value AS f, u.value AS l
        FROM reading_chunks c CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
        WHERE %1$s
        UNION ALL
        SELECT b.series_id, b.block_start, %4$s, d.ts, d.ts, 1, d.value, d.value, d.value,
               d.value, d.value
        FROM reading_blocks b
        JOIN reading_timelines t ON t.block_start = b.block_start AND t.id = b.timeline
        CROSS JOIN LATERAL unnest(haltless_stamps(t.ts), haltless_values(b.vals)) AS d (ts, value)
        WHERE %2$s AND $q$ || unsummarised || $q$
        UNION ALL
        %5$s$q$;
    aggs text := $q$sum(r.n)::integer AS count, min(r.mn) AS min, max(r.mx) AS max,
        sum(r.s) AS sum, (array_agg(r.f ORDER BY r.tf))[1] AS first,
        (array_agg(r.l ORDER BY r.tl))[count(*)] AS last$q$;
    -- A block's minutes from its summary. %1$s: series predicate on b,
    -- %2$s: which blocks by their own columns, %3$s: extra columns (the
    -- block's span, for combining), %4$s: which blocks by their hour's hot
    -- rows (in the fenced subquery k, whose minute array the unnest reads).
    minutes text := $q$
        SELECT b.series_id, b.block_start AS bucket,
               b.block_start + coalesce(u.minute, u.i - 1) * interval '1 minute' AS "time", %3$s
               u.count,
               coalesce(u.kmin / k.f, u.fmin) AS min, coalesce(u.kmax / k.f, u.fmax) AS max,
               coalesce(u.ksum / k.f, u.fsum) AS sum,
               coalesce(u.kfirst / k.f, u.ffirst) AS first, coalesce(u.klast / k.f, u.flast) AS last
        FROM reading_blocks b
        CROSS JOIN LATERAL (SELECT 10::float8 ^ b.m_scale AS f, b.m_minute AS minute,
                                   %4$s AS keep OFFSET 0) AS k
        CROSS JOIN LATERAL unnest(k.minute, b.m_count,
            b.m_k[:][1:1], b.m_k[:][2:2], b.m_k[:][3:3], b.m_k[:][4:4], b.m_k[:][5:5],
            b.m_f[:][1:1], b.m_f[:][2:2], b.m_f[:][3:3], b.m_f[:][4:4], b.m_f[:][5:5])
            WITH ORDINALITY AS u (minute, count, ksum, kmin, kmax, kfirst, klast,
                                  fsum, fmin, fmax, ffirst, flast, i)
        WHERE %1$s AND %2$s AND k.keep$q$;
    hours text := $q$
        SELECT b.series_id, b.block_start AS bucket, b.block_start AS "time", %3$s
               coalesce(b.hour_n, b.n) AS count,
               b.v_min AS min, b.v_max AS max, b.v_sum AS sum, b.v_first AS first, b.v_last AS last
        FROM reading_blocks b
        WHERE %1$s AND %2$s AND %4$s$q$;
    names text := $q$m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
        s.metric_name, NULLIF(s.unit, '') AS unit$q$;
    cols text := $q$r.bucket, r."time", r.count, r.min, r.max, r.sum / r.count AS avg, r.sum,
        r.first, r.last$q$;
    step text;
    summary text;
    hot_time text;
    block_time text;
BEGIN
    IF citus THEN
        RETURN;
    END IF;
    FOREACH step IN ARRAY ARRAY['minute', 'hour'] LOOP
        summary := CASE step WHEN 'minute' THEN minutes ELSE hours END;
        hot_time := CASE step WHEN 'minute' THEN $q$date_bin('1 minute', u.ts, timestamptz 'epoch')$q$
                              ELSE 'c.bucket' END;
        block_time := CASE step WHEN 'minute' THEN $q$date_bin('1 minute', d.ts, timestamptz 'epoch')$q$
                                ELSE 'b.block_start' END;
        EXECUTE format('CREATE OR REPLACE VIEW %I AS %s',
            CASE step WHEN 'minute' THEN 'readings_1m' ELSE 'readings_1h' END,
            format($q$
                SELECT %s, %s
                FROM machines m JOIN series s ON s.machine_id = m.id
                CROSS JOIN LATERAL (
                    %s
                    UNION ALL
                    SELECT r.series_id, r.bucket, r."time", %s
                    FROM (%s) AS r
                    GROUP BY r.series_id, r.bucket, r."time") AS r$q$,
                names, cols,
                format(summary, 'b.series_id = s.id', summarised_b, '', summarised_hot),
                aggs,
                format(raw, 'c.series_id = s.id', 'b.series_id = s.id', hot_time, block_time,
                       format(summary, 'b.series_id = s.id',
                              combinable_b || CASE step WHEN 'minute' THEN ' AND u.count > 0'
                                                        ELSE '' END,
                              'b.t_first, b.t_last,', combinable_hot))));
    END LOOP;
END $fns$;

-- CREATE OR REPLACE VIEW resets the view's options: the views run with the
-- reader's rights again (row-level security), as 0013 set them.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 150000 THEN
        ALTER VIEW readings_1m SET (security_invoker = true);
        ALTER VIEW readings_1h SET (security_invoker = true);
    END IF;
END $$;
