-- 0025_queue_depth: how much work waits, per lane, for autoscalers and alerts.
--
-- One row per lane (provider, key alias, model: the lane of the rate-limit ledger and the circuit
-- breaker) with an unfinished job (running or paused):
--   due_rows                rows a worker can take now: queued, due (run_after <= now()), of a
--                           running job whose lane's circuit is closed. Batch-mode rows count: a
--                           worker must be alive to send them in chunks.
--   oldest_due_age_seconds  how long the oldest of them has been due (database time); NULL with none
--   held_rows               queued and due, but not claimable: the job is paused, or the lane's
--                           circuit is open
--   scheduled_rows          queued, due later: retries waiting out their backoff, rows handed back by
--                           a waiting lane (duplicates waiting for their first row's answer are not
--                           counted: they are answered with it, never sent)
--   running_rows            leased to a worker now
--   dead_rows               rows of these jobs that ran out of attempts
--   jobs                    unfinished jobs on the lane
--   circuit_open            the lane's circuit is open (batchdb.circuits)
-- KEDA's query: SELECT coalesce(sum(due_rows), 0) FROM batchdb.queue_depth.
--
-- Cost: one probe per unfinished job of the claim's partial index (requests_claimable_idx, in the
-- job's own partition) for the queued counts and the oldest due row, and of requests_leased_idx
-- for the running ones; counting reads index entries only, never the rows (docs/design.md,
-- "Monitoring" has the EXPLAIN on a 5,000,000-row table). A lane's counts are read in one
-- statement, so they agree with each other at one instant.
--
-- The view runs as its owner, not as the reader (no security_invoker, unlike the views users
-- read): it shows counts per lane only, no job, owner, prompt or answer, and a monitoring role
-- must see every user's rows to count them. Readers: batchdb_admin, batchdb_worker (its
-- /metrics) and batchdb_monitor, a new group role with no other grant than this view, for
-- the KEDA scaler and SQL exporters:
--   CREATE ROLE keda LOGIN PASSWORD '...' IN ROLE batchdb_monitor;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'batchdb_monitor') THEN
        BEGIN
            CREATE ROLE batchdb_monitor NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database's migration created it a moment ago
        END;
    END IF;
END;
$$;

CREATE VIEW batchdb.queue_depth AS
WITH job_depth AS (
    SELECT j.provider, j.key_alias, j.model, j.status, j.n_dead,
           c.state = 'open' AS circuit_open,
           first_queued.run_after AS first_run_after,
           rr.running, later.scheduled,
           -- Queued and due: the job's unfinished rows (its exact counters) less those running and those
           -- due later. Counting the due rows themselves would read every one of them (1.2-2.3 s for
           -- 1,500,000 due rows); these read only the running and the later ones.
           greatest(j.n_total - j.n_done - rr.running - later.n_later, 0) AS due
      FROM batchdb.jobs j
      LEFT JOIN batchdb.circuits c ON c.provider = j.provider AND c.key_alias = j.key_alias AND c.model = j.model
      -- The claim's own probe: the first entry of the job's claimable index is its oldest queued row.
      LEFT JOIN LATERAL (
           SELECT q.run_after
             FROM batchdb.requests q
            WHERE q.job_id = j.id AND q.status = 'queued'
            ORDER BY q.run_after, q.id
            LIMIT 1
           ) first_queued ON true
     CROSS JOIN LATERAL (
           SELECT count(*) AS running FROM batchdb.requests q WHERE q.job_id = j.id AND q.status = 'running'
           ) rr
     CROSS JOIN LATERAL (
           -- Retries waiting out their backoff and rows a waiting lane handed back, and duplicates waiting
           -- for their first row's answer (run_after 'infinity', 0019): not due, never sent.
           SELECT count(*) AS n_later, count(*) FILTER (WHERE q.run_after < 'infinity') AS scheduled
             FROM batchdb.requests q
            WHERE q.job_id = j.id AND q.status = 'queued' AND q.run_after > now()
           ) later
     WHERE j.status IN ('running', 'paused') AND j.n_done < j.n_total
)
SELECT provider, key_alias, model,
       coalesce(sum(due) FILTER (WHERE status = 'running' AND NOT coalesce(circuit_open, false)), 0)::bigint
           AS due_rows,
       extract(epoch FROM now() - min(first_run_after) FILTER (WHERE status = 'running' AND due > 0
                                                                  AND NOT coalesce(circuit_open, false)))::float8
           AS oldest_due_age_seconds,
       coalesce(sum(due) FILTER (WHERE status = 'paused' OR coalesce(circuit_open, false)), 0)::bigint AS held_rows,
       sum(scheduled)::bigint AS scheduled_rows,
       sum(running)::bigint AS running_rows,
       sum(n_dead)::bigint AS dead_rows,
       count(*) AS jobs,
       coalesce(bool_or(circuit_open), false) AS circuit_open
  FROM job_depth
 GROUP BY provider, key_alias, model;

COMMENT ON VIEW batchdb.queue_depth IS
    'Per lane with an unfinished job: rows due now (due_rows: what autoscalers scale on), the age of the oldest, '
    'and rows held (paused job, open circuit), scheduled for later, running and dead (0025).';

GRANT USAGE ON SCHEMA batchdb TO batchdb_monitor;
GRANT SELECT ON batchdb.queue_depth TO batchdb_admin, batchdb_worker, batchdb_monitor;
