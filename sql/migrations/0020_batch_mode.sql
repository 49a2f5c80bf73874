-- 0020_batch_mode: jobs sent through the providers' Batch APIs (about half the price, a quota of
-- their own, answered within a completion window of 24 h).
--
-- A job's `mode` says how its rows are sent: 'online' (one call per row, paced by the ledger:
-- everything before this migration) or 'batch'. Online claims never take a batch job's rows;
-- workers/batch_driver.py gathers them into chunks instead, one row of batchdb.provider_batches
-- per chunk, and drives each chunk through the provider:
--
--   planned -> file_uploaded -> submitted -> in_progress -> completed | failed | expired | cancelled -> collected
--
-- A row of a chunk is 'running' with requests.batch_id = the chunk and no lease expiry of its own
-- (reclaim_expired leaves it alone: the chunk holds it for as long as its batch may take); its
-- lease_token, bumped when the chunk took it, fences the completion as on the online path. A row
-- belongs to at most one open chunk: it is taken only while 'queued'.
--
-- Every provider call is preceded by a record of the intent (upload_started_at,
-- create_started_at) and followed by a record of its result (input_file_id, batch_id), each
-- fenced by the chunk's own lease token, so a worker killed between the two is succeeded by one
-- that looks the file or batch up (by the chunk's uid in the file name and in the batch's
-- metadata) before making another: no chunk ever gets a second batch. See docs/design.md.
--
-- The enqueued-token queue (OpenAI's per-model batch queue limit, Azure's enqueued-token quota)
-- is a lane capacity: rate_limits.batch_queue_tokens is the configured limit, and the tokens a
-- lane holds are the estimates of its chunks whose batch is being created or is open (taken when
-- the create is about to be sent, returned when the batch ends); batchdb.batch_queues shows both.

SELECT batchdb.require_lock_capacity_for_requests();

ALTER TABLE batchdb.jobs ADD COLUMN mode text NOT NULL DEFAULT 'online',
    ADD CONSTRAINT jobs_mode_valid CHECK (mode IN ('online', 'batch'));
COMMENT ON COLUMN batchdb.jobs.mode IS
    'online: one call per row, paced by the rate-limit ledger; batch: rows go in chunks through the provider''s Batch API (batchdb.provider_batches).';
GRANT INSERT (mode) ON batchdb.jobs TO batchdb_user;

-- The mode is checked with the job, with a message saying what is allowed (as the SDK does).
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
    IF NEW.mode IS NULL OR NEW.mode NOT IN ('online', 'batch') THEN
        RAISE EXCEPTION 'batchdb.jobs.mode: expected online or batch, got %', coalesce(quote_literal(NEW.mode), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.mode = 'batch' AND NEW.provider NOT IN ('openai', 'azure', 'gemini') THEN
        RAISE EXCEPTION 'batchdb.jobs.mode: batch mode goes through the Batch APIs of openai, azure and gemini; provider % has none', quote_literal(NEW.provider)
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.mode = 'batch' AND NEW.budget_usd IS NOT NULL THEN
        -- A batch is paid when it ends, a chunk at once: the per-call reservations budgets rely on do not apply.
        RAISE EXCEPTION 'batchdb.jobs.budget_usd: not supported with mode batch yet'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
DROP TRIGGER jobs_validate ON batchdb.jobs;
CREATE TRIGGER jobs_validate BEFORE INSERT OR UPDATE OF model, provider, priority, budget_usd, params, mode
    ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_validate();

ALTER TABLE batchdb.rate_limits ADD COLUMN batch_queue_tokens bigint,
    ADD CONSTRAINT rate_limits_batch_queue_positive CHECK (batch_queue_tokens IS NULL OR batch_queue_tokens > 0);
COMMENT ON COLUMN batchdb.rate_limits.batch_queue_tokens IS
    'Prompt tokens the lane may have enqueued in open batches at once (the provider''s batch queue limit); NULL: no limit known.';

CREATE TABLE batchdb.provider_batches (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Names the chunk at the provider (file name, batch metadata): unique across databases sharing a key.
    uid               uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    job_id            bigint NOT NULL REFERENCES batchdb.jobs (id) ON DELETE CASCADE,
    provider          text NOT NULL,
    key_alias         text NOT NULL,
    model             text NOT NULL,
    state             text NOT NULL DEFAULT 'planned',
    provider_status   text,           -- the provider's own word: validating, in_progress, finalizing, cancelling ...
    n_requests        integer NOT NULL DEFAULT 0,
    input_bytes       bigint,
    enqueued_tokens   bigint NOT NULL DEFAULT 0,   -- prompt tokens of the file, counted as the provider does
    input_file_id     text,
    batch_id          text,
    output_file_id    text,
    error_file_id     text,
    create_try        integer NOT NULL DEFAULT 1,  -- bumped when the provider refuses a batch for its queue limit
    n_completed       integer,        -- the provider's request counts
    n_failed          integer,
    upload_started_at timestamptz,
    uploaded_at       timestamptz,
    create_started_at timestamptz,
    submitted_at      timestamptz,
    ended_at          timestamptz,
    collected_at      timestamptz,
    last_error        text,
    next_check_at     timestamptz NOT NULL DEFAULT now(),
    lease_owner       text,
    lease_expires_at  timestamptz,
    lease_token       bigint NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT provider_batches_state_valid CHECK (state IN ('planned', 'file_uploaded', 'submitted', 'in_progress',
                                                             'completed', 'failed', 'expired', 'cancelled',
                                                             'collected'))
);
COMMENT ON TABLE batchdb.provider_batches IS
    'One chunk of a batch-mode job: its rows (requests.batch_id), its file and batch at the provider, and where it is in its life.';

CREATE INDEX provider_batches_due_idx ON batchdb.provider_batches (next_check_at) WHERE state <> 'collected';
CREATE INDEX provider_batches_job_idx ON batchdb.provider_batches (job_id);
CREATE INDEX provider_batches_lane_idx ON batchdb.provider_batches (provider, key_alias, model)
    WHERE state IN ('file_uploaded', 'submitted', 'in_progress');

ALTER TABLE batchdb.requests ADD COLUMN batch_id bigint;
COMMENT ON COLUMN batchdb.requests.batch_id IS
    'Set by batchdb: the chunk (batchdb.provider_batches) that sent this row last (batch-mode jobs).';
-- Only batch rows are indexed: online rows never carry a batch_id, so their updates never touch it.
CREATE INDEX requests_batch_idx ON batchdb.requests (batch_id) WHERE batch_id IS NOT NULL;

ALTER TABLE batchdb.provider_batches ENABLE ROW LEVEL SECURITY;
CREATE POLICY provider_batches_own ON batchdb.provider_batches TO batchdb_user
    USING (EXISTS (SELECT 1 FROM batchdb.jobs j WHERE j.id = provider_batches.job_id AND j.owner = current_user));
CREATE POLICY provider_batches_all ON batchdb.provider_batches TO batchdb_admin, batchdb_worker
    USING (true) WITH CHECK (true);
GRANT SELECT ON batchdb.provider_batches TO batchdb_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON batchdb.provider_batches TO batchdb_worker, batchdb_admin;

-- Per lane: the configured queue limit and the tokens held by chunks whose batch is being created
-- or is open.
CREATE VIEW batchdb.batch_queues WITH (security_invoker = true) AS
SELECT b.provider, b.key_alias, b.model,
       l.batch_queue_tokens,
       sum(b.enqueued_tokens) AS enqueued_tokens,
       count(*) AS open_batches
  FROM batchdb.provider_batches b
  LEFT JOIN batchdb.rate_limits l ON l.provider = b.provider AND l.key_alias = b.key_alias AND l.model = b.model
 WHERE b.state IN ('submitted', 'in_progress') OR (b.state = 'file_uploaded' AND b.create_started_at IS NOT NULL)
 GROUP BY b.provider, b.key_alias, b.model, l.batch_queue_tokens;
GRANT SELECT ON batchdb.batch_queues TO batchdb_user, batchdb_worker, batchdb_admin;

-- Take up to p_max_rows due rows of one running batch-mode job of p_provider under one of
-- p_key_aliases (NULL: any) into a new chunk. A job gets a new chunk only while none of its chunks waits to be created, so rows
-- wait in the queue, not in chunks, while the lane's batch queue is full. Two workers never form
-- chunks of one job at once (an advisory lock per job). Returns the chunk, or nothing.
CREATE FUNCTION batchdb.form_provider_batch(p_provider text, p_key_aliases text[], p_max_rows integer)
    RETURNS TABLE (chunk_id bigint, chunk_job_id bigint, chunk_rows integer)
LANGUAGE plpgsql AS $$
DECLARE
    j record;
    chunk bigint;
    n integer;
BEGIN
    FOR j IN
        SELECT jb.id, jb.provider, jb.key_alias, jb.model
          FROM batchdb.jobs jb
         WHERE jb.status = 'running' AND jb.mode = 'batch' AND jb.n_done < jb.n_total
           AND jb.provider = p_provider AND (p_key_aliases IS NULL OR jb.key_alias = ANY (p_key_aliases))
           AND EXISTS (SELECT 1 FROM batchdb.requests q
                        WHERE q.job_id = jb.id AND q.status = 'queued' AND q.run_after <= now())
           AND NOT EXISTS (SELECT 1 FROM batchdb.provider_batches b
                            WHERE b.job_id = jb.id AND b.state IN ('planned', 'file_uploaded'))
         ORDER BY jb.priority DESC, jb.id
    LOOP
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
REVOKE EXECUTE ON FUNCTION batchdb.form_provider_batch(text, text[], integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION batchdb.form_provider_batch(text, text[], integer) TO batchdb_worker, batchdb_admin;

-- Take the lane's batch queue room for a chunk whose batch is about to be created: 'ok' (taken
-- now: create_started_at is set, the intent recorded), 'resumed' (taken by an earlier try, which
-- may have created the batch: look it up before creating one), 'wait' (the lane's queue is full),
-- or 'lost' (the chunk is no longer this lease's). Serialised per lane by an advisory lock. A
-- chunk alone in an empty queue always goes (the provider has the last word), so a limit lowered
-- below a chunk's size cannot hold it forever.
CREATE FUNCTION batchdb.provider_batch_reserve(p_id bigint, p_lease_token bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    c batchdb.provider_batches;
    queue_limit bigint;
    used bigint;
BEGIN
    SELECT * INTO c FROM batchdb.provider_batches b
     WHERE b.id = p_id AND b.lease_token = p_lease_token AND b.state = 'file_uploaded'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    IF c.create_started_at IS NOT NULL THEN
        RETURN 'resumed';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('batchdb.batch_queue.' || c.provider || '/' || c.key_alias
                                                   || '/' || c.model, 0));
    SELECT l.batch_queue_tokens INTO queue_limit FROM batchdb.rate_limits l
     WHERE l.provider = c.provider AND l.key_alias = c.key_alias AND l.model = c.model;
    IF queue_limit IS NOT NULL THEN
        SELECT coalesce(sum(b.enqueued_tokens), 0) INTO used FROM batchdb.provider_batches b
         WHERE b.provider = c.provider AND b.key_alias = c.key_alias AND b.model = c.model AND b.id <> c.id
           AND (b.state IN ('submitted', 'in_progress') OR (b.state = 'file_uploaded' AND b.create_started_at IS NOT NULL));
        IF used > 0 AND used + c.enqueued_tokens > queue_limit THEN
            RETURN 'wait';
        END IF;
    END IF;
    UPDATE batchdb.provider_batches b SET create_started_at = now() WHERE b.id = c.id;
    RETURN 'ok';
END;
$$;
REVOKE EXECUTE ON FUNCTION batchdb.provider_batch_reserve(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION batchdb.provider_batch_reserve(bigint, bigint) TO batchdb_worker, batchdb_admin;

-- The mode joins the job's progress.
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
       j.mode
  FROM batchdb.jobs j
  LEFT JOIN LATERAL (
        SELECT count(*) AS n_running
          FROM batchdb.requests q
         WHERE j.status IN ('running', 'paused', 'cancelled') AND q.job_id = j.id AND q.status = 'running'
  ) r ON true;
