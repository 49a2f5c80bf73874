-- 0011_events_and_limit_history: one event vocabulary everywhere; the history of rate limits.
--
-- Events.
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

-- ---------------------------------------------------------------------------
-- rate_limit_history: every change of a lane's limits, so a chart over the past
-- hour draws the limit that applied at each minute, not today's value across it.
-- A row holds the limits in effect from `changed_at` until the lane's next row;
-- all-NULL limits after a delete. Lanes configured before this migration get one
-- row at the epoch: their current limits are all that is known of their past.
-- ---------------------------------------------------------------------------
CREATE TABLE batchdb.rate_limit_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider    text NOT NULL,
    key_alias   text NOT NULL,
    model       text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    rpm         integer,
    tpm         integer,
    rpd         integer,
    source      text
);

CREATE INDEX rate_limit_history_lane_idx ON batchdb.rate_limit_history (provider, key_alias, model, changed_at);

INSERT INTO batchdb.rate_limit_history (provider, key_alias, model, changed_at, rpm, tpm, rpd, source)
SELECT provider, key_alias, model, 'epoch', rpm, tpm, rpd, source FROM batchdb.rate_limits;

-- SECURITY DEFINER: workers learn limits from response headers without any right on the history.
CREATE FUNCTION batchdb.rate_limits_record_history() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO batchdb.rate_limit_history (provider, key_alias, model)
        VALUES (OLD.provider, OLD.key_alias, OLD.model);
    ELSE
        INSERT INTO batchdb.rate_limit_history (provider, key_alias, model, rpm, tpm, rpd, source)
        VALUES (NEW.provider, NEW.key_alias, NEW.model, NEW.rpm, NEW.tpm, NEW.rpd, NEW.source);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER rate_limits_history_insert AFTER INSERT ON batchdb.rate_limits
    FOR EACH ROW EXECUTE FUNCTION batchdb.rate_limits_record_history();
-- Only real changes of the limits: the ledger updates its buckets on every grant.
CREATE TRIGGER rate_limits_history_update AFTER UPDATE OF rpm, tpm, rpd ON batchdb.rate_limits
    FOR EACH ROW WHEN ((OLD.rpm, OLD.tpm, OLD.rpd) IS DISTINCT FROM (NEW.rpm, NEW.tpm, NEW.rpd))
    EXECUTE FUNCTION batchdb.rate_limits_record_history();
CREATE TRIGGER rate_limits_history_delete AFTER DELETE ON batchdb.rate_limits
    FOR EACH ROW EXECUTE FUNCTION batchdb.rate_limits_record_history();

GRANT SELECT ON batchdb.rate_limit_history TO batchdb_user, batchdb_worker;
GRANT ALL ON batchdb.rate_limit_history TO batchdb_admin;
