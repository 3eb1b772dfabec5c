-- A series-hour may hold more readings than one block can (README
-- "Storage": a block holds at most 16,777,216; one ingest key wrote more,
-- and compaction stopped for everyone). Compaction now cuts an hour into
-- parts of at most haltless.server.compact.PART_READINGS readings, in time
-- order: part 0 holds the earliest. A part is also what a read decodes at
-- once, so reading a second inside a huge hour decodes one part, not the
-- hour (bench/README). The whole hour's summary (0013) stays on part 0,
-- computed over every part, with the hour's count (hour_n) and last value
-- (v_last); later parts carry none. The rollup views read
-- summaries from part 0 only, and a later part's readings only when its
-- hour is not summarised.

-- hour_n: the readings of the whole hour, on part 0 of an hour cut into
-- parts (NULL otherwise: n is the hour's); v_last of part 0 is the hour's.
DO $$ BEGIN EXECUTE 'ALTER TABLE reading_blocks ADD COLUMN part smallint NOT NULL DEFAULT 0,'
                    ' ADD COLUMN hour_n integer'; END $$;
-- Through EXECUTE: on a Citus coordinator DDL is sent to the shards as its
-- query string, which must be one statement.
DO $$ BEGIN
    EXECUTE 'CREATE UNIQUE INDEX reading_blocks_series_start_part'
            ' ON reading_blocks (series_id, block_start, part)';
    EXECUTE 'DROP INDEX reading_blocks_series_start';
END $$;

-- The views of 0013, with the part rule; CREATE OR REPLACE keeps their
-- grants to reader roles.
DO $fns$
DECLARE
    citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
    -- A compacted hour whose summary is the whole answer: it has one, and no
    -- hot rows of that series and hour wait to be merged into it.
    -- Only part 0 carries a summary, of the whole hour (0022): the
    -- minutes and hours arms read part 0 alone.
    summarised text := $q$b.part = 0 AND b.m_count IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM reading_chunks c WHERE c.series_id = b.series_id AND c.bucket = b.block_start)$q$;
    -- The raw arm takes a block whose hour is not summarised: for part 0
    -- its own columns say so, for a later part its hour's part 0 does.
    unsummarised text := $q$CASE WHEN b.part = 0 THEN NOT (b.m_count IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM reading_chunks c WHERE c.series_id = b.series_id AND c.bucket = b.block_start))
        ELSE NOT EXISTS (SELECT 1 FROM reading_blocks b0 WHERE b0.series_id = b.series_id
                AND b0.block_start = b.block_start AND b0.part = 0 AND b0.m_count IS NOT NULL)
            OR EXISTS (SELECT 1 FROM reading_chunks c
                WHERE c.series_id = b.series_id AND c.bucket = b.block_start) END$q$;
    -- Readings aggregated on read: hot rows, and the blocks that are not
    -- summarised, with their timeline. %1$s: series predicate on c, %2$s on b.
    raw text := $q$
        SELECT c.series_id, c.bucket, u.ts, u.value
        FROM reading_chunks c CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
        WHERE %1$s
        UNION ALL
        SELECT b.series_id, b.block_start, d.ts, d.value
        FROM reading_blocks b
        JOIN reading_timelines t ON %3$s t.block_start = b.block_start AND t.id = b.timeline
        CROSS JOIN LATERAL unnest(haltless_stamps(t.ts), haltless_values(b.vals)) AS d (ts, value)
        WHERE %2$s AND $q$ || unsummarised;
    aggs text := $q$count(*)::integer AS count, min(r.value) AS min, max(r.value) AS max,
        sum(r.value) AS sum, (array_agg(r.value ORDER BY r.ts))[1] AS first,
        (array_agg(r.value ORDER BY r.ts))[count(*)] AS last$q$;
    -- A summarised block's minutes.
    minutes text := $q$
        SELECT b.series_id, b.block_start AS bucket,
               b.block_start + coalesce(u.minute, u.i - 1) * interval '1 minute' AS "time",
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
        WHERE %1$s AND $q$ || summarised;
    hours text := $q$
        SELECT b.series_id, b.block_start AS bucket, b.block_start AS "time",
               coalesce(b.hour_n, b.n) AS count,
               b.v_min AS min, b.v_max AS max, b.v_sum AS sum, b.v_first AS first, b.v_last AS last
        FROM reading_blocks b
        WHERE %1$s AND $q$ || summarised;
    names text := $q$m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
        s.metric_name, NULLIF(s.unit, '') AS unit$q$;
    cols text := $q$r.bucket, r."time", r.count, r.min, r.max, r.sum / r.count AS avg, r.sum,
        r.first, r.last$q$;
    step text;
    v text;
BEGIN
    FOREACH step IN ARRAY ARRAY['minute', 'hour'] LOOP
        IF NOT citus THEN
            -- Per series (as the readings view, 0012): a machine or metric
            -- predicate selects the series before any block is read.
            v := format($q$
                SELECT %s, %s
                FROM machines m JOIN series s ON s.machine_id = m.id
                CROSS JOIN LATERAL (
                    %s
                    UNION ALL
                    SELECT r.series_id, r.bucket, %s AS "time", %s
                    FROM (%s) AS r
                    GROUP BY r.series_id, r.bucket, 3) AS r$q$,
                names, cols,
                format(CASE step WHEN 'minute' THEN minutes ELSE hours END, 'b.series_id = s.id'),
                CASE step WHEN 'minute' THEN $q$date_bin('1 minute', r.ts, timestamptz 'epoch')$q$
                          ELSE 'r.bucket' END,
                aggs, format(raw, 'c.series_id = s.id', 'b.series_id = s.id', ''));
        ELSE
            -- Citus cannot plan a lateral subquery over distributed tables
            -- from a reference table: two arms, each joining machines ->
            -- series -> its rows on the distribution column, and the raw arm
            -- grouped with the series' columns, so that a machine or metric
            -- predicate still reaches every arm.
            v := format($q$
                SELECT %1$s, %2$s
                FROM machines m JOIN series s ON s.machine_id = m.id
                JOIN (%3$s) AS r ON r.series_id = s.id
                UNION ALL
                SELECT m.org_id, m.id, m.machine_identifier, s.id, s.metric_name,
                       NULLIF(s.unit, ''), r.bucket, %4$s, %5$s
                FROM machines m JOIN series s ON s.machine_id = m.id
                JOIN (%6$s) AS r ON r.series_id = s.id
                GROUP BY m.org_id, m.id, m.machine_identifier, s.id, s.metric_name, s.unit,
                         r.bucket, 8$q$,
                names, cols,
                format(CASE step WHEN 'minute' THEN minutes ELSE hours END, 'true'),
                CASE step WHEN 'minute' THEN $q$date_bin('1 minute', r.ts, timestamptz 'epoch')$q$
                          ELSE 'r.bucket' END,
                'count(*)::integer, min(r.value), max(r.value), sum(r.value) / count(*), '
                'sum(r.value), (array_agg(r.value ORDER BY r.ts))[1], '
                '(array_agg(r.value ORDER BY r.ts))[count(*)]',
                format(raw, 'true', 'true', 't.series_id = b.series_id AND'));
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
