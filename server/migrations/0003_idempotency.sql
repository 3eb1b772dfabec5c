-- Idempotency-Key of POST /api/v1/ingest: the key and its response are
-- written in the same transaction as the readings, so a retry either finds
-- both or neither. Kept at least 24 h (purged after 48 h).
CREATE TABLE idempotency_keys (
    org_id        uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    response      bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
