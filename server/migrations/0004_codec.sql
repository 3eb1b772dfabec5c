-- Decoders of compacted reading blocks in plain SQL, bit-exact with
-- haltless.fast.unpack_ints / unpack_values (the format is documented in
-- haltless_fast/_blocks_py.py). The format is byte-aligned and big-endian
-- precisely so that these can be set-based queries: every residual sits at
-- an offset computed from its index, and the running sums are window
-- aggregates. PostgreSQL 14+ (bit_xor, SQL-standard function bodies).
--
--   SELECT * FROM haltless_unpack_ints(ts_block);      -- (i, v bigint)
--   SELECT * FROM haltless_unpack_values(vals_block);  -- (i, value float8)

-- w bytes of data at 0-based offset pos as a bigint, big-endian; signed:
-- two's complement, sign-extended ((x # 2^(k-1)) - 2^(k-1) for k bits, or
-- lpad with 'f' for 8 bytes), else zero-extended. get_byte arithmetic for
-- 1, 2 and 4 bytes is ~10x faster than the hex round trip that 8 needs.
-- The helpers are not STRICT so that the planner inlines them (it does not
-- inline a STRICT function whose body is a CASE); the decoders that call
-- them are STRICT.
CREATE FUNCTION haltless_codec_be(data bytea, pos integer, w integer, signed boolean)
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
    ELSE ('x' || lpad(encode(substring(data FROM pos + 1 FOR w), 'hex'), 16,
                      CASE WHEN signed AND get_byte(data, pos) >= 128 THEN 'f' ELSE '0' END)
         )::bit(64)::bigint
END;

-- The encoder's differences wrap modulo 2**64; the sums here are numeric
-- (exact, no overflow error), so reduce them back to int64 the same way.
CREATE FUNCTION haltless_codec_wrap(x numeric) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (CASE WHEN x BETWEEN -9223372036854775808 AND 9223372036854775807 THEN x
        ELSE mod(mod(x + 9223372036854775808, 18446744073709551616) + 18446744073709551616,
                 18446744073709551616) - 9223372036854775808 END)::bigint;

-- A float8 from its 64 bits. There is no bit cast, so exact arithmetic:
-- (2^52 + m) / 2^52 * 2^(e-1023) for normal numbers, m / 2^52 * 2^-1022 for
-- subnormals. Every factor is a normal double and every product exact:
-- power() errors (ERANGE) on subnormal results and float8mul on products
-- that round to 0, so 2^-1074 is never formed directly. The sign is a
-- multiplication by -1 so that the zero with the sign bit gives -0.0.
-- NaN payloads are not kept (NaN is not a reading).
CREATE FUNCTION haltless_codec_float8(bits bigint) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN bits < 0 THEN -1::float8 ELSE 1::float8 END * CASE (bits >> 52) & 2047
    WHEN 2047 THEN CASE WHEN bits & 4503599627370495 = 0 THEN 'Infinity' ELSE 'NaN' END::float8
    WHEN 0 THEN ((bits & 4503599627370495)::float8 / 4503599627370496::float8)
                * '2.2250738585072014e-308'::float8
    ELSE ((4503599627370496 + (bits & 4503599627370495))::float8 / 4503599627370496::float8)
         * power(2::float8, (((bits >> 52) & 2047) - 1023)::float8)
END;

-- Packed ints: [0] order, [1] w, [2:6] n, [6:14] first, order 2: [14:22]
-- first delta; then residuals of w bytes. Order 1: v_i = v_1 + S1(i), the
-- running sum of the deltas. Order 2 (two nested running sums) in closed
-- form, so one window pass does: v_i = v_1 + (i-1)·d + (i+1)·S1(i) - S2(i),
-- with S1 the running sum of the delta-of-deltas r_j and S2 that of j·r_j.
CREATE FUNCTION haltless_unpack_ints(data bytea) RETURNS TABLE (i integer, v bigint)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
#variable_conflict use_column
DECLARE
    size  integer := length(data);
    ord   integer;
    w     integer;
    n     bigint;
    head  integer;
    need  bigint;
    v1    bigint;
    d     bigint;
BEGIN
    IF size < 14 THEN
        RAISE EXCEPTION 'packed ints: % bytes is shorter than the 14-byte header; the block is truncated', size;
    END IF;
    ord := get_byte(data, 0);
    w := get_byte(data, 1);
    n := haltless_codec_be(data, 2, 4, false);
    IF ord NOT IN (1, 2) THEN
        RAISE EXCEPTION 'packed ints: order % at byte 0 is not 1 or 2; the block is corrupt', ord;
    END IF;
    IF w NOT IN (0, 1, 2, 4, 8) THEN
        RAISE EXCEPTION 'packed ints: width % at byte 1 is not 0, 1, 2, 4 or 8; the block is corrupt', w;
    END IF;
    IF n > 16777216 THEN
        RAISE EXCEPTION 'a block holds at most 16,777,216 readings, got %; the block is corrupt', n;
    END IF;
    IF ord = 2 AND n < 2 THEN
        RAISE EXCEPTION 'packed ints: order 2 needs at least 2 values, the header says %; the block is corrupt', n;
    END IF;
    head := CASE ord WHEN 1 THEN 14 ELSE 22 END;
    need := head + greatest(n - ord, 0) * w;
    IF size <> need THEN
        RAISE EXCEPTION 'packed ints: % bytes where the header (n=%, order=%, width=%) needs %; the block is truncated or corrupt',
            size, n, ord, w, need;
    END IF;
    v1 := haltless_codec_be(data, 6, 8, true);
    d := CASE ord WHEN 2 THEN haltless_codec_be(data, 14, 8, true) ELSE 0 END;
    RETURN QUERY
    WITH r AS (
        SELECT g.i, CASE WHEN g.i <= ord THEN 0
                    ELSE haltless_codec_be(data, head + (g.i - ord - 1) * w, w, true) END AS r
        FROM generate_series(1, n::integer) AS g(i)
    ), s AS (
        SELECT r.i, sum(r.r) OVER (ORDER BY r.i) AS s1,
               CASE WHEN ord = 2 THEN sum(r.i::numeric * r.r) OVER (ORDER BY r.i) END AS s2
        FROM r
    )
    SELECT s.i, haltless_codec_wrap(v1 + CASE ord WHEN 1 THEN s.s1
                                     ELSE (s.i - 1)::numeric * d + (s.i + 1) * s.s1 - s.s2 END)
    FROM s ORDER BY s.i;
END
$$;

-- Values: [0] mode. 'D' (0x44): [1] d, then packed ints of k; value =
-- k::float8 / 10^d (10^d exact: numeric power, then a correctly rounded
-- cast). 'X' (0x58): [1] w, [2:6] n, [6:14] bits of the first value, then
-- residuals bits_i # bits_(i-1) of w bytes: bits_i is a running bit_xor.
CREATE FUNCTION haltless_unpack_values(data bytea) RETURNS TABLE (i integer, value float8)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
#variable_conflict use_column
DECLARE
    size  integer := length(data);
    mode  integer;
    w     integer;  -- mode D: the exponent d
    n     bigint;
    need  bigint;
    scale float8;
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
        RETURN QUERY
        SELECT u.i, u.v::float8 / scale
        FROM haltless_unpack_ints(substring(data FROM 3)) AS u ORDER BY u.i;
        RETURN;
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
    RETURN QUERY
    WITH r AS (
        SELECT g.i, CASE WHEN g.i = 1 THEN haltless_codec_be(data, 6, 8, false)
                    ELSE haltless_codec_be(data, 14 + (g.i - 2) * w, w, false) END AS r
        FROM generate_series(1, n::integer) AS g(i)
    )
    SELECT r.i, haltless_codec_float8(bit_xor(r.r) OVER (ORDER BY r.i))
    FROM r ORDER BY r.i;
END
$$;
