-- 0024_dedupe_looks_at_new_keys_only: marking a job's repeated rows costs what the new rows cost.
--
-- requests_after_insert (0019) found each new row's leader with a window over every keyed row of
-- its job, sorted, once per inserted statement: a submit copies its rows in chunks, so a
-- 1,000,000-row job sorted its rows again for every chunk, growing with the job (0.44 s of a
-- 300,000-row submit). The window now runs over the rows whose key one of the new rows has: the
-- new rows and the earlier rows they repeat. Same leaders, same result; the job's other rows are
-- only read past (a hash semi-join), never sorted.

CREATE OR REPLACE FUNCTION batchdb.requests_after_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    touched bigint[];
BEGIN
    WITH added AS (
        SELECT job_id, count(*) AS n FROM new_rows GROUP BY job_id
    ), updated AS (
        UPDATE batchdb.jobs j
           SET n_total = j.n_total + a.n,
               status = CASE WHEN j.status = 'completed' THEN 'running' ELSE j.status END,
               finished_at = CASE WHEN j.status = 'completed' THEN NULL ELSE j.finished_at END
          FROM added a
         WHERE j.id = a.job_id
        RETURNING j.id
    )
    SELECT array_agg(id) INTO touched FROM updated;
    -- Rows whose request_key equals an earlier row's of the same job wait for that row's answer
    -- instead of being sent (0019): run_after 'infinity' keeps them out of every claim until the
    -- first row's outcome is passed on (requests_after_update). Only new rows follow, and only a
    -- row still to be answered leads.
    IF EXISTS (SELECT 1 FROM new_rows WHERE duplicate_of IS NOT NULL) THEN
        RAISE EXCEPTION 'batchdb.requests.duplicate_of is set by batchdb: give rows equal request_key values instead'
            USING ERRCODE = 'check_violation';
    END IF;
    IF EXISTS (SELECT 1 FROM new_rows WHERE request_key IS NOT NULL) THEN
        -- A new row's leader is the first row of its job with its key: looked up for the new rows'
        -- keys alone (a hash join reading the job's rows once), not by sorting every keyed row of
        -- the job once per inserted chunk (0024).
        WITH keys AS (
            SELECT DISTINCT job_id, request_key FROM new_rows WHERE request_key IS NOT NULL
        ), leaders AS (
            SELECT k.job_id, k.request_key, min(r.id) AS leader
              FROM keys k
              JOIN batchdb.requests r ON r.job_id = k.job_id AND r.request_key = k.request_key
             WHERE r.duplicate_of IS NULL
             GROUP BY k.job_id, k.request_key
        )
        UPDATE batchdb.requests q
           SET duplicate_of = l.leader, run_after = 'infinity'
          FROM new_rows n
          JOIN leaders l ON l.job_id = n.job_id AND l.request_key = n.request_key
          JOIN batchdb.requests lead ON lead.job_id = l.job_id AND lead.id = l.leader
                                    AND lead.status IN ('queued', 'running')
         WHERE q.job_id = n.job_id AND q.id = n.id AND l.leader <> n.id;
    END IF;
    -- One wake-up per statement, never per row.
    IF touched IS NOT NULL THEN
        PERFORM pg_notify('batchdb_requests', array_to_string(touched, ','));
    END IF;
    RETURN NULL;
END;
$$;
