-- Direct ingestion: devices the pollers read server-side.
CREATE TABLE ingest_sources (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id                 uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    machine_id             uuid NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    name                   text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    protocol               text NOT NULL CHECK (protocol IN ('opcua', 'modbus')),
    host                   text NOT NULL CHECK (length(host) BETWEEN 1 AND 253),
    port                   integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    poll_interval_seconds  integer NOT NULL CHECK (poll_interval_seconds BETWEEN 1 AND 86400),
    is_active              boolean NOT NULL DEFAULT true,
    config                 jsonb NOT NULL,  -- write-only fields removed, see secrets
    secrets                bytea,           -- AES-256-GCM sealed JSON of write-only fields
    version                integer NOT NULL DEFAULT 1,  -- bumped on every change; pollers reload
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    -- lease: which poller process polls it, until when (renewed every second)
    lease_owner            text,
    lease_expires          timestamptz,
    -- OPC-UA server certificate recorded on first use (unless pinned in config)
    server_cert_sha256     text,
    -- state reported by the pollers
    last_poll_at           timestamptz,
    last_success_at        timestamptz,
    last_error             text,
    last_error_at          timestamptz,
    readings_written       bigint NOT NULL DEFAULT 0,
    points_failed          bigint NOT NULL DEFAULT 0,
    polls_missed           bigint NOT NULL DEFAULT 0
);
CREATE INDEX ingest_sources_org ON ingest_sources (org_id, created_at);
CREATE INDEX ingest_sources_lease ON ingest_sources (lease_expires) WHERE is_active;

-- Live poller processes; a row not seen for a few seconds is a dead process.
CREATE TABLE poller_processes (
    owner       text PRIMARY KEY,
    hostname    text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);
