-- Hot rows are never compressed (bench/README "Ingest"). PostgreSQL tries
-- TOAST compression (pglz; this build has no lz4) on every row over ~2 KB,
-- and a group commit that merges several requests of one machine writes
-- rows of 150-400 readings: compressing them took 300-480 ns a reading, more
-- than COPYing them (~160 ns), for hot data that compaction turns into ~3
-- bytes a reading within two hours anyway. The kernel writes rows of at most
-- 500 readings (8,072 bytes on disk; haltless.fast.MAX_ROW), and with the target at
-- its largest value no such row is compressed or moved out of line.
-- Storage parameters live on the slot tables: a partitioned table has none.
DO $$ BEGIN
    EXECUTE 'ALTER TABLE reading_chunks_0 SET (toast_tuple_target = 8160)';
    EXECUTE 'ALTER TABLE reading_chunks_1 SET (toast_tuple_target = 8160)';
END $$;
