-- 0016_cached_and_batch_pricing: the one cost rule prices cached input and batch calls.
--
-- Providers bill the part of a prompt they served from their prompt cache at the
-- cached-input price (OpenAI, Azure OpenAI: usage.prompt_tokens_details.cached_tokens;
-- Gemini: usageMetadata.cachedContentTokenCount; both are included in the prompt
-- token count), and calls made through a Batch API at a discount. batchdb.prices
-- had both columns since 0001 but nothing read them, so a job whose prompts shared
-- a long prefix was recorded as costing more than it was billed.
--
-- requests.cached_tokens keeps how many of a row's prompt tokens were cached (a
-- constant default: adding it rewrites nothing). batchdb.call_cost_usd gains an
-- eight-argument form (0014's four-argument one stays, as a wrapper):
--   uncached prompt tokens x input price
-- + cached tokens x cached-input price (the input price when none is listed)
-- + completion tokens x output price,
-- per million tokens, times (1 - batch_discount) for a batch call. Cached tokens
-- are clipped to 0..prompt tokens. NULL when the input or output price is unknown.

-- Altering batchdb.requests locks every job's partition in this transaction: with many jobs,
-- more locks than PostgreSQL's lock table holds. Say so, with the setting to raise, rather
-- than fail with "out of shared memory". (Used again by later migrations that alter requests.)
-- `p_capacity`: the lock table's size; by default what the server's settings give (a test passes less).
CREATE FUNCTION batchdb.require_lock_capacity_for_requests(p_capacity bigint DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    partitions bigint;
    per_lock_slot bigint := current_setting('max_connections')::bigint
                            + current_setting('max_prepared_transactions')::bigint;
    capacity bigint := coalesce(p_capacity,
                                current_setting('max_locks_per_transaction')::bigint * per_lock_slot);
    needed bigint;
BEGIN
    SELECT count(*) INTO partitions FROM pg_inherits WHERE inhparent = 'batchdb.requests'::regclass;
    needed := 4 * partitions + 200;  -- each partition, its TOAST table and indexes, and some slack
    IF needed > capacity THEN
        RAISE EXCEPTION 'batchdb: this upgrade alters batchdb.requests, whose % job partitions need about % locks in one transaction, more than PostgreSQL holds (%); set max_locks_per_transaction = % in postgresql.conf and restart PostgreSQL (or delete finished jobs), then run: batchdb db upgrade',
            partitions, needed, capacity, ceil(needed::numeric / per_lock_slot)::bigint + 16
            USING ERRCODE = 'insufficient_resources';
    END IF;
END;
$$;
REVOKE EXECUTE ON FUNCTION batchdb.require_lock_capacity_for_requests(bigint) FROM PUBLIC;

SELECT batchdb.require_lock_capacity_for_requests();
ALTER TABLE batchdb.requests ADD COLUMN cached_tokens integer NOT NULL DEFAULT 0;

-- The job's counters gain cached tokens beside prompt and completion tokens (kept exact by the
-- same statement-level triggers), and job_progress shows them as its last column.
ALTER TABLE batchdb.jobs ADD COLUMN cached_tokens bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION batchdb.requests_after_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    WITH removed AS (
        SELECT job_id,
               count(*) AS n,
               count(*) FILTER (WHERE status = 'succeeded') AS s,
               count(*) FILTER (WHERE status = 'failed') AS f,
               count(*) FILTER (WHERE status = 'dead') AS d,
               count(*) FILTER (WHERE status = 'cancelled') AS c,
               sum(prompt_tokens) AS pt, sum(cached_tokens) AS cached, sum(completion_tokens) AS ct,
               sum(cost_usd) AS cost
          FROM old_rows GROUP BY job_id
    )
    UPDATE batchdb.jobs j
       SET n_total = j.n_total - r.n, n_succeeded = j.n_succeeded - r.s, n_failed = j.n_failed - r.f,
           n_dead = j.n_dead - r.d, n_cancelled = j.n_cancelled - r.c,
           prompt_tokens = j.prompt_tokens - r.pt, cached_tokens = j.cached_tokens - r.cached,
           completion_tokens = j.completion_tokens - r.ct,
           cost_usd = j.cost_usd - r.cost
      FROM removed r
     WHERE j.id = r.job_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION batchdb.requests_after_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    WITH delta AS (
        SELECT n.job_id,
               count(*) FILTER (WHERE n.status = 'succeeded') - count(*) FILTER (WHERE o.status = 'succeeded') AS d_succeeded,
               count(*) FILTER (WHERE n.status = 'failed') - count(*) FILTER (WHERE o.status = 'failed') AS d_failed,
               count(*) FILTER (WHERE n.status = 'dead') - count(*) FILTER (WHERE o.status = 'dead') AS d_dead,
               count(*) FILTER (WHERE n.status = 'cancelled') - count(*) FILTER (WHERE o.status = 'cancelled') AS d_cancelled,
               -- A retry spends an attempt: rows handed back unsent (release_leases, defer_leases, an open
               -- circuit) get theirs back and are not retries.
               count(*) FILTER (WHERE o.status = 'running' AND n.status = 'queued' AND n.attempts >= o.attempts) AS d_retries,
               count(*) FILTER (WHERE o.status = 'queued' AND n.status = 'running') AS d_claimed,
               coalesce(sum(n.prompt_tokens - o.prompt_tokens), 0) AS d_prompt,
               coalesce(sum(n.cached_tokens - o.cached_tokens), 0) AS d_cached,
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
           cached_tokens = j.cached_tokens + d.d_cached,
           completion_tokens = j.completion_tokens + d.d_completion,
           cost_usd = j.cost_usd + d.d_cost,
           started_at = coalesce(j.started_at, CASE WHEN d.d_claimed > 0 THEN now() END)
      FROM delta d
     WHERE j.id = d.job_id
       AND (d.d_succeeded <> 0 OR d.d_failed <> 0 OR d.d_dead <> 0 OR d.d_cancelled <> 0 OR d.d_retries <> 0
            OR d.d_prompt <> 0 OR d.d_cached <> 0 OR d.d_completion <> 0 OR d.d_cost <> 0
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
       j.cached_tokens
  FROM batchdb.jobs j
  LEFT JOIN LATERAL (
        SELECT count(*) AS n_running
          FROM batchdb.requests q
         WHERE j.status IN ('running', 'paused', 'cancelled') AND q.job_id = j.id AND q.status = 'running'
  ) r ON true;

COMMENT ON COLUMN batchdb.requests.cached_tokens IS
    'Prompt tokens of this row''s calls that the provider served from its prompt cache (part of prompt_tokens).';
COMMENT ON COLUMN batchdb.prices.cached_input_per_mtok IS
    'USD per 1M prompt tokens served from the provider''s prompt cache; NULL: charged at input_per_mtok.';
COMMENT ON COLUMN batchdb.prices.batch_discount IS
    'Share taken off every token price for calls made through the provider''s Batch API (0.5: half price); NULL: none.';


CREATE FUNCTION batchdb.call_cost_usd(p_input_per_mtok numeric, p_cached_input_per_mtok numeric,
                                      p_output_per_mtok numeric, p_batch_discount numeric,
                                      p_prompt_tokens bigint, p_cached_tokens bigint,
                                      p_completion_tokens bigint, p_batch boolean)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ((p_prompt_tokens - c.cached) * p_input_per_mtok
            + c.cached * coalesce(p_cached_input_per_mtok, p_input_per_mtok)
            + p_completion_tokens * p_output_per_mtok) / 1000000
           * CASE WHEN p_batch THEN 1 - coalesce(p_batch_discount, 0) ELSE 1 END
      FROM (SELECT least(greatest(coalesce(p_cached_tokens, 0), 0), greatest(p_prompt_tokens, 0)) AS cached) c
$$;

GRANT EXECUTE ON FUNCTION batchdb.call_cost_usd(numeric, numeric, numeric, numeric, bigint, bigint, bigint, boolean)
    TO PUBLIC;

-- 0014's four-argument form stays as a wrapper of the new one: workers still running the previous
-- release while the database is upgraded call it from their complete_batch (dropping it would
-- make their completions fail and their paid answers be asked again).
CREATE OR REPLACE FUNCTION batchdb.call_cost_usd(p_input_per_mtok numeric, p_output_per_mtok numeric,
                                                 p_prompt_tokens bigint, p_completion_tokens bigint)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT batchdb.call_cost_usd(p_input_per_mtok, NULL, p_output_per_mtok, NULL, p_prompt_tokens, 0,
                                 p_completion_tokens, false)
$$;
