-- 0012_event_names: one event vocabulary everywhere.
--
-- The NOTIFY batchdb_events payload named events 'job_' || status, so a job that
-- completed with dead rows was `job_completed` in `batchdb watch` while its
-- webhook said `job.failed`. The payload's `event` is now the webhook's name
-- (batchdb.notification_event: job.completed, job.failed, job.cancelled,
-- job.paused, job.budget_paused, job.quota_exhausted, ...) and, for the
-- statuses no notification is sent for, 'job.' || status (job.running,
-- job.loading). The rest of the payload is unchanged.

CREATE OR REPLACE FUNCTION batchdb.jobs_notify_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batchdb_events', json_build_object(
        'event', coalesce(batchdb.notification_event(NEW.status, NEW.status_reason, NEW.n_failed, NEW.n_dead),
                          'job.' || NEW.status),
        'job_id', NEW.id,
        'name', NEW.name,
        'owner', NEW.owner,
        'status', NEW.status,
        'previous_status', OLD.status,
        'reason', NEW.status_reason,
        'n_total', NEW.n_total,
        'n_succeeded', NEW.n_succeeded,
        'n_failed', NEW.n_failed,
        'n_dead', NEW.n_dead,
        'cost_usd', NEW.cost_usd
    )::text);
    RETURN NULL;
END;
$$;
