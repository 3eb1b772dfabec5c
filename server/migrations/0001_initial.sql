-- Tenancy: organizations own machines and API keys.
CREATE TABLE organizations (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX organizations_one_default ON organizations (is_default) WHERE is_default;
INSERT INTO organizations (name, is_default) VALUES ('default', true);

CREATE TABLE machines (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id              uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    machine_identifier  text NOT NULL CHECK (length(machine_identifier) BETWEEN 1 AND 200),
    name                text CHECK (length(name) <= 200),
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, machine_identifier)
);

-- Only a SHA-256 of the key is stored: keys are 256 random bits, so a fast
-- hash is enough (no dictionary to attack) and keeps lookups cheap.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name        text CHECK (length(name) <= 200),
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- A series is one (machine, metric, unit, raw_tag); unit and raw_tag use ''
-- for "not given" so the unique key works on every PostgreSQL version.
CREATE TABLE series (
    id           integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    machine_id   uuid NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    metric_name  text NOT NULL,
    unit         text NOT NULL DEFAULT '',
    raw_tag      text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (machine_id, metric_name, unit, raw_tag)
);

-- Readings are stored as chunks: one row per (series, hour, write) holding
-- parallel arrays of timestamps and values, sorted by time. See README
-- "Design" for the measurements behind this choice.
CREATE TABLE reading_chunks (
    series_id  integer NOT NULL,
    bucket     timestamptz NOT NULL,
    n          integer NOT NULL,
    ts         timestamptz[] NOT NULL,
    vals       float8[] NOT NULL
) PARTITION BY RANGE (bucket);
CREATE INDEX reading_chunks_series_bucket ON reading_chunks (series_id, bucket);
CREATE TABLE reading_chunks_default PARTITION OF reading_chunks DEFAULT;

-- Monthly partitions are created ahead of time by haltless_ensure_partitions().
CREATE FUNCTION haltless_ensure_partitions(months_ahead integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    name text;
    created integer := 0;
BEGIN
    FOR i IN 0..months_ahead LOOP
        name := 'reading_chunks_' || to_char(m, 'YYYYMM');
        IF to_regclass(name) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF reading_chunks FOR VALUES FROM (%L) TO (%L)',
                    name, (m::timestamp AT TIME ZONE 'UTC'),
                    ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
                created := created + 1;
            EXCEPTION WHEN duplicate_table THEN
                NULL;  -- another process made it first
            END;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END $$;

-- One series over a time range, answered from reading_chunks_series_bucket.
CREATE FUNCTION readings_between(p_series integer, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (ts timestamptz, value float8)
LANGUAGE sql STABLE AS $$
    SELECT u.ts, u.value
    FROM reading_chunks c
    CROSS JOIN LATERAL unnest(c.ts, c.vals) AS u (ts, value)
    WHERE c.series_id = p_series
      AND c.bucket >= date_trunc('hour', p_from)
      AND c.bucket <= p_to
      AND u.ts >= p_from AND u.ts <= p_to
    ORDER BY u.ts
$$;

-- Every reading, one row each: for ad-hoc queries and exports.
CREATE VIEW readings AS
SELECT m.org_id, m.id AS machine_id, m.machine_identifier, s.id AS series_id,
       s.metric_name, NULLIF(s.unit, '') AS unit, NULLIF(s.raw_tag, '') AS raw_tag,
       u.ts AS "timestamp", u.value
FROM reading_chunks c
JOIN series s ON s.id = c.series_id
JOIN machines m ON m.id = s.machine_id
CROSS JOIN LATERAL unnest(c.ts, c.vals) AS u (ts, value);
