-- 0007_circuit_breaker: one circuit per lane (provider, key alias, model), shared by every worker.
--
-- When a provider endpoint is down or wrong (sustained connection errors, timeouts
-- or 5xx; a 404 on the route; a DNS failure), calling it row after row only burns
-- the rows' attempts: they go `dead` and the job reads `completed`. A worker that
-- sees that opens the lane's circuit here. While it is open:
--   - claim_batch skips the lane's jobs, and rows a worker already holds go back
--     to the queue without spending an attempt;
--   - the lane's running jobs say `waiting: provider unavailable since T (last
--     error ...)` in status_reason, and each fires `job.provider_unavailable` once
--     per outage through the notification outbox (0004);
--   - one worker at a time (probe_owner, under a lease) sends one real row as a
--     probe when next_probe_at comes; the wait doubles after each failed probe, up
--     to the worker's cap. A probe (or any call) that succeeds closes the circuit,
--     clears the reasons and wakes the claimers.
-- workers/breaker.py is the only writer; docs/design.md ("Circuit breaker") has the why.

CREATE TABLE batchdb.circuits (
    provider          text NOT NULL,
    key_alias         text NOT NULL,
    model             text NOT NULL,
    state             text NOT NULL DEFAULT 'closed',
    opened_at         timestamptz,
    closed_at         timestamptz,
    -- The error that opened the circuit, then that of the last failed probe (never a key).
    last_error        text,
    -- Probes failed since the circuit opened: the next wait is base * 2^probes_failed, capped.
    probes_failed     integer NOT NULL DEFAULT 0,
    next_probe_at     timestamptz,
    -- The worker sending the probe now, until probe_expires_at (a killed prober's probe lapses).
    probe_owner       text,
    probe_expires_at  timestamptz,
    n_opened          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, key_alias, model),
    CONSTRAINT circuits_state_valid CHECK (state IN ('closed', 'open'))
);

GRANT SELECT ON batchdb.circuits TO batchdb_user;
GRANT ALL ON batchdb.circuits TO batchdb_admin;
GRANT SELECT, INSERT, UPDATE ON batchdb.circuits TO batchdb_worker;

-- The text a waiting job shows; the prefix is what the notification trigger and the
-- closing statement recognise.
CREATE FUNCTION batchdb.circuit_wait_reason(p_opened_at timestamptz, p_error text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT 'waiting: provider unavailable since '
           || to_char(p_opened_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"Z"')
           || ' (last error: ' || coalesce(p_error, 'unknown') || ')'
$$;

-- Running jobs of the lane show the circuit's state in their reason. Setting a reason
-- that was not a waiting one fires job.provider_unavailable (trigger below); updating
-- the last error of a job already waiting does not fire it again.
CREATE FUNCTION batchdb.circuit_mark_jobs(p_provider text, p_key_alias text, p_model text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    reason text;
    n integer;
BEGIN
    SELECT batchdb.circuit_wait_reason(c.opened_at, c.last_error) INTO reason
      FROM batchdb.circuits c
     WHERE c.provider = p_provider AND c.key_alias = p_key_alias AND c.model = p_model AND c.state = 'open';
    IF reason IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE batchdb.jobs j
       SET status_reason = reason
     WHERE j.provider = p_provider AND j.key_alias = p_key_alias AND j.model = p_model
       AND j.status = 'running' AND j.status_reason IS DISTINCT FROM reason;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

-- Open the lane's circuit (a no-op but for last_error when it is open already).
-- Returns whether this call opened it, and when the first probe is due.
CREATE FUNCTION batchdb.circuit_open(p_provider text, p_key_alias text, p_model text, p_error text,
                                     p_first_probe_s double precision)
RETURNS TABLE (opened boolean, opened_at timestamptz, next_probe_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    c batchdb.circuits;
    was_open boolean;
BEGIN
    INSERT INTO batchdb.circuits AS k (provider, key_alias, model)
    VALUES (p_provider, p_key_alias, p_model)
    ON CONFLICT (provider, key_alias, model) DO NOTHING;
    SELECT * INTO c FROM batchdb.circuits k
     WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model
       FOR UPDATE;
    was_open := c.state = 'open';
    IF was_open THEN
        UPDATE batchdb.circuits k SET last_error = p_error
         WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model
        RETURNING * INTO c;
    ELSE
        UPDATE batchdb.circuits k
           SET state = 'open', opened_at = now(), closed_at = NULL, last_error = p_error, probes_failed = 0,
               next_probe_at = now() + make_interval(secs => p_first_probe_s),
               probe_owner = NULL, probe_expires_at = NULL, n_opened = k.n_opened + 1
         WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model
        RETURNING * INTO c;
        PERFORM batchdb.circuit_mark_jobs(p_provider, p_key_alias, p_model);
    END IF;
    RETURN QUERY SELECT NOT was_open, c.opened_at, c.next_probe_at;
END;
$$;

-- The probe failed: wait twice as long (capped) before the next one, and let any worker send it.
CREATE FUNCTION batchdb.circuit_probe_failed(p_provider text, p_key_alias text, p_model text, p_error text,
                                             p_base_s double precision, p_max_s double precision)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    due timestamptz;
BEGIN
    UPDATE batchdb.circuits k
       SET probes_failed = k.probes_failed + 1, last_error = p_error,
           next_probe_at = now() + make_interval(secs => least(p_max_s, p_base_s * power(2, least(k.probes_failed + 1, 30)))),
           probe_owner = NULL, probe_expires_at = NULL
     WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model AND k.state = 'open'
    RETURNING k.next_probe_at INTO due;
    PERFORM batchdb.circuit_mark_jobs(p_provider, p_key_alias, p_model);
    RETURN due;
END;
$$;

-- A call on the lane succeeded: close the circuit, clear the waiting reasons, wake the claimers.
-- Returns how long it was open (NULL when it was not open).
CREATE FUNCTION batchdb.circuit_close(p_provider text, p_key_alias text, p_model text) RETURNS interval
LANGUAGE plpgsql AS $$
DECLARE
    since timestamptz;
BEGIN
    UPDATE batchdb.circuits k
       SET state = 'closed', closed_at = now(), probe_owner = NULL, probe_expires_at = NULL, next_probe_at = NULL
     WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model AND k.state = 'open'
    RETURNING k.opened_at INTO since;
    IF since IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE batchdb.jobs j
       SET status_reason = NULL
     WHERE j.provider = p_provider AND j.key_alias = p_key_alias AND j.model = p_model
       AND j.status IN ('running', 'completed') AND j.status_reason LIKE 'waiting: provider unavailable%';
    PERFORM pg_notify('batchdb_requests', '');
    RETURN now() - since;
END;
$$;

GRANT EXECUTE ON FUNCTION batchdb.circuit_wait_reason(timestamptz, text),
    batchdb.circuit_mark_jobs(text, text, text),
    batchdb.circuit_open(text, text, text, text, double precision),
    batchdb.circuit_probe_failed(text, text, text, text, double precision, double precision),
    batchdb.circuit_close(text, text, text) TO batchdb_worker, batchdb_admin;

-- Restated in full from 0004 with one event added: a running job whose reason becomes
-- 'waiting: provider unavailable ...' is job.provider_unavailable.
CREATE OR REPLACE FUNCTION batchdb.notification_event(p_status text, p_reason text, p_failed bigint, p_dead bigint)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_status = 'completed' AND coalesce(p_failed, 0) + coalesce(p_dead, 0) = 0 THEN 'job.completed'
        WHEN p_status = 'completed' THEN 'job.failed'
        WHEN p_status = 'cancelled' THEN 'job.cancelled'
        WHEN p_status = 'paused' AND p_reason ILIKE 'budget%' THEN 'job.budget_paused'
        WHEN p_status = 'paused' AND p_reason ILIKE '%quota%' THEN 'job.quota_exhausted'
        WHEN p_status = 'paused' THEN 'job.paused'
        WHEN p_status = 'running' AND p_reason LIKE 'waiting: provider unavailable%' THEN 'job.provider_unavailable'
    END
$$;

-- Once per outage per job: only when the reason turns into a waiting one.
CREATE CONSTRAINT TRIGGER jobs_enqueue_provider_unavailable AFTER UPDATE OF status_reason ON batchdb.jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.status = 'running' AND NEW.status_reason LIKE 'waiting: provider unavailable%'
          AND (OLD.status_reason IS NULL OR OLD.status_reason NOT LIKE 'waiting: provider unavailable%'))
    EXECUTE FUNCTION batchdb.jobs_enqueue_notifications();
