-- SQL reads that cost what they return (README "SQL: psql and Grafana").
--
-- 1. The readings of a block decode into arrays, joined by position
--    (unnest of two arrays), instead of two row sets joined on their index:
--    that join was planned as a nested loop of 3,600 x 3,600 and took ~21 us
--    a reading. The running sums of the packed ints are int8 window sums
--    (haltless_isum) wherever the block's header bounds every partial sum
--    below 2^61, numeric (exact, wrapping) otherwise, as before.
-- 2. The view and readings_in() read per series: machines -> series ->
--    (hot rows, blocks) of that series, so a predicate on the machine or the
--    metric selects the series first and only their rows are fetched and
--    decoded (before, every series of the organization was decoded and the
--    machine filter applied after). A bucket predicate on the view, and
--    readings_in()'s range, prune partitions and index ranges; readings_in()
--    and readings_between() skip blocks that end before or start after the
--    range. A timeline is decoded once per query where the planner caches it
--    (Memoize), not once per block that shares it.
-- 3. readings_in() returns the view's columns, so a machine or metric filter
--    needs no join: WHERE machine_identifier = 'CNC-001'.

CREATE AGGREGATE haltless_isum(int8) (SFUNC = int8pl, STYPE = int8, INITCOND = '0');

-- A big-endian field of 8 bytes by shifts, not through hex text (1.2 -> 0.5
-- us); the other widths as in 0004.
CREATE OR REPLACE FUNCTION haltless_codec_be(data bytea, pos integer, w integer, signed boolean)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE w
    WHEN 0 THEN 0
    WHEN 1 THEN CASE WHEN signed THEN (get_byte(data, pos) # 128) - 128
                ELSE get_byte(data, pos) END
    WHEN 2 THEN CASE WHEN signed
                THEN ((get_byte(data, pos) * 256 + get_byte(data, pos + 1)) # 32768) - 32768
                ELSE get_byte(data, pos) * 256 + get_byte(data, pos + 1) END
    WHEN 4 THEN CASE WHEN signed
                THEN (((get_byte(data, pos)::bigint << 24) | (get_byte(data, pos + 1) << 16)
                       | (get_byte(data, pos + 2) << 8) | get_byte(data, pos + 3)) # 2147483648)
                     - 2147483648
                ELSE (get_byte(data, pos)::bigint << 24) | (get_byte(data, pos + 1) << 16)
                     | (get_byte(data, pos + 2) << 8) | get_byte(data, pos + 3) END
    WHEN 8 THEN (get_byte(data, pos)::bigint << 56) | (get_byte(data, pos + 1)::bigint << 48)
                | (get_byte(data, pos + 2)::bigint << 40) | (get_byte(data, pos + 3)::bigint << 32)
                | (get_byte(data, pos + 4)::bigint << 24) | (get_byte(data, pos + 5) << 16)
                | (get_byte(data, pos + 6) << 8) | get_byte(data, pos + 7)
    ELSE ('x' || lpad(encode(substring(data FROM pos + 1 FOR w), 'hex'), 16,
                      CASE WHEN signed AND get_byte(data, pos) >= 128 THEN 'f' ELSE '0' END)
         )::bit(64)::bigint
END;

-- A packed-ints header (format in haltless_fast/_blocks_py.py), checked
-- against the block's size as the kernels check it: order, width, count, and
-- the first value and first delta (orders 1, 2) or the line's base and step
-- (order 3, where each value is base + i * step + its residual: no running
-- sum, so it decodes in one pass).
CREATE FUNCTION haltless_ints_header(data bytea, OUT ord integer, OUT w integer, OUT n bigint,
                                     OUT v1 bigint, OUT d bigint)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    size integer := length(data);
    need bigint;
    lim  bigint;
BEGIN
    IF size < 14 THEN
        RAISE EXCEPTION 'packed ints: % bytes is shorter than the 14-byte header; the block is truncated', size;
    END IF;
    ord := get_byte(data, 0);
    w := get_byte(data, 1);
    n := haltless_codec_be(data, 2, 4, false);
    IF ord NOT IN (1, 2, 3) THEN
        RAISE EXCEPTION 'packed ints: order % at byte 0 is not 1, 2 or 3; the block is corrupt', ord;
    END IF;
    IF w NOT IN (0, 1, 2, 4, 8) OR (ord = 3 AND w = 8) THEN
        RAISE EXCEPTION 'packed ints: width % at byte 1 is not 0, 1, 2, 4%; the block is corrupt',
            w, CASE WHEN ord = 3 THEN '' ELSE ' or 8' END;
    END IF;
    IF n > 16777216 THEN
        RAISE EXCEPTION 'a block holds at most 16,777,216 readings, got %; the block is corrupt', n;
    END IF;
    IF ord = 2 AND n < 2 THEN
        RAISE EXCEPTION 'packed ints: order 2 needs at least 2 values, the header says %; the block is corrupt', n;
    END IF;
    need := CASE ord WHEN 1 THEN 14 ELSE 22 END
            + CASE WHEN ord = 3 THEN n * w ELSE greatest(n - ord, 0) * w END;
    IF size <> need THEN
        RAISE EXCEPTION 'packed ints: % bytes where the header (n=%, order=%, width=%) needs %; the block is truncated or corrupt',
            size, n, ord, w, need;
    END IF;
    v1 := haltless_codec_be(data, 6, 8, true);
    d := CASE WHEN ord >= 2 THEN haltless_codec_be(data, 14, 8, true) ELSE 0 END;
    IF ord = 3 THEN
        lim := 4611686018427387904 / greatest(n - 1, 1);  -- 2^62 / (n - 1)
        IF NOT (v1 > -4611686018427387904 AND v1 < 4611686018427387904 AND d > -lim AND d < lim) THEN
            RAISE EXCEPTION 'packed ints: order 3 line (base %, step %, n=%) leaves the range of int64; the block is corrupt',
                v1, d, n;
        END IF;
    END IF;
END
$$;

-- Packed ints as a bigint array. Custom plans always: each block's width and
-- count become constants the planner folds into the per-element
-- expressions; the generic plan that PL/pgSQL switches to after five calls
-- took 9 us an element instead of 1.
CREATE FUNCTION haltless_ints(data bytea) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE COST 1000
SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    h     record := haltless_ints_header(data);
    w     integer := h.w;
    n     bigint := h.n;
    v1    bigint := h.v1;
    d     bigint := h.d;
    head  integer := CASE h.ord WHEN 1 THEN 14 ELSE 22 END;
    safe  boolean;
    out   bigint[];
BEGIN
    IF n = 0 THEN
        RETURN '{}';
    END IF;
    IF h.ord = 3 THEN  -- the header bounds every value below 2^63
        SELECT array_agg(v1 + g.i * d + haltless_codec_be(data, 22 + g.i * w, w, true)) INTO out
        FROM generate_series(0, n::integer - 1) AS g(i);
        RETURN out;
    END IF;
    -- When every partial sum fits int8 with room, no wrapping can occur: int8
    -- arithmetic (haltless_isum); else numeric, wrapped as the encoder did.
    safe := abs(v1::numeric) < 2::numeric ^ 61 AND n * abs(d::numeric) < 2::numeric ^ 61
            AND n::numeric * n * 2::numeric ^ greatest(8 * w - 1, 0) < 2::numeric ^ 60;
    IF safe AND w = 0 THEN  -- no residuals: a constant, or an arithmetic progression
        SELECT array_agg(v1 + (g.i - 1) * d) INTO out FROM generate_series(1, n::integer) AS g(i);
    ELSIF safe THEN
        IF h.ord = 1 THEN
            SELECT array_agg(v1 + s) INTO out FROM (
                SELECT haltless_isum(r.r) OVER (ORDER BY r.i ROWS UNBOUNDED PRECEDING) AS s
                FROM (SELECT g.i, CASE WHEN g.i = 1 THEN 0
                             ELSE haltless_codec_be(data, head + (g.i - 2) * w, w, true) END AS r
                      FROM generate_series(1, n::integer) AS g(i)) r) x;
        ELSE
            SELECT array_agg(v1 + (i - 1) * d + (i + 1) * s1 - s2) INTO out FROM (
                SELECT r.i, haltless_isum(r.r) OVER w1 AS s1, haltless_isum(r.i * r.r) OVER w1 AS s2
                FROM (SELECT g.i, CASE WHEN g.i <= 2 THEN 0
                             ELSE haltless_codec_be(data, head + (g.i - 3) * w, w, true) END AS r
                      FROM generate_series(1, n::integer) AS g(i)) r
                WINDOW w1 AS (ORDER BY r.i ROWS UNBOUNDED PRECEDING)) x;
        END IF;
    ELSE  -- numeric sums, reduced modulo 2^64 as the encoder wrapped them
        SELECT array_agg(haltless_codec_wrap(v1 + CASE h.ord WHEN 1 THEN s.s1
                         ELSE (s.i - 1)::numeric * d + (s.i + 1) * s.s1 - s.s2 END) ORDER BY s.i)
        INTO out FROM (
            SELECT r.i, sum(r.r) OVER (ORDER BY r.i) AS s1,
                   CASE WHEN h.ord = 2 THEN sum(r.i::numeric * r.r) OVER (ORDER BY r.i) END AS s2
            FROM (SELECT g.i, CASE WHEN g.i <= h.ord THEN 0
                         ELSE haltless_codec_be(data, head + (g.i - h.ord - 1) * w, w, true) END AS r
                  FROM generate_series(1, n::integer) AS g(i)) r) s;
    END IF;
    RETURN out;
END
$$;

-- Values (modes D and X, format in haltless_fast/_blocks_py.py) as a float8
-- array. Decimals on a line (order 3) and constants (X, w = 0) in one pass.
CREATE FUNCTION haltless_values(data bytea) RETURNS float8[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE COST 1000
SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    size  integer := length(data);
    mode  integer;
    w     integer;
    n     bigint;
    need  bigint;
    scale float8;
    h     record;
    out   float8[];
BEGIN
    IF size < 2 THEN
        RAISE EXCEPTION 'values: % bytes is shorter than the 2-byte header; the block is truncated', size;
    END IF;
    mode := get_byte(data, 0);
    w := get_byte(data, 1);
    IF mode = 68 THEN  -- 'D'
        IF w > 17 THEN
            RAISE EXCEPTION 'values: decimal exponent % at byte 1 is above 17; the block is corrupt', w;
        END IF;
        scale := (10::numeric ^ w)::float8;
        h := haltless_ints_header(substring(data FROM 3));
        IF h.ord = 3 THEN
            IF h.n = 0 THEN
                RETURN '{}';
            END IF;
            SELECT array_agg((h.v1 + g.i * h.d + haltless_codec_be(data, 24 + g.i * h.w, h.w, true))::float8
                             / scale) INTO out
            FROM generate_series(0, h.n::integer - 1) AS g(i);
            RETURN out;
        END IF;
        SELECT array_agg(k::float8 / scale) INTO out
        FROM unnest(haltless_ints(substring(data FROM 3))) AS k;
        RETURN coalesce(out, '{}');
    END IF;
    IF mode <> 88 THEN  -- 'X'
        RAISE EXCEPTION 'values: mode byte % is neither ''D'' (68) nor ''X'' (88); the block is corrupt', mode;
    END IF;
    IF size < 14 THEN
        RAISE EXCEPTION 'values: % bytes is shorter than the 14-byte header of mode X; the block is truncated', size;
    END IF;
    n := haltless_codec_be(data, 2, 4, false);
    IF w > 8 THEN
        RAISE EXCEPTION 'values: width % at byte 1 is above 8; the block is corrupt', w;
    END IF;
    IF n > 16777216 THEN
        RAISE EXCEPTION 'a block holds at most 16,777,216 readings, got %; the block is corrupt', n;
    END IF;
    need := 14 + greatest(n - 1, 0) * w;
    IF size <> need THEN
        RAISE EXCEPTION 'values: % bytes where the header (n=%, width=%) needs %; the block is truncated or corrupt',
            size, n, w, need;
    END IF;
    IF n = 0 THEN
        RETURN '{}';
    END IF;
    IF w = 0 THEN  -- one value n times
        RETURN array_fill(haltless_codec_float8(haltless_codec_be(data, 6, 8, false)), ARRAY[n::integer]);
    END IF;
    SELECT array_agg(haltless_codec_float8(b)) INTO out FROM (
        SELECT bit_xor(r.r) OVER (ORDER BY r.i ROWS UNBOUNDED PRECEDING) AS b
        FROM (SELECT g.i, CASE WHEN g.i = 1 THEN haltless_codec_be(data, 6, 8, false)
                     ELSE haltless_codec_be(data, 14 + (g.i - 2) * w, w, false) END AS r
              FROM generate_series(1, n::integer) AS g(i)) r) x;
    RETURN coalesce(out, '{}');
END
$$;

-- A timeline's timestamps; on a line (order 3) in one pass.
CREATE FUNCTION haltless_stamps(data bytea) RETURNS timestamptz[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE COST 1000
SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    h   record := haltless_ints_header(data);
    t0  timestamptz;
    out timestamptz[];
BEGIN
    IF h.ord = 3 THEN
        IF h.n = 0 THEN
            RETURN '{}';
        END IF;
        t0 := timestamptz 'epoch' + h.v1 * interval '1 microsecond';
        SELECT array_agg(t0 + (g.i * h.d + haltless_codec_be(data, 22 + g.i * h.w, h.w, true))
                              * interval '1 microsecond') INTO out
        FROM generate_series(0, h.n::integer - 1) AS g(i);
        RETURN out;
    END IF;
    SELECT coalesce(array_agg(timestamptz 'epoch' + v * interval '1 microsecond'), '{}') INTO out
    FROM unnest(haltless_ints(data)) AS v;
    RETURN out;
END
$$;

-- The row-set decoders of 0004, now over the arrays (same signatures).
CREATE OR REPLACE FUNCTION haltless_unpack_ints(data bytea) RETURNS TABLE (i integer, v bigint)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT u.i::integer, u.v FROM unnest(haltless_ints(data)) WITH ORDINALITY AS u (v, i)
$$;
CREATE OR REPLACE FUNCTION haltless_unpack_values(data bytea) RETURNS TABLE (i integer, value float8)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT u.i::integer, u.value FROM unnest(haltless_values(data)) WITH ORDINALITY AS u (value, i)
$$;
CREATE OR REPLACE FUNCTION haltless_block_readings(p_ts bytea, p_vals bytea)
RETURNS TABLE (ts timestamptz, value float8)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT u.ts, u.value FROM unnest(haltless_stamps(p_ts), haltless_values(p_vals)) AS u (ts, value)
$$;

DROP VIEW readings;
DROP FUNCTION readings_in(timestamptz, timestamptz);
DROP FUNCTION readings_between(integer, timestamptz, timestamptz);

-- The view, readings_in and readings_between, written once for both kinds of
-- server (as 0008): on a Citus coordinator (0007) blocks join their
-- timeline on the distribution column as well, and the functions are
-- PL/pgSQL, because Citus cannot plan a SQL function's parameterized query
-- over distributed tables.
DO $fns$
DECLARE
    citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
    tl text := CASE WHEN citus THEN 't.series_id = b.series_id AND ' ELSE '' END;
    -- One series' readings (s.id): hot rows, then blocks with their timeline,
    -- decoded once per query where the planner caches it. %1$s: the hot rows'
    -- predicate, %2$s: the blocks' (besides the series), %3$s: the readings'.
    per_series text := $q$
        SELECT c.bucket, u.ts, u.value
        FROM reading_chunks c CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
        WHERE c.series_id = s.id %1$s %3$s
        UNION ALL
        SELECT b.block_start, d.ts, d.value
        FROM reading_blocks b
        JOIN reading_timelines t ON %4$s t.block_start = b.block_start AND t.id = b.timeline
        CROSS JOIN LATERAL (SELECT haltless_stamps(t.ts) AS a) AS tl
        CROSS JOIN LATERAL unnest(tl.a, haltless_values(b.vals)) AS d (ts, value)
        WHERE b.series_id = s.id %2$s %3$s$q$;
    columns text := $q$
        SELECT m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
               s.metric_name, NULLIF(s.unit, '') AS unit, NULLIF(s.raw_tag, '') AS raw_tag,
               %s
        FROM machines m
        JOIN series s ON s.machine_id = m.id
        CROSS JOIN LATERAL (%s) AS r$q$;
    q_view text;
    q_in text;
    q_between text;
    arms text;
BEGIN
    q_view := format(columns, 'r.ts AS "timestamp", r.value, r.bucket',
                     format(per_series, '', '', '', tl));
    q_in := format(columns, 'r.bucket, r.ts, r.value', format(per_series,
        'AND c.bucket >= date_trunc(''hour'', p_from) AND c.bucket < p_to',
        'AND b.block_start >= date_trunc(''hour'', p_from) AND b.block_start < p_to'
        ' AND t.block_start >= date_trunc(''hour'', p_from) AND t.block_start < p_to'
        ' AND b.t_last >= p_from AND b.t_first < p_to',
        '', tl)) || ' WHERE r.ts >= p_from AND r.ts < p_to';
    q_between := format($q$
        SELECT r.ts, r.value FROM (SELECT p_series AS id) AS s
        CROSS JOIN LATERAL (%s) AS r
        WHERE r.ts >= p_from AND r.ts <= p_to
        ORDER BY r.ts$q$, format(per_series,
        'AND c.bucket >= date_trunc(''hour'', p_from) AND c.bucket <= p_to',
        'AND b.block_start >= date_trunc(''hour'', p_from) AND b.block_start <= p_to'
        ' AND t.block_start >= date_trunc(''hour'', p_from) AND t.block_start <= p_to'
        ' AND b.t_last >= p_from AND b.t_first <= p_to'
        || CASE WHEN citus THEN ' AND t.series_id = p_series' ELSE '' END,
        '', tl));
    IF citus THEN
        -- Citus cannot plan a lateral subquery over distributed tables from a
        -- reference table (machines, series) on its outer side, so there the
        -- two sources are two arms, each joining machines -> series -> its
        -- table on the distribution column: a machine or metric predicate on
        -- the view still reaches each arm, and each worker reads only the
        -- chosen series' shards.
        arms := $q$
            SELECT m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
                   s.metric_name, NULLIF(s.unit, '') AS unit, NULLIF(s.raw_tag, '') AS raw_tag,
                   %1$s
            FROM machines m JOIN series s ON s.machine_id = m.id
            JOIN reading_chunks c ON c.series_id = s.id
            CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
            WHERE true %2$s
            UNION ALL
            SELECT m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
                   s.metric_name, NULLIF(s.unit, '') AS unit, NULLIF(s.raw_tag, '') AS raw_tag,
                   %3$s
            FROM machines m JOIN series s ON s.machine_id = m.id
            JOIN reading_blocks b ON b.series_id = s.id
            JOIN reading_timelines t ON t.series_id = b.series_id
                 AND t.block_start = b.block_start AND t.id = b.timeline
            CROSS JOIN LATERAL unnest(haltless_stamps(t.ts), haltless_values(b.vals)) AS d (ts, value)
            WHERE true %4$s$q$;
        q_view := format(arms, 'u.ts AS "timestamp", u.value, c.bucket', '',
                         'd.ts AS "timestamp", d.value, b.block_start AS bucket', '');
        q_in := format(arms, 'c.bucket, u.ts, u.value',
            'AND c.bucket >= date_trunc(''hour'', p_from) AND c.bucket < p_to'
            ' AND u.ts >= p_from AND u.ts < p_to',
            'b.block_start AS bucket, d.ts, d.value',
            'AND b.block_start >= date_trunc(''hour'', p_from) AND b.block_start < p_to'
            ' AND b.t_last >= p_from AND b.t_first < p_to AND d.ts >= p_from AND d.ts < p_to');
        q_between := $q$
            SELECT r.ts, r.value FROM (
                SELECT u.ts, u.value FROM reading_chunks c
                CROSS JOIN LATERAL haltless_chunk_readings(c.ts, c.vals) AS u
                WHERE c.series_id = p_series
                  AND c.bucket >= date_trunc('hour', p_from) AND c.bucket <= p_to
                UNION ALL
                SELECT d.ts, d.value FROM reading_blocks b
                JOIN reading_timelines t ON t.series_id = b.series_id
                     AND t.block_start = b.block_start AND t.id = b.timeline
                CROSS JOIN LATERAL unnest(haltless_stamps(t.ts), haltless_values(b.vals)) AS d (ts, value)
                WHERE b.series_id = p_series AND t.series_id = p_series
                  AND b.block_start >= date_trunc('hour', p_from) AND b.block_start <= p_to
                  AND b.t_last >= p_from AND b.t_first <= p_to) AS r
            WHERE r.ts >= p_from AND r.ts <= p_to
            ORDER BY r.ts$q$;
    END IF;
    EXECUTE 'CREATE VIEW readings AS ' || q_view;
    EXECUTE format(
        'CREATE FUNCTION readings_in(p_from timestamptz, p_to timestamptz)'
        ' RETURNS TABLE (org_id uuid, machine_id uuid, machine_identifier text, series_id integer,'
        ' metric_name text, unit text, raw_tag text, bucket timestamptz, ts timestamptz,'
        ' value float8) LANGUAGE %s STABLE AS %L', CASE WHEN citus THEN 'plpgsql' ELSE 'sql' END,
        CASE WHEN citus THEN E'#variable_conflict use_column\nBEGIN RETURN QUERY '
                             || q_in || '; END' ELSE q_in END);
    EXECUTE format(
        'CREATE FUNCTION readings_between(p_series integer, p_from timestamptz, p_to timestamptz)'
        ' RETURNS TABLE (ts timestamptz, value float8) LANGUAGE %s STABLE AS %L',
        CASE WHEN citus THEN 'plpgsql' ELSE 'sql' END,
        CASE WHEN citus THEN E'#variable_conflict use_column\nBEGIN RETURN QUERY '
                             || q_between || '; END' ELSE q_between END);
END $fns$;

-- As 0008: the view runs with the reader's rights, and the reader roles
-- registered so far keep their grant on the new view.
DO $$
DECLARE
    r record;
BEGIN
    IF current_setting('server_version_num')::int >= 150000 THEN
        ALTER VIEW readings SET (security_invoker = true);
        FOR r IN SELECT role_name FROM reader_roles
                 WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) LOOP
            EXECUTE format('GRANT SELECT ON readings TO %I', r.role_name);
        END LOOP;
    END IF;
END $$;
