-- 0026_open_batches_keep_their_job: a job with a batch open at the provider cannot be deleted.
--
-- Deleting a job drops its rows and, through the foreign key, its chunks (batchdb.provider_batches).
-- A chunk whose file was uploaded or whose batch runs at the provider would vanish with it: no worker
-- would cancel the batch, the provider would go on answering (and billing) it, and its file would
-- stay in the provider's storage. So the delete is refused, saying what to do: cancel the job first;
-- its open batches are cancelled at the provider and collected within a poll interval or two, and
-- the delete then goes through. Chunks that never reached the provider (planned, nothing uploaded)
-- and collected ones do not hold the delete.

CREATE FUNCTION batchdb.jobs_before_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    open_chunks integer;
    providers text;
BEGIN
    SELECT count(*), string_agg(DISTINCT b.provider, ', ')
      INTO open_chunks, providers
      FROM batchdb.provider_batches b
     WHERE b.job_id = OLD.id AND b.state <> 'collected' AND b.upload_started_at IS NOT NULL;
    IF open_chunks > 0 THEN
        RAISE EXCEPTION 'job % has % batch(es) open at %: deleting it would leave them running and billed',
                        OLD.id, open_chunks, providers
            USING ERRCODE = 'object_in_use',
                  HINT = format('Cancel it first (batchdb cancel %s, or SELECT batchdb.cancel_job(%s)); once '
                                'its batches are cancelled and collected the delete goes through.', OLD.id, OLD.id);
    END IF;
    RETURN OLD;
END;
$$;
REVOKE ALL ON FUNCTION batchdb.jobs_before_delete() FROM PUBLIC;

CREATE TRIGGER jobs_before_delete BEFORE DELETE ON batchdb.jobs
    FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_before_delete();
