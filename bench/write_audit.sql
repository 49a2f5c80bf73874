-- Test-only write audit (bench/write_audit.py): every write of a result and every update
-- that leaves a request in a final state is logged, so "no row completed twice" is counted
-- from the writes themselves. results' primary key and complete_batch's ON CONFLICT would
-- otherwise fold a second write into the first. Installed by the fault drills and the
-- exactly-once tests on their own scratch databases; never part of a migration.
CREATE SCHEMA IF NOT EXISTS batchdb_audit;

CREATE TABLE IF NOT EXISTS batchdb_audit.writes (
    kind        text NOT NULL,              -- 'result' or 'final'
    job_id      bigint NOT NULL,
    request_id  bigint NOT NULL,
    status      text,                       -- the final status written ('final' only)
    lease_token bigint,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS writes_row_idx ON batchdb_audit.writes (job_id, request_id);

CREATE OR REPLACE FUNCTION batchdb_audit.record_result_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO batchdb_audit.writes (kind, job_id, request_id) VALUES ('result', NEW.job_id, NEW.request_id);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION batchdb_audit.record_final_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO batchdb_audit.writes (kind, job_id, request_id, status, lease_token)
    VALUES ('final', NEW.job_id, NEW.id, NEW.status, NEW.lease_token);
    RETURN NULL;
END;
$$;

-- Row triggers on the partitioned parents are cloned onto every partition, present and future.
DROP TRIGGER IF EXISTS audit_result_writes ON batchdb.results;
CREATE TRIGGER audit_result_writes AFTER INSERT OR UPDATE ON batchdb.results
    FOR EACH ROW EXECUTE FUNCTION batchdb_audit.record_result_write();
DROP TRIGGER IF EXISTS audit_final_writes ON batchdb.requests;
CREATE TRIGGER audit_final_writes AFTER UPDATE ON batchdb.requests
    FOR EACH ROW WHEN (NEW.status IN ('succeeded', 'failed', 'dead', 'cancelled'))
    EXECUTE FUNCTION batchdb_audit.record_final_write();
