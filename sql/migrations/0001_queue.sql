-- 0001_queue: jobs, requests (one LIST partition per job), results, workers,
-- prices and rate-limit tables; the triggers that keep job counters exact and
-- that turn plain SQL INSERTs into a first-class way in.
--
-- This file is the contract documented in docs/sql.md. Change it only by adding
-- a new numbered migration.

CREATE SCHEMA IF NOT EXISTS batchdb;

-- ---------------------------------------------------------------------------
-- jobs: one batch of requests.
-- ---------------------------------------------------------------------------
CREATE TABLE batchdb.jobs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              text,
    owner             text NOT NULL DEFAULT current_user,
    provider          text NOT NULL DEFAULT 'openai',
    model             text NOT NULL,
    -- Request defaults merged under each row's payload: system, prompt template,
    -- temperature, max_tokens, response_format, seed ...
    params            jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Weight in the fair claim: a priority-2 job gets twice the claims of a priority-1 job.
    priority          integer NOT NULL DEFAULT 1,
    status            text NOT NULL DEFAULT 'running',
    status_reason     text,
    max_attempts      integer NOT NULL DEFAULT 5,
    budget_usd        numeric(14, 6),
    idempotency_key   text UNIQUE,
    -- Counters, maintained by statement triggers on batchdb.requests; never written by hand.
    n_total           bigint NOT NULL DEFAULT 0,
    n_succeeded       bigint NOT NULL DEFAULT 0,
    n_failed          bigint NOT NULL DEFAULT 0,
    n_dead            bigint NOT NULL DEFAULT 0,
    n_cancelled       bigint NOT NULL DEFAULT 0,
    n_done            bigint GENERATED ALWAYS AS (n_succeeded + n_failed + n_dead + n_cancelled) STORED,
    n_retries         bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost_usd          numeric(18, 8) NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    CONSTRAINT jobs_status_valid CHECK (status IN ('loading', 'running', 'paused', 'cancelled', 'completed')),
    CONSTRAINT jobs_priority_positive CHECK (priority >= 1),
    CONSTRAINT jobs_max_attempts_positive CHECK (max_attempts >= 1),
    CONSTRAINT jobs_budget_positive CHECK (budget_usd IS NULL OR budget_usd > 0),
    CONSTRAINT jobs_params_object CHECK (jsonb_typeof(params) = 'object'),
    CONSTRAINT jobs_model_not_blank CHECK (btrim(model) <> '')
);

CREATE INDEX jobs_active_idx ON batchdb.jobs (id) WHERE status = 'running';

-- ---------------------------------------------------------------------------
-- requests: one row per prompt; the queue itself. Partitioned by job so a
-- finished job's rows are never vacuumed again and purging a job is a DROP.
-- ---------------------------------------------------------------------------
CREATE SEQUENCE batchdb.requests_id_seq AS bigint;

CREATE TABLE batchdb.requests (
    job_id            bigint NOT NULL,
    id                bigint NOT NULL DEFAULT nextval('batchdb.requests_id_seq'),
    custom_id         text NOT NULL,
    -- The call: {"messages": [...]} or {"prompt": "..."}, plus per-row overrides
    -- (temperature, max_tokens ...). NULL when the job's params hold a prompt
    -- template that is formatted from "input".
    payload           jsonb,
    -- The caller's own columns for this row, returned with the results.
    input             jsonb,
    status            text NOT NULL DEFAULT 'queued',
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer,
    run_after         timestamptz NOT NULL DEFAULT now(),
    lease_owner       text,
    lease_expires_at  timestamptz,
    -- Fencing counter: bumped on every claim; a completion must present the
    -- current value, so a worker that lost its lease cannot record a result.
    lease_token       bigint NOT NULL DEFAULT 0,
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    cost_usd          numeric(18, 8) NOT NULL DEFAULT 0,
    error_class       text,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    latency_ms        integer,
    PRIMARY KEY (job_id, id),
    CONSTRAINT requests_custom_id_unique UNIQUE (job_id, custom_id),
    CONSTRAINT requests_status_valid CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled')),
    CONSTRAINT requests_attempts_nonnegative CHECK (attempts >= 0),
    CONSTRAINT requests_max_attempts_positive CHECK (max_attempts IS NULL OR max_attempts >= 1)
) PARTITION BY LIST (job_id);

-- The claim reads due rows of one job in (run_after, id) order; only queued rows are indexed.
CREATE INDEX requests_claimable_idx ON batchdb.requests (job_id, run_after, id) WHERE status = 'queued';
-- The lease reclaimer looks only at in-flight rows.
CREATE INDEX requests_leased_idx ON batchdb.requests (lease_expires_at) WHERE status = 'running';

-- Rows for a job id that has no partition land here and are refused with a clear message.
CREATE TABLE batchdb.requests_orphan PARTITION OF batchdb.requests DEFAULT;

-- ---------------------------------------------------------------------------
-- results: the provider's answer, kept out of the hot queue rows.
-- ---------------------------------------------------------------------------
CREATE TABLE batchdb.results (
    job_id        bigint NOT NULL,
    request_id    bigint NOT NULL,
    response_text text,
    response_json jsonb,
    finish_reason text,
    model         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, request_id)
) PARTITION BY LIST (job_id);

CREATE TABLE batchdb.results_orphan PARTITION OF batchdb.results DEFAULT;

-- ---------------------------------------------------------------------------
-- workers: liveness of worker processes (one row each, heartbeated).
-- ---------------------------------------------------------------------------
CREATE TABLE batchdb.workers (
    id             text PRIMARY KEY,
    hostname       text NOT NULL,
    pid            integer NOT NULL,
    concurrency    integer NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    stopped_at     timestamptz,
    in_flight      integer NOT NULL DEFAULT 0,
    n_completed    bigint NOT NULL DEFAULT 0
);

-- ---------------------------------------------------------------------------
-- prices: USD per 1M tokens. Every row's cost is computed from this table in
-- the statement that completes the row.
-- ---------------------------------------------------------------------------
CREATE TABLE batchdb.prices (
    provider            text NOT NULL,
    model               text NOT NULL,
    input_per_mtok      numeric(12, 6) NOT NULL,
    output_per_mtok     numeric(12, 6) NOT NULL,
    cached_input_per_mtok numeric(12, 6),
    batch_discount      numeric(4, 3),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model),
    CONSTRAINT prices_nonnegative CHECK (input_per_mtok >= 0 AND output_per_mtok >= 0)
);

-- List prices (USD per 1M tokens) as published for the standard tier; edit freely.
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount) VALUES
    ('openai', 'gpt-4o',           2.50, 10.00, 1.25,  0.5),
    ('openai', 'gpt-4o-mini',      0.15,  0.60, 0.075, 0.5),
    ('openai', 'gpt-4.1',          2.00,  8.00, 0.50,  0.5),
    ('openai', 'gpt-4.1-mini',     0.40,  1.60, 0.10,  0.5),
    ('openai', 'gpt-4.1-nano',     0.10,  0.40, 0.025, 0.5),
    ('openai', 'gpt-5',            1.25, 10.00, 0.125, 0.5),
    ('openai', 'gpt-5-mini',       0.25,  2.00, 0.025, 0.5),
    ('openai', 'gpt-5-nano',       0.05,  0.40, 0.005, 0.5),
    ('openai', 'o4-mini',          1.10,  4.40, 0.275, 0.5),
    ('azure',  'gpt-4o',           2.50, 10.00, 1.25,  0.5),
    ('azure',  'gpt-4o-mini',      0.15,  0.60, 0.075, 0.5),
    ('gemini', 'gemini-2.5-pro',   1.25, 10.00, 0.31,  0.5),
    ('gemini', 'gemini-2.5-flash', 0.30,  2.50, 0.075, 0.5),
    ('gemini', 'gemini-2.5-flash-lite', 0.10, 0.40, 0.025, 0.5),
    ('gemini', 'gemini-2.0-flash', 0.10,  0.40, 0.025, 0.5);

-- ---------------------------------------------------------------------------
-- Partition management: a job's partitions are created with the job and
-- dropped with it. CREATE + ATTACH takes only SHARE UPDATE EXCLUSIVE on the
-- parent, so creating a job never blocks workers' claims.
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.create_job_partitions(p_job_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    req text := 'requests_' || p_job_id;
    res text := 'results_' || p_job_id;
BEGIN
    EXECUTE format('CREATE TABLE batchdb.%I (LIKE batchdb.requests INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', req);
    -- Queue rows churn: vacuum this partition early so dead index entries at the
    -- head of the claimable index do not slow the claim.
    EXECUTE format('ALTER TABLE batchdb.%I SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 20000, '
                   'autovacuum_vacuum_insert_scale_factor = 0.0, autovacuum_vacuum_insert_threshold = 100000, '
                   'autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0, fillfactor = 90)', req);
    EXECUTE format('ALTER TABLE batchdb.%I ADD CONSTRAINT %I CHECK (job_id = %s)', req, req || '_job', p_job_id);
    EXECUTE format('ALTER TABLE batchdb.requests ATTACH PARTITION batchdb.%I FOR VALUES IN (%s)', req, p_job_id);
    EXECUTE format('CREATE TABLE batchdb.%I (LIKE batchdb.results INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', res);
    EXECUTE format('ALTER TABLE batchdb.%I ADD CONSTRAINT %I CHECK (job_id = %s)', res, res || '_job', p_job_id);
    EXECUTE format('ALTER TABLE batchdb.results ATTACH PARTITION batchdb.%I FOR VALUES IN (%s)', res, p_job_id);
END;
$$;

CREATE FUNCTION batchdb.drop_job_partitions(p_job_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TABLE IF EXISTS batchdb.%I', 'requests_' || p_job_id);
    EXECUTE format('DROP TABLE IF EXISTS batchdb.%I', 'results_' || p_job_id);
END;
$$;

-- Fresh statistics for one job's rows after a bulk load (cheaper than ANALYZE of every partition).
CREATE FUNCTION batchdb.analyze_job(p_job_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ANALYZE batchdb.%I', 'requests_' || p_job_id);
END;
$$;

CREATE FUNCTION batchdb.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM batchdb.create_job_partitions(NEW.id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_after_insert AFTER INSERT ON batchdb.jobs
    FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_after_insert();

CREATE FUNCTION batchdb.jobs_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM batchdb.drop_job_partitions(OLD.id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_after_delete AFTER DELETE ON batchdb.jobs
    FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_after_delete();

-- Clear messages for bad job rows (the CHECK constraints stay as the backstop).
CREATE FUNCTION batchdb.jobs_validate() RETURNS trigger
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
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_validate BEFORE INSERT OR UPDATE OF model, provider, priority, budget_usd, params ON batchdb.jobs
    FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_validate();

-- ---------------------------------------------------------------------------
-- Request validation. The WHEN clause keeps valid rows on the fast path: the
-- plpgsql function runs only for a row that is about to be refused.
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.requests_refuse() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payload IS NULL AND NEW.input IS NULL THEN
        RAISE EXCEPTION 'batchdb.requests.payload: row custom_id=% has neither payload nor input; expected payload {"prompt": "..."} or {"messages": [...]}, or input {...} for a job with a prompt template', quote_literal(NEW.custom_id)
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.payload IS NOT NULL AND jsonb_typeof(NEW.payload) <> 'object' THEN
        RAISE EXCEPTION 'batchdb.requests.payload: row custom_id=% expected a JSON object, got a JSON %', quote_literal(NEW.custom_id), jsonb_typeof(NEW.payload)
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.payload IS NOT NULL
       AND jsonb_typeof(NEW.payload -> 'prompt') IS DISTINCT FROM 'string'
       AND jsonb_typeof(NEW.payload -> 'messages') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'batchdb.requests.payload: row custom_id=% expected {"prompt": "<text>"} or {"messages": [{"role": ..., "content": ...}, ...]}, got keys %', quote_literal(NEW.custom_id), (SELECT coalesce(array_agg(k), '{}') FROM jsonb_object_keys(NEW.payload) k)
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.input IS NOT NULL AND jsonb_typeof(NEW.input) <> 'object' THEN
        RAISE EXCEPTION 'batchdb.requests.input: row custom_id=% expected a JSON object of column values, got a JSON %', quote_literal(NEW.custom_id), jsonb_typeof(NEW.input)
            USING ERRCODE = 'check_violation';
    END IF;
    RAISE EXCEPTION 'batchdb.requests.status: row custom_id=% must be inserted as ''queued'' (got %)', quote_literal(NEW.custom_id), quote_literal(NEW.status)
        USING ERRCODE = 'check_violation';
END;
$$;

CREATE TRIGGER requests_refuse BEFORE INSERT ON batchdb.requests
    FOR EACH ROW
    WHEN (
        (NEW.payload IS NULL AND NEW.input IS NULL)
        OR (NEW.payload IS NOT NULL AND (
                jsonb_typeof(NEW.payload) IS DISTINCT FROM 'object'
                OR (jsonb_typeof(NEW.payload -> 'prompt') IS DISTINCT FROM 'string'
                    AND jsonb_typeof(NEW.payload -> 'messages') IS DISTINCT FROM 'array')))
        OR (NEW.input IS NOT NULL AND jsonb_typeof(NEW.input) IS DISTINCT FROM 'object')
        OR NEW.status IS DISTINCT FROM 'queued'
    )
    EXECUTE FUNCTION batchdb.requests_refuse();

CREATE FUNCTION batchdb.requests_orphan_refuse() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'batchdb.requests.job_id: job % does not exist; insert the job into batchdb.jobs first', NEW.job_id
        USING ERRCODE = 'foreign_key_violation';
END;
$$;

CREATE TRIGGER requests_orphan_refuse BEFORE INSERT ON batchdb.requests_orphan
    FOR EACH ROW EXECUTE FUNCTION batchdb.requests_orphan_refuse();

CREATE TRIGGER results_orphan_refuse BEFORE INSERT ON batchdb.results_orphan
    FOR EACH ROW EXECUTE FUNCTION batchdb.requests_orphan_refuse();

-- ---------------------------------------------------------------------------
-- Exact job counters. Statement-level triggers with transition tables fold a
-- whole statement (a COPY of a million rows, a batch of 100 completions) into
-- one UPDATE of each affected job, whatever path changed the rows: worker,
-- SDK, CLI or a user's own SQL.
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.requests_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
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
    -- One wake-up per statement, never per row.
    IF touched IS NOT NULL THEN
        PERFORM pg_notify('batchdb_requests', array_to_string(touched, ','));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER requests_after_insert AFTER INSERT ON batchdb.requests
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_after_insert();

CREATE FUNCTION batchdb.requests_after_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH delta AS (
        SELECT n.job_id,
               count(*) FILTER (WHERE n.status = 'succeeded') - count(*) FILTER (WHERE o.status = 'succeeded') AS d_succeeded,
               count(*) FILTER (WHERE n.status = 'failed') - count(*) FILTER (WHERE o.status = 'failed') AS d_failed,
               count(*) FILTER (WHERE n.status = 'dead') - count(*) FILTER (WHERE o.status = 'dead') AS d_dead,
               count(*) FILTER (WHERE n.status = 'cancelled') - count(*) FILTER (WHERE o.status = 'cancelled') AS d_cancelled,
               count(*) FILTER (WHERE o.status = 'running' AND n.status = 'queued') AS d_retries,
               count(*) FILTER (WHERE o.status = 'queued' AND n.status = 'running') AS d_claimed,
               coalesce(sum(n.prompt_tokens - o.prompt_tokens), 0) AS d_prompt,
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
           completion_tokens = j.completion_tokens + d.d_completion,
           cost_usd = j.cost_usd + d.d_cost,
           started_at = coalesce(j.started_at, CASE WHEN d.d_claimed > 0 THEN now() END)
      FROM delta d
     WHERE j.id = d.job_id
       AND (d.d_succeeded <> 0 OR d.d_failed <> 0 OR d.d_dead <> 0 OR d.d_cancelled <> 0 OR d.d_retries <> 0
            OR d.d_prompt <> 0 OR d.d_completion <> 0 OR d.d_cost <> 0
            OR (d.d_claimed > 0 AND j.started_at IS NULL));
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

CREATE TRIGGER requests_after_update AFTER UPDATE ON batchdb.requests
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_after_update();

CREATE FUNCTION batchdb.requests_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH removed AS (
        SELECT job_id,
               count(*) AS n,
               count(*) FILTER (WHERE status = 'succeeded') AS s,
               count(*) FILTER (WHERE status = 'failed') AS f,
               count(*) FILTER (WHERE status = 'dead') AS d,
               count(*) FILTER (WHERE status = 'cancelled') AS c,
               sum(prompt_tokens) AS pt, sum(completion_tokens) AS ct, sum(cost_usd) AS cost
          FROM old_rows GROUP BY job_id
    )
    UPDATE batchdb.jobs j
       SET n_total = j.n_total - r.n, n_succeeded = j.n_succeeded - r.s, n_failed = j.n_failed - r.f,
           n_dead = j.n_dead - r.d, n_cancelled = j.n_cancelled - r.c,
           prompt_tokens = j.prompt_tokens - r.pt, completion_tokens = j.completion_tokens - r.ct,
           cost_usd = j.cost_usd - r.cost
      FROM removed r
     WHERE j.id = r.job_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER requests_after_delete AFTER DELETE ON batchdb.requests
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_after_delete();

-- A job changing state is an event: workers, `job.wait()` and `batchdb watch` listen.
CREATE FUNCTION batchdb.jobs_notify_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batchdb_events', json_build_object(
        'event', 'job_' || NEW.status,
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

CREATE TRIGGER jobs_notify_status AFTER UPDATE OF status ON batchdb.jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION batchdb.jobs_notify_status();

-- ---------------------------------------------------------------------------
-- Operations any of the four ways in can call (the SDK and CLI use these too).
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.cancel_job(p_job_id bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE batchdb.jobs SET status = 'cancelled', status_reason = 'cancelled by ' || current_user,
                            finished_at = now()
     WHERE id = p_job_id AND status <> 'cancelled';
    IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM batchdb.jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'batchdb: job % does not exist', p_job_id USING ERRCODE = 'no_data_found';
    END IF;
    -- In-flight rows are cancelled too: their completions are then fenced out.
    UPDATE batchdb.requests
       SET status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, finished_at = now()
     WHERE job_id = p_job_id AND status IN ('queued', 'running');
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

CREATE FUNCTION batchdb.retry_job(p_job_id bigint, p_statuses text[] DEFAULT ARRAY['failed', 'dead']) RETURNS bigint
LANGUAGE plpgsql AS $$
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
    IF n > 0 THEN
        PERFORM pg_notify('batchdb_requests', p_job_id::text);
    END IF;
    RETURN n;
END;
$$;

-- ---------------------------------------------------------------------------
-- Views for humans and dashboards.
-- ---------------------------------------------------------------------------
CREATE VIEW batchdb.job_progress AS
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
       END AS eta
  FROM batchdb.jobs j
  LEFT JOIN LATERAL (
        SELECT count(*) AS n_running FROM batchdb.requests q WHERE q.job_id = j.id AND q.status = 'running'
  ) r ON j.status IN ('running', 'paused', 'cancelled');

CREATE VIEW batchdb.live_workers AS
SELECT w.*, (w.heartbeat_at > now() - interval '30 seconds' AND w.stopped_at IS NULL) AS alive
  FROM batchdb.workers w;
