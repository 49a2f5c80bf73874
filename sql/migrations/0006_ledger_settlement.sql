-- 0006_ledger_settlement: every reservation settles, rows that cannot fit a
-- model are refused before they are sent, and a lane says why it is not moving.
--
-- Issue 10 ("one bad row froze a whole key"): a 2 MB row reserved ~400,000
-- tokens, the provider refused it (context length exceeded), and because only
-- successful calls settled, the key's token bucket stayed ~248,000 in debt for
-- minutes. Now (docs/ratelimits.md, "What a failed call costs"):
--  * workers give back a refused call's tokens at once (settle_capacity);
--  * prices carry each model's context window and output limit, so a row that
--    cannot fit is refused at submit (SDK/CLI), at INSERT (this trigger, for
--    rows that clearly cannot fit) or failed at claim time without a call;
--  * batchdb.lane_states says, per lane, whether it is ready, waiting for
--    tokens, held by a 429 or out of its daily quota.

-- ---------------------------------------------------------------------------
-- Model limits next to the price. NULL: not known (nothing is checked).
--   context_window     prompt + max output must fit (OpenAI, Azure);
--   max_input_tokens   the prompt alone must fit (Gemini's input limit; GPT-5's 272k);
--   max_output_tokens  the largest max_tokens the model accepts.
-- ---------------------------------------------------------------------------
ALTER TABLE batchdb.prices
    ADD COLUMN context_window    integer,
    ADD COLUMN max_input_tokens  integer,
    ADD COLUMN max_output_tokens integer,
    ADD CONSTRAINT prices_model_limits_positive CHECK (
        (context_window IS NULL OR context_window > 0)
        AND (max_input_tokens IS NULL OR max_input_tokens > 0)
        AND (max_output_tokens IS NULL OR max_output_tokens > 0));

-- As the providers publish them for the seeded models; edit freely.
UPDATE batchdb.prices p
   SET context_window = v.context_window, max_input_tokens = v.max_input_tokens,
       max_output_tokens = v.max_output_tokens
  FROM (VALUES
    ('openai', 'gpt-4o',                 128000,  NULL::integer,  16384),
    ('openai', 'gpt-4o-mini',            128000,  NULL,   16384),
    ('openai', 'gpt-4.1',               1047576,  NULL,   32768),
    ('openai', 'gpt-4.1-mini',          1047576,  NULL,   32768),
    ('openai', 'gpt-4.1-nano',          1047576,  NULL,   32768),
    ('openai', 'gpt-5',                  400000,  272000, 128000),
    ('openai', 'gpt-5-mini',             400000,  272000, 128000),
    ('openai', 'gpt-5-nano',             400000,  272000, 128000),
    ('openai', 'o4-mini',                200000,  NULL,  100000),
    ('azure',  'gpt-4o',                 128000,  NULL,   16384),
    ('azure',  'gpt-4o-mini',            128000,  NULL,   16384),
    ('gemini', 'gemini-2.5-pro',           NULL, 1048576, 65536),
    ('gemini', 'gemini-2.5-flash',         NULL, 1048576, 65536),
    ('gemini', 'gemini-2.5-flash-lite',    NULL, 1048576, 65536),
    ('gemini', 'gemini-2.0-flash',         NULL, 1048576,  8192)
  ) AS v(provider, model, context_window, max_input_tokens, max_output_tokens)
 WHERE p.provider = v.provider AND p.model = v.model;

-- ---------------------------------------------------------------------------
-- settle_capacity: what workers learnt after their calls, in one statement for
-- many lanes. p_tokens[i] > 0 gives tokens back to lane i (a refused call, an
-- estimate that was high); < 0 takes more (the provider counted more). A give-back
-- never lifts the bucket above its burst cap; a bucket already above it stays.
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.settle_capacity(
    p_provider text[], p_key_alias text[], p_model text[], p_tokens bigint[]
) RETURNS void
LANGUAGE sql AS $$
    UPDATE batchdb.rate_limits r
       SET token_credit = CASE
               WHEN s.tokens > 0 AND r.tpm IS NOT NULL THEN
                   greatest(r.token_credit,
                            least(r.token_credit + s.tokens,
                                  r.tpm / 60.0 * r.target_fraction * r.pace * r.burst_seconds))
               ELSE r.token_credit + s.tokens END,
           tokens_granted = greatest(0, r.tokens_granted - s.tokens),
           updated_at = now()
      FROM (SELECT provider, key_alias, model, sum(tokens) AS tokens
              FROM unnest(p_provider, p_key_alias, p_model, p_tokens) AS x(provider, key_alias, model, tokens)
             GROUP BY provider, key_alias, model) s
     WHERE r.provider = s.provider AND r.key_alias = s.key_alias AND r.model = s.model
       AND s.tokens <> 0;
$$;

-- ---------------------------------------------------------------------------
-- lane_states: each lane's live state in words (ready, waiting for tokens, waiting
-- for requests, held by a 429, daily quota used up), for `batchdb limits show`, the
-- dashboard's Providers page and the worker log. The buckets are refilled to
-- now() exactly as reserve_capacity would. (A circuit breaker may restate this
-- view to add its own "circuit open since T" ahead of these states.)
-- ---------------------------------------------------------------------------
CREATE VIEW batchdb.lane_states AS
SELECT l.*,
       -- Not moving for at least 5 s more: what the dashboard warns about (a lane at its
       -- limit is often a moment from its next grant; that lane is moving).
       coalesce(l.until > now() + interval '5 seconds', false) AS stalled
  FROM (
SELECT r.provider, r.key_alias, r.model,
       s.pace_now,
       s.token_credit_now,
       CASE
           WHEN r.blocked_until > now() THEN 'held by a 429'
           WHEN r.rpd IS NOT NULL AND r.day_key = (now() AT TIME ZONE 'America/Los_Angeles')::date
                AND r.day_requests >= r.rpd THEN 'daily quota used up'
           WHEN s.token_credit_now < 0 THEN 'waiting for tokens'
           WHEN s.request_credit_now < 1 THEN 'waiting for requests'
           ELSE 'ready'
       END AS state,
       CASE
           WHEN r.blocked_until > now() THEN r.blocked_until
           WHEN r.rpd IS NOT NULL AND r.day_key = (now() AT TIME ZONE 'America/Los_Angeles')::date
                AND r.day_requests >= r.rpd
               THEN (((now() AT TIME ZONE 'America/Los_Angeles')::date + 1)::timestamp AT TIME ZONE 'America/Los_Angeles')
           WHEN s.token_credit_now < 0 AND s.tok_rate > 0
               THEN now() + make_interval(secs => -s.token_credit_now / s.tok_rate)
           WHEN s.request_credit_now < 1 AND s.req_rate > 0
               THEN now() + make_interval(secs => (1 - s.request_credit_now) / s.req_rate)
       END AS until,
       CASE
           WHEN r.blocked_until > now() THEN
               format('held by a 429 until %s UTC', to_char(r.blocked_until AT TIME ZONE 'UTC', 'HH24:MI:SS'))
           WHEN r.rpd IS NOT NULL AND r.day_key = (now() AT TIME ZONE 'America/Los_Angeles')::date
                AND r.day_requests >= r.rpd THEN
               format('daily quota of %s requests used up; resets at midnight Pacific', r.rpd)
           WHEN s.token_credit_now < 0 THEN
               format('waiting for tokens: %s in debt, moving again about %s UTC',
                      to_char(-s.token_credit_now, 'FM999,999,999,990'),
                      to_char((now() + make_interval(secs => -s.token_credit_now / nullif(s.tok_rate, 0)))
                              AT TIME ZONE 'UTC', 'HH24:MI:SS'))
           WHEN s.request_credit_now < 1 THEN
               format('waiting for requests: limit %s per minute, next in %s s', r.rpm,
                      round(((1 - s.request_credit_now) / nullif(s.req_rate, 0))::numeric, 1))
           ELSE 'ready'
       END AS state_text
  FROM batchdb.rate_limits r
 CROSS JOIN LATERAL (
        SELECT least(1.0, r.pace + 0.02 * greatest(0, extract(epoch FROM now() - r.refilled_at)))::float8 AS pace_now
 ) p
 CROSS JOIN LATERAL (
        SELECT p.pace_now,
               CASE WHEN r.tpm IS NULL THEN NULL ELSE r.tpm / 60.0 * r.target_fraction * p.pace_now END AS tok_rate,
               CASE WHEN r.tpm IS NULL THEN NULL
                    ELSE least(r.tpm / 60.0 * r.target_fraction * p.pace_now * r.burst_seconds,
                               r.token_credit + greatest(0, extract(epoch FROM now() - r.refilled_at))
                                                * r.tpm / 60.0 * r.target_fraction * p.pace_now)
               END::float8 AS token_credit_now,
               CASE WHEN r.rpm IS NULL THEN NULL ELSE r.rpm / 60.0 * r.target_fraction * p.pace_now END AS req_rate,
               CASE WHEN r.rpm IS NULL THEN NULL
                    ELSE least(greatest(1.0, r.rpm / 60.0 * r.target_fraction * p.pace_now * r.burst_seconds),
                               r.request_credit + greatest(0, extract(epoch FROM now() - r.refilled_at))
                                                  * r.rpm / 60.0 * r.target_fraction * p.pace_now)
               END::float8 AS request_credit_now
 ) s
) l;

-- ---------------------------------------------------------------------------
-- Lower bound of a text's o200k token count: every run of letters is at least
-- one token (the tokenizer never joins two words into one token; an
-- apostrophe suffix such as 's stays with its word here). Exact counts need the
-- tokenizer (batchdb/tokens.py); this is only for refusing what clearly cannot fit.
-- ---------------------------------------------------------------------------
CREATE FUNCTION batchdb.min_tokens(p_text text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_count(coalesce(p_text, ''), '[[:alpha:]]+(''[[:alpha:]]+)?')::bigint;
$$;

-- The prompt text a row will send, as far as SQL can see it: the payload's
-- strings, or the job's templates plus the values of the columns they name.
CREATE FUNCTION batchdb.request_text(p_params jsonb, p_payload jsonb, p_input jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_payload IS NOT NULL THEN
            coalesce(p_params ->> 'system', '') || ' ' ||
            coalesce((SELECT string_agg(v #>> '{}', ' ')
                        FROM jsonb_path_query(p_payload, 'strict $.**') v
                       WHERE jsonb_typeof(v) = 'string'), '')
        ELSE
            coalesce(p_params ->> 'system', '') || ' ' || coalesce(p_params ->> 'prompt', '') || ' ' ||
            coalesce((SELECT string_agg(p_input ->> f, ' ')
                        FROM (SELECT DISTINCT m[1] AS f
                                FROM regexp_matches(coalesce(p_params ->> 'system', '') || ' ' ||
                                                    coalesce(p_params ->> 'prompt', ''),
                                                    '\{([^{}:!]+)[^{}]*\}', 'g') m) fields), '')
    END;
$$;

-- A row that clearly cannot fit its job's model is refused at INSERT, named by its
-- custom_id. Rows under 8 kB of JSON (at most ~4,000 words) skip the check: the
-- WHEN clause keeps COPY of ordinary rows on the fast path; workers check every
-- row exactly before sending it.
CREATE FUNCTION batchdb.requests_refuse_oversized() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    j record;
    at_least bigint;
    out_tokens bigint;
BEGIN
    SELECT jb.provider, jb.model, jb.params, p.context_window, p.max_input_tokens, p.max_output_tokens
      INTO j
      FROM batchdb.jobs jb
      JOIN batchdb.prices p ON p.provider = jb.provider AND p.model = jb.model
     WHERE jb.id = NEW.job_id;
    IF NOT FOUND OR (j.context_window IS NULL AND j.max_input_tokens IS NULL) THEN
        RETURN NEW;  -- an unknown model: nothing to check against
    END IF;
    IF NEW.payload ? 'model' AND NEW.payload ->> 'model' IS DISTINCT FROM j.model THEN
        RETURN NEW;  -- the row names another model
    END IF;
    -- 10% margin: refuse only what cannot fit by a wide margin.
    at_least := (batchdb.min_tokens(batchdb.request_text(j.params, NEW.payload, NEW.input)) * 0.9)::bigint;
    out_tokens := coalesce(
        CASE WHEN jsonb_typeof(NEW.payload -> 'max_tokens') = 'number' THEN (NEW.payload ->> 'max_tokens')::numeric END,
        CASE WHEN jsonb_typeof(j.params -> 'max_tokens') = 'number' THEN (j.params ->> 'max_tokens')::numeric END,
        0)::bigint;
    IF j.max_input_tokens IS NOT NULL AND at_least > j.max_input_tokens THEN
        RAISE EXCEPTION 'batchdb.requests: row custom_id=% of job % has a prompt of at least % tokens; % takes at most % input tokens. Shorten the row or choose a model with a larger context window',
            quote_literal(NEW.custom_id), NEW.job_id, at_least, j.model, j.max_input_tokens
            USING ERRCODE = 'check_violation';
    END IF;
    IF j.context_window IS NOT NULL AND at_least + out_tokens > j.context_window THEN
        RAISE EXCEPTION 'batchdb.requests: row custom_id=% of job % has a prompt of at least % tokens; with max_tokens % it cannot fit the % tokens of %''s context window. Shorten the row or choose a model with a larger context window',
            quote_literal(NEW.custom_id), NEW.job_id, at_least, out_tokens, j.context_window, j.model
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER requests_refuse_oversized BEFORE INSERT ON batchdb.requests
    FOR EACH ROW
    WHEN (coalesce(pg_column_size(NEW.payload), 0) + coalesce(pg_column_size(NEW.input), 0) > 8000)
    EXECUTE FUNCTION batchdb.requests_refuse_oversized();

GRANT SELECT ON batchdb.lane_states TO batchdb_user, batchdb_worker, batchdb_admin;
