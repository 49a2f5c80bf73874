-- 0013_waiting_events_and_abandoned_budget: `batchdb watch` hears a job start and stop
-- waiting for its provider; a killed worker's budget reservations are given back.
--
-- Waiting events.
--
-- A job whose lane's circuit opens stays 'running' with status_reason 'waiting:
-- provider unavailable since T (last error ...)' (0007). NOTIFY batchdb_events fired
-- only on a change of status, so `batchdb watch` and `job.wait()` never heard it,
-- while the webhook said job.provider_unavailable. Now a running job's reason turning
-- into a waiting one, or back, is an event on the channel too: job.provider_unavailable
-- when it starts waiting, job.running (reason NULL) when its provider is back. Updates
-- of the reason that keep it waiting (a probe's new last error) stay quiet.

CREATE TRIGGER jobs_notify_waiting AFTER UPDATE OF status_reason ON batchdb.jobs
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status = 'running'
          AND coalesce(OLD.status_reason LIKE 'waiting: provider unavailable%', false)
              IS DISTINCT FROM coalesce(NEW.status_reason LIKE 'waiting: provider unavailable%', false))
    EXECUTE FUNCTION batchdb.jobs_notify_status();

-- ---------------------------------------------------------------------------
-- Abandoned budget reservations.
--
-- A worker reserves each call's worst-case cost before sending it (0010) and settles
-- it once the outcome is recorded or the row handed back. A worker killed in between
-- (SIGKILL, OOM, a lost machine) never settles: its rows are reclaimed when their
-- lease runs out, but the reservations stayed in jobs.reserved_usd and the owner's
-- user_spend.reserved_usd for ever, so every crash ate into the budget until the job
-- or the user paused with money left.
--
-- A reservation is abandoned when its row is no longer running under the lease that
-- made it and it is older than `p_older_than_s` (a live worker settles within
-- seconds; the margin keeps the sweep from racing its settler). It is settled as if
-- the call cost its whole reservation: the killed worker may have sent it, and the
-- provider charges for a call whether or not anyone reads the answer, so a budget
-- must count it (the worst case, never more than was reserved).
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.settle_abandoned_budget(p_older_than_s double precision, p_limit integer DEFAULT 10000)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    calls record;
BEGIN
    SELECT array_agg(a.job_id) AS job_ids, array_agg(a.request_id) AS request_ids,
           array_agg(a.lease_token) AS lease_tokens, array_agg(a.usd) AS usds
      INTO calls
      FROM (SELECT b.job_id, b.request_id, b.lease_token, sum(b.usd) AS usd
              FROM batchdb.budget_reservations b
             WHERE b.created_at < now() - make_interval(secs => p_older_than_s)
               AND NOT EXISTS (SELECT 1 FROM batchdb.requests q
                                WHERE q.job_id = b.job_id AND q.id = b.request_id
                                  AND q.lease_token = b.lease_token AND q.status = 'running')
             GROUP BY b.job_id, b.request_id, b.lease_token
             LIMIT p_limit) a;
    IF calls.job_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN batchdb.settle_budget(calls.job_ids, calls.request_ids, calls.lease_tokens, calls.usds);
END;
$$;

REVOKE EXECUTE ON FUNCTION batchdb.settle_abandoned_budget(double precision, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION batchdb.settle_abandoned_budget(double precision, integer) TO batchdb_worker, batchdb_admin;
