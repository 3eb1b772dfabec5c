-- When a source's data last stopped and came back (a device restarted, a
-- connection dropped, a subscription was lost and made again): set by the
-- pollers, shown in the source's status. gap_ended_at is NULL while the gap
-- lasts.
ALTER TABLE ingest_sources
    ADD COLUMN IF NOT EXISTS gap_started_at timestamptz,
    ADD COLUMN IF NOT EXISTS gap_ended_at   timestamptz;
