-- 0027_vertex_ai: Google Vertex AI as a provider ('vertex').
--
-- Vertex AI serves the Gemini models through Google Cloud: a job's key alias names a project and
-- location (batchdb/secrets.py), so its lanes are per (project, location, model). Jobs may name
-- the provider; its online prices are seeded here (Vertex's list prices per 1M tokens, prompts up
-- to 200k tokens; the same as batchdb/price_list.json). Vertex's batch prediction is not one of
-- the Batch APIs batchdb drives, so batch and auto modes still refuse it (no batch_discount).

CREATE OR REPLACE FUNCTION batchdb.jobs_validate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.model IS NULL OR btrim(NEW.model) = '' THEN
        RAISE EXCEPTION 'batchdb.jobs.model: expected a model name such as ''gpt-4o-mini'', got %', coalesce(quote_literal(NEW.model), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.provider NOT IN ('openai', 'azure', 'gemini', 'vertex', 'instant') THEN
        RAISE EXCEPTION 'batchdb.jobs.provider: expected one of openai, azure, gemini, vertex, instant; got %', quote_literal(NEW.provider)
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

INSERT INTO batchdb.prices
    (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, max_input_tokens, max_output_tokens) VALUES
    ('vertex', 'gemini-2.5-pro',        1.25, 10.00, 0.125,  NULL, 1048576, 65535),
    ('vertex', 'gemini-2.5-flash',      0.30,  2.50, 0.03,   NULL, 1048576, 65535),
    ('vertex', 'gemini-2.5-flash-lite', 0.10,  0.40, 0.01,   NULL, 1048576, 65535),
    ('vertex', 'gemini-2.0-flash',      0.15,  0.60, 0.0375, NULL, 1048576,  8192)
ON CONFLICT (provider, model) DO NOTHING;
