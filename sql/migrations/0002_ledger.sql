-- 0002_ledger: the shared rate-limit ledger and budget reservations.
--
-- Every worker, on every machine, reserves provider capacity here before a
-- call, so N workers together stay inside one key's limits. The buckets live
-- in database time; see docs/ratelimits.md.

ALTER TABLE batchdb.jobs ADD COLUMN key_alias text NOT NULL DEFAULT 'default';
-- Estimated cost of calls in flight, held against budget_usd until they settle.
ALTER TABLE batchdb.jobs ADD COLUMN reserved_usd numeric(18, 8) NOT NULL DEFAULT 0;

CREATE TABLE batchdb.rate_limits (
    provider          text NOT NULL,
    key_alias         text NOT NULL DEFAULT 'default',
    model             text NOT NULL,
    rpm               integer,
    tpm               integer,
    rpd               integer,
    -- How much of a minute's budget may go out at once, in seconds of the limit.
    burst_seconds     double precision NOT NULL DEFAULT 0.5,
    -- Share of the limit batchdb aims for; the rest absorbs clock and network jitter.
    target_fraction   double precision NOT NULL DEFAULT 0.99,
    source            text NOT NULL DEFAULT 'configured',
    -- Live state: two token buckets (requests, tokens), refilled in database time.
    request_credit    double precision NOT NULL DEFAULT 0,
    token_credit      double precision NOT NULL DEFAULT 0,
    refilled_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Multiplicative decrease on a 429, additive recovery afterwards (AIMD).
    pace              double precision NOT NULL DEFAULT 1.0,
    blocked_until     timestamptz,
    day_key           date,
    day_requests      integer NOT NULL DEFAULT 0,
    -- Running totals for dashboards.
    requests_granted  bigint NOT NULL DEFAULT 0,
    tokens_granted    bigint NOT NULL DEFAULT 0,
    rate_limited      bigint NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, key_alias, model),
    CONSTRAINT rate_limits_positive CHECK ((rpm IS NULL OR rpm > 0) AND (tpm IS NULL OR tpm > 0) AND (rpd IS NULL OR rpd > 0)),
    CONSTRAINT rate_limits_burst CHECK (burst_seconds > 0 AND burst_seconds <= 60),
    CONSTRAINT rate_limits_target CHECK (target_fraction > 0 AND target_fraction <= 1),
    CONSTRAINT rate_limits_source CHECK (source IN ('configured', 'headers'))
);

-- Per-minute usage for dashboards and for the simulator-vs-ledger comparison in tests.
CREATE TABLE batchdb.rate_usage (
    provider     text NOT NULL,
    key_alias    text NOT NULL,
    model        text NOT NULL,
    minute       timestamptz NOT NULL,
    requests     bigint NOT NULL DEFAULT 0,
    tokens       bigint NOT NULL DEFAULT 0,
    rate_limited bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, key_alias, model, minute)
);

-- ---------------------------------------------------------------------------
-- reserve_capacity: grant the longest prefix of the offered calls that fits
-- both buckets now. Tokens are what the provider counts on arrival (OpenAI:
-- prompt + max_tokens). Also folds in what the caller learnt since its last
-- call: tokens to give back (estimate was high) and the provider's own view of
-- what remains (x-ratelimit-remaining-* headers), which slows the key down when
-- someone else is spending it.
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.reserve_capacity(
    p_provider text, p_key_alias text, p_model text,
    p_tokens bigint[],
    p_refund_tokens bigint DEFAULT 0,
    p_remaining_requests double precision DEFAULT NULL,
    p_remaining_tokens double precision DEFAULT NULL
) RETURNS TABLE (granted integer, wait_seconds double precision, daily_exhausted boolean, limited boolean)
LANGUAGE plpgsql AS $$
DECLARE
    r batchdb.rate_limits%ROWTYPE;
    t timestamptz := clock_timestamp();
    elapsed double precision;
    req_rate double precision;
    tok_rate double precision;
    req_cap double precision;
    tok_cap double precision;
    req double precision;
    tok double precision;
    n integer := 0;
    need bigint;
    wait double precision := 0;
    today date := (t AT TIME ZONE 'America/Los_Angeles')::date;
BEGIN
    SELECT * INTO r FROM batchdb.rate_limits
     WHERE provider = p_provider AND key_alias = p_key_alias AND model = p_model
       FOR UPDATE;
    IF NOT FOUND THEN
        -- No limit known for this key and model: nothing to pace.
        RETURN QUERY SELECT coalesce(array_length(p_tokens, 1), 0), 0::double precision, false, false;
        RETURN;
    END IF;
    elapsed := greatest(0, extract(epoch FROM t - r.refilled_at));
    -- Recover 2% of the limit per second after a slowdown.
    r.pace := least(1.0, r.pace + 0.02 * elapsed);
    req_rate := CASE WHEN r.rpm IS NULL THEN NULL ELSE r.rpm / 60.0 * r.target_fraction * r.pace END;
    tok_rate := CASE WHEN r.tpm IS NULL THEN NULL ELSE r.tpm / 60.0 * r.target_fraction * r.pace END;
    -- NULL rate = no such limit; note greatest()/least() skip NULLs, so guard each bucket.
    IF req_rate IS NOT NULL THEN
        req_cap := greatest(1.0, req_rate * r.burst_seconds);
        req := least(req_cap, r.request_credit + elapsed * req_rate);
    END IF;
    IF tok_rate IS NOT NULL THEN
        tok_cap := tok_rate * r.burst_seconds;
        tok := least(tok_cap, r.token_credit + elapsed * tok_rate + coalesce(p_refund_tokens, 0));
    END IF;
    -- The provider's own window is nearly empty although we stay under the limit:
    -- another program is using this key. Ease off a little per observation (before
    -- any 429), and let the 2%/s recovery find the capacity that is left.
    IF (p_remaining_requests IS NOT NULL AND r.rpm IS NOT NULL AND p_remaining_requests < r.rpm / 60.0 * 0.25)
       OR (p_remaining_tokens IS NOT NULL AND r.tpm IS NOT NULL AND p_remaining_tokens < r.tpm / 60.0 * 0.25) THEN
        r.pace := greatest(0.1, r.pace * 0.97);
    END IF;
    IF r.day_key IS DISTINCT FROM today THEN
        r.day_key := today;
        r.day_requests := 0;
    END IF;

    IF r.blocked_until IS NOT NULL AND r.blocked_until > t THEN
        wait := extract(epoch FROM r.blocked_until - t);
    ELSIF r.rpd IS NOT NULL AND r.day_requests >= r.rpd THEN
        UPDATE batchdb.rate_limits SET day_key = r.day_key, day_requests = r.day_requests, updated_at = now()
         WHERE provider = p_provider AND key_alias = p_key_alias AND model = p_model;
        RETURN QUERY SELECT 0, extract(epoch FROM (((today + 1)::timestamp AT TIME ZONE 'America/Los_Angeles') - t))::double precision,
                            true, true;
        RETURN;
    ELSE
        FOR i IN 1 .. coalesce(array_length(p_tokens, 1), 0) LOOP
            need := p_tokens[i];
            EXIT WHEN req IS NOT NULL AND req < 1;
            -- A call larger than the whole bucket goes when the bucket is full, leaving it in debt.
            EXIT WHEN tok IS NOT NULL AND tok < least(need, tok_cap) - 1e-9;
            EXIT WHEN r.rpd IS NOT NULL AND r.day_requests + n >= r.rpd;
            n := n + 1;
            req := req - 1;
            IF tok IS NOT NULL THEN
                tok := tok - need;
            END IF;
        END LOOP;
        IF n < coalesce(array_length(p_tokens, 1), 0) THEN
            need := p_tokens[n + 1];
            wait := greatest(
                CASE WHEN req IS NOT NULL AND req < 1 THEN (1 - req) / req_rate ELSE 0 END,
                CASE WHEN tok IS NOT NULL AND tok < least(need, tok_cap) THEN (least(need, tok_cap) - tok) / tok_rate ELSE 0 END);
        END IF;
    END IF;

    UPDATE batchdb.rate_limits
       SET request_credit = coalesce(req, 0),
           token_credit = coalesce(tok, 0),
           refilled_at = t,
           pace = r.pace,
           day_key = r.day_key,
           day_requests = r.day_requests + n,
           requests_granted = requests_granted + n,
           tokens_granted = tokens_granted + coalesce((SELECT sum(x) FROM unnest(p_tokens[1:n]) x), 0),
           updated_at = now()
     WHERE provider = p_provider AND key_alias = p_key_alias AND model = p_model;
    IF n > 0 THEN
        INSERT INTO batchdb.rate_usage AS u (provider, key_alias, model, minute, requests, tokens)
        VALUES (p_provider, p_key_alias, p_model, date_trunc('minute', t), n,
                coalesce((SELECT sum(x) FROM unnest(p_tokens[1:n]) x), 0))
        ON CONFLICT (provider, key_alias, model, minute) DO UPDATE
           SET requests = u.requests + EXCLUDED.requests, tokens = u.tokens + EXCLUDED.tokens;
    END IF;
    RETURN QUERY SELECT n, wait, false, true;
END;
$$;

-- A 429 reached us: the provider's window is spent. Empty the buckets, slow the
-- key down (x0.7, recovering 2%/s), and hold it until the provider's delay passes.
CREATE FUNCTION batchdb.record_rate_limited(
    p_provider text, p_key_alias text, p_model text, p_retry_after double precision
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz := clock_timestamp();
BEGIN
    UPDATE batchdb.rate_limits
       SET request_credit = 0,
           token_credit = least(token_credit, 0),
           refilled_at = t,
           pace = greatest(0.1, pace * 0.7),
           blocked_until = greatest(coalesce(blocked_until, t), t + make_interval(secs => least(coalesce(p_retry_after, 1.0), 60))),
           rate_limited = rate_limited + 1,
           updated_at = now()
     WHERE provider = p_provider AND key_alias = p_key_alias AND model = p_model;
    INSERT INTO batchdb.rate_usage AS u (provider, key_alias, model, minute, rate_limited)
    VALUES (p_provider, p_key_alias, p_model, date_trunc('minute', t), 1)
    ON CONFLICT (provider, key_alias, model, minute) DO UPDATE SET rate_limited = u.rate_limited + 1;
END;
$$;

-- Limits seen in a provider's x-ratelimit-limit-* headers fill in a key that
-- nobody configured; configured limits are never overwritten.
CREATE FUNCTION batchdb.learn_limits(
    p_provider text, p_key_alias text, p_model text, p_rpm integer, p_tpm integer
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO batchdb.rate_limits (provider, key_alias, model, rpm, tpm, source)
    VALUES (p_provider, p_key_alias, p_model, p_rpm, p_tpm, 'headers')
    ON CONFLICT (provider, key_alias, model) DO UPDATE
       SET rpm = EXCLUDED.rpm, tpm = EXCLUDED.tpm, updated_at = now()
     WHERE batchdb.rate_limits.source = 'headers'
       AND (batchdb.rate_limits.rpm IS DISTINCT FROM EXCLUDED.rpm OR batchdb.rate_limits.tpm IS DISTINCT FROM EXCLUDED.tpm);
$$;

-- ---------------------------------------------------------------------------
-- Budgets: a call's estimated cost is reserved against the job's budget before
-- it is sent; completion replaces the estimate by the real cost. Concurrent
-- workers therefore cannot overshoot by more than the calls in flight.
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    ok boolean;
BEGIN
    UPDATE batchdb.jobs
       SET reserved_usd = reserved_usd + p_usd
     WHERE id = p_job_id
       AND (budget_usd IS NULL OR cost_usd + reserved_usd + p_usd <= budget_usd)
    RETURNING true INTO ok;
    IF ok THEN
        RETURN true;
    END IF;
    UPDATE batchdb.jobs
       SET status = 'paused',
           status_reason = format('budget of $%s reached ($%s spent); resume with a higher budget', budget_usd, round(cost_usd, 4))
     WHERE id = p_job_id AND status = 'running';
    RETURN false;
END;
$$;

CREATE FUNCTION batchdb.release_budget(p_job_ids bigint[], p_usd numeric[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE batchdb.jobs j
       SET reserved_usd = greatest(0, j.reserved_usd - r.usd)
      FROM (SELECT job_id, sum(usd) AS usd FROM unnest(p_job_ids, p_usd) AS x(job_id, usd) GROUP BY job_id) r
     WHERE j.id = r.job_id;
$$;

-- The progress view gains the budget reservation and key alias.
CREATE OR REPLACE VIEW batchdb.job_progress AS
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
       j.reserved_usd
  FROM batchdb.jobs j
  LEFT JOIN LATERAL (
        SELECT count(*) AS n_running FROM batchdb.requests q WHERE q.job_id = j.id AND q.status = 'running'
  ) r ON j.status IN ('running', 'paused', 'cancelled');
