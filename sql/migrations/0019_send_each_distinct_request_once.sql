-- 0019_send_each_distinct_request_once: identical requests of a job are sent once.
--
-- A job whose rows repeat (the same headline twice, the same question for two ids) paid
-- for every copy. Rows now carry a request_key: the SDK sets it to a hash of what the
-- row's request is made of (its payload and the values its templates use), and a plain
-- SQL insert may set its own. A row whose key equals an earlier row's of the same job
-- gets duplicate_of = that row and waits (run_after 'infinity': no claim takes it); when
-- the first row becomes final its outcome is passed on in the same transaction: answered,
-- each duplicate gets a copy of its result; failed or dead, the same status and error.
-- Duplicates record no tokens and no cost. NULL keys (the default) are never deduplicated.
-- A row whose earlier twin was already answered before it was inserted is sent again.

SELECT batchdb.require_lock_capacity_for_requests();
ALTER TABLE batchdb.requests ADD COLUMN request_key bytea, ADD COLUMN duplicate_of bigint;

COMMENT ON COLUMN batchdb.requests.request_key IS
    'Rows of a job with equal keys are one request: sent once, its answer given to all (NULL: never deduplicated).';
COMMENT ON COLUMN batchdb.requests.duplicate_of IS
    'Set by batchdb: the id of the earlier row with the same request_key whose answer this row takes.';

-- Rows answered by an identical row's call, per job (what estimates divide output tokens by).
ALTER TABLE batchdb.jobs ADD COLUMN n_duplicates bigint NOT NULL DEFAULT 0;

INSERT INTO batchdb.request_params (name, in_job, in_row, meaning)
VALUES ('dedupe', true, false, 'batchdb: false sends every row, identical or not (submit(dedupe=False))');

-- A user's plain SQL (and the SDK, which inserts as the user) may give request keys; never duplicate_of.
GRANT INSERT (request_key) ON batchdb.requests TO batchdb_user;

CREATE INDEX requests_duplicates_idx ON batchdb.requests (job_id, duplicate_of) WHERE duplicate_of IS NOT NULL;

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
        UPDATE batchdb.requests q
           SET duplicate_of = l.leader, run_after = 'infinity'
          FROM (SELECT k.job_id, k.id, min(k.id) OVER (PARTITION BY k.job_id, k.request_key) AS leader
                  FROM batchdb.requests k
                 WHERE k.job_id IN (SELECT DISTINCT job_id FROM new_rows WHERE request_key IS NOT NULL)
                   AND k.request_key IS NOT NULL AND k.duplicate_of IS NULL) l
          JOIN batchdb.requests lead ON lead.job_id = l.job_id AND lead.id = l.leader
                                    AND lead.status IN ('queued', 'running')
         WHERE q.job_id = l.job_id AND q.id = l.id AND l.leader <> l.id
           AND (q.job_id, q.id) IN (SELECT job_id, id FROM new_rows WHERE request_key IS NOT NULL);
    END IF;
    -- One wake-up per statement, never per row.
    IF touched IS NOT NULL THEN
        PERFORM pg_notify('batchdb_requests', array_to_string(touched, ','));
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION batchdb.requests_after_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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
               coalesce(sum(n.cached_tokens - o.cached_tokens), 0) AS d_cached,
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
           cached_tokens = j.cached_tokens + d.d_cached,
           completion_tokens = j.completion_tokens + d.d_completion,
           cost_usd = j.cost_usd + d.d_cost,
           started_at = coalesce(j.started_at, CASE WHEN d.d_claimed > 0 THEN now() END)
      FROM delta d
     WHERE j.id = d.job_id
       AND (d.d_succeeded <> 0 OR d.d_failed <> 0 OR d.d_dead <> 0 OR d.d_cancelled <> 0 OR d.d_retries <> 0
            OR d.d_prompt <> 0 OR d.d_cached <> 0 OR d.d_completion <> 0 OR d.d_cost <> 0
            OR (d.d_claimed > 0 AND j.started_at IS NULL));
    -- A row answered once for its duplicates (0019) passes its outcome on when it becomes final:
    -- its waiting duplicates take its status and error (and, answered, a copy of its result), with
    -- no call, no tokens and no cost of their own. Their own update runs this trigger again, which
    -- counts them and finds no duplicates of theirs.
    IF EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.job_id = n.job_id AND o.id = n.id
                WHERE n.request_key IS NOT NULL AND n.duplicate_of IS NULL
                  AND n.status IN ('succeeded', 'failed', 'dead') AND n.status IS DISTINCT FROM o.status) THEN
        WITH leaders AS (
            SELECT n.job_id, n.id, n.status, n.error_class, n.error
              FROM new_rows n JOIN old_rows o ON o.job_id = n.job_id AND o.id = n.id
             WHERE n.request_key IS NOT NULL AND n.duplicate_of IS NULL
               AND n.status IN ('succeeded', 'failed', 'dead') AND n.status IS DISTINCT FROM o.status
        ), passed AS (
            UPDATE batchdb.requests f
               SET status = l.status, error_class = l.error_class, error = l.error,
                   finished_at = now(), run_after = now()
              FROM leaders l
             WHERE f.job_id = l.job_id AND f.duplicate_of = l.id AND f.status = 'queued'
            RETURNING f.job_id, f.id, f.duplicate_of, f.status
        ), counted AS (
            UPDATE batchdb.jobs j
               SET n_duplicates = j.n_duplicates + c.n
              FROM (SELECT job_id, count(*) AS n FROM passed WHERE status = 'succeeded' GROUP BY job_id) c
             WHERE j.id = c.job_id
        )
        INSERT INTO batchdb.results (job_id, request_id, response_text, response_json, finish_reason, model)
        SELECT p.job_id, p.id, r.response_text, r.response_json, r.finish_reason, r.model
          FROM passed p
          JOIN batchdb.results r ON r.job_id = p.job_id AND r.request_id = p.duplicate_of;
    END IF;
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

CREATE OR REPLACE FUNCTION batchdb.retry_job(p_job_id bigint, p_statuses text[] DEFAULT ARRAY['failed'::text, 'dead'::text]) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM batchdb.jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'batchdb: job % does not exist', p_job_id USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT p_statuses <@ ARRAY['failed', 'dead', 'cancelled'] THEN
        RAISE EXCEPTION 'batchdb.retry_job: statuses must be among failed, dead, cancelled; got %', p_statuses
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Reopen the job first so the rows' trigger does not see a finished job.
    UPDATE batchdb.jobs SET status = 'running', status_reason = NULL, finished_at = NULL
     WHERE id = p_job_id AND status IN ('completed', 'cancelled')
       AND EXISTS (SELECT 1 FROM batchdb.requests WHERE job_id = p_job_id AND status = ANY (p_statuses));
    DELETE FROM batchdb.results r
     USING batchdb.requests q
     WHERE q.job_id = p_job_id AND r.job_id = p_job_id AND r.request_id = q.id AND q.status = ANY (p_statuses);
    UPDATE batchdb.requests
       SET status = 'queued', attempts = 0, run_after = now(), error = NULL, error_class = NULL,
           finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL
     WHERE job_id = p_job_id AND status = ANY (p_statuses);
    GET DIAGNOSTICS n = ROW_COUNT;
    -- Duplicates retried with their first row wait for its answer again (0019).
    UPDATE batchdb.requests f
       SET run_after = 'infinity'
      FROM batchdb.requests lead
     WHERE f.job_id = p_job_id AND f.duplicate_of IS NOT NULL AND f.status = 'queued'
       AND lead.job_id = p_job_id AND lead.id = f.duplicate_of AND lead.status IN ('queued', 'running');
    IF n > 0 THEN
        PERFORM pg_notify('batchdb_requests', p_job_id::text);
    END IF;
    RETURN n;
END;
$$;

CREATE OR REPLACE VIEW batchdb.job_progress WITH (security_invoker = true) AS
SELECT j.id AS job_id,
       j.name,
       j.owner,
       j.provider,
       j.model,
       j.status,
       j.status_reason,
       j.priority,
       j.n_total,
       greatest(j.n_total - j.n_done - coalesce(r.n_running, 0), 0) AS n_queued,
       coalesce(r.n_running, 0) AS n_running,
       j.n_succeeded,
       j.n_failed,
       j.n_dead,
       j.n_cancelled,
       j.n_done,
       CASE WHEN j.n_total > 0 THEN round(100.0 * j.n_done / j.n_total, 2) ELSE 0 END AS pct_done,
       j.n_retries,
       j.prompt_tokens,
       j.completion_tokens,
       j.cost_usd,
       j.budget_usd,
       j.created_at,
       j.started_at,
       j.finished_at,
       CASE WHEN j.started_at IS NOT NULL AND coalesce(j.finished_at, now()) > j.started_at
            THEN round((j.n_done / extract(epoch FROM coalesce(j.finished_at, now()) - j.started_at))::numeric, 2)
       END AS rows_per_second,
       CASE WHEN j.status = 'running' AND j.started_at IS NOT NULL AND j.n_done > 0 AND now() > j.started_at
            THEN (j.n_total - j.n_done) * ((now() - j.started_at) / j.n_done)
       END AS eta,
       j.key_alias,
       j.reserved_usd,
       j.cached_tokens,
       j.wasted_calls,
       j.wasted_usd,
       j.n_duplicates
  FROM batchdb.jobs j
  LEFT JOIN LATERAL (
        SELECT count(*) AS n_running
          FROM batchdb.requests q
         WHERE j.status IN ('running', 'paused', 'cancelled') AND q.job_id = j.id AND q.status = 'running'
  ) r ON true;
