-- 0023_costs_are_not_rounded: a row's cost is stored with every digit its price gives.
--
-- Costs were numeric(18,8): eight decimals. A batch-priced gpt-4o-mini input token costs
-- $0.000000075, so a batch row with an odd number of prompt tokens needs a ninth decimal, and
-- PostgreSQL rounded it half up: at most $0.000000005 a row, always up, which put a 20,000-row
-- batch job $0.00005 over the provider's bill (bench/cost.py) and would have crossed a cent at
-- about two million batch rows. Costs are now unconstrained numeric, exact products of tokens and
-- prices (batchdb.call_cost_usd), so a job's cost is the provider's bill to the last digit.
--
-- Only the type modifier goes: PostgreSQL rewrites no table (numeric(18,8) values are already valid
-- numeric), so this takes a moment whatever the size; job_progress reads jobs.cost_usd and is
-- created again as it was.

SELECT batchdb.require_lock_capacity_for_requests();

DROP VIEW batchdb.job_progress;

ALTER TABLE batchdb.requests ALTER COLUMN cost_usd TYPE numeric;
ALTER TABLE batchdb.jobs ALTER COLUMN cost_usd TYPE numeric, ALTER COLUMN reserved_usd TYPE numeric;
ALTER TABLE batchdb.budget_reservations ALTER COLUMN usd TYPE numeric;
ALTER TABLE batchdb.user_spend ALTER COLUMN spent_usd TYPE numeric, ALTER COLUMN reserved_usd TYPE numeric;

CREATE VIEW batchdb.job_progress WITH (security_invoker = true) AS
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
       j.n_duplicates,
       j.mode,
       j.deadline
  FROM batchdb.jobs j
  LEFT JOIN LATERAL (
        SELECT count(*) AS n_running
          FROM batchdb.requests q
         WHERE j.status IN ('running', 'paused', 'cancelled') AND q.job_id = j.id AND q.status = 'running'
  ) r ON true;

-- In the order 0005 granted them (sql/schema.sql lists them so).
GRANT SELECT ON batchdb.job_progress TO batchdb_user;
GRANT ALL ON batchdb.job_progress TO batchdb_admin;
GRANT SELECT ON batchdb.job_progress TO batchdb_worker;
