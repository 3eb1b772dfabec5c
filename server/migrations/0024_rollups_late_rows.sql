-- Late readings waiting in a compacted hour no longer make its rollups
-- decode the hour's block (bench/README "SQL reads", 2026-12-08: one
-- jittered reading made a series-hour decode 3,600; panels at 100 machines
-- took 3-10x longer until the next compaction merged it).
--
-- When every hot reading of a (series, hour) lies outside the span of the
-- hour's block [t_first, t_last] (data that came after the block's last
-- reading, or before its first: a backlog sent late, a clock that caught
-- up), the block's summary is combined with the hot readings instead:
-- count, sum, min and max add up; first and last are ordered by time, the
-- block's first at t_first and its last at t_last, which no hot reading
-- lies between. A hot reading inside the span (it may fall between two of
-- the block's readings of one minute) still sends that hour through its
-- readings, as before, and so does an hour cut into parts (0022). Either
-- way each (series, hour) is still answered from one place, so the
-- rollups stay equal to the aggregate over the raw readings.
--
-- The views of 0022, rebuilt with that rule; CREATE OR REPLACE keeps their
-- grants to reader roles. The raw arm now aggregates partial rows (one per
-- reading, or one per minute or hour of a combinable block's summary).
DO $fns$
DECLARE
    citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
    hot_in_hour text := $q$EXISTS (SELECT 1 FROM reading_chunks c
        WHERE c.series_id = b.series_id AND c.bucket = b.block_start)$q$;
    -- (In microseconds over generate_series: Citus takes only immutable
    -- functions as table expressions in such a subquery.)
    hot_inside text := $q$EXISTS (SELECT 1 FROM reading_chunks c
        CROSS JOIN LATERAL generate_series(1, length(c.ts) / 8) AS g (i)
        WHERE c.series_id = b.series_id AND c.bucket = b.block_start
          AND haltless_chunk_us(c.ts, g.i)
              BETWEEN (extract(epoch FROM b.t_first) * 1000000)::bigint
                  AND (extract(epoch FROM b.t_last) * 1000000)::bigint)$q$;
    -- A compacted hour whose summary is the whole answer (as 0022).
    summarised text := 'b.part = 0 AND b.m_count IS NOT NULL AND NOT ' || hot_in_hour;
    -- A compacted hour whose summary and its hot rows together are.
    combinable text := 'b.part = 0 AND b.m_count IS NOT NULL AND b.hour_n IS NULL AND '
                       || hot_in_hour || ' AND NOT ' || hot_inside;
    -- The raw arm decodes a block whose hour is neither: for part 0 its own
    -- columns say so, for a later part its hour's part 0 does (0022).
    unsummarised text := 'CASE WHEN b.part = 0 THEN NOT (b.m_count IS NOT NULL AND (NOT '
        || hot_in_hour || ' OR (b.hour_n IS NULL AND NOT ' || hot_inside || $q$)))
        ELSE NOT EXISTS (SELECT 1 FROM reading_blocks b0 WHERE b0.series_id = b.series_id
                AND b0.block_start = b.block_start AND b0.part = 0 AND b0.m_count IS NOT NULL)
            OR EXISTS (SELECT 1 FROM reading_chunks c
                WHERE c.series_id = b.series_id AND c.bucket = b.block_start) END$q$;
    -- Partial rows aggregated on read: hot readings, the readings of blocks
    -- that are not summarised (with their timeline), and the summary of
    -- combinable blocks. %1$s: series predicate on c, %2$s on b, %3$s the
    -- timeline join's extra condition, %4$s / %5$s the bucket "time" of a
    -- hot / decoded reading, %6$s the combinable blocks' summary rows.
    raw text := $q$
        SELECT c.series_id, c.bucket, %4$s AS "time", u.ts AS tf, u.ts AS tl, 1 AS n,
               u.value AS mn, u.value AS mx, u.value AS s, u.value AS f, u.value AS l
        FROM reading_chunks c CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
        WHERE %1$s
        UNION ALL
        SELECT b.series_id, b.block_start, %5$s, d.ts, d.ts, 1, d.value, d.value, d.value,
               d.value, d.value
        FROM reading_blocks b
        JOIN reading_timelines t ON %3$s t.block_start = b.block_start AND t.id = b.timeline
        CROSS JOIN LATERAL unnest(haltless_stamps(t.ts), haltless_values(b.vals)) AS d (ts, value)
        WHERE %2$s AND $q$ || unsummarised || $q$
        UNION ALL
        %6$s$q$;
    aggs text := $q$sum(r.n)::integer AS count, min(r.mn) AS min, max(r.mx) AS max,
        sum(r.s) AS sum, (array_agg(r.f ORDER BY r.tf))[1] AS first,
        (array_agg(r.l ORDER BY r.tl))[count(*)] AS last$q$;
    -- A block's minutes from its summary; %1$s: series predicate on b, %2$s:
    -- which blocks, %3$s: extra columns (the block's span, for combining).
    minutes text := $q$
        SELECT b.series_id, b.block_start AS bucket,
               b.block_start + coalesce(u.minute, u.i - 1) * interval '1 minute' AS "time", %3$s
               u.count,
               coalesce(u.kmin / p.f, u.fmin) AS min, coalesce(u.kmax / p.f, u.fmax) AS max,
               coalesce(u.ksum / p.f, u.fsum) AS sum,
               coalesce(u.kfirst / p.f, u.ffirst) AS first, coalesce(u.klast / p.f, u.flast) AS last
        FROM reading_blocks b
        CROSS JOIN LATERAL (SELECT 10::float8 ^ b.m_scale AS f) AS p
        CROSS JOIN LATERAL unnest(b.m_minute, b.m_count,
            b.m_k[:][1:1], b.m_k[:][2:2], b.m_k[:][3:3], b.m_k[:][4:4], b.m_k[:][5:5],
            b.m_f[:][1:1], b.m_f[:][2:2], b.m_f[:][3:3], b.m_f[:][4:4], b.m_f[:][5:5])
            WITH ORDINALITY AS u (minute, count, ksum, kmin, kmax, kfirst, klast,
                                  fsum, fmin, fmax, ffirst, flast, i)
        WHERE %1$s AND %2$s$q$;
    hours text := $q$
        SELECT b.series_id, b.block_start AS bucket, b.block_start AS "time", %3$s
               coalesce(b.hour_n, b.n) AS count,
               b.v_min AS min, b.v_max AS max, b.v_sum AS sum, b.v_first AS first, b.v_last AS last
        FROM reading_blocks b
        WHERE %1$s AND %2$s$q$;
    names text := $q$m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
        s.metric_name, NULLIF(s.unit, '') AS unit$q$;
    cols text := $q$r.bucket, r."time", r.count, r.min, r.max, r.sum / r.count AS avg, r.sum,
        r.first, r.last$q$;
    step text;
    summary text;
    hot_time text;
    block_time text;
    combined text;
    v text;
BEGIN
    FOREACH step IN ARRAY ARRAY['minute', 'hour'] LOOP
        summary := CASE step WHEN 'minute' THEN minutes ELSE hours END;
        -- The bucket "time" of a hot and of a decoded reading (raw's %4$s, %5$s).
        hot_time := CASE step WHEN 'minute' THEN $q$date_bin('1 minute', u.ts, timestamptz 'epoch')$q$
                              ELSE 'c.bucket' END;
        block_time := CASE step WHEN 'minute' THEN $q$date_bin('1 minute', d.ts, timestamptz 'epoch')$q$
                                ELSE 'b.block_start' END;
        -- Which blocks' summary rows the raw arm combines (raw's %6$s).
        combined := combinable || CASE step WHEN 'minute' THEN ' AND u.count > 0' ELSE '' END;
        IF NOT citus THEN
            -- Per series (as the readings view, 0012): a machine or metric
            -- predicate selects the series before any block is read.
            v := format($q$
                SELECT %s, %s
                FROM machines m JOIN series s ON s.machine_id = m.id
                CROSS JOIN LATERAL (
                    %s
                    UNION ALL
                    SELECT r.series_id, r.bucket, r."time", %s
                    FROM (%s) AS r
                    GROUP BY r.series_id, r.bucket, r."time") AS r$q$,
                names, cols,
                format(summary, 'b.series_id = s.id', summarised, ''),
                aggs,
                format(raw, 'c.series_id = s.id', 'b.series_id = s.id', '', hot_time, block_time,
                       format(summary, 'b.series_id = s.id', combined, 'b.t_first, b.t_last,')));
        ELSE
            -- Citus cannot plan a lateral subquery over distributed tables
            -- from a reference table: two arms, each joining machines ->
            -- series -> its rows on the distribution column, and the raw arm
            -- grouped with the series' columns, so that a machine or metric
            -- predicate still reaches every arm (as 0022).
            v := format($q$
                SELECT %1$s, %2$s
                FROM machines m JOIN series s ON s.machine_id = m.id
                JOIN (%3$s) AS r ON r.series_id = s.id
                UNION ALL
                SELECT m.org_id, m.id, m.machine_identifier, s.id, s.metric_name,
                       NULLIF(s.unit, ''), r.bucket, r."time", %4$s
                FROM machines m JOIN series s ON s.machine_id = m.id
                JOIN (%5$s) AS r ON r.series_id = s.id
                GROUP BY m.org_id, m.id, m.machine_identifier, s.id, s.metric_name, s.unit,
                         r.bucket, r."time"$q$,
                names, cols,
                format(summary, 'true', summarised, ''),
                'sum(r.n)::integer, min(r.mn), max(r.mx), sum(r.s) / sum(r.n), sum(r.s), '
                '(array_agg(r.f ORDER BY r.tf))[1], (array_agg(r.l ORDER BY r.tl))[count(*)]',
                format(raw, 'true', 'true', 't.series_id = b.series_id AND', hot_time, block_time,
                       format(summary, 'true', combined, 'b.t_first, b.t_last,')));
        END IF;
        EXECUTE format('CREATE OR REPLACE VIEW %I AS %s',
                       CASE step WHEN 'minute' THEN 'readings_1m' ELSE 'readings_1h' END, v);
    END LOOP;
END $fns$;

DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 150000 THEN
        ALTER VIEW readings_1m SET (security_invoker = true);
        ALTER VIEW readings_1h SET (security_invoker = true);
    END IF;
END $$;
