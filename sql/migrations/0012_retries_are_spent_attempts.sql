-- 0012_retries_are_spent_attempts: a job's n_retries counts rows sent again.
--
-- Rows now go back to the queue without spending an attempt in more ways than a
-- shutdown: a lane waiting for capacity hands its rows back (defer_leases, 0006),
-- an open circuit returns them (0007), a stale or cancelled row is dropped before
-- its call (send guard). Counted as retries, they made a job on a busy key look
-- like it was failing (79 "retries" for 188 calls with no extra call made). A
-- retry is now a row whose attempt was spent (requests.attempts did not go back
-- down). Restated in full from 0001, with 0005's SECURITY DEFINER and search_path.

CREATE OR REPLACE FUNCTION batchdb.requests_after_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    WITH delta AS (
        SELECT n.job_id,
               count(*) FILTER (WHERE n.status = 'succeeded') - count(*) FILTER (WHERE o.status = 'succeeded') AS d_succeeded,
               count(*) FILTER (WHERE n.status = 'failed') - count(*) FILTER (WHERE o.status = 'failed') AS d_failed,
               count(*) FILTER (WHERE n.status = 'dead') - count(*) FILTER (WHERE o.status = 'dead') AS d_dead,
               count(*) FILTER (WHERE n.status = 'cancelled') - count(*) FILTER (WHERE o.status = 'cancelled') AS d_cancelled,
               -- A retry spends an attempt: rows handed back unsent (release_leases, defer_leases, an open
               -- circuit) get theirs back and are not retries.
               count(*) FILTER (WHERE o.status = 'running' AND n.status = 'queued' AND n.attempts >= o.attempts) AS d_retries,
               count(*) FILTER (WHERE o.status = 'queued' AND n.status = 'running') AS d_claimed,
               coalesce(sum(n.prompt_tokens - o.prompt_tokens), 0) AS d_prompt,
               coalesce(sum(n.completion_tokens - o.completion_tokens), 0) AS d_completion,
               coalesce(sum(n.cost_usd - o.cost_usd), 0) AS d_cost
          FROM new_rows n
          JOIN old_rows o ON o.job_id = n.job_id AND o.id = n.id
         GROUP BY n.job_id
    )
    UPDATE batchdb.jobs j
       SET n_succeeded = j.n_succeeded + d.d_succeeded,
           n_failed = j.n_failed + d.d_failed,
           n_dead = j.n_dead + d.d_dead,
           n_cancelled = j.n_cancelled + d.d_cancelled,
           n_retries = j.n_retries + d.d_retries,
           prompt_tokens = j.prompt_tokens + d.d_prompt,
           completion_tokens = j.completion_tokens + d.d_completion,
           cost_usd = j.cost_usd + d.d_cost,
           started_at = coalesce(j.started_at, CASE WHEN d.d_claimed > 0 THEN now() END)
      FROM delta d
     WHERE j.id = d.job_id
       AND (d.d_succeeded <> 0 OR d.d_failed <> 0 OR d.d_dead <> 0 OR d.d_cancelled <> 0 OR d.d_retries <> 0
            OR d.d_prompt <> 0 OR d.d_completion <> 0 OR d.d_cost <> 0
            OR (d.d_claimed > 0 AND j.started_at IS NULL));
    -- A job whose every row is final is complete.
    UPDATE batchdb.jobs j
       SET status = 'completed', finished_at = now()
     WHERE j.id IN (SELECT DISTINCT job_id FROM new_rows WHERE status IN ('succeeded', 'failed', 'dead', 'cancelled'))
       AND j.status = 'running'
       AND j.n_total > 0
       AND j.n_done = j.n_total;
    RETURN NULL;
END;
$$;
