-- 0024_dedupe_looks_at_new_keys_only: a submit marks its repeated rows by looking at its own rows.
--
-- requests_after_insert (0019) found each new row's leader with a window over every keyed row of
-- its job, sorted, and a semi-join back to the new rows: a submit's single COPY of 1,000,000 rows
-- spent about 6 s there (sorts and hashes larger than work_mem go to disk), with not one repeated
-- row to mark. Now:
-- - a statement that fills jobs with no rows before it (every submit) looks at its own rows only:
--   one hash aggregate of their keys finds the repeated ones, and each repeat follows the first
--   row of its key;
-- - a statement adding rows to a job that has some (plain SQL inserts in several statements) finds
--   each new key's first row with a hash join on the job's rows, instead of sorting all of them.
-- Same leaders, same result as 0019.

CREATE OR REPLACE FUNCTION batchdb.requests_after_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    touched bigint[];
    fresh boolean;  -- every job this statement adds rows to had none before it
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
        RETURNING j.id, j.n_total - a.n AS before
    )
    SELECT array_agg(id), bool_and(before = 0) INTO touched, fresh FROM updated;
    -- Rows whose request_key equals an earlier row's of the same job wait for that row's answer
    -- instead of being sent (0019): run_after 'infinity' keeps them out of every claim until the
    -- first row's outcome is passed on (requests_after_update). Only new rows follow, and only a
    -- row still to be answered leads.
    IF EXISTS (SELECT 1 FROM new_rows WHERE duplicate_of IS NOT NULL) THEN
        RAISE EXCEPTION 'batchdb.requests.duplicate_of is set by batchdb: give rows equal request_key values instead'
            USING ERRCODE = 'check_violation';
    END IF;
    IF EXISTS (SELECT 1 FROM new_rows WHERE request_key IS NOT NULL) THEN
        IF fresh THEN
            -- The jobs were empty: a repeated key's first row is among the new rows.
            UPDATE batchdb.requests q
               SET duplicate_of = l.leader, run_after = 'infinity'
              FROM (SELECT job_id, request_key, min(id) AS leader
                      FROM new_rows
                     WHERE request_key IS NOT NULL
                     GROUP BY job_id, request_key
                    HAVING count(*) > 1) l
              JOIN new_rows n ON n.job_id = l.job_id AND n.request_key = l.request_key AND n.id <> l.leader
              JOIN batchdb.requests lead ON lead.job_id = l.job_id AND lead.id = l.leader
                                        AND lead.status IN ('queued', 'running')
             WHERE q.job_id = n.job_id AND q.id = n.id;
        ELSE
            -- The jobs had rows: a new key's first row may be an earlier one, found with a hash join
            -- on the job's rows for the new rows' keys alone.
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
    END IF;
    -- One wake-up per statement, never per row.
    IF touched IS NOT NULL THEN
        PERFORM pg_notify('batchdb_requests', array_to_string(touched, ','));
    END IF;
    RETURN NULL;
END;
$$;
