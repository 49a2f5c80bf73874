-- 0003_ledger_pacing: gentler, de-duplicated slow-downs.
--
-- Measured with bench/ratelimit.py: with 8 workers every 429 of one burst cut the
-- pace by 30% again, and every worker's report of a low x-ratelimit-remaining
-- header cut it by 3% (hundreds of times a second), so the key fell to 20-50% of
-- its limit with no one else using it. Now a burst of 429s counts once (while the
-- key is held for the provider's delay), and header-based easing needs an almost
-- empty provider window and happens at most once a second.

ALTER TABLE batchdb.rate_limits ADD COLUMN slowed_at timestamptz;

CREATE OR REPLACE FUNCTION batchdb.reserve_capacity(
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
    -- The provider's own window is all but empty although we stay under the limit:
    -- another program is using this key. Ease off by 5%, at most once a second (many
    -- workers report the same empty window), and let the 2%/s recovery find what is left.
    IF ((p_remaining_requests IS NOT NULL AND r.rpm IS NOT NULL AND p_remaining_requests < r.rpm / 60.0 * 0.1)
        OR (p_remaining_tokens IS NOT NULL AND r.tpm IS NOT NULL AND p_remaining_tokens < r.tpm / 60.0 * 0.1))
       AND (r.slowed_at IS NULL OR r.slowed_at < t - interval '1 second') THEN
        r.pace := greatest(0.1, r.pace * 0.95);
        r.slowed_at := t;
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
           slowed_at = r.slowed_at,
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

CREATE OR REPLACE FUNCTION batchdb.record_rate_limited(
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
           -- One slow-down per burst: 429s that arrive while the key is already held count once.
           pace = CASE WHEN blocked_until IS NULL OR blocked_until <= t THEN greatest(0.1, pace * 0.7) ELSE pace END,
           slowed_at = t,
           blocked_until = greatest(coalesce(blocked_until, t), t + make_interval(secs => least(coalesce(p_retry_after, 1.0), 60))),
           rate_limited = rate_limited + 1,
           updated_at = now()
     WHERE provider = p_provider AND key_alias = p_key_alias AND model = p_model;
    INSERT INTO batchdb.rate_usage AS u (provider, key_alias, model, minute, rate_limited)
    VALUES (p_provider, p_key_alias, p_model, date_trunc('minute', t), 1)
    ON CONFLICT (provider, key_alias, model, minute) DO UPDATE SET rate_limited = u.rate_limited + 1;
END;
$$;
