-- MQTT sources (README "MQTT and Sparkplug B"): a broker subscription run by
-- `haltless pollers` like a polled source. Its machine_id is optional (each
-- Sparkplug device, edge node or JSON reading names its machine), and what
-- its subscription heard (connected, Sparkplug nodes and devices online,
-- messages discarded and skipped) is kept in protocol_status, written by the
-- poller that holds the source's lease.
-- One EXECUTE per statement: Citus propagates the DDL of ingest_sources (a
-- Citus local table there) with the query string it was given, and a
-- string of several commands cannot be sent as one prepared statement.
DO $$ BEGIN
    EXECUTE 'ALTER TABLE ingest_sources DROP CONSTRAINT ingest_sources_protocol_check';
    EXECUTE 'ALTER TABLE ingest_sources ADD CONSTRAINT ingest_sources_protocol_check'
            ' CHECK (protocol IN (''opcua'', ''modbus'', ''mqtt''))';
    EXECUTE 'ALTER TABLE ingest_sources ALTER COLUMN machine_id DROP NOT NULL';
    EXECUTE 'ALTER TABLE ingest_sources ADD CONSTRAINT ingest_sources_machine_required'
            ' CHECK (machine_id IS NOT NULL OR protocol = ''mqtt'')';
    EXECUTE 'ALTER TABLE ingest_sources ADD COLUMN protocol_status jsonb';
END $$;
