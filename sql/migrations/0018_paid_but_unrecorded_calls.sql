-- 0018_paid_but_unrecorded_calls: calls that were paid for but recorded on no row.
--
-- A completion is fenced out when its row is no longer the worker's under that lease:
-- the lease ran out and another worker took the row, or the job was cancelled while
-- the call was in flight. The provider answered, so it billed the call, but no row
-- records its tokens: a job's cost came out below the provider's bill. Workers now
-- record each such call here (sql/queries.sql: record_unrecorded_calls), and the job
-- counts them: job_progress.wasted_calls and .wasted_usd (cost_usd stays the sum of
-- its rows; cost_usd + wasted_usd is what the provider billed).
--
-- Keyed by the lease (job, row, lease token): the statement repeated after a lost reply
-- adds nothing.

CREATE TABLE batchdb.unrecorded_calls (
    job_id            bigint NOT NULL REFERENCES batchdb.jobs (id) ON DELETE CASCADE,
    request_id        bigint NOT NULL,
    lease_token       bigint NOT NULL,
    reason            text NOT NULL,           -- 'fenced': the row was no longer this lease's
    prompt_tokens     integer NOT NULL,
    cached_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    cost_usd          numeric NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, request_id, lease_token)
);

ALTER TABLE batchdb.jobs ADD COLUMN wasted_calls integer NOT NULL DEFAULT 0,
                         ADD COLUMN wasted_usd numeric NOT NULL DEFAULT 0;

CREATE FUNCTION batchdb.unrecorded_calls_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE batchdb.jobs j
       SET wasted_calls = j.wasted_calls + n.calls, wasted_usd = j.wasted_usd + n.usd
      FROM (SELECT job_id, count(*) AS calls, sum(cost_usd) AS usd FROM new_rows GROUP BY job_id) n
     WHERE j.id = n.job_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER unrecorded_calls_after_insert AFTER INSERT ON batchdb.unrecorded_calls
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION batchdb.unrecorded_calls_after_insert();

ALTER TABLE batchdb.unrecorded_calls ENABLE ROW LEVEL SECURITY;
CREATE POLICY unrecorded_calls_own ON batchdb.unrecorded_calls TO batchdb_user
    USING (EXISTS (SELECT 1 FROM batchdb.jobs j WHERE j.id = unrecorded_calls.job_id AND j.owner = current_user));
CREATE POLICY unrecorded_calls_all ON batchdb.unrecorded_calls TO batchdb_admin, batchdb_worker
    USING (true) WITH CHECK (true);
GRANT SELECT ON batchdb.unrecorded_calls TO batchdb_user;
GRANT SELECT, INSERT ON batchdb.unrecorded_calls TO batchdb_worker, batchdb_admin;

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
       j.wasted_usd
  FROM batchdb.jobs j
  LEFT JOIN LATERAL (
        SELECT count(*) AS n_running
          FROM batchdb.requests q
         WHERE j.status IN ('running', 'paused', 'cancelled') AND q.job_id = j.id AND q.status = 'running'
  ) r ON true;
