-- 0009_input_checks: refuse at INSERT what every row would otherwise fail on at the worker, and
-- remember what a job's rows were so an idempotency key cannot be reused for different data.
--
-- * batchdb.request_params lists the keys a job's params and a row's payload may hold. It mirrors
--   batchdb/prompts.py and batchdb/providers/compat.py (tests/test_input_checks.py keeps them equal).
-- * A job whose params hold a misspelt key ("max_token", "temprature") is refused, naming the key.
-- * A row whose payload holds an unknown key, or whose input lacks a column the job's prompt or
--   system template uses, is refused, naming the row, the key or the column. One check per
--   statement over its transition table: a COPY of a million rows pays one join, not a million calls.
-- * jobs.input_sha256: SHA-256 of the rows the SDK copied in, compared when an idempotency key
--   comes back.

-- Every role may see which migrations ran: `batchdb worker` and `batchdb db status` check it first.
GRANT SELECT ON public.batchdb_migrations TO PUBLIC;

ALTER TABLE batchdb.jobs ADD COLUMN input_sha256 text;
GRANT UPDATE (input_sha256) ON batchdb.jobs TO batchdb_user;

CREATE TABLE batchdb.request_params (
    name    text PRIMARY KEY,
    in_job  boolean NOT NULL,   -- may appear in batchdb.jobs.params
    in_row  boolean NOT NULL,   -- may appear in batchdb.requests.payload
    meaning text NOT NULL
);

INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES
    ('system',             true,  false, 'system message template'),
    ('prompt',             true,  true,  'job: prompt template over the input columns; row: the prompt text'),
    ('messages',           false, true,  'the row''s chat messages'),
    ('model',              false, true,  'the row''s model, overriding the job''s'),
    ('input_columns',      true,  false, 'input column names (the SDK records them)'),
    ('input_types',        true,  false, 'input column types (the SDK records them)'),
    ('validation_retries', true,  false, 're-asks for an answer that fails the JSON schema'),
    ('max_tokens',         true,  true,  'most tokens in the answer'),
    ('temperature',        true,  true,  'sampling temperature, 0 to 2'),
    ('seed',               true,  true,  'sampling seed'),
    ('response_format',    true,  true,  'text, json_object or json_schema');
-- Further chat-completion parameters a job may carry (compat.py _EXTRA_PARAMS).
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning)
SELECT name, true, false, 'chat-completion parameter'
  FROM unnest(ARRAY['n', 'stream', 'stream_options', 'top_p', 'stop', 'presence_penalty', 'frequency_penalty',
                    'logit_bias', 'logprobs', 'top_logprobs', 'tools', 'tool_choice', 'functions', 'function_call',
                    'parallel_tool_calls', 'user', 'service_tier', 'store', 'metadata', 'modalities', 'audio',
                    'prediction', 'reasoning_effort', 'max_completion_tokens', 'web_search_options']) AS name;

GRANT SELECT ON batchdb.request_params TO batchdb_user, batchdb_worker;
GRANT ALL ON batchdb.request_params TO batchdb_admin;

-- The known name a misspelt one was most likely meant as, or NULL: the most similar by shared
-- letter pairs (Dice coefficient, as pg_trgm does with trigrams), if at least half are shared.
CREATE FUNCTION batchdb.letter_pairs(p_text text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(DISTINCT substr(p_text, i, 2)), '{}')
      FROM generate_series(1, length(p_text) - 1) AS i
$$;

CREATE FUNCTION batchdb.closest_name(p_name text, p_names text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT n
      FROM unnest(p_names) AS n,
           LATERAL (SELECT batchdb.letter_pairs(n) AS theirs, batchdb.letter_pairs(p_name) AS mine) AS p,
           LATERAL (SELECT 2.0 * cardinality(ARRAY(SELECT unnest(p.theirs) INTERSECT SELECT unnest(p.mine)))
                           / greatest(cardinality(p.theirs) + cardinality(p.mine), 1) AS score) AS s
     WHERE s.score >= 0.5
     ORDER BY s.score DESC, n
     LIMIT 1
$$;

-- Column names a Python format template uses: 'Rate {title} on {day!r:>10}' -> {title, day}.
CREATE FUNCTION batchdb.template_fields(p_template text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(DISTINCT m[1]), '{}')
      FROM regexp_matches(replace(replace(coalesce(p_template, ''), '{{', ''), '}}', ''),
                          '\{([^{}.\[!:]+)[^{}]*\}', 'g') AS m
$$;

CREATE FUNCTION batchdb.jobs_check_params() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad text;
    known text[];
BEGIN
    IF NEW.params IS NULL OR jsonb_typeof(NEW.params) <> 'object' THEN
        RETURN NEW;  -- jobs_validate refuses it
    END IF;
    SELECT array_agg(name ORDER BY name) INTO known FROM batchdb.request_params WHERE in_job;
    SELECT k INTO bad FROM jsonb_object_keys(NEW.params) AS k WHERE k <> ALL (known) ORDER BY k LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'batchdb.jobs.params: unknown key "%"%; known keys are listed in batchdb.request_params',
            bad, coalesce(' (did you mean "' || batchdb.closest_name(bad, known) || '"?)', '')
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_check_params BEFORE INSERT OR UPDATE OF params ON batchdb.jobs
    FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_check_params();

CREATE FUNCTION batchdb.requests_check_keys() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
    known text[];
BEGIN
    SELECT array_agg(name ORDER BY name) INTO known FROM batchdb.request_params WHERE in_row;
    SELECT n.custom_id, k INTO bad
      FROM new_rows n, jsonb_object_keys(n.payload) AS k
     WHERE jsonb_typeof(n.payload) = 'object' AND k <> ALL (known)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'batchdb.requests.payload: row custom_id=% has unknown key "%"%; known keys: %',
            quote_literal(bad.custom_id), bad.k,
            coalesce(' (did you mean "' || batchdb.closest_name(bad.k, known) || '"?)', ''),
            array_to_string(known, ', ')
            USING ERRCODE = 'check_violation';
    END IF;
    -- A row without a payload is formatted from its job's prompt template: the job needs one, and
    -- the row every column the job's templates use. The templates are parsed once per job
    -- (MATERIALIZED), not once per row.
    WITH templated AS MATERIALIZED (
        SELECT j.id,
               coalesce(j.params ->> 'prompt', '') <> '' AS has_prompt,
               batchdb.template_fields(j.params ->> 'prompt') || batchdb.template_fields(j.params ->> 'system')
                   AS fields
          FROM batchdb.jobs j
         WHERE j.id IN (SELECT DISTINCT job_id FROM new_rows WHERE payload IS NULL)
    )
    SELECT n.custom_id, n.job_id, n.input, t.has_prompt,
           ARRAY(SELECT f FROM unnest(t.fields) AS f WHERE NOT n.input ? f ORDER BY f) AS missing INTO bad
      FROM new_rows n
      JOIN templated t ON t.id = n.job_id
     WHERE n.payload IS NULL
       AND (NOT t.has_prompt OR (jsonb_typeof(n.input) = 'object' AND NOT n.input ?& t.fields))
     LIMIT 1;
    IF FOUND AND NOT bad.has_prompt THEN
        RAISE EXCEPTION 'batchdb.requests.payload: row custom_id=% has no payload and job % has no prompt template; give the row a payload {"prompt": ...} or the job params {"prompt": "... {column} ..."}',
            quote_literal(bad.custom_id), bad.job_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF FOUND THEN
        RAISE EXCEPTION 'batchdb.requests.input: row custom_id=% lacks column(s) % that the job''s template uses; it has: %',
            quote_literal(bad.custom_id), array_to_string(bad.missing, ', '),
            coalesce((SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(bad.input) AS k), '(none)')
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER requests_check_keys AFTER INSERT ON batchdb.requests
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_check_keys();
