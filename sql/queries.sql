-- Every statement batchdb runs at run time, one named block each.
-- A block starts with a line "-- name --"; batchdb/queries.py loads them.
-- Parameters use psycopg's %(name)s style; nothing is ever formatted in.

-- ===========================================================================
-- Migrations
-- ===========================================================================

-- migrations_lock --
-- Serialises concurrent `batchdb db upgrade` runs (transaction-scoped advisory lock).
SELECT pg_advisory_xact_lock(hashtext('batchdb.migrations'))

-- migrations_table --
CREATE TABLE IF NOT EXISTS public.batchdb_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- migrations_applied --
SELECT version FROM public.batchdb_migrations ORDER BY version

-- migrations_table_exists --
-- Read-only check (`batchdb db status`, worker start): has this database ever been upgraded?
SELECT to_regclass('public.batchdb_migrations') IS NOT NULL AS present

-- migration_record --
INSERT INTO public.batchdb_migrations (version, name) VALUES (%(version)s, %(name)s)

-- ===========================================================================
-- Submitting
-- ===========================================================================

-- insert_job --
-- A job starts as 'loading' so workers ignore it until its rows are all in.
INSERT INTO batchdb.jobs (name, owner, provider, key_alias, model, params, priority, max_attempts, budget_usd,
                          idempotency_key, allow_unknown_model, mode, deadline, reuse, reuse_scope, reuse_max_age,
                          status)
VALUES (%(name)s, coalesce(%(owner)s, current_user), %(provider)s, %(key_alias)s, %(model)s, %(params)s,
        %(priority)s, %(max_attempts)s, %(budget_usd)s, %(idempotency_key)s, %(allow_unknown_model)s, %(mode)s,
        %(deadline)s, %(reuse)s, %(reuse_scope)s, %(reuse_max_age)s, 'loading')
ON CONFLICT (owner, idempotency_key) DO NOTHING
RETURNING id

-- job_by_idempotency_key --
-- What the key was first used for, to refuse it for a different job (0009_input_checks.sql).
SELECT id, status, provider, model, params, input_sha256
  FROM batchdb.jobs
 WHERE idempotency_key = %(idempotency_key)s AND owner = coalesce(%(owner)s, current_user)

-- copy_requests --
COPY batchdb.requests (job_id, custom_id, payload, input, request_key) FROM STDIN WITH (FORMAT csv)

-- requests_rls_active --
-- True for a role that row-level security applies to (a batchdb user, not the owner).
SELECT row_security_active('batchdb.requests') AS active

-- create_requests_staging --
CREATE TEMP TABLE batchdb_requests_staging (job_id bigint, custom_id text, payload jsonb, input jsonb, request_key bytea)
    ON COMMIT DROP

-- copy_requests_staging --
COPY batchdb_requests_staging (job_id, custom_id, payload, input, request_key) FROM STDIN WITH (FORMAT csv)

-- insert_staged_requests --
INSERT INTO batchdb.requests (job_id, custom_id, payload, input, request_key)
SELECT job_id, custom_id, payload, input, request_key FROM batchdb_requests_staging

-- mark_job_loaded --
-- Rows are in: the job becomes claimable (or completed at once when empty, or when every row was
-- answered as it went in, by reuse: 0021).
UPDATE batchdb.jobs
   SET status = CASE WHEN n_total = 0 OR n_done = n_total THEN 'completed' ELSE 'running' END,
       finished_at = CASE WHEN n_total = 0 OR n_done = n_total THEN now() END,
       input_sha256 = %(input_sha256)s
 WHERE id = %(job_id)s AND status = 'loading'

-- analyze_job_requests --
-- Fresh statistics after a bulk load keep the claim on its index (see docs/design.md).
SELECT batchdb.analyze_job(%(job_id)s)

-- delete_job --
DELETE FROM batchdb.jobs WHERE id = %(job_id)s

-- ===========================================================================
-- Claiming and completing (the worker's hot path)
-- ===========================================================================

-- claim_batch --
-- Claim up to `limit` due rows for one worker, on the lanes (provider, key alias)
-- it can serve, fairly across users and then
-- across each user's jobs. Among running jobs with a due row, sample up to
-- `max_jobs` by weighted random choice (Efraimidis-Spirakis; a job's weight is
-- its owner's weight, batchdb.users, default 1, times its share of the owner's
-- priorities, so a user's chance does not grow with their number of jobs).
-- The batch is then split between the sampled users by their full weight, and
-- within a user by priority, with cumulative rounding in draw order: quotas add
-- up to exactly `limit`, each within one row of its share, and a one-row claim
-- goes to the first-drawn job. Each job's oldest due rows are locked with SKIP
-- LOCKED. The lease is set in database time; the fencing token is bumped so
-- only this claim can complete.
WITH running_jobs AS (
    SELECT j.id, j.owner, j.priority, j.max_attempts, coalesce(u.weight, 1) AS owner_weight,
           coalesce(u.weight, 1) * j.priority / sum(j.priority) OVER (PARTITION BY j.owner) AS weight
      FROM batchdb.jobs j
      LEFT JOIN batchdb.users u ON u.name = j.owner
      -- A job whose rows are all in flight or waiting to retry would take a share and return
      -- nothing. LATERAL ... LIMIT 1 keeps this a probe of each job's claimable index (as an
      -- EXISTS the planner turned it into a scan of every queued row).
     CROSS JOIN LATERAL (
           SELECT 1 FROM batchdb.requests q
            WHERE q.job_id = j.id AND q.status = 'queued' AND q.run_after <= now()
            ORDER BY q.run_after, q.id  -- the claimable index's order: never a scan of the heap
            LIMIT 1
           ) due
     WHERE j.status = 'running' AND j.n_done < j.n_total
       -- A batch-mode job's rows go through the provider's Batch API (workers/batch_driver.py, 0020);
       -- an auto job's too, unless a batch cannot make its deadline for them (0022).
       AND CASE j.mode WHEN 'online' THEN true
                       WHEN 'auto' THEN batchdb.auto_goes_online(j.provider, j.key_alias, j.model, j.deadline)
                       ELSE false END
       -- Only jobs on lanes this worker can serve (workers/lanes.py); NULL arrays: any lane.
       AND (%(lane_providers)s::text[] IS NULL
            OR (j.provider, j.key_alias) IN (SELECT l.provider, l.key_alias
                                               FROM unnest(%(lane_providers)s::text[], %(lane_key_aliases)s::text[])
                                                    AS l(provider, key_alias)))
       -- A lane whose circuit is open waits for its probe (0007, workers/breaker.py).
       AND NOT EXISTS (SELECT 1 FROM batchdb.circuits c
                        WHERE c.provider = j.provider AND c.key_alias = j.key_alias AND c.model = j.model
                          AND c.state = 'open')
), candidate_jobs AS (
    SELECT id, owner, priority, max_attempts, owner_weight, -ln(1.0 - random()) / weight AS draw
      FROM running_jobs
     ORDER BY draw
     LIMIT %(max_jobs)s
), weighted AS (
    SELECT id, max_attempts, draw,
           owner_weight * priority / sum(priority) OVER (PARTITION BY owner) AS weight
      FROM candidate_jobs
), shares AS (
    SELECT id, max_attempts,
           (ceil(%(limit)s * sum(weight) OVER upto / sum(weight) OVER () - 1e-9)
            - ceil(%(limit)s * (sum(weight) OVER upto - weight) / sum(weight) OVER () - 1e-9))::integer AS quota
      FROM weighted
    WINDOW upto AS (ORDER BY draw ROWS UNBOUNDED PRECEDING)
), picked AS (
    SELECT r.job_id, r.id, s.max_attempts
      FROM shares s
     CROSS JOIN LATERAL (
           SELECT q.job_id, q.id
             FROM batchdb.requests q
            WHERE q.job_id = s.id AND q.status = 'queued' AND q.run_after <= now()
            ORDER BY q.run_after, q.id
            LIMIT s.quota
              FOR UPDATE SKIP LOCKED
           ) r
     LIMIT %(limit)s
)
UPDATE batchdb.requests q
   SET status = 'running',
       attempts = q.attempts + 1,
       lease_token = q.lease_token + 1,
       lease_owner = %(worker_id)s,
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
       started_at = now(),
       -- An auto job's row a chunk handed back is online's now: batch_id says which path answered it.
       batch_id = NULL
  FROM picked p
 WHERE q.job_id = p.job_id AND q.id = p.id
RETURNING q.job_id, q.id, q.custom_id, q.payload, q.input, q.attempts,
          coalesce(q.max_attempts, p.max_attempts) AS max_attempts, q.lease_token

-- complete_batch --
-- Record a batch of outcomes in one statement (River's batch completer). Only
-- rows still 'running' under the presented lease token are touched, so a late
-- or duplicate completion records nothing. Outcome 'queued' is a retry after
-- `retry_in` seconds. Cost comes from batchdb.prices in the same statement.
-- Budget reservations are settled apart, by key (settle_budget), so repeating
-- this statement after a lost reply changes nothing. A result written a second
-- time for the same row (a double completion) is counted in `writes`, never
-- silently replaced. `batch`: the outcomes came from a provider batch, priced at
-- the batch discount (workers/batch_driver.py); the online path passes false.
WITH outcome AS (
    SELECT *
      FROM unnest(%(job_id)s::bigint[], %(id)s::bigint[], %(lease_token)s::bigint[], %(status)s::text[],
                  %(retry_in)s::float8[], %(prompt_tokens)s::integer[], %(cached_tokens)s::integer[],
                  %(completion_tokens)s::integer[], %(error_class)s::text[], %(error)s::text[],
                  %(latency_ms)s::integer[], %(response_text)s::text[], %(response_json)s::jsonb[],
                  %(finish_reason)s::text[], %(model)s::text[])
           AS o(job_id, id, lease_token, status, retry_in, prompt_tokens, cached_tokens, completion_tokens,
                error_class, error, latency_ms, response_text, response_json, finish_reason, model)
), priced AS (
    SELECT o.*,
           coalesce(batchdb.call_cost_usd(p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok,
                                          p.batch_discount, o.prompt_tokens, o.cached_tokens,
                                          o.completion_tokens, %(batch)s::boolean), 0)
               AS cost_usd
      FROM outcome o
      JOIN batchdb.jobs j ON j.id = o.job_id
      LEFT JOIN batchdb.prices p ON p.provider = j.provider AND p.model = j.model
), done AS (
    UPDATE batchdb.requests q
       SET status = p.status,
           run_after = CASE WHEN p.status = 'queued' THEN now() + make_interval(secs => p.retry_in) ELSE q.run_after END,
           lease_owner = NULL,
           lease_expires_at = NULL,
           prompt_tokens = q.prompt_tokens + p.prompt_tokens,
           cached_tokens = q.cached_tokens + p.cached_tokens,
           completion_tokens = q.completion_tokens + p.completion_tokens,
           cost_usd = q.cost_usd + p.cost_usd,
           error_class = p.error_class,
           error = p.error,
           latency_ms = p.latency_ms,
           finished_at = CASE WHEN p.status = 'queued' THEN NULL ELSE now() END
      FROM priced p
     WHERE q.job_id = p.job_id AND q.id = p.id AND q.lease_token = p.lease_token
       -- `lower()` keeps the planner off the partial leased index, whose dead entries it cannot
       -- see in its estimates (docs/design.md, "Bloat"); the primary key finds each row directly.
       AND lower(q.status) = 'running'
    RETURNING q.job_id, q.id
), stored AS (
    INSERT INTO batchdb.results AS r (job_id, request_id, response_text, response_json, finish_reason, model)
    SELECT p.job_id, p.id, p.response_text, p.response_json, p.finish_reason, p.model
      FROM done d
      JOIN priced p ON p.job_id = d.job_id AND p.id = d.id
     WHERE p.response_text IS NOT NULL
    ON CONFLICT (job_id, request_id) DO UPDATE
       SET response_text = EXCLUDED.response_text, response_json = EXCLUDED.response_json,
           finish_reason = EXCLUDED.finish_reason, model = EXCLUDED.model, created_at = now(),
           writes = r.writes + 1
)
SELECT job_id, id FROM done

-- record_unrecorded_calls --
-- Calls answered (so billed) whose completion was fenced out: the row was no longer this lease's
-- (its lease ran out and reclaim_expired or another worker took it, or its job was cancelled).
-- Their usage goes to batchdb.unrecorded_calls and the job's wasted_* counters (0018), at the cost
-- rule's price. A row that still shows exactly this outcome under this lease was recorded by it
-- (an earlier complete_batch whose reply was lost: the repeat records nothing) and is not counted;
-- a repeat of this statement adds nothing (keyed by lease). Not told apart: a retry outcome recorded
-- by a lost-reply complete_batch whose row another worker then claimed (counted here once more).
-- `batch`: the calls were lines of a provider batch, priced at the batch discount.
INSERT INTO batchdb.unrecorded_calls AS u (job_id, request_id, lease_token, reason, prompt_tokens, cached_tokens,
                                            completion_tokens, cost_usd)
SELECT o.job_id, o.id, o.lease_token, 'fenced', o.prompt_tokens, o.cached_tokens, o.completion_tokens,
       coalesce(batchdb.call_cost_usd(p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok, p.batch_discount,
                                      o.prompt_tokens, o.cached_tokens, o.completion_tokens, %(batch)s::boolean), 0)
  FROM unnest(%(job_id)s::bigint[], %(id)s::bigint[], %(lease_token)s::bigint[], %(status)s::text[],
              %(error_class)s::text[], %(prompt_tokens)s::integer[], %(cached_tokens)s::integer[],
              %(completion_tokens)s::integer[])
       AS o(job_id, id, lease_token, status, error_class, prompt_tokens, cached_tokens, completion_tokens)
  JOIN batchdb.jobs j ON j.id = o.job_id
  LEFT JOIN batchdb.prices p ON p.provider = j.provider AND p.model = j.model
  LEFT JOIN batchdb.requests q ON q.job_id = o.job_id AND q.id = o.id
 WHERE NOT coalesce(q.lease_token = o.lease_token AND q.status = o.status
                    AND q.error_class IS NOT DISTINCT FROM o.error_class, false)
ON CONFLICT (job_id, request_id, lease_token) DO NOTHING

-- extend_leases --
-- Heartbeat for the rows a live worker still has in flight. A row locked right now
-- is being completed (or cancelled): it needs no longer lease, and skipping it means
-- the heartbeat never waits on, or deadlocks with, the completion statement.
WITH mine AS (
    SELECT q.job_id, q.id
      FROM batchdb.requests q
      JOIN unnest(%(job_id)s::bigint[], %(id)s::bigint[], %(lease_token)s::bigint[]) AS l(job_id, id, lease_token)
        ON q.job_id = l.job_id AND q.id = l.id AND q.lease_token = l.lease_token
     WHERE lower(q.status) = 'running'  -- primary-key lookups, not the partial leased index (see complete_batch)
       FOR UPDATE OF q SKIP LOCKED
)
UPDATE batchdb.requests q
   SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
  FROM mine m
 WHERE q.job_id = m.job_id AND q.id = m.id
RETURNING q.job_id, q.id

-- release_leases --
-- A worker hands back rows it will not call now; the attempt is not counted. They are due
-- again after delay_s seconds: none for a worker shutting down, an open circuit or a dropped
-- call; for a lane that is waiting (for tokens, a 429's delay), when it should be moving
-- again, so the worker's slots serve other lanes meanwhile.
UPDATE batchdb.requests q
   SET status = 'queued', attempts = greatest(q.attempts - 1, 0),
       run_after = now() + make_interval(secs => %(delay_s)s),
       lease_owner = NULL, lease_expires_at = NULL
  FROM unnest(%(job_id)s::bigint[], %(id)s::bigint[], %(lease_token)s::bigint[]) AS l(job_id, id, lease_token)
 WHERE q.job_id = l.job_id AND q.id = l.id AND q.lease_token = l.lease_token
   AND lower(q.status) = 'running'  -- primary-key lookups, not the partial leased index (see complete_batch)
RETURNING q.job_id, q.id

-- reclaim_expired --
-- Rows whose lease ran out (a worker was killed or stalled) go back to the
-- queue, or to 'dead' when that was their last attempt. Database time only.
WITH expired AS (
    SELECT q.job_id, q.id
      FROM batchdb.requests q
     WHERE q.status = 'running' AND q.lease_expires_at < now()
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE batchdb.requests q
   SET status = CASE WHEN q.attempts >= coalesce(q.max_attempts, j.max_attempts) THEN 'dead' ELSE 'queued' END,
       error_class = 'lease_expired',
       error = 'lease of worker ' || coalesce(q.lease_owner, '?') || ' expired during attempt ' || q.attempts,
       finished_at = CASE WHEN q.attempts >= coalesce(q.max_attempts, j.max_attempts) THEN now() END,
       lease_owner = NULL,
       lease_expires_at = NULL,
       run_after = now()
  FROM expired e, batchdb.jobs j
 WHERE q.job_id = e.job_id AND q.id = e.id AND j.id = q.job_id
RETURNING q.job_id, q.id, q.status

-- circuits_open --
-- Lanes whose circuit is open now (the breaker's cache, refreshed every poll).
SELECT provider, key_alias, model, opened_at, last_error, next_probe_at, probes_failed
  FROM batchdb.circuits
 WHERE state = 'open'

-- circuit_open --
-- Open a lane's circuit; `opened` says whether this call opened it (see 0007).
SELECT opened, opened_at, next_probe_at
  FROM batchdb.circuit_open(%(provider)s, %(key_alias)s, %(model)s, %(error)s, %(first_probe_s)s)

-- circuit_take_probe --
-- Become the one worker probing an open lane whose probe is due (none may be under way).
UPDATE batchdb.circuits
   SET probe_owner = %(worker_id)s, probe_expires_at = now() + make_interval(secs => %(probe_lease_s)s)
 WHERE provider = %(provider)s AND key_alias = %(key_alias)s AND model = %(model)s
   AND state = 'open' AND next_probe_at <= now()
   AND (probe_owner IS NULL OR probe_expires_at < now())
RETURNING provider

-- circuit_probe_not_sent --
-- The prober found no row to send: give the probe back, due again after `wait_s`.
UPDATE batchdb.circuits
   SET probe_owner = NULL, probe_expires_at = NULL, next_probe_at = now() + make_interval(secs => %(wait_s)s)
 WHERE provider = %(provider)s AND key_alias = %(key_alias)s AND model = %(model)s
   AND state = 'open' AND probe_owner = %(worker_id)s

-- claim_probe_row --
-- One due row of a running job on the lane, claimed like claim_batch does, to be sent as the probe.
WITH picked AS (
    SELECT q.job_id, q.id, j.max_attempts
      FROM batchdb.jobs j
     CROSS JOIN LATERAL (
           SELECT r.job_id, r.id FROM batchdb.requests r
            WHERE r.job_id = j.id AND r.status = 'queued' AND r.run_after <= now()
            ORDER BY r.run_after, r.id
            LIMIT 1
              FOR UPDATE SKIP LOCKED
           ) q
     WHERE j.provider = %(provider)s AND j.key_alias = %(key_alias)s AND j.model = %(model)s
       AND j.status = 'running' AND j.n_done < j.n_total
       AND CASE j.mode WHEN 'online' THEN true
                       WHEN 'auto' THEN batchdb.auto_goes_online(j.provider, j.key_alias, j.model, j.deadline)
                       ELSE false END
     ORDER BY j.priority DESC, j.id
     LIMIT 1
)
UPDATE batchdb.requests q
   SET status = 'running',
       attempts = q.attempts + 1,
       lease_token = q.lease_token + 1,
       lease_owner = %(worker_id)s,
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
       started_at = now(),
       -- An auto job's row a chunk handed back is online's now: batch_id says which path answered it.
       batch_id = NULL
  FROM picked p
 WHERE q.job_id = p.job_id AND q.id = p.id
RETURNING q.job_id, q.id, q.custom_id, q.payload, q.input, q.attempts,
          coalesce(q.max_attempts, p.max_attempts) AS max_attempts, q.lease_token

-- circuit_probe_failed --
-- The probe failed too: next probe after base * 2^failures, capped; returns when.
SELECT batchdb.circuit_probe_failed(%(provider)s, %(key_alias)s, %(model)s, %(error)s, %(base_s)s, %(max_s)s)
       AS next_probe_at

-- circuit_close --
-- A call on the lane succeeded: close its circuit; `open_for` is NULL when it was not open.
SELECT batchdb.circuit_close(%(provider)s, %(key_alias)s, %(model)s) AS open_for

-- job_for_worker --
-- What a worker needs to call the provider for a job's rows (cached per job).
SELECT j.id, j.owner, j.provider, j.key_alias, j.model, j.params, j.status, j.budget_usd, j.mode, j.deadline,
       p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok, p.batch_discount,
       p.context_window, p.max_input_tokens, p.max_output_tokens,
       coalesce(u.budget_usd_day IS NOT NULL OR u.budget_usd_month IS NOT NULL, false) AS owner_has_budget
  FROM batchdb.jobs j
  LEFT JOIN batchdb.prices p ON p.provider = j.provider AND p.model = j.model
  LEFT JOIN batchdb.users u ON u.name = j.owner
 WHERE j.id = %(job_id)s

-- job_statuses --
-- The status of jobs a worker holds rows of (workers/send_guard.py), read when an event
-- names one of them: the NOTIFY payload itself is not trusted.
SELECT id, status FROM batchdb.jobs WHERE id = ANY (%(job_ids)s::bigint[])

-- pause_job --
UPDATE batchdb.jobs SET status = 'paused', status_reason = %(reason)s
 WHERE id = %(job_id)s AND status = 'running'

-- resume_job --
UPDATE batchdb.jobs
   SET status = CASE WHEN n_total > 0 AND n_done = n_total THEN 'completed' ELSE 'running' END,
       status_reason = NULL,
       budget_usd = coalesce(%(budget_usd)s, budget_usd)
 WHERE id = %(job_id)s AND status = 'paused'
RETURNING id

-- ===========================================================================
-- Batch mode: chunks through the providers' Batch APIs (workers/batch_driver.py, 0020)
-- ===========================================================================

-- provider_batch_form --
-- Take due rows of one running batch-mode job of `provider` under one of `key_aliases` (NULL: any)
-- into a new chunk of at most `max_rows`; no row when there is nothing to take (0020).
SELECT chunk_id, chunk_job_id, chunk_rows
  FROM batchdb.form_provider_batch(%(provider)s, %(key_aliases)s::text[], %(max_rows)s)

-- provider_batch_take --
-- Lease up to `limit` chunks due for their next step (any worker may drive any chunk; a chunk whose
-- lease ran out, its worker killed mid-step, is due again). The token fences every later write.
WITH due AS (
    SELECT b.id
      FROM batchdb.provider_batches b
     WHERE b.state <> 'collected' AND b.next_check_at <= now()
       AND (b.lease_expires_at IS NULL OR b.lease_expires_at < now())
       AND (%(providers)s::text[] IS NULL
            OR (b.provider, b.key_alias) IN (SELECT l.provider, l.key_alias
                                               FROM unnest(%(providers)s::text[], %(key_aliases)s::text[])
                                                    AS l(provider, key_alias)))
     ORDER BY b.next_check_at, b.id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE batchdb.provider_batches b
   SET lease_owner = %(worker_id)s,
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
       lease_token = b.lease_token + 1
  FROM due
 WHERE b.id = due.id
RETURNING b.*

-- provider_batch_rows --
-- The rows a chunk took, with what their outcomes need; `running` ones are still the chunk's.
SELECT q.job_id, q.id, q.custom_id, q.payload, q.input, q.status, q.attempts,
       coalesce(q.max_attempts, j.max_attempts) AS max_attempts, q.lease_token
  FROM batchdb.requests q
  JOIN batchdb.jobs j ON j.id = q.job_id
 WHERE q.job_id = %(job_id)s AND q.batch_id = %(chunk_id)s
 ORDER BY q.id

-- provider_batch_row_keys --
-- The same rows without their content: what recording their outcomes needs.
SELECT q.job_id, q.id, q.custom_id, q.status, q.attempts, coalesce(q.max_attempts, j.max_attempts) AS max_attempts,
       q.lease_token
  FROM batchdb.requests q
  JOIN batchdb.jobs j ON j.id = q.job_id
 WHERE q.job_id = %(job_id)s AND q.batch_id = %(chunk_id)s
 ORDER BY q.id

-- provider_batch_hold --
-- Inside a transaction writing a chunk's rows: the chunk is still this lease's (locked until commit).
SELECT id FROM batchdb.provider_batches WHERE id = %(id)s AND lease_token = %(lease_token)s FOR UPDATE

-- provider_batch_queue_limit --
-- The lane's configured batch queue limit (NULL: none known), which a chunk is cut to fit, and the
-- tokens other chunks hold in it now (an auto job's chunk is cut to the room left, 0022).
SELECT l.batch_queue_tokens,
       (SELECT coalesce(sum(b.enqueued_tokens), 0)
          FROM batchdb.provider_batches b
         WHERE b.provider = l.provider AND b.key_alias = l.key_alias AND b.model = l.model AND b.id <> %(id)s
           AND (b.state IN ('submitted', 'in_progress')
                OR (b.state = 'file_uploaded' AND b.create_started_at IS NOT NULL))) AS used_tokens
  FROM batchdb.rate_limits l
 WHERE l.provider = %(provider)s AND l.key_alias = %(key_alias)s AND l.model = %(model)s

-- auto_job_clock --
-- An auto job against its deadline (0022): past the cutoff no batch is created for it, past
-- cancel_at its open batches are cancelled.
SELECT lane, batch_cutoff, cancel_at, past_cutoff, past_cancel FROM batchdb.auto_lane(%(job_id)s)

-- provider_batch_upload_intent --
-- About to upload the chunk's file: recorded first, so a successor knows to look for it by name.
UPDATE batchdb.provider_batches
   SET upload_started_at = coalesce(upload_started_at, now())
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'planned'
RETURNING *

-- provider_batch_uploaded --
UPDATE batchdb.provider_batches
   SET state = 'file_uploaded', input_file_id = %(input_file_id)s, input_bytes = %(input_bytes)s,
       enqueued_tokens = %(enqueued_tokens)s, n_requests = %(n_requests)s, uploaded_at = now(), last_error = NULL
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'planned'
RETURNING *

-- provider_batch_reserve --
-- Take the lane's batch queue room and record the intent to create the batch (0020):
-- 'ok', 'resumed' (an earlier try may have created it: look it up first), 'wait' or 'lost'.
SELECT batchdb.provider_batch_reserve(%(id)s, %(lease_token)s) AS result

-- provider_batch_unreserve --
-- The provider refused to create the batch for its queue limit and made none (Gemini's 429): the
-- intent is withdrawn, the queue room given back, and the next try gets a new number.
UPDATE batchdb.provider_batches
   SET create_started_at = NULL, create_try = create_try + 1, last_error = %(error)s
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'file_uploaded'
RETURNING *

-- provider_batch_submitted --
UPDATE batchdb.provider_batches
   SET state = 'submitted', batch_id = %(batch_id)s, provider_status = %(provider_status)s, submitted_at = now(),
       last_error = NULL
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND state = 'file_uploaded'
RETURNING *

-- provider_batch_polled --
-- What the provider says now; an ended batch returns its queue room (it no longer counts) and
-- waits to be collected.
UPDATE batchdb.provider_batches
   SET state = %(state)s, provider_status = %(provider_status)s, output_file_id = %(output_file_id)s,
       error_file_id = %(error_file_id)s, n_completed = %(n_completed)s, n_failed = %(n_failed)s,
       ended_at = CASE WHEN %(state)s IN ('completed', 'failed', 'expired', 'cancelled') THEN now() END,
       last_error = %(error)s
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND state IN ('submitted', 'in_progress')
RETURNING *

-- provider_batch_requeue --
-- The provider refused the batch for its enqueued-token limit: the chunk (its rows, its file) waits
-- to be created again, under a new try number (the refused batch keeps the old one in its metadata).
UPDATE batchdb.provider_batches
   SET state = 'file_uploaded', batch_id = NULL, provider_status = NULL, create_started_at = NULL,
       submitted_at = NULL, create_try = create_try + 1, last_error = %(error)s
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND state IN ('submitted', 'in_progress')
RETURNING *

-- provider_batch_collected --
-- Every row's outcome is recorded (in the same transaction): the chunk is done.
UPDATE batchdb.provider_batches
   SET state = 'collected', collected_at = now(), last_error = coalesce(%(error)s, last_error),
       lease_owner = NULL, lease_expires_at = NULL
 WHERE id = %(id)s AND lease_token = %(lease_token)s AND state <> 'collected'
RETURNING *

-- provider_batch_release --
-- Let go of a chunk until its next step is due (its batch is running, its lane's queue is full,
-- or a provider call failed: `error` says which).
UPDATE batchdb.provider_batches
   SET lease_owner = NULL, lease_expires_at = NULL, next_check_at = now() + make_interval(secs => %(delay_s)s),
       last_error = CASE WHEN %(error)s::text IS NULL THEN last_error ELSE %(error)s::text END
 WHERE id = %(id)s AND lease_token = %(lease_token)s
RETURNING id

-- provider_batch_work --
-- Whether batch-mode work remains on these lanes (NULL: any): an open chunk, or a running batch job
-- with rows not final. A worker told to exit when idle waits for it.
SELECT EXISTS (SELECT 1 FROM batchdb.provider_batches b
                WHERE b.state <> 'collected'
                  AND (%(providers)s::text[] IS NULL
                       OR (b.provider, b.key_alias) IN (SELECT l.provider, l.key_alias
                                                          FROM unnest(%(providers)s::text[], %(key_aliases)s::text[])
                                                               AS l(provider, key_alias))))
       OR EXISTS (SELECT 1 FROM batchdb.jobs j
                   WHERE j.status = 'running' AND j.mode IN ('batch', 'auto') AND j.n_done < j.n_total
                     AND (%(providers)s::text[] IS NULL
                          OR (j.provider, j.key_alias) IN (SELECT l.provider, l.key_alias
                                                             FROM unnest(%(providers)s::text[],
                                                                         %(key_aliases)s::text[])
                                                                  AS l(provider, key_alias)))) AS pending

-- ===========================================================================
-- Workers
-- ===========================================================================

-- register_worker --
INSERT INTO batchdb.workers (id, hostname, pid, concurrency)
VALUES (%(worker_id)s, %(hostname)s, %(pid)s, %(concurrency)s)

-- heartbeat_worker --
UPDATE batchdb.workers
   SET heartbeat_at = now(), in_flight = %(in_flight)s, n_completed = %(n_completed)s
 WHERE id = %(worker_id)s

-- advertise_lanes --
-- The lanes this worker can serve, as it resolved them (workers/lanes.py; no keys).
UPDATE batchdb.workers SET lanes = %(lanes)s WHERE id = %(worker_id)s

-- demanded_lanes --
-- Lanes of unfinished jobs: whether a job on it is running, and whether one is paused
-- because no live worker could serve it (its reason starts with `waiting_prefix`).
SELECT provider, key_alias,
       bool_or(status = 'running') AS running,
       bool_or(status = 'paused' AND starts_with(status_reason, %(waiting_prefix)s)) AS waiting
  FROM batchdb.jobs
 WHERE status IN ('running', 'paused')
 GROUP BY provider, key_alias

-- pause_unserved_lanes --
-- Pause running jobs on lanes no live worker advertises, each with its lane's reason. A live
-- worker that has advertised nothing yet (starting, or older than lane advertising) may serve it.
UPDATE batchdb.jobs j
   SET status = 'paused', status_reason = l.reason
  FROM unnest(%(provider)s::text[], %(key_alias)s::text[], %(reason)s::text[]) AS l(provider, key_alias, reason)
 WHERE j.provider = l.provider AND j.key_alias = l.key_alias AND j.status = 'running'
   AND NOT EXISTS (SELECT 1 FROM batchdb.live_workers w
                    WHERE w.alive
                      AND (w.lanes @> jsonb_build_array(jsonb_build_object('provider', l.provider,
                                                                           'key_alias', l.key_alias))
                           OR jsonb_array_length(w.lanes) = 0))
RETURNING j.id, j.provider, j.key_alias

-- resume_served_lanes --
-- Jobs paused for want of a worker on a lane this worker now serves run again; the
-- claimers are woken as for new rows.
WITH resumed AS (
    UPDATE batchdb.jobs j
       SET status = CASE WHEN j.n_total > 0 AND j.n_done = j.n_total THEN 'completed' ELSE 'running' END,
           status_reason = NULL
      FROM unnest(%(provider)s::text[], %(key_alias)s::text[]) AS l(provider, key_alias)
     WHERE j.provider = l.provider AND j.key_alias = l.key_alias AND j.status = 'paused'
       AND starts_with(j.status_reason, %(waiting_prefix)s)
    RETURNING j.id
)
SELECT id, pg_notify('batchdb_requests', id::text) FROM resumed

-- stop_worker --
UPDATE batchdb.workers
   SET stopped_at = now(), heartbeat_at = now(), in_flight = 0, n_completed = %(n_completed)s
 WHERE id = %(worker_id)s

-- list_live_workers --
-- Live workers (`batchdb workers`), each with the lanes (provider/key alias) it advertised as able to
-- serve (workers/lanes.py; endpoints, never keys).
SELECT w.id, w.hostname, w.pid, w.concurrency, w.in_flight, w.n_completed, w.started_at, w.heartbeat_at,
       extract(epoch FROM clock_timestamp() - w.heartbeat_at)::float8 AS heartbeat_age_s,
       coalesce(ARRAY(SELECT l ->> 'provider' || '/' || (l ->> 'key_alias')
                               || coalesce(' (' || (l ->> 'endpoint') || ')', '')
                        FROM jsonb_array_elements(w.lanes) l), '{}') AS lanes
  FROM batchdb.live_workers w
 WHERE w.alive
 ORDER BY w.hostname, w.pid

-- queue_depth --
-- Rows due, held, scheduled, running and dead per lane, fleet-wide (0025): a worker's batchdb_queue_*
-- gauges (workers/metrics.py), read every few seconds; a few index probes per unfinished job.
SELECT provider, key_alias, model, due_rows, oldest_due_age_seconds, held_rows, scheduled_rows, running_rows,
       dead_rows, circuit_open
  FROM batchdb.queue_depth

-- ===========================================================================
-- Reading jobs and results
-- ===========================================================================

-- job_progress --
-- `priced`: the job's model has a price (else its cost is unknown, not $0; the instant provider is free).
-- n_reused, reused_usd: rows answered by reuse and what their answers first cost (0021).
SELECT p.*, (p.provider = 'instant' OR EXISTS (SELECT 1 FROM batchdb.prices c
                                                WHERE c.provider = p.provider AND c.model = p.model)) AS priced,
       j.n_reused, j.reused_usd
  FROM batchdb.job_progress p JOIN batchdb.jobs j ON j.id = p.job_id WHERE p.job_id = %(job_id)s

-- job_batches --
-- A batch-mode job's chunks and their batches at the provider (`batchdb status JOB`, Job.batches()).
SELECT id, state, provider_status, n_requests, batch_id, n_completed, n_failed, create_try, enqueued_tokens,
       created_at, submitted_at, ended_at, collected_at, last_error
  FROM batchdb.provider_batches
 WHERE job_id = %(job_id)s
 ORDER BY id

-- job_lane_split --
-- Rows of a job answered through a provider batch and through online calls (final rows; a row a
-- chunk handed back and online answered counts as online: claim_batch clears its batch_id).
SELECT count(*) FILTER (WHERE batch_id IS NOT NULL) AS n_by_batch,
       count(*) FILTER (WHERE batch_id IS NULL) AS n_by_online
  FROM batchdb.requests
 WHERE job_id = %(job_id)s AND status IN ('succeeded', 'failed', 'dead')

-- job_visible --
-- Row-level security answers: false for another user's job.
SELECT EXISTS (SELECT 1 FROM batchdb.jobs WHERE id = %(job_id)s) AS visible

-- jobs_table_exists --
SELECT to_regclass('batchdb.jobs') IS NOT NULL AS present

-- demo_other_jobs --
-- Jobs in this database that `batchdb demo` did not make (it refuses to run beside them without --yes).
SELECT count(*) AS n FROM batchdb.jobs WHERE key_alias <> %(key_alias)s

-- live_worker_count --
-- Worker processes heartbeating now (`Job.wait()` says so when there are none).
SELECT count(*) AS n FROM batchdb.live_workers WHERE alive

-- list_jobs --
SELECT p.*, (p.provider = 'instant' OR EXISTS (SELECT 1 FROM batchdb.prices c
                                                WHERE c.provider = p.provider AND c.model = p.model)) AS priced
  FROM batchdb.job_progress p ORDER BY p.job_id DESC LIMIT %(limit)s

-- known_models --
-- Models with a price for one provider: submit refuses any other unless told to allow it.
SELECT model FROM batchdb.prices WHERE provider = %(provider)s ORDER BY model

-- price_of_model --
-- A model's prices, for `batchdb estimate` (batchdb/estimation.py).
SELECT input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount
  FROM batchdb.prices
 WHERE provider = %(provider)s AND model = %(model)s

-- lane_limits --
-- The limits configured for a lane (NULL: none), for the estimate's online duration.
SELECT rpm, tpm, rpd
  FROM batchdb.rate_limits
 WHERE provider = %(provider)s AND key_alias = %(key_alias)s AND model = %(model)s

-- output_tokens_of_similar_jobs --
-- Output tokens per answering call (rows answered by a duplicate's call excluded) of earlier jobs
-- asking the same model the same way (same
-- templates, max_tokens and response format): the estimate's guess at answer length. The jobs'
-- exact counters are read, never their rows.
SELECT count(*) AS jobs, coalesce(sum(j.n_succeeded - j.n_duplicates), 0) AS rows,
       coalesce(sum(j.completion_tokens), 0) AS completion_tokens
  FROM batchdb.jobs j
 WHERE j.provider = %(provider)s AND j.model = %(model)s AND j.n_succeeded > 0
   AND jsonb_strip_nulls(jsonb_build_object('prompt', j.params -> 'prompt', 'system', j.params -> 'system',
                                            'max_tokens', j.params -> 'max_tokens',
                                            'response_format', j.params -> 'response_format'))
       = %(shape)s::jsonb

-- prices_all --
-- Every price row, for `batchdb prices update` to compare a price map with (batchdb/price_list.py).
SELECT provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount,
       context_window, max_input_tokens, max_output_tokens, source, as_of
  FROM batchdb.prices
 ORDER BY provider, model

-- prices_insert --
-- A model a price map adds (batchdb/price_list.py).
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount,
                            max_input_tokens, max_output_tokens, source, as_of)
VALUES (%(provider)s, %(model)s, %(input_per_mtok)s, %(output_per_mtok)s, %(cached_input_per_mtok)s,
        %(batch_discount)s, %(max_input_tokens)s, %(max_output_tokens)s, %(source)s, %(as_of)s)

-- prices_change --
-- The fields a price map gives differently (`set_fields`); the others keep their value.
UPDATE batchdb.prices p
   SET input_per_mtok = CASE WHEN 'input_per_mtok' = ANY (%(set_fields)s::text[])
                             THEN %(input_per_mtok)s ELSE p.input_per_mtok END,
       output_per_mtok = CASE WHEN 'output_per_mtok' = ANY (%(set_fields)s::text[])
                              THEN %(output_per_mtok)s ELSE p.output_per_mtok END,
       cached_input_per_mtok = CASE WHEN 'cached_input_per_mtok' = ANY (%(set_fields)s::text[])
                                    THEN %(cached_input_per_mtok)s ELSE p.cached_input_per_mtok END,
       batch_discount = CASE WHEN 'batch_discount' = ANY (%(set_fields)s::text[])
                             THEN %(batch_discount)s ELSE p.batch_discount END,
       max_input_tokens = CASE WHEN 'max_input_tokens' = ANY (%(set_fields)s::text[])
                               THEN %(max_input_tokens)s ELSE p.max_input_tokens END,
       max_output_tokens = CASE WHEN 'max_output_tokens' = ANY (%(set_fields)s::text[])
                                THEN %(max_output_tokens)s ELSE p.max_output_tokens END,
       source = %(source)s, as_of = %(as_of)s, updated_at = now()
 WHERE p.provider = %(provider)s AND p.model = %(model)s

-- prices_confirm --
-- Rows a price map gives exactly as they are: now known to be current as of its date.
UPDATE batchdb.prices SET source = %(source)s, as_of = %(as_of)s
 WHERE (provider, model) IN (SELECT * FROM unnest(%(providers)s::text[], %(models)s::text[]))
   AND as_of IS DISTINCT FROM %(as_of)s::date

-- job_results --
-- Streamed with a server-side cursor, in request order.
-- `duplicate_of`: the custom_id of the row whose answer a duplicate took (0019).
-- `reused_from_job`, `reused_from`: the job and request id of the stored answer a row reused (0021).
SELECT q.id AS request_id, q.custom_id, q.input, q.status, q.attempts, q.prompt_tokens, q.cached_tokens,
       q.completion_tokens, q.cost_usd, q.error_class, q.error, q.latency_ms, r.response_text, r.finish_reason,
       d.custom_id AS duplicate_of, q.reused_from_job, q.reused_from
  FROM batchdb.requests q
  LEFT JOIN batchdb.results r ON r.job_id = q.job_id AND r.request_id = q.id
  LEFT JOIN batchdb.requests d ON d.job_id = q.job_id AND d.id = q.duplicate_of
 WHERE q.job_id = %(job_id)s
 ORDER BY q.id

-- cancel_job --
SELECT batchdb.cancel_job(%(job_id)s) AS n

-- retry_job --
SELECT batchdb.retry_job(%(job_id)s, %(statuses)s::text[]) AS n

-- ===========================================================================
-- Rate-limit ledger and budgets (functions in sql/migrations/0002_ledger.sql)
-- ===========================================================================

-- reserve_capacity --
SELECT granted, wait_seconds, daily_exhausted, limited
  FROM batchdb.reserve_capacity(%(provider)s, %(key_alias)s, %(model)s, %(tokens)s::bigint[],
                                %(refund_tokens)s, %(remaining_requests)s, %(remaining_tokens)s)

-- record_rate_limited --
SELECT batchdb.record_rate_limited(%(provider)s, %(key_alias)s, %(model)s, %(retry_after)s)

-- learn_limits --
SELECT batchdb.learn_limits(%(provider)s, %(key_alias)s, %(model)s, %(rpm)s, %(tpm)s)

-- set_limits --
-- Configure a key's limits by hand (`batchdb limits set`); configured limits win over learnt ones.
-- A partial update: a limit not given (NULL) keeps its current value; those named in `clear` are removed.
-- batch_queue_tokens: the enqueued-token limit of the lane's Batch API (0020, batch-mode jobs).
-- batch_window_seconds / batch_margin_seconds: how long a batch may take, and the time auto-mode
-- jobs keep before their deadline (0022).
INSERT INTO batchdb.rate_limits AS l (provider, key_alias, model, rpm, tpm, rpd, batch_queue_tokens,
                                      batch_window_seconds, batch_margin_seconds, source)
VALUES (%(provider)s, %(key_alias)s, %(model)s, %(rpm)s, %(tpm)s, %(rpd)s, %(batch_queue_tokens)s,
        %(batch_window_seconds)s, %(batch_margin_seconds)s, 'configured')
ON CONFLICT (provider, key_alias, model) DO UPDATE
   SET rpm = CASE WHEN 'rpm' = ANY (%(clear)s::text[]) THEN NULL ELSE coalesce(EXCLUDED.rpm, l.rpm) END,
       tpm = CASE WHEN 'tpm' = ANY (%(clear)s::text[]) THEN NULL ELSE coalesce(EXCLUDED.tpm, l.tpm) END,
       rpd = CASE WHEN 'rpd' = ANY (%(clear)s::text[]) THEN NULL ELSE coalesce(EXCLUDED.rpd, l.rpd) END,
       batch_queue_tokens = CASE WHEN 'batch_queue_tokens' = ANY (%(clear)s::text[]) THEN NULL
                                 ELSE coalesce(EXCLUDED.batch_queue_tokens, l.batch_queue_tokens) END,
       batch_window_seconds = CASE WHEN 'batch_window_seconds' = ANY (%(clear)s::text[]) THEN NULL
                                   ELSE coalesce(EXCLUDED.batch_window_seconds, l.batch_window_seconds) END,
       batch_margin_seconds = CASE WHEN 'batch_margin_seconds' = ANY (%(clear)s::text[]) THEN NULL
                                   ELSE coalesce(EXCLUDED.batch_margin_seconds, l.batch_margin_seconds) END,
       source = 'configured', updated_at = now()
RETURNING rpm, tpm, rpd, batch_queue_tokens, batch_window_seconds, batch_margin_seconds

-- list_limits --
-- Each lane's limits, totals and live state (0006: lane_states says why a lane is not moving).
-- batch_queue_tokens / batch_enqueued_tokens: the lane's Batch API queue, its limit and what open batches hold (0020).
SELECT r.provider, r.key_alias, r.model, r.rpm, r.tpm, r.rpd, r.source, r.pace, s.pace_now, r.blocked_until,
       r.requests_granted, r.tokens_granted, r.rate_limited, r.updated_at,
       s.token_credit_now, s.state, s.until, s.state_text,
       r.batch_queue_tokens, coalesce(b.enqueued_tokens, 0) AS batch_enqueued_tokens
  FROM batchdb.rate_limits r
  JOIN batchdb.lane_states s USING (provider, key_alias, model)
  LEFT JOIN batchdb.batch_queues b USING (provider, key_alias, model)
 ORDER BY r.provider, r.key_alias, r.model

-- open_circuits --
-- Lanes whose circuit is open (0007, workers/breaker.py): their provider is down or refuses the
-- endpoint; `limits show` and the dashboard say so, with the error and the next probe.
SELECT provider, key_alias, model,
       'circuit open since ' || to_char(opened_at AT TIME ZONE 'UTC', 'HH24:MI:SS')
       || ' UTC (last error: ' || coalesce(last_error, 'unknown') || '); next probe about '
       || coalesce(to_char(next_probe_at AT TIME ZONE 'UTC', 'HH24:MI:SS') || ' UTC', 'soon') AS state_text
  FROM batchdb.circuits
 WHERE state = 'open'
 ORDER BY provider, key_alias, model

-- settle_capacity --
-- Tokens back to (or taken from) many lanes at once, after calls ended (0006_ledger_settlement.sql).
SELECT batchdb.settle_capacity(%(provider)s::text[], %(key_alias)s::text[], %(model)s::text[], %(tokens)s::bigint[])

-- lane_state --
-- One lane's state in words, for the worker log when a lane stops moving.
SELECT state, until, state_text, token_credit_now
  FROM batchdb.lane_states
 WHERE provider = %(provider)s AND key_alias = %(key_alias)s AND model = %(model)s

-- model_limits --
-- A model's context window and output limit (NULLs: unknown), for the submit-time fit check.
SELECT context_window, max_input_tokens, max_output_tokens
  FROM batchdb.prices
 WHERE provider = %(provider)s AND model = %(model)s

-- reserve_budget --
-- 'ok', 'wait' (calls in flight hold the budget) or 'paused' (see 0005_users.sql). Keyed by the
-- call (row, lease token, n-th call of the lease): repeated after a lost reply, it reserves nothing more.
SELECT batchdb.reserve_budget(%(job_id)s, %(usd)s, %(request_id)s, %(lease_token)s, %(seq)s) AS result

-- settle_budget --
-- Calls done or handed back: their reservations out, their cost into the owners' spend (0010).
-- Keyed by call, so repeating it after a lost reply settles nothing twice.
SELECT batchdb.settle_budget(%(job_id)s::bigint[], %(request_id)s::bigint[], %(lease_token)s::bigint[],
                             %(spent)s::numeric[]) AS settled

-- settle_abandoned_budget --
-- Reservations of calls whose row is no longer leased to them (a killed worker's), older than
-- the margin: settled at their reserved cost (0013). Returns the number of calls settled.
SELECT batchdb.settle_abandoned_budget(%(older_than_s)s, %(limit)s) AS settled

-- resume_due_jobs --
-- Jobs paused by a user quota resume when the day (or month) has turned over.
SELECT batchdb.resume_due_jobs() AS n

-- ===========================================================================
-- Users (sql/migrations/0005_users.sql)
-- ===========================================================================

-- add_user --
SELECT * FROM batchdb.add_user(%(name)s::text, %(kind)s::text, %(weight)s::double precision,
                               %(budget_usd_day)s::numeric, %(budget_usd_month)s::numeric,
                               %(email)s::text, %(password)s::text)

-- set_user_team --
-- Users of one team may reuse one another's answers (jobs.reuse_scope = 'team', 0021); NULL: no team.
UPDATE batchdb.users SET team = %(team)s WHERE name = %(name)s

-- list_users --
-- Known users with their group role and what they spent today and this month (UTC).
SELECT u.name, u.weight, u.budget_usd_day, u.budget_usd_month, u.email, u.team,
       coalesce((SELECT string_agg(substr(g.rolname, 9), ',' ORDER BY g.rolname)
                   FROM pg_auth_members m
                   JOIN pg_roles g ON g.oid = m.roleid
                   JOIN pg_roles r ON r.oid = m.member
                  WHERE r.rolname = u.name AND g.rolname IN ('batchdb_user', 'batchdb_admin', 'batchdb_worker')),
                '') AS kind,
       coalesce((SELECT s.spent_usd FROM batchdb.user_spend s
                  WHERE s.owner = u.name AND s.day = (now() AT TIME ZONE 'UTC')::date), 0) AS spent_today_usd,
       coalesce((SELECT sum(s.spent_usd) FROM batchdb.user_spend s
                  WHERE s.owner = u.name
                    AND s.day >= date_trunc('month', now() AT TIME ZONE 'UTC')::date), 0) AS spent_month_usd
  FROM batchdb.users u
 ORDER BY u.name

-- ===========================================================================
-- Wake-ups and events
-- ===========================================================================

-- listen_requests --
-- Workers: new rows were queued (one notification per statement; payload = job ids).
LISTEN batchdb_requests

-- listen_events --
-- Job status changes, JSON payloads (see docs/sql.md).
LISTEN batchdb_events

-- ===========================================================================
-- Maintenance
-- ===========================================================================

-- partitions_to_vacuum --
-- Partitions of unfinished jobs carrying many dead row versions and not vacuumed lately.
-- Workers vacuum them themselves: the queue must stay fast even where autovacuum is
-- off or slow to come round (its default naptime is a minute).
SELECT j.id AS job_id, s.relname AS partition, s.n_dead_tup
  FROM batchdb.jobs j
  JOIN pg_stat_user_tables s ON s.schemaname = 'batchdb' AND s.relname = 'requests_' || j.id
 WHERE j.status IN ('running', 'paused')
   AND s.n_dead_tup >= %(min_dead)s
   AND coalesce(greatest(s.last_vacuum, s.last_autovacuum), '-infinity') < now() - make_interval(secs => %(min_interval)s)
 ORDER BY s.n_dead_tup DESC

-- vacuum_partition --
-- {partition} is filled in with psycopg.sql.Identifier: VACUUM takes no parameters.
-- One worker at a time vacuums a partition, with no lock of ours: VACUUM cannot run inside a
-- transaction (so no pg_try_advisory_xact_lock), and a session lock would span statements that
-- a pool or PgBouncer may run on different connections. SKIP_LOCKED skips a partition whose
-- lock another VACUUM (a worker's, or autovacuum) holds, with a WARNING (SQLSTATE 55P03).
VACUUM (SKIP_LOCKED, ANALYZE) batchdb.{partition}

-- ===========================================================================
-- Notifications (tables and the outbox trigger in sql/migrations/0004_notifications.sql)
-- ===========================================================================

-- notify_add_target --
-- A webhook (URL + HMAC secret; NULL secret = generated) or an email address for a job.
INSERT INTO batchdb.notification_targets (job_id, channel, target, secret)
VALUES (%(job_id)s, %(channel)s, %(target)s, %(secret)s)
RETURNING id, secret

-- notify_webhook_secret --
-- The secret of a job's webhook, for a caller re-submitting with the same idempotency key.
SELECT secret FROM batchdb.notification_targets
 WHERE job_id = %(job_id)s AND channel = 'webhook' AND target = %(target)s

-- listen_notifications --
-- Dispatchers: deliveries were queued (payload = job id).
LISTEN batchdb_notifications

-- notify_claim --
-- Claim up to `limit` due deliveries on the given channels. A 'delivering' row
-- whose lease (next_attempt_at) ran out belonged to a dispatcher that died: it
-- is due again. The try is counted at claim, so even a delivery that kills its
-- dispatcher every time ends after `max_attempts`.
WITH due AS (
    SELECT d.id
      FROM batchdb.notification_deliveries d
     WHERE d.status IN ('pending', 'delivering')
       AND d.next_attempt_at <= now()
       AND d.channel = ANY (%(channels)s::text[])
       AND d.attempts < %(max_attempts)s
     ORDER BY d.next_attempt_at, d.id
     LIMIT %(limit)s
       FOR UPDATE OF d SKIP LOCKED
)
UPDATE batchdb.notification_deliveries d
   SET status = 'delivering',
       attempts = d.attempts + 1,
       claimed_by = %(worker_id)s,
       next_attempt_at = now() + make_interval(secs => %(lease_seconds)s)
  FROM due, batchdb.notification_targets t
 WHERE d.id = due.id AND t.id = d.target_id
RETURNING d.id, d.job_id, d.channel, d.event, d.payload, d.attempts, t.target, t.secret

-- notify_record_attempt --
-- One try's outcome. The attempt row is always written (the try happened); the
-- delivery changes only while this try still holds it (same attempt, still
-- 'delivering'), so a try that outlived its lease cannot overwrite a newer one.
WITH attempt AS (
    INSERT INTO batchdb.notification_attempts
           (delivery_id, job_id, attempt, worker_id, started_at, duration_ms, ok, http_status, reply, error)
    SELECT d.id, d.job_id, %(attempt)s, %(worker_id)s,
           clock_timestamp() - make_interval(secs => %(duration_ms)s / 1000.0),
           %(duration_ms)s, %(ok)s, %(http_status)s, %(reply)s, %(error)s
      FROM batchdb.notification_deliveries d
     WHERE d.id = %(id)s
)
UPDATE batchdb.notification_deliveries d
   SET status = CASE WHEN %(ok)s THEN 'delivered'
                     WHEN %(give_up)s OR d.attempts >= %(max_attempts)s THEN 'failed'
                     ELSE 'pending' END,
       next_attempt_at = CASE WHEN %(ok)s OR %(give_up)s OR d.attempts >= %(max_attempts)s THEN now()
                              ELSE now() + make_interval(secs => %(retry_in)s) END,
       delivered_at = CASE WHEN %(ok)s THEN now() END,
       last_error = CASE WHEN %(ok)s THEN d.last_error ELSE %(error)s END,
       claimed_by = NULL
 WHERE d.id = %(id)s AND d.status = 'delivering' AND d.attempts = %(attempt)s
RETURNING d.status

-- notify_release --
-- A dispatcher stopping hands back the deliveries it did not finish; those tries are not counted.
UPDATE batchdb.notification_deliveries d
   SET status = 'pending', attempts = greatest(d.attempts - 1, 0), next_attempt_at = now(), claimed_by = NULL
  FROM unnest(%(id)s::bigint[], %(attempt)s::integer[]) AS r(id, attempt)
 WHERE d.id = r.id AND d.status = 'delivering' AND d.attempts = r.attempt
RETURNING d.id

-- notify_fail_abandoned --
-- Deliveries whose last allowed try never reported back (its dispatcher died) are failed.
UPDATE batchdb.notification_deliveries
   SET status = 'failed', claimed_by = NULL,
       last_error = coalesce(last_error || '; ', '') || 'no outcome from attempt ' || attempts || ' (dispatcher '
                    || coalesce(claimed_by, '?') || ' stopped); giving up'
 WHERE status IN ('pending', 'delivering') AND next_attempt_at <= now() AND attempts >= %(max_attempts)s
RETURNING id
