-- 0022_auto_mode: mode 'auto' with a deadline: batch where it can make the deadline, online where
-- it cannot, both quotas at once (issue 12).
--
-- An auto job's rows go to batches (at the batch price) while a batch created now would surely end
-- before the deadline; the online path (claim_batch, at the online price) takes them when it would
-- not. The rule, per job on its lane (provider, key alias, model):
--
--   window  = rate_limits.batch_window_seconds  (NULL: the provider's completion window, 24 h;
--                                                Gemini 48 h)
--   margin  = rate_limits.batch_margin_seconds  (NULL: window / 24, an hour of a 24 h window): the
--             time kept before the deadline to collect a batch, and for the online path to answer
--             what a late batch did not
--   cutoff  = deadline - window - margin        the last moment a batch may be created
--
--   batch  takes a due row while now < cutoff and the lane's batch queue is not full;
--   online takes a due row when now >= cutoff, or when the lane's batch queue is full and no
--          batch open on the lane is sure to end (created + window) before the cutoff: its room
--          would come too late for a batch made from it to end before the deadline.
--   An open batch of the job still running at deadline - margin is cancelled; its rows that never
--   ran go back to the queue unspent, where the online path takes them (the job is past its cutoff).
--
-- The batch queue is full when it has less room (batch_queue_tokens minus the tokens of the
-- lane's open batches) than one row takes on average in those batches; a lane without a configured
-- batch_queue_tokens is never full. A row is in at most one of an open chunk and an online claim:
-- both take it only while it is 'queued', and each bumps its lease token.

ALTER TABLE batchdb.jobs ADD COLUMN deadline timestamptz;
COMMENT ON COLUMN batchdb.jobs.deadline IS
    'mode auto: when every row must be answered; rows go through the Batch API while a batch can still end before it, online otherwise (0022).';
GRANT INSERT (deadline) ON batchdb.jobs TO batchdb_user;

ALTER TABLE batchdb.jobs DROP CONSTRAINT jobs_mode_valid,
    ADD CONSTRAINT jobs_mode_valid CHECK (mode IN ('online', 'batch', 'auto'));
COMMENT ON COLUMN batchdb.jobs.mode IS
    'online: one call per row, paced by the rate-limit ledger; batch: rows go in chunks through the provider''s Batch API (batchdb.provider_batches); auto: batch while a batch can end before the deadline, online for the rest (0022).';

ALTER TABLE batchdb.rate_limits ADD COLUMN batch_window_seconds double precision,
    ADD COLUMN batch_margin_seconds double precision,
    ADD CONSTRAINT rate_limits_batch_window_positive CHECK (batch_window_seconds IS NULL OR batch_window_seconds > 0),
    ADD CONSTRAINT rate_limits_batch_margin_nonnegative CHECK (batch_margin_seconds IS NULL OR batch_margin_seconds >= 0);
COMMENT ON COLUMN batchdb.rate_limits.batch_window_seconds IS
    'The longest a batch of this lane may take (its completion window); NULL: the provider''s (24 h; Gemini 48 h). Auto-mode jobs plan with it (0022).';
COMMENT ON COLUMN batchdb.rate_limits.batch_margin_seconds IS
    'Time an auto-mode job keeps before its deadline for collecting batches and answering online what they did not; NULL: window / 24 (0022).';

CREATE OR REPLACE FUNCTION batchdb.jobs_validate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.model IS NULL OR btrim(NEW.model) = '' THEN
        RAISE EXCEPTION 'batchdb.jobs.model: expected a model name such as ''gpt-4o-mini'', got %', coalesce(quote_literal(NEW.model), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.provider NOT IN ('openai', 'azure', 'gemini', 'instant') THEN
        RAISE EXCEPTION 'batchdb.jobs.provider: expected one of openai, azure, gemini, instant; got %', quote_literal(NEW.provider)
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.priority IS NULL OR NEW.priority < 1 THEN
        RAISE EXCEPTION 'batchdb.jobs.priority: expected an integer >= 1, got %', coalesce(NEW.priority::text, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.budget_usd IS NOT NULL AND NEW.budget_usd <= 0 THEN
        RAISE EXCEPTION 'batchdb.jobs.budget_usd: expected a positive amount in USD or NULL, got %', NEW.budget_usd
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.params IS NULL OR jsonb_typeof(NEW.params) <> 'object' THEN
        RAISE EXCEPTION 'batchdb.jobs.params: expected a JSON object, got %', coalesce(jsonb_typeof(NEW.params), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.mode IS NULL OR NEW.mode NOT IN ('online', 'batch', 'auto') THEN
        RAISE EXCEPTION 'batchdb.jobs.mode: expected online, batch or auto, got %', coalesce(quote_literal(NEW.mode), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.mode IN ('batch', 'auto') AND NEW.provider NOT IN ('openai', 'azure', 'gemini') THEN
        RAISE EXCEPTION 'batchdb.jobs.mode: % mode goes through the Batch APIs of openai, azure and gemini; provider % has none', NEW.mode, quote_literal(NEW.provider)
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.mode IN ('batch', 'auto') AND NEW.budget_usd IS NOT NULL THEN
        -- A batch is paid when it ends, a chunk at once: the per-call reservations budgets rely on do not apply.
        RAISE EXCEPTION 'batchdb.jobs.budget_usd: not supported with mode % yet', NEW.mode
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.mode = 'auto' AND NEW.deadline IS NULL THEN
        RAISE EXCEPTION 'batchdb.jobs.deadline: mode auto needs a deadline (a timestamptz in the future), got NULL'
            USING ERRCODE = 'check_violation';
    END IF;
    -- In the future when given: an old job's deadline may pass without its other columns becoming invalid.
    IF NEW.mode = 'auto' AND NEW.deadline <= now()
       AND (TG_OP = 'INSERT' OR NEW.deadline IS DISTINCT FROM OLD.deadline OR OLD.mode IS DISTINCT FROM 'auto') THEN
        RAISE EXCEPTION 'batchdb.jobs.deadline: expected a time in the future, got % (now is %)', NEW.deadline, now()
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
DROP TRIGGER jobs_validate ON batchdb.jobs;
CREATE TRIGGER jobs_validate BEFORE INSERT OR UPDATE OF model, provider, priority, budget_usd, params, mode, deadline
    ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_validate();

-- The lane's batch window and margin in seconds, defaults filled in.
CREATE FUNCTION batchdb.batch_window(p_provider text, p_key_alias text, p_model text)
    RETURNS TABLE (window_s double precision, margin_s double precision)
LANGUAGE sql STABLE AS $$
    SELECT w.s, coalesce(l.batch_margin_seconds, w.s / 24)
      FROM (SELECT 1) one
      LEFT JOIN batchdb.rate_limits l ON l.provider = p_provider AND l.key_alias = p_key_alias AND l.model = p_model
     CROSS JOIN LATERAL (SELECT coalesce(l.batch_window_seconds,
                                         CASE WHEN p_provider = 'gemini' THEN 172800.0 ELSE 86400.0 END) AS s) w
$$;

-- An auto job's two moments: the last at which a batch may be created, and the one at which its
-- open batches are cancelled (0022's rule, at the top of this file).
CREATE FUNCTION batchdb.auto_times(p_provider text, p_key_alias text, p_model text, p_deadline timestamptz)
    RETURNS TABLE (batch_cutoff timestamptz, cancel_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT p_deadline - make_interval(secs => w.window_s + w.margin_s), p_deadline - make_interval(secs => w.margin_s)
      FROM batchdb.batch_window(p_provider, p_key_alias, p_model) w
$$;

-- The lane's batch queue has less room than one row of its open batches takes on average.
CREATE FUNCTION batchdb.batch_queue_full(p_provider text, p_key_alias text, p_model text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(l.batch_queue_tokens - sum(b.enqueued_tokens)
                    < sum(b.enqueued_tokens)::double precision / nullif(sum(b.n_requests), 0), false)
      FROM batchdb.rate_limits l
      JOIN batchdb.provider_batches b ON b.provider = l.provider AND b.key_alias = l.key_alias AND b.model = l.model
       AND (b.state IN ('submitted', 'in_progress') OR (b.state = 'file_uploaded' AND b.create_started_at IS NOT NULL))
     WHERE l.provider = p_provider AND l.key_alias = p_key_alias AND l.model = p_model
       AND l.batch_queue_tokens IS NOT NULL
     GROUP BY l.batch_queue_tokens
$$;

-- Whether the online path may take an auto job's rows now (the rule at the top of this file).
CREATE FUNCTION batchdb.auto_goes_online(p_provider text, p_key_alias text, p_model text, p_deadline timestamptz)
    RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    t record;
    w record;
BEGIN
    SELECT * INTO t FROM batchdb.auto_times(p_provider, p_key_alias, p_model, p_deadline);
    IF now() >= t.batch_cutoff THEN
        RETURN true;
    END IF;
    IF NOT coalesce(batchdb.batch_queue_full(p_provider, p_key_alias, p_model), false) THEN
        RETURN false;
    END IF;
    SELECT * INTO w FROM batchdb.batch_window(p_provider, p_key_alias, p_model);
    -- Full: the rows may wait for room only if some open batch surely ends before the cutoff.
    RETURN NOT EXISTS (
        SELECT 1 FROM batchdb.provider_batches b
         WHERE b.provider = p_provider AND b.key_alias = p_key_alias AND b.model = p_model
           AND (b.state IN ('submitted', 'in_progress') OR (b.state = 'file_uploaded' AND b.create_started_at IS NOT NULL))
           AND coalesce(b.submitted_at, b.create_started_at) + make_interval(secs => w.window_s) <= t.batch_cutoff);
END;
$$;

-- Where an auto job's rows go now, for `batchdb status` and the driver: 'batch' or 'online'.
CREATE FUNCTION batchdb.auto_lane(p_job_id bigint) RETURNS TABLE (
    lane text, batch_cutoff timestamptz, cancel_at timestamptz, past_cutoff boolean, past_cancel boolean)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN batchdb.auto_goes_online(j.provider, j.key_alias, j.model, j.deadline) THEN 'online' ELSE 'batch' END,
           t.batch_cutoff, t.cancel_at, now() >= t.batch_cutoff, now() >= t.cancel_at
      FROM batchdb.jobs j
     CROSS JOIN LATERAL batchdb.auto_times(j.provider, j.key_alias, j.model, j.deadline) t
     WHERE j.id = p_job_id AND j.mode = 'auto'
$$;

GRANT EXECUTE ON FUNCTION batchdb.batch_window(text, text, text), batchdb.auto_times(text, text, text, timestamptz),
    batchdb.batch_queue_full(text, text, text), batchdb.auto_goes_online(text, text, text, timestamptz),
    batchdb.auto_lane(bigint) TO batchdb_user, batchdb_worker, batchdb_admin;

-- Batch chunks now take auto jobs' rows too, while a batch can make the job's deadline and the
-- lane's queue has room (rows do not wait in a chunk for room: the online path may take them).
CREATE OR REPLACE FUNCTION batchdb.form_provider_batch(p_provider text, p_key_aliases text[], p_max_rows integer)
    RETURNS TABLE (chunk_id bigint, chunk_job_id bigint, chunk_rows integer)
LANGUAGE plpgsql AS $$
DECLARE
    j record;
    chunk bigint;
    n integer;
BEGIN
    FOR j IN
        SELECT jb.id, jb.provider, jb.key_alias, jb.model, jb.mode, jb.deadline
          FROM batchdb.jobs jb
         WHERE jb.status = 'running' AND jb.mode IN ('batch', 'auto') AND jb.n_done < jb.n_total
           AND jb.provider = p_provider AND (p_key_aliases IS NULL OR jb.key_alias = ANY (p_key_aliases))
           AND EXISTS (SELECT 1 FROM batchdb.requests q
                        WHERE q.job_id = jb.id AND q.status = 'queued' AND q.run_after <= now())
           AND NOT EXISTS (SELECT 1 FROM batchdb.provider_batches b
                            WHERE b.job_id = jb.id AND b.state IN ('planned', 'file_uploaded'))
         ORDER BY jb.priority DESC, jb.id
    LOOP
        IF j.mode = 'auto' THEN
            CONTINUE WHEN (SELECT now() >= t.batch_cutoff
                             FROM batchdb.auto_times(j.provider, j.key_alias, j.model, j.deadline) t);
            CONTINUE WHEN coalesce(batchdb.batch_queue_full(j.provider, j.key_alias, j.model), false);
        END IF;
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtextextended('batchdb.provider_batch.' || j.id, 0));
        -- Seen again under the lock: another worker may have formed one since the scan.
        CONTINUE WHEN EXISTS (SELECT 1 FROM batchdb.provider_batches b
                               WHERE b.job_id = j.id AND b.state IN ('planned', 'file_uploaded'));
        INSERT INTO batchdb.provider_batches AS b (job_id, provider, key_alias, model)
        VALUES (j.id, j.provider, j.key_alias, j.model)
        RETURNING b.id INTO chunk;
        WITH picked AS (
            SELECT q.job_id, q.id
              FROM batchdb.requests q
             WHERE q.job_id = j.id AND q.status = 'queued' AND q.run_after <= now()
             ORDER BY q.run_after, q.id
             LIMIT p_max_rows
               FOR UPDATE SKIP LOCKED
        )
        UPDATE batchdb.requests q
           SET status = 'running',
               attempts = q.attempts + 1,
               lease_token = q.lease_token + 1,
               lease_owner = 'batch ' || chunk,
               lease_expires_at = NULL,
               started_at = now(),
               batch_id = chunk
          FROM picked p
         WHERE q.job_id = p.job_id AND q.id = p.id;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 THEN
            DELETE FROM batchdb.provider_batches b WHERE b.id = chunk;
            CONTINUE;
        END IF;
        UPDATE batchdb.provider_batches b SET n_requests = n WHERE b.id = chunk;
        chunk_id := chunk;
        chunk_job_id := j.id;
        chunk_rows := n;
        RETURN NEXT;
        RETURN;
    END LOOP;
END;
$$;

-- The deadline joins the job's progress.
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
       j.n_duplicates,
       j.mode,
       j.deadline
  FROM batchdb.jobs j
  LEFT JOIN LATERAL (
        SELECT count(*) AS n_running
          FROM batchdb.requests q
         WHERE j.status IN ('running', 'paused', 'cancelled') AND q.job_id = j.id AND q.status = 'running'
  ) r ON true;
