-- batchdb's schema as it stands after the last migration: every table, view,
-- function, trigger, policy and grant of the `batchdb` schema, each defined once,
-- and the reference data the migrations seed. Read this file to see what the
-- database looks like today; read sql/migrations/ for how it got there and why.
--
-- Databases are built and upgraded by the migrations (`batchdb db upgrade`).
-- tests/test_schema.py builds one database from this file and one from the
-- migrations and requires pg_dump to describe them identically: a migration
-- that changes an object changes it here too (by hand, or start from
-- `python tests/schema_dump.py DSN > sql/schema.sql` on an upgraded database).

-- The group roles are cluster-wide (see 0005_users.sql, 0025_queue_depth.sql): create them when missing.
DO $$
DECLARE
    group_role text;
BEGIN
    FOREACH group_role IN ARRAY ARRAY['batchdb_user', 'batchdb_admin', 'batchdb_worker', 'batchdb_monitor'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = group_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', group_role);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END;
$$;

-- Functions come before the tables their bodies read: create them unchecked.
SET check_function_bodies = false;

-- schema batchdb

CREATE SCHEMA batchdb;

-- table users

CREATE TABLE batchdb.users (
    name text NOT NULL,
    weight double precision DEFAULT 1 NOT NULL,
    budget_usd_day numeric(14,6),
    budget_usd_month numeric(14,6),
    email text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    team text,
    CONSTRAINT users_budgets_positive CHECK ((((budget_usd_day IS NULL) OR (budget_usd_day > (0)::numeric)) AND ((budget_usd_month IS NULL) OR (budget_usd_month > (0)::numeric)))),
    CONSTRAINT users_team_name CHECK (((team IS NULL) OR (team ~ '^[a-z_][a-z0-9_.-]{0,62}$'::text))),
    CONSTRAINT users_weight_range CHECK (((weight >= (0.001)::double precision) AND (weight <= (1000)::double precision)))
);

-- comment COLUMN users.team

COMMENT ON COLUMN batchdb.users.team IS 'Users with the same team may reuse one another''s answers (jobs.reuse_scope = team); NULL: no team.';

-- function add_user(text, text, double precision, numeric, numeric, text, text)

CREATE FUNCTION batchdb.add_user(p_name text, p_kind text DEFAULT 'user'::text, p_weight double precision DEFAULT NULL::double precision, p_budget_usd_day numeric DEFAULT NULL::numeric, p_budget_usd_month numeric DEFAULT NULL::numeric, p_email text DEFAULT NULL::text, p_password text DEFAULT NULL::text) RETURNS batchdb.users
    LANGUAGE plpgsql
    AS $_$
DECLARE
    saved batchdb.users;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[a-z_][a-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'batchdb.add_user: name must be 1-63 lowercase letters, digits, _ . - starting with a letter or _; got %',
            coalesce(quote_literal(p_name), 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_kind NOT IN ('user', 'admin', 'worker') THEN
        RAISE EXCEPTION 'batchdb.add_user: kind must be user, admin or worker; got %', quote_literal(p_kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_name IN ('batchdb_user', 'batchdb_admin', 'batchdb_worker') THEN
        RAISE EXCEPTION 'batchdb.add_user: % is one of batchdb''s group roles', p_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_name) THEN
        IF p_password IS NULL THEN
            EXECUTE format('CREATE ROLE %I LOGIN', p_name);
        ELSE
            EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', p_name, p_password);
        END IF;
    ELSIF p_password IS NOT NULL THEN
        EXECUTE format('ALTER ROLE %I PASSWORD %L', p_name, p_password);
    END IF;
    EXECUTE format('GRANT %I TO %I', 'batchdb_' || p_kind, p_name);
    -- The row-level security subplans inflate cost estimates past jit_above_cost: JIT then
    -- spent 230 ms compiling a 1 ms progress read. batchdb's queries are short; no JIT.
    EXECUTE format('ALTER ROLE %I SET jit = off', p_name);
    -- Creating or deleting a job takes a brief exclusive lock that every claim waits on; a
    -- session left idle inside such a transaction (a notebook) must not hold it for long.
    EXECUTE format('ALTER ROLE %I SET idle_in_transaction_session_timeout = %L', p_name, '60s');
    INSERT INTO batchdb.users AS u (name, weight, budget_usd_day, budget_usd_month, email)
    VALUES (p_name, coalesce(p_weight, 1), p_budget_usd_day, p_budget_usd_month, p_email)
    ON CONFLICT (name) DO UPDATE
       SET weight = coalesce(p_weight, u.weight),
           budget_usd_day = coalesce(p_budget_usd_day, u.budget_usd_day),
           budget_usd_month = coalesce(p_budget_usd_month, u.budget_usd_month),
           email = coalesce(p_email, u.email)
    RETURNING * INTO saved;
    RETURN saved;
END;
$_$;

-- function analyze_job(bigint)

CREATE FUNCTION batchdb.analyze_job(p_job_id bigint) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    EXECUTE format('ANALYZE batchdb.%I', 'requests_' || p_job_id);
END;
$$;

-- function auto_goes_online(text, text, text, timestamp with time zone)

CREATE FUNCTION batchdb.auto_goes_online(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone) RETURNS boolean
    LANGUAGE plpgsql STABLE
    AS $$
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

-- function auto_lane(bigint)

CREATE FUNCTION batchdb.auto_lane(p_job_id bigint) RETURNS TABLE(lane text, batch_cutoff timestamp with time zone, cancel_at timestamp with time zone, past_cutoff boolean, past_cancel boolean)
    LANGUAGE sql STABLE
    AS $$
    SELECT CASE WHEN batchdb.auto_goes_online(j.provider, j.key_alias, j.model, j.deadline) THEN 'online' ELSE 'batch' END,
           t.batch_cutoff, t.cancel_at, now() >= t.batch_cutoff, now() >= t.cancel_at
      FROM batchdb.jobs j
     CROSS JOIN LATERAL batchdb.auto_times(j.provider, j.key_alias, j.model, j.deadline) t
     WHERE j.id = p_job_id AND j.mode = 'auto'
$$;

-- function auto_times(text, text, text, timestamp with time zone)

CREATE FUNCTION batchdb.auto_times(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone) RETURNS TABLE(batch_cutoff timestamp with time zone, cancel_at timestamp with time zone)
    LANGUAGE sql STABLE
    AS $$
    SELECT p_deadline - make_interval(secs => w.window_s + w.margin_s), p_deadline - make_interval(secs => w.margin_s)
      FROM batchdb.batch_window(p_provider, p_key_alias, p_model) w
$$;

-- function batch_queue_full(text, text, text)

CREATE FUNCTION batchdb.batch_queue_full(p_provider text, p_key_alias text, p_model text) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
    SELECT coalesce(l.batch_queue_tokens - sum(b.enqueued_tokens)
                    < sum(b.enqueued_tokens)::double precision / nullif(sum(b.n_requests), 0), false)
      FROM batchdb.rate_limits l
      JOIN batchdb.provider_batches b ON b.provider = l.provider AND b.key_alias = l.key_alias AND b.model = l.model
       AND (b.state IN ('submitted', 'in_progress') OR (b.state = 'file_uploaded' AND b.create_started_at IS NOT NULL))
     WHERE l.provider = p_provider AND l.key_alias = p_key_alias AND l.model = p_model
       AND l.batch_queue_tokens IS NOT NULL
     GROUP BY l.batch_queue_tokens
$$;

-- function batch_window(text, text, text)

CREATE FUNCTION batchdb.batch_window(p_provider text, p_key_alias text, p_model text) RETURNS TABLE(window_s double precision, margin_s double precision)
    LANGUAGE sql STABLE
    AS $$
    SELECT w.s, coalesce(l.batch_margin_seconds, w.s / 24)
      FROM (SELECT 1) one
      LEFT JOIN batchdb.rate_limits l ON l.provider = p_provider AND l.key_alias = p_key_alias AND l.model = p_model
     CROSS JOIN LATERAL (SELECT coalesce(l.batch_window_seconds,
                                         CASE WHEN p_provider = 'gemini' THEN 172800.0 ELSE 86400.0 END) AS s) w
$$;

-- function call_cost_usd(numeric, numeric, bigint, bigint)

CREATE FUNCTION batchdb.call_cost_usd(p_input_per_mtok numeric, p_output_per_mtok numeric, p_prompt_tokens bigint, p_completion_tokens bigint) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT batchdb.call_cost_usd(p_input_per_mtok, NULL, p_output_per_mtok, NULL, p_prompt_tokens, 0,
                                 p_completion_tokens, false)
$$;

-- function call_cost_usd(numeric, numeric, numeric, numeric, bigint, bigint, bigint, boolean)

CREATE FUNCTION batchdb.call_cost_usd(p_input_per_mtok numeric, p_cached_input_per_mtok numeric, p_output_per_mtok numeric, p_batch_discount numeric, p_prompt_tokens bigint, p_cached_tokens bigint, p_completion_tokens bigint, p_batch boolean) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT ((p_prompt_tokens - c.cached) * p_input_per_mtok
            + c.cached * coalesce(p_cached_input_per_mtok, p_input_per_mtok)
            + p_completion_tokens * p_output_per_mtok) / 1000000
           * CASE WHEN p_batch THEN 1 - coalesce(p_batch_discount, 0) ELSE 1 END
      FROM (SELECT least(greatest(coalesce(p_cached_tokens, 0), 0), greatest(p_prompt_tokens, 0)) AS cached) c
$$;

-- function cancel_job(bigint)

CREATE FUNCTION batchdb.cancel_job(p_job_id bigint) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
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

-- function circuit_close(text, text, text)

CREATE FUNCTION batchdb.circuit_close(p_provider text, p_key_alias text, p_model text) RETURNS interval
    LANGUAGE plpgsql
    AS $$
DECLARE
    since timestamptz;
BEGIN
    UPDATE batchdb.circuits k
       SET state = 'closed', closed_at = now(), probe_owner = NULL, probe_expires_at = NULL, next_probe_at = NULL
     WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model AND k.state = 'open'
    RETURNING k.opened_at INTO since;
    IF since IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE batchdb.jobs j
       SET status_reason = NULL
     WHERE j.provider = p_provider AND j.key_alias = p_key_alias AND j.model = p_model
       AND j.status IN ('running', 'completed') AND j.status_reason LIKE 'waiting: provider unavailable%';
    PERFORM pg_notify('batchdb_requests', '');
    RETURN now() - since;
END;
$$;

-- function circuit_mark_jobs(text, text, text)

CREATE FUNCTION batchdb.circuit_mark_jobs(p_provider text, p_key_alias text, p_model text) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    reason text;
    n integer;
BEGIN
    SELECT batchdb.circuit_wait_reason(c.opened_at, c.last_error) INTO reason
      FROM batchdb.circuits c
     WHERE c.provider = p_provider AND c.key_alias = p_key_alias AND c.model = p_model AND c.state = 'open';
    IF reason IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE batchdb.jobs j
       SET status_reason = reason
     WHERE j.provider = p_provider AND j.key_alias = p_key_alias AND j.model = p_model
       AND j.status = 'running' AND j.status_reason IS DISTINCT FROM reason;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

-- function circuit_open(text, text, text, text, double precision)

CREATE FUNCTION batchdb.circuit_open(p_provider text, p_key_alias text, p_model text, p_error text, p_first_probe_s double precision) RETURNS TABLE(opened boolean, opened_at timestamp with time zone, next_probe_at timestamp with time zone)
    LANGUAGE plpgsql
    AS $$
DECLARE
    c batchdb.circuits;
    was_open boolean;
BEGIN
    INSERT INTO batchdb.circuits AS k (provider, key_alias, model)
    VALUES (p_provider, p_key_alias, p_model)
    ON CONFLICT (provider, key_alias, model) DO NOTHING;
    SELECT * INTO c FROM batchdb.circuits k
     WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model
       FOR UPDATE;
    was_open := c.state = 'open';
    IF was_open THEN
        UPDATE batchdb.circuits k SET last_error = p_error
         WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model
        RETURNING * INTO c;
    ELSE
        UPDATE batchdb.circuits k
           SET state = 'open', opened_at = now(), closed_at = NULL, last_error = p_error, probes_failed = 0,
               next_probe_at = now() + make_interval(secs => p_first_probe_s),
               probe_owner = NULL, probe_expires_at = NULL, n_opened = k.n_opened + 1
         WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model
        RETURNING * INTO c;
        PERFORM batchdb.circuit_mark_jobs(p_provider, p_key_alias, p_model);
    END IF;
    RETURN QUERY SELECT NOT was_open, c.opened_at, c.next_probe_at;
END;
$$;

-- function circuit_probe_failed(text, text, text, text, double precision, double precision)

CREATE FUNCTION batchdb.circuit_probe_failed(p_provider text, p_key_alias text, p_model text, p_error text, p_base_s double precision, p_max_s double precision) RETURNS timestamp with time zone
    LANGUAGE plpgsql
    AS $$
DECLARE
    due timestamptz;
BEGIN
    UPDATE batchdb.circuits k
       SET probes_failed = k.probes_failed + 1, last_error = p_error,
           next_probe_at = now() + make_interval(secs => least(p_max_s, p_base_s * power(2, least(k.probes_failed + 1, 30)))),
           probe_owner = NULL, probe_expires_at = NULL
     WHERE k.provider = p_provider AND k.key_alias = p_key_alias AND k.model = p_model AND k.state = 'open'
    RETURNING k.next_probe_at INTO due;
    PERFORM batchdb.circuit_mark_jobs(p_provider, p_key_alias, p_model);
    RETURN due;
END;
$$;

-- function circuit_wait_reason(timestamp with time zone, text)

CREATE FUNCTION batchdb.circuit_wait_reason(p_opened_at timestamp with time zone, p_error text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT 'waiting: provider unavailable since '
           || to_char(p_opened_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"Z"')
           || ' (last error: ' || coalesce(p_error, 'unknown') || ')'
$$;

-- function closest_name(text, text[])

CREATE FUNCTION batchdb.closest_name(p_name text, p_names text[]) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT n
      FROM unnest(p_names) AS n,
           LATERAL (SELECT batchdb.letter_pairs(n) AS theirs, batchdb.letter_pairs(p_name) AS mine) AS p,
           LATERAL (SELECT 2.0 * cardinality(ARRAY(SELECT unnest(p.theirs) INTERSECT SELECT unnest(p.mine)))
                           / greatest(cardinality(p.theirs) + cardinality(p.mine), 1) AS score) AS s
     WHERE s.score >= 0.5
     ORDER BY s.score DESC, n
     LIMIT 1
$$;

-- function create_job_partitions(bigint)

CREATE FUNCTION batchdb.create_job_partitions(p_job_id bigint) RETURNS void
    LANGUAGE plpgsql
    AS $$
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

-- function drop_job_partitions(bigint)

CREATE FUNCTION batchdb.drop_job_partitions(p_job_id bigint) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    EXECUTE format('DROP TABLE IF EXISTS batchdb.%I', 'requests_' || p_job_id);
    EXECUTE format('DROP TABLE IF EXISTS batchdb.%I', 'results_' || p_job_id);
END;
$$;

-- function form_provider_batch(text, text[], integer)

CREATE FUNCTION batchdb.form_provider_batch(p_provider text, p_key_aliases text[], p_max_rows integer) RETURNS TABLE(chunk_id bigint, chunk_job_id bigint, chunk_rows integer)
    LANGUAGE plpgsql
    AS $$
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

-- function jobs_after_delete()

CREATE FUNCTION batchdb.jobs_after_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    PERFORM batchdb.drop_job_partitions(OLD.id);
    RETURN NULL;
END;
$$;

-- function jobs_after_insert()

CREATE FUNCTION batchdb.jobs_after_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    PERFORM batchdb.create_job_partitions(NEW.id);
    RETURN NULL;
END;
$$;

-- function jobs_before_delete()

CREATE FUNCTION batchdb.jobs_before_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    open_chunks integer;
    providers text;
BEGIN
    SELECT count(*), string_agg(DISTINCT b.provider, ', ')
      INTO open_chunks, providers
      FROM batchdb.provider_batches b
     WHERE b.job_id = OLD.id AND b.state <> 'collected' AND b.upload_started_at IS NOT NULL;
    IF open_chunks > 0 THEN
        RAISE EXCEPTION 'job % has % batch(es) open at %: deleting it would leave them running and billed',
                        OLD.id, open_chunks, providers
            USING ERRCODE = 'object_in_use',
                  HINT = format('Cancel it first (batchdb cancel %s, or SELECT batchdb.cancel_job(%s)); once '
                                'its batches are cancelled and collected the delete goes through.', OLD.id, OLD.id);
    END IF;
    RETURN OLD;
END;
$$;

-- function jobs_check_model()

CREATE FUNCTION batchdb.jobs_check_model() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    known text[];
BEGIN
    IF NEW.allow_unknown_model OR NEW.model IS NULL OR NEW.provider IS NULL OR NEW.provider = 'instant' THEN
        RETURN NEW;  -- a missing model or provider is refused by jobs_validate
    END IF;
    IF EXISTS (SELECT 1 FROM batchdb.prices p WHERE p.provider = NEW.provider AND p.model = NEW.model) THEN
        RETURN NEW;
    END IF;
    SELECT array_agg(p.model ORDER BY p.model) INTO known FROM batchdb.prices p WHERE p.provider = NEW.provider;
    RAISE EXCEPTION 'batchdb.jobs.model: no price for %/% in batchdb.prices%; add its price, or insert the job '
                    'with allow_unknown_model = true (its cost then shows as unknown)',
        NEW.provider, NEW.model,
        coalesce(' (did you mean "' || batchdb.closest_name(NEW.model, known) || '"?)', '')
        USING ERRCODE = 'check_violation';
END;
$$;

-- function jobs_check_params()

CREATE FUNCTION batchdb.jobs_check_params() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

-- function jobs_clear_paused_until()

CREATE FUNCTION batchdb.jobs_clear_paused_until() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM 'paused' OR NEW.status_reason NOT LIKE 'user quota:%' THEN
        NEW.paused_until := NULL;
    END IF;
    RETURN NEW;
END;
$$;

-- function jobs_enqueue_notifications()

CREATE FUNCTION batchdb.jobs_enqueue_notifications() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    j batchdb.jobs;
    ev text;
    n integer;
BEGIN
    SELECT * INTO j FROM batchdb.jobs WHERE id = NEW.id;
    IF NOT FOUND THEN
        RETURN NULL;  -- deleted in the same transaction
    END IF;
    ev := batchdb.notification_event(NEW.status, NEW.status_reason, j.n_failed, j.n_dead);
    IF ev IS NULL THEN
        RETURN NULL;
    END IF;
    WITH planned AS (
        SELECT nextval(pg_get_serial_sequence('batchdb.notification_deliveries', 'id')) AS id, t.id AS target_id, t.channel
          FROM batchdb.notification_targets t
         WHERE t.job_id = j.id
         ORDER BY t.id
    ), inserted AS (
        INSERT INTO batchdb.notification_deliveries (id, job_id, target_id, channel, event, payload)
        SELECT p.id, j.id, p.target_id, p.channel, ev,
               jsonb_build_object(
                   'delivery_id', p.id,
                   'event', ev,
                   'job_id', j.id,
                   'name', j.name,
                   'owner', j.owner,
                   'provider', j.provider,
                   'model', j.model,
                   'status', NEW.status,
                   'reason', NEW.status_reason,
                   'counts', jsonb_build_object(
                       'total', j.n_total, 'succeeded', j.n_succeeded, 'failed', j.n_failed, 'dead', j.n_dead,
                       'cancelled', j.n_cancelled, 'done', j.n_done, 'retries', j.n_retries),
                   'tokens', jsonb_build_object(
                       'prompt', j.prompt_tokens, 'completion', j.completion_tokens,
                       'total', j.prompt_tokens + j.completion_tokens),
                   'cost_usd', j.cost_usd,
                   'budget_usd', j.budget_usd,
                   'created_at', to_char(j.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   'started_at', to_char(j.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   'finished_at', to_char(j.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
          FROM planned p
        RETURNING 1
    )
    SELECT count(*) INTO n FROM inserted;
    IF n > 0 THEN
        -- Wakes the dispatchers; they also poll, so a lost notification only delays.
        PERFORM pg_notify('batchdb_notifications', j.id::text);
    END IF;
    RETURN NULL;
END;
$$;

-- function jobs_notify_owner_email()

CREATE FUNCTION batchdb.jobs_notify_owner_email() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    INSERT INTO batchdb.notification_targets (job_id, channel, target)
    SELECT NEW.id, 'email', u.email FROM batchdb.users u WHERE u.name = NEW.owner AND u.email IS NOT NULL
    ON CONFLICT (job_id, channel, target) DO NOTHING;
    RETURN NULL;
END;
$$;

-- function jobs_notify_status()

CREATE FUNCTION batchdb.jobs_notify_status() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify('batchdb_events', json_build_object(
        'event', coalesce(batchdb.notification_event(NEW.status, NEW.status_reason, NEW.n_failed, NEW.n_dead),
                          'job.' || NEW.status),
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

-- function jobs_validate()

CREATE FUNCTION batchdb.jobs_validate() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

-- function jobs_validate_reuse()

CREATE FUNCTION batchdb.jobs_validate_reuse() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.reuse IS NOT NULL AND NEW.reuse <> 'exact' THEN
        RAISE EXCEPTION 'batchdb.jobs.reuse: expected ''exact'' (take stored answers to the same requests) or NULL (off), got %',
            quote_literal(NEW.reuse) USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.reuse_scope IS NULL OR NEW.reuse_scope NOT IN ('user', 'team') THEN
        RAISE EXCEPTION 'batchdb.jobs.reuse_scope: expected user or team, got %', coalesce(quote_literal(NEW.reuse_scope), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.reuse_max_age IS NOT NULL AND NEW.reuse_max_age <= interval '0' THEN
        RAISE EXCEPTION 'batchdb.jobs.reuse_max_age: expected a positive interval such as ''30 days'', or NULL for any age; got %',
            quote_literal(NEW.reuse_max_age::text) USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

-- function learn_limits(text, text, text, integer, integer)

CREATE FUNCTION batchdb.learn_limits(p_provider text, p_key_alias text, p_model text, p_rpm integer, p_tpm integer) RETURNS void
    LANGUAGE sql
    AS $$
    INSERT INTO batchdb.rate_limits (provider, key_alias, model, rpm, tpm, source)
    VALUES (p_provider, p_key_alias, p_model, p_rpm, p_tpm, 'headers')
    ON CONFLICT (provider, key_alias, model) DO UPDATE
       SET rpm = EXCLUDED.rpm, tpm = EXCLUDED.tpm, updated_at = now()
     WHERE batchdb.rate_limits.source = 'headers'
       AND (batchdb.rate_limits.rpm IS DISTINCT FROM EXCLUDED.rpm OR batchdb.rate_limits.tpm IS DISTINCT FROM EXCLUDED.tpm);
$$;

-- function letter_pairs(text)

CREATE FUNCTION batchdb.letter_pairs(p_text text) RETURNS text[]
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT coalesce(array_agg(DISTINCT substr(p_text, i, 2)), '{}')
      FROM generate_series(1, length(p_text) - 1) AS i
$$;

-- function min_tokens(text)

CREATE FUNCTION batchdb.min_tokens(p_text text) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT regexp_count(coalesce(p_text, ''), '[[:alpha:]]+(''[[:alpha:]]+)?')::bigint;
$$;

-- function notification_event(text, text, bigint, bigint)

CREATE FUNCTION batchdb.notification_event(p_status text, p_reason text, p_failed bigint, p_dead bigint) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT CASE
        WHEN p_status = 'completed' AND coalesce(p_failed, 0) + coalesce(p_dead, 0) = 0 THEN 'job.completed'
        WHEN p_status = 'completed' THEN 'job.failed'
        WHEN p_status = 'cancelled' THEN 'job.cancelled'
        WHEN p_status = 'paused' AND p_reason ILIKE 'budget%' THEN 'job.budget_paused'
        WHEN p_status = 'paused' AND p_reason ILIKE '%quota%' THEN 'job.quota_exhausted'
        WHEN p_status = 'paused' THEN 'job.paused'
        WHEN p_status = 'running' AND p_reason LIKE 'waiting: provider unavailable%' THEN 'job.provider_unavailable'
    END
$$;

-- function notification_targets_validate()

CREATE FUNCTION batchdb.notification_targets_validate() RETURNS trigger
    LANGUAGE plpgsql
    AS $_$
BEGIN
    IF NEW.channel IS NULL OR NEW.channel NOT IN ('webhook', 'email') THEN
        RAISE EXCEPTION 'batchdb.notification_targets.channel: expected ''webhook'' or ''email'', got %', coalesce(quote_literal(NEW.channel), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.channel = 'webhook' THEN
        IF NEW.target IS NULL OR NEW.target !~* '^https?://[^/?#[:space:]]+[^[:space:]]*$' THEN
            RAISE EXCEPTION 'batchdb.notification_targets.target: expected an http:// or https:// URL for a webhook, got %', coalesce(quote_literal(NEW.target), 'NULL')
                USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.secret IS NULL THEN
            -- 244 random bits from the server's strong random source (gen_random_uuid), hashed to hex.
            NEW.secret := encode(sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')), 'hex');
        ELSIF length(NEW.secret) < 16 THEN
            RAISE EXCEPTION 'batchdb.notification_targets.secret: expected at least 16 characters (or NULL for a generated one), got %', length(NEW.secret)
                USING ERRCODE = 'check_violation';
        END IF;
    ELSE
        IF NEW.target IS NULL OR NEW.target !~ '^[^@[:space:]<>,;]+@[^@[:space:]<>,;]+\.[^@[:space:]<>,;]+$' THEN
            RAISE EXCEPTION 'batchdb.notification_targets.target: expected one email address such as ''ops@example.com'', got %', coalesce(quote_literal(NEW.target), 'NULL')
                USING ERRCODE = 'check_violation';
        END IF;
        NEW.secret := NULL;
    END IF;
    RETURN NEW;
END;
$_$;

-- function provider_batch_reserve(bigint, bigint)

CREATE FUNCTION batchdb.provider_batch_reserve(p_id bigint, p_lease_token bigint) RETURNS text
    LANGUAGE plpgsql
    AS $$
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

-- function rate_limits_record_history()

CREATE FUNCTION batchdb.rate_limits_record_history() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO batchdb.rate_limit_history (provider, key_alias, model)
        VALUES (OLD.provider, OLD.key_alias, OLD.model);
    ELSE
        INSERT INTO batchdb.rate_limit_history (provider, key_alias, model, rpm, tpm, rpd, source)
        VALUES (NEW.provider, NEW.key_alias, NEW.model, NEW.rpm, NEW.tpm, NEW.rpd, NEW.source);
    END IF;
    RETURN NULL;
END;
$$;

-- function record_rate_limited(text, text, text, double precision)

CREATE FUNCTION batchdb.record_rate_limited(p_provider text, p_key_alias text, p_model text, p_retry_after double precision) RETURNS void
    LANGUAGE plpgsql
    AS $$
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

-- function release_budget(bigint[], numeric[])

CREATE FUNCTION batchdb.release_budget(p_job_ids bigint[], p_usd numeric[]) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    UPDATE batchdb.user_spend s
       SET reserved_usd = greatest(0, s.reserved_usd - r.usd)
      FROM (SELECT j.owner, sum(x.usd) AS usd
              FROM unnest(p_job_ids, p_usd) AS x(job_id, usd)
              JOIN batchdb.jobs j ON j.id = x.job_id
             GROUP BY j.owner) r
     WHERE s.owner = r.owner AND s.day = today;
    UPDATE batchdb.jobs j
       SET reserved_usd = greatest(0, j.reserved_usd - r.usd)
      FROM (SELECT job_id, sum(usd) AS usd FROM unnest(p_job_ids, p_usd) AS x(job_id, usd) GROUP BY job_id) r
     WHERE j.id = r.job_id;
END;
$$;

-- function request_text(jsonb, jsonb, jsonb)

CREATE FUNCTION batchdb.request_text(p_params jsonb, p_payload jsonb, p_input jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $_$
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
$_$;

-- function requests_after_delete()

CREATE FUNCTION batchdb.requests_after_delete() RETURNS trigger
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

-- function requests_after_insert()

CREATE FUNCTION batchdb.requests_after_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    touched bigint[];
    fresh boolean;  -- every job this statement adds rows to had none before it
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
        RETURNING j.id, j.n_total - a.n AS before
    )
    SELECT array_agg(id), bool_and(before = 0) INTO touched, fresh FROM updated;
    -- Rows whose request_key equals an earlier row's of the same job wait for that row's answer
    -- instead of being sent (0019): run_after 'infinity' keeps them out of every claim until the
    -- first row's outcome is passed on (requests_after_update). Only new rows follow, and only a
    -- row still to be answered leads.
    IF EXISTS (SELECT 1 FROM new_rows WHERE duplicate_of IS NOT NULL) THEN
        RAISE EXCEPTION 'batchdb.requests.duplicate_of is set by batchdb: give rows equal request_key values instead'
            USING ERRCODE = 'check_violation';
    END IF;
    IF EXISTS (SELECT 1 FROM new_rows WHERE request_key IS NOT NULL) THEN
        IF fresh THEN
            -- The jobs were empty: a repeated key's first row is among the new rows.
            UPDATE batchdb.requests q
               SET duplicate_of = l.leader, run_after = 'infinity'
              FROM (SELECT job_id, request_key, min(id) AS leader
                      FROM new_rows
                     WHERE request_key IS NOT NULL
                     GROUP BY job_id, request_key
                    HAVING count(*) > 1) l
              JOIN new_rows n ON n.job_id = l.job_id AND n.request_key = l.request_key AND n.id <> l.leader
              JOIN batchdb.requests lead ON lead.job_id = l.job_id AND lead.id = l.leader
                                        AND lead.status IN ('queued', 'running')
             WHERE q.job_id = n.job_id AND q.id = n.id;
        ELSE
            -- The jobs had rows: a new key's first row may be an earlier one, found with a hash join
            -- on the job's rows for the new rows' keys alone.
            WITH keys AS (
                SELECT DISTINCT job_id, request_key FROM new_rows WHERE request_key IS NOT NULL
            ), leaders AS (
                SELECT k.job_id, k.request_key, min(r.id) AS leader
                  FROM keys k
                  JOIN batchdb.requests r ON r.job_id = k.job_id AND r.request_key = k.request_key
                 WHERE r.duplicate_of IS NULL
                 GROUP BY k.job_id, k.request_key
            )
            UPDATE batchdb.requests q
               SET duplicate_of = l.leader, run_after = 'infinity'
              FROM new_rows n
              JOIN leaders l ON l.job_id = n.job_id AND l.request_key = n.request_key
              JOIN batchdb.requests lead ON lead.job_id = l.job_id AND lead.id = l.leader
                                        AND lead.status IN ('queued', 'running')
             WHERE q.job_id = n.job_id AND q.id = n.id AND l.leader <> n.id;
        END IF;
    END IF;
    -- One wake-up per statement, never per row.
    IF touched IS NOT NULL THEN
        PERFORM pg_notify('batchdb_requests', array_to_string(touched, ','));
    END IF;
    RETURN NULL;
END;
$$;

-- function requests_after_update()

CREATE FUNCTION batchdb.requests_after_update() RETURNS trigger
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
    -- A row answered once for its duplicates (0019) passes its outcome on when it becomes final:
    -- its waiting duplicates take its status and error (and, answered, a copy of its result), with
    -- no call, no tokens and no cost of their own. Their own update runs this trigger again, which
    -- counts them and finds no duplicates of theirs.
    IF EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.job_id = n.job_id AND o.id = n.id
                WHERE n.request_key IS NOT NULL AND n.duplicate_of IS NULL
                  AND n.status IN ('succeeded', 'failed', 'dead') AND n.status IS DISTINCT FROM o.status) THEN
        WITH leaders AS (
            SELECT n.job_id, n.id, n.status, n.error_class, n.error
              FROM new_rows n JOIN old_rows o ON o.job_id = n.job_id AND o.id = n.id
             WHERE n.request_key IS NOT NULL AND n.duplicate_of IS NULL
               AND n.status IN ('succeeded', 'failed', 'dead') AND n.status IS DISTINCT FROM o.status
        ), passed AS (
            UPDATE batchdb.requests f
               SET status = l.status, error_class = l.error_class, error = l.error,
                   finished_at = now(), run_after = now()
              FROM leaders l
             WHERE f.job_id = l.job_id AND f.duplicate_of = l.id AND f.status = 'queued'
            RETURNING f.job_id, f.id, f.duplicate_of, f.status
        ), counted AS (
            UPDATE batchdb.jobs j
               SET n_duplicates = j.n_duplicates + c.n
              FROM (SELECT job_id, count(*) AS n FROM passed WHERE status = 'succeeded' GROUP BY job_id) c
             WHERE j.id = c.job_id
        )
        INSERT INTO batchdb.results (job_id, request_id, response_text, response_json, finish_reason, model)
        SELECT p.job_id, p.id, r.response_text, r.response_json, r.finish_reason, r.model
          FROM passed p
          JOIN batchdb.results r ON r.job_id = p.job_id AND r.request_id = p.duplicate_of;
    END IF;
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

-- function requests_check_keys()

CREATE FUNCTION batchdb.requests_check_keys() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

-- function requests_orphan_refuse()

CREATE FUNCTION batchdb.requests_orphan_refuse() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'batchdb.requests.job_id: job % does not exist; insert the job into batchdb.jobs first', NEW.job_id
        USING ERRCODE = 'foreign_key_violation';
END;
$$;

-- function requests_refuse()

CREATE FUNCTION batchdb.requests_refuse() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

-- function requests_refuse_oversized()

CREATE FUNCTION batchdb.requests_refuse_oversized() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

-- function requests_reuse()

CREATE FUNCTION batchdb.requests_reuse() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    job record;
    owners text[];
    sources bigint[];
    ids bigint[];
    src_jobs bigint[];
    src_ids bigint[];
    costs numeric[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM batchdb.jobs
                    WHERE reuse IS NOT NULL AND status IN ('loading', 'running', 'paused')) THEN
        RETURN NULL;
    END IF;
    FOR job IN
        SELECT j.* FROM batchdb.jobs j
         WHERE j.reuse IS NOT NULL AND j.status IN ('loading', 'running', 'paused')
           AND j.id IN (SELECT DISTINCT job_id FROM new_rows WHERE request_key IS NOT NULL)
    LOOP
        owners := ARRAY[job.owner];
        IF job.reuse_scope = 'team' THEN
            SELECT array_agg(DISTINCT m.name) || job.owner INTO owners
              FROM batchdb.users me JOIN batchdb.users m ON m.team = me.team
             WHERE me.name = job.owner AND me.team IS NOT NULL;
            owners := coalesce(owners, ARRAY[job.owner]);
        END IF;
        -- Jobs asking the same requests, with an answer young enough.
        SELECT array_agg(s.id) INTO sources
          FROM batchdb.jobs s
         WHERE s.owner = ANY (owners)
           AND s.provider = job.provider AND s.model = job.model
           AND s.params - ARRAY['input_columns', 'input_types', 'dedupe'] = job.params - ARRAY['input_columns', 'input_types', 'dedupe']
           AND s.n_succeeded > 0
           AND (job.reuse_max_age IS NULL OR s.finished_at IS NULL OR s.finished_at >= now() - job.reuse_max_age);
        CONTINUE WHEN sources IS NULL;
        -- Row by row, the latest answer through requests_answers_idx (a probe per source job): a
        -- join the planner orders itself can scan a whole source partition per row when its
        -- statistics predate its answers.
        -- The new rows are read back by id (their duplicate_of is set since): a join with the
        -- transition table, which has no statistics, was planned as a nested loop over it.
        SELECT array_agg(n.id) INTO ids FROM new_rows n WHERE n.job_id = job.id AND n.request_key IS NOT NULL;
        SELECT array_agg(q.id), array_agg(a.job_id), array_agg(a.id), array_agg(a.cost_usd)
          INTO ids, src_jobs, src_ids, costs
          FROM batchdb.requests q
          CROSS JOIN LATERAL (
                SELECT s.job_id, s.id, s.cost_usd
                  FROM batchdb.requests s
                 WHERE s.job_id = ANY (sources) AND s.request_key = q.request_key
                   AND s.status = 'succeeded' AND s.request_key IS NOT NULL
                   AND s.duplicate_of IS NULL AND s.reused_from IS NULL
                   AND (job.reuse_max_age IS NULL OR s.finished_at >= now() - job.reuse_max_age)
                   AND EXISTS (SELECT 1 FROM batchdb.results r WHERE r.job_id = s.job_id AND r.request_id = s.id)
                 ORDER BY s.finished_at DESC, s.id DESC
                 LIMIT 1) a
         WHERE q.job_id = job.id AND q.id = ANY (ids)
           AND q.status = 'queued' AND q.duplicate_of IS NULL;
        CONTINUE WHEN ids IS NULL;
        -- The answer first: the rows' own update passes it on to their duplicates (0019).
        INSERT INTO batchdb.results (job_id, request_id, response_text, response_json, finish_reason, model)
        SELECT job.id, u.id, r.response_text, r.response_json, r.finish_reason, r.model
          FROM unnest(ids, src_jobs, src_ids) AS u(id, src_job, src_id)
          JOIN batchdb.results r ON r.job_id = ANY (sources) AND r.job_id = u.src_job AND r.request_id = u.src_id;
        -- requests_after_update plans its joins of the transition tables once per session, sized by
        -- its first call: in a submit that is 0019's update of a statement's duplicates, often none,
        -- and a nested loop planned for none is quadratic for the thousands of rows updated here
        -- (200,000 rows: minutes instead of seconds). Replanned, it hashes.
        IF cardinality(ids) > 500 THEN
            EXECUTE 'DISCARD PLANS';
        END IF;
        UPDATE batchdb.requests q
           SET status = 'succeeded', finished_at = now(), run_after = now(),
               reused_from = u.src_id, reused_from_job = u.src_job, reused_usd = u.cost
          FROM unnest(ids, src_jobs, src_ids, costs) AS u(id, src_job, src_id, cost)
         WHERE q.job_id = job.id AND q.id = u.id AND q.status = 'queued';
        UPDATE batchdb.jobs
           SET n_reused = n_reused + cardinality(ids),
               reused_usd = reused_usd + (SELECT coalesce(sum(c), 0) FROM unnest(costs) AS c)
         WHERE id = job.id;
    END LOOP;
    RETURN NULL;
END;
$$;

-- function require_lock_capacity_for_requests(bigint)

CREATE FUNCTION batchdb.require_lock_capacity_for_requests(p_capacity bigint DEFAULT NULL::bigint) RETURNS void
    LANGUAGE plpgsql
    AS $$
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

-- function reserve_budget(bigint, numeric)

CREATE FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric) RETURNS text
    LANGUAGE plpgsql
    AS $_$
DECLARE
    job batchdb.jobs;
    usr batchdb.users;
    today date := (now() AT TIME ZONE 'UTC')::date;
    day_row batchdb.user_spend;
    month_spent numeric;
    reason text;
    until timestamptz;
    usd numeric := greatest(coalesce(p_usd, 0), 0);  -- a negative estimate must never free budget
BEGIN
    SELECT u.* INTO usr FROM batchdb.users u JOIN batchdb.jobs j ON j.owner = u.name
     WHERE j.id = p_job_id AND (u.budget_usd_day IS NOT NULL OR u.budget_usd_month IS NOT NULL);
    IF usr.name IS NOT NULL THEN
        -- The user's day row is locked first, the job row second (release_budget does the same).
        INSERT INTO batchdb.user_spend (owner, day) VALUES (usr.name, today) ON CONFLICT DO NOTHING;
        SELECT * INTO day_row FROM batchdb.user_spend WHERE owner = usr.name AND day = today FOR UPDATE;
        SELECT coalesce(sum(spent_usd), 0) INTO month_spent
          FROM batchdb.user_spend
         WHERE owner = usr.name AND day >= date_trunc('month', today)::date AND day < today;
        IF usr.budget_usd_day IS NOT NULL AND day_row.spent_usd + usd > usr.budget_usd_day THEN
            reason := format('user quota: daily budget of $%s for %s reached ($%s spent today); resumes at 00:00 UTC',
                             usr.budget_usd_day, usr.name, round(day_row.spent_usd, 4));
            until := (today + 1)::timestamp AT TIME ZONE 'UTC';
        ELSIF usr.budget_usd_month IS NOT NULL AND month_spent + day_row.spent_usd + usd > usr.budget_usd_month THEN
            reason := format('user quota: monthly budget of $%s for %s reached ($%s spent this month); resumes on the 1st (UTC)',
                             usr.budget_usd_month, usr.name, round(month_spent + day_row.spent_usd, 4));
            until := (date_trunc('month', today) + interval '1 month')::timestamp AT TIME ZONE 'UTC';
        END IF;
        IF reason IS NOT NULL THEN
            UPDATE batchdb.jobs
               SET status = 'paused', status_reason = reason, paused_until = until
             WHERE owner = usr.name AND status = 'running';
            RETURN 'paused';
        END IF;
        IF (usr.budget_usd_day IS NOT NULL AND day_row.spent_usd + day_row.reserved_usd + usd > usr.budget_usd_day)
           OR (usr.budget_usd_month IS NOT NULL
               AND month_spent + day_row.spent_usd + day_row.reserved_usd + usd > usr.budget_usd_month) THEN
            RETURN 'wait';
        END IF;
    END IF;
    SELECT * INTO job FROM batchdb.jobs WHERE id = p_job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN 'paused';
    END IF;
    IF job.budget_usd IS NOT NULL AND job.cost_usd + usd > job.budget_usd THEN
        UPDATE batchdb.jobs
           SET status = 'paused', paused_until = NULL,
               status_reason = format('budget of $%s reached ($%s spent); resume with a higher budget',
                                      job.budget_usd, round(job.cost_usd, 4))
         WHERE id = p_job_id AND status = 'running';
        RETURN 'paused';
    END IF;
    IF job.budget_usd IS NOT NULL AND job.cost_usd + job.reserved_usd + usd > job.budget_usd THEN
        RETURN 'wait';
    END IF;
    UPDATE batchdb.jobs SET reserved_usd = reserved_usd + usd WHERE id = p_job_id;
    IF usr.name IS NOT NULL THEN
        UPDATE batchdb.user_spend SET reserved_usd = reserved_usd + usd WHERE owner = usr.name AND day = today;
    END IF;
    RETURN 'ok';
END;
$_$;

-- function reserve_budget(bigint, numeric, bigint, bigint, integer)

CREATE FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric, p_request_id bigint, p_lease_token bigint, p_seq integer) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    result text;
    budget_owner text;
BEGIN
    INSERT INTO batchdb.budget_reservations (job_id, request_id, lease_token, seq, usd)
    VALUES (p_job_id, p_request_id, p_lease_token, p_seq, greatest(coalesce(p_usd, 0), 0))
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'ok';  -- this very call was reserved already: its reply was lost
    END IF;
    result := batchdb.reserve_budget(p_job_id, p_usd);
    IF result <> 'ok' THEN
        DELETE FROM batchdb.budget_reservations
         WHERE job_id = p_job_id AND request_id = p_request_id AND lease_token = p_lease_token AND seq = p_seq;
        RETURN result;
    END IF;
    SELECT u.name INTO budget_owner FROM batchdb.users u JOIN batchdb.jobs j ON j.owner = u.name
     WHERE j.id = p_job_id AND (u.budget_usd_day IS NOT NULL OR u.budget_usd_month IS NOT NULL);
    IF budget_owner IS NOT NULL THEN
        UPDATE batchdb.budget_reservations
           SET owner = budget_owner, day = (now() AT TIME ZONE 'UTC')::date
         WHERE job_id = p_job_id AND request_id = p_request_id AND lease_token = p_lease_token AND seq = p_seq;
    END IF;
    RETURN 'ok';
END;
$$;

-- function reserve_capacity(text, text, text, bigint[], bigint, double precision, double precision)

CREATE FUNCTION batchdb.reserve_capacity(p_provider text, p_key_alias text, p_model text, p_tokens bigint[], p_refund_tokens bigint DEFAULT 0, p_remaining_requests double precision DEFAULT NULL::double precision, p_remaining_tokens double precision DEFAULT NULL::double precision) RETURNS TABLE(granted integer, wait_seconds double precision, daily_exhausted boolean, limited boolean)
    LANGUAGE plpgsql
    AS $$
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

-- function resume_due_jobs()

CREATE FUNCTION batchdb.resume_due_jobs() RETURNS bigint
    LANGUAGE plpgsql
    AS $$
DECLARE
    resumed bigint[];
BEGIN
    WITH due AS (
        UPDATE batchdb.jobs
           SET status = CASE WHEN n_total > 0 AND n_done = n_total THEN 'completed' ELSE 'running' END,
               status_reason = NULL, paused_until = NULL
         WHERE status = 'paused' AND paused_until IS NOT NULL AND paused_until <= now()
        RETURNING id
    )
    SELECT array_agg(id) INTO resumed FROM due;
    IF resumed IS NOT NULL THEN
        PERFORM pg_notify('batchdb_requests', array_to_string(resumed, ','));
    END IF;
    RETURN coalesce(cardinality(resumed), 0);
END;
$$;

-- function retry_job(bigint, text[])

CREATE FUNCTION batchdb.retry_job(p_job_id bigint, p_statuses text[] DEFAULT ARRAY['failed'::text, 'dead'::text]) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
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
    -- Duplicates retried with their first row wait for its answer again (0019).
    UPDATE batchdb.requests f
       SET run_after = 'infinity'
      FROM batchdb.requests lead
     WHERE f.job_id = p_job_id AND f.duplicate_of IS NOT NULL AND f.status = 'queued'
       AND lead.job_id = p_job_id AND lead.id = f.duplicate_of AND lead.status IN ('queued', 'running');
    IF n > 0 THEN
        PERFORM pg_notify('batchdb_requests', p_job_id::text);
    END IF;
    RETURN n;
END;
$$;

-- function settle_abandoned_budget(double precision, integer)

CREATE FUNCTION batchdb.settle_abandoned_budget(p_older_than_s double precision, p_limit integer DEFAULT 10000) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    calls record;
BEGIN
    SELECT array_agg(a.job_id) AS job_ids, array_agg(a.request_id) AS request_ids,
           array_agg(a.lease_token) AS lease_tokens, array_agg(a.usd) AS usds
      INTO calls
      FROM (SELECT b.job_id, b.request_id, b.lease_token, sum(b.usd) AS usd
              FROM batchdb.budget_reservations b
             WHERE b.created_at < now() - make_interval(secs => p_older_than_s)
               AND NOT EXISTS (SELECT 1 FROM batchdb.requests q
                                WHERE q.job_id = b.job_id AND q.id = b.request_id
                                  AND q.lease_token = b.lease_token AND q.status = 'running')
             GROUP BY b.job_id, b.request_id, b.lease_token
             LIMIT p_limit) a;
    IF calls.job_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN batchdb.settle_budget(calls.job_ids, calls.request_ids, calls.lease_tokens, calls.usds);
END;
$$;

-- function settle_budget(bigint[], bigint[], bigint[], numeric[])

CREATE FUNCTION batchdb.settle_budget(p_job_ids bigint[], p_request_ids bigint[], p_lease_tokens bigint[], p_spent numeric[]) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    jobs bigint[];
    owners text[];
    days date[];
    usds numeric[];
    spents numeric[];
BEGIN
    -- One element per call settled now: its reservations are deleted here, so a repeat finds none.
    WITH calls AS (
        SELECT job_id, request_id, lease_token, sum(coalesce(spent, 0)) AS spent
          FROM unnest(p_job_ids, p_request_ids, p_lease_tokens, p_spent) AS c(job_id, request_id, lease_token, spent)
         GROUP BY job_id, request_id, lease_token
    ), gone AS (
        DELETE FROM batchdb.budget_reservations b
         USING calls c
         WHERE b.job_id = c.job_id AND b.request_id = c.request_id AND b.lease_token = c.lease_token
        RETURNING b.job_id, b.request_id, b.lease_token, b.owner, b.day, b.usd
    ), per_call AS (
        SELECT g.job_id, max(g.owner) AS owner, max(g.day) AS day, sum(g.usd) AS usd, max(c.spent) AS spent
          FROM gone g
          JOIN calls c ON c.job_id = g.job_id AND c.request_id = g.request_id AND c.lease_token = g.lease_token
         GROUP BY g.job_id, g.request_id, g.lease_token
    )
    SELECT array_agg(job_id), array_agg(owner), array_agg(day), array_agg(usd), array_agg(spent)
      INTO jobs, owners, days, usds, spents
      FROM per_call;
    IF jobs IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE batchdb.user_spend s
       SET reserved_usd = greatest(0, s.reserved_usd - o.usd),
           spent_usd = s.spent_usd + o.spent
      FROM (SELECT owner, day, sum(usd) AS usd, sum(spent) AS spent
              FROM unnest(owners, days, usds, spents) AS x(owner, day, usd, spent)
             WHERE owner IS NOT NULL
             GROUP BY owner, day) o
     WHERE s.owner = o.owner AND s.day = o.day;
    UPDATE batchdb.jobs j
       SET reserved_usd = greatest(0, j.reserved_usd - r.usd)
      FROM (SELECT job_id, sum(usd) AS usd FROM unnest(jobs, usds) AS x(job_id, usd) GROUP BY job_id) r
     WHERE j.id = r.job_id;
    RETURN cardinality(jobs);
END;
$$;

-- function settle_capacity(text[], text[], text[], bigint[])

CREATE FUNCTION batchdb.settle_capacity(p_provider text[], p_key_alias text[], p_model text[], p_tokens bigint[]) RETURNS void
    LANGUAGE sql
    AS $$
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

-- function settle_user_spend(text[], numeric[], numeric[])

CREATE FUNCTION batchdb.settle_user_spend(p_owners text[], p_reserved numeric[], p_spent numeric[]) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    WITH per_owner AS (
        SELECT owner, sum(reserved) AS reserved, sum(spent) AS spent
          FROM unnest(p_owners, p_reserved, p_spent) AS s(owner, reserved, spent)
         GROUP BY owner
         ORDER BY owner
    )
    INSERT INTO batchdb.user_spend AS s (owner, day, spent_usd, reserved_usd)
    SELECT owner, today, spent, 0 FROM per_owner
    ON CONFLICT (owner, day) DO UPDATE
       SET spent_usd = s.spent_usd + EXCLUDED.spent_usd,
           reserved_usd = greatest(0, s.reserved_usd - (SELECT p.reserved FROM per_owner p WHERE p.owner = s.owner));
END;
$$;

-- function template_fields(text)

CREATE FUNCTION batchdb.template_fields(p_template text) RETURNS text[]
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT coalesce(array_agg(DISTINCT m[1]), '{}')
      FROM regexp_matches(replace(replace(coalesce(p_template, ''), '{{', ''), '}}', ''),
                          '\{([^{}.\[!:]+)[^{}]*\}', 'g') AS m
$$;

-- function unrecorded_calls_after_insert()

CREATE FUNCTION batchdb.unrecorded_calls_after_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    UPDATE batchdb.jobs j
       SET wasted_calls = j.wasted_calls + n.calls, wasted_usd = j.wasted_usd + n.usd
      FROM (SELECT job_id, count(*) AS calls, sum(cost_usd) AS usd FROM new_rows GROUP BY job_id) n
     WHERE j.id = n.job_id;
    RETURN NULL;
END;
$$;

-- table provider_batches

CREATE TABLE batchdb.provider_batches (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    job_id bigint NOT NULL,
    provider text NOT NULL,
    key_alias text NOT NULL,
    model text NOT NULL,
    state text DEFAULT 'planned'::text NOT NULL,
    provider_status text,
    n_requests integer DEFAULT 0 NOT NULL,
    input_bytes bigint,
    enqueued_tokens bigint DEFAULT 0 NOT NULL,
    input_file_id text,
    batch_id text,
    output_file_id text,
    error_file_id text,
    create_try integer DEFAULT 1 NOT NULL,
    n_completed integer,
    n_failed integer,
    upload_started_at timestamp with time zone,
    uploaded_at timestamp with time zone,
    create_started_at timestamp with time zone,
    submitted_at timestamp with time zone,
    ended_at timestamp with time zone,
    collected_at timestamp with time zone,
    last_error text,
    next_check_at timestamp with time zone DEFAULT now() NOT NULL,
    lease_owner text,
    lease_expires_at timestamp with time zone,
    lease_token bigint DEFAULT 0 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT provider_batches_state_valid CHECK ((state = ANY (ARRAY['planned'::text, 'file_uploaded'::text, 'submitted'::text, 'in_progress'::text, 'completed'::text, 'failed'::text, 'expired'::text, 'cancelled'::text, 'collected'::text])))
);

-- comment TABLE provider_batches

COMMENT ON TABLE batchdb.provider_batches IS 'One chunk of a batch-mode job: its rows (requests.batch_id), its file and batch at the provider, and where it is in its life.';

-- table rate_limits

CREATE TABLE batchdb.rate_limits (
    provider text NOT NULL,
    key_alias text DEFAULT 'default'::text NOT NULL,
    model text NOT NULL,
    rpm integer,
    tpm integer,
    rpd integer,
    burst_seconds double precision DEFAULT 0.5 NOT NULL,
    target_fraction double precision DEFAULT 0.99 NOT NULL,
    source text DEFAULT 'configured'::text NOT NULL,
    request_credit double precision DEFAULT 0 NOT NULL,
    token_credit double precision DEFAULT 0 NOT NULL,
    refilled_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    pace double precision DEFAULT 1.0 NOT NULL,
    blocked_until timestamp with time zone,
    day_key date,
    day_requests integer DEFAULT 0 NOT NULL,
    requests_granted bigint DEFAULT 0 NOT NULL,
    tokens_granted bigint DEFAULT 0 NOT NULL,
    rate_limited bigint DEFAULT 0 NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    slowed_at timestamp with time zone,
    batch_queue_tokens bigint,
    batch_window_seconds double precision,
    batch_margin_seconds double precision,
    CONSTRAINT rate_limits_batch_margin_nonnegative CHECK (((batch_margin_seconds IS NULL) OR (batch_margin_seconds >= (0)::double precision))),
    CONSTRAINT rate_limits_batch_queue_positive CHECK (((batch_queue_tokens IS NULL) OR (batch_queue_tokens > 0))),
    CONSTRAINT rate_limits_batch_window_positive CHECK (((batch_window_seconds IS NULL) OR (batch_window_seconds > (0)::double precision))),
    CONSTRAINT rate_limits_burst CHECK (((burst_seconds > (0)::double precision) AND (burst_seconds <= (60)::double precision))),
    CONSTRAINT rate_limits_positive CHECK ((((rpm IS NULL) OR (rpm > 0)) AND ((tpm IS NULL) OR (tpm > 0)) AND ((rpd IS NULL) OR (rpd > 0)))),
    CONSTRAINT rate_limits_source CHECK ((source = ANY (ARRAY['configured'::text, 'headers'::text]))),
    CONSTRAINT rate_limits_target CHECK (((target_fraction > (0)::double precision) AND (target_fraction <= (1)::double precision)))
);

-- comment COLUMN rate_limits.batch_queue_tokens

COMMENT ON COLUMN batchdb.rate_limits.batch_queue_tokens IS 'Prompt tokens the lane may have enqueued in open batches at once (the provider''s batch queue limit); NULL: no limit known.';

-- comment COLUMN rate_limits.batch_window_seconds

COMMENT ON COLUMN batchdb.rate_limits.batch_window_seconds IS 'The longest a batch of this lane may take (its completion window); NULL: the provider''s (24 h; Gemini 48 h). Auto-mode jobs plan with it (0022).';

-- comment COLUMN rate_limits.batch_margin_seconds

COMMENT ON COLUMN batchdb.rate_limits.batch_margin_seconds IS 'Time an auto-mode job keeps before its deadline for collecting batches and answering online what they did not; NULL: window / 24 (0022).';

-- view batch_queues

CREATE VIEW batchdb.batch_queues WITH (security_invoker='true') AS
 SELECT b.provider,
    b.key_alias,
    b.model,
    l.batch_queue_tokens,
    sum(b.enqueued_tokens) AS enqueued_tokens,
    count(*) AS open_batches
   FROM (batchdb.provider_batches b
     LEFT JOIN batchdb.rate_limits l ON (((l.provider = b.provider) AND (l.key_alias = b.key_alias) AND (l.model = b.model))))
  WHERE ((b.state = ANY (ARRAY['submitted'::text, 'in_progress'::text])) OR ((b.state = 'file_uploaded'::text) AND (b.create_started_at IS NOT NULL)))
  GROUP BY b.provider, b.key_alias, b.model, l.batch_queue_tokens;

-- table budget_reservations

CREATE TABLE batchdb.budget_reservations (
    job_id bigint NOT NULL,
    request_id bigint NOT NULL,
    lease_token bigint NOT NULL,
    seq integer NOT NULL,
    owner text,
    day date,
    usd numeric NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

-- table circuits

CREATE TABLE batchdb.circuits (
    provider text NOT NULL,
    key_alias text NOT NULL,
    model text NOT NULL,
    state text DEFAULT 'closed'::text NOT NULL,
    opened_at timestamp with time zone,
    closed_at timestamp with time zone,
    last_error text,
    probes_failed integer DEFAULT 0 NOT NULL,
    next_probe_at timestamp with time zone,
    probe_owner text,
    probe_expires_at timestamp with time zone,
    n_opened bigint DEFAULT 0 NOT NULL,
    CONSTRAINT circuits_state_valid CHECK ((state = ANY (ARRAY['closed'::text, 'open'::text])))
);

-- table jobs

CREATE TABLE batchdb.jobs (
    id bigint NOT NULL,
    name text,
    owner text DEFAULT CURRENT_USER NOT NULL,
    provider text DEFAULT 'openai'::text NOT NULL,
    model text NOT NULL,
    params jsonb DEFAULT '{}'::jsonb NOT NULL,
    priority integer DEFAULT 1 NOT NULL,
    status text DEFAULT 'running'::text NOT NULL,
    status_reason text,
    max_attempts integer DEFAULT 5 NOT NULL,
    budget_usd numeric(14,6),
    idempotency_key text,
    n_total bigint DEFAULT 0 NOT NULL,
    n_succeeded bigint DEFAULT 0 NOT NULL,
    n_failed bigint DEFAULT 0 NOT NULL,
    n_dead bigint DEFAULT 0 NOT NULL,
    n_cancelled bigint DEFAULT 0 NOT NULL,
    n_done bigint GENERATED ALWAYS AS ((((n_succeeded + n_failed) + n_dead) + n_cancelled)) STORED,
    n_retries bigint DEFAULT 0 NOT NULL,
    prompt_tokens bigint DEFAULT 0 NOT NULL,
    completion_tokens bigint DEFAULT 0 NOT NULL,
    cost_usd numeric DEFAULT 0 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    key_alias text DEFAULT 'default'::text NOT NULL,
    reserved_usd numeric DEFAULT 0 NOT NULL,
    paused_until timestamp with time zone,
    input_sha256 text,
    allow_unknown_model boolean DEFAULT false NOT NULL,
    cached_tokens bigint DEFAULT 0 NOT NULL,
    wasted_calls integer DEFAULT 0 NOT NULL,
    wasted_usd numeric DEFAULT 0 NOT NULL,
    n_duplicates bigint DEFAULT 0 NOT NULL,
    mode text DEFAULT 'online'::text NOT NULL,
    reuse text,
    reuse_scope text DEFAULT 'user'::text NOT NULL,
    reuse_max_age interval,
    n_reused bigint DEFAULT 0 NOT NULL,
    reused_usd numeric(18,8) DEFAULT 0 NOT NULL,
    deadline timestamp with time zone,
    CONSTRAINT jobs_budget_positive CHECK (((budget_usd IS NULL) OR (budget_usd > (0)::numeric))),
    CONSTRAINT jobs_max_attempts_positive CHECK ((max_attempts >= 1)),
    CONSTRAINT jobs_mode_valid CHECK ((mode = ANY (ARRAY['online'::text, 'batch'::text, 'auto'::text]))),
    CONSTRAINT jobs_model_not_blank CHECK ((btrim(model) <> ''::text)),
    CONSTRAINT jobs_params_object CHECK ((jsonb_typeof(params) = 'object'::text)),
    CONSTRAINT jobs_priority_positive CHECK ((priority >= 1)),
    CONSTRAINT jobs_status_valid CHECK ((status = ANY (ARRAY['loading'::text, 'running'::text, 'paused'::text, 'cancelled'::text, 'completed'::text])))
);

-- comment COLUMN jobs.mode

COMMENT ON COLUMN batchdb.jobs.mode IS 'online: one call per row, paced by the rate-limit ledger; batch: rows go in chunks through the provider''s Batch API (batchdb.provider_batches); auto: batch while a batch can end before the deadline, online for the rest (0022).';

-- comment COLUMN jobs.reuse

COMMENT ON COLUMN batchdb.jobs.reuse IS 'exact: rows take a stored successful answer to the same request (another job''s, within reuse_scope and reuse_max_age) at $0; NULL: off.';

-- comment COLUMN jobs.reuse_scope

COMMENT ON COLUMN batchdb.jobs.reuse_scope IS 'Whose answers reuse takes: user (the owner''s) or team (every user with the owner''s batchdb.users.team).';

-- comment COLUMN jobs.reuse_max_age

COMMENT ON COLUMN batchdb.jobs.reuse_max_age IS 'Oldest answer reuse takes, by the time it was answered (database time); NULL: any age.';

-- comment COLUMN jobs.n_reused

COMMENT ON COLUMN batchdb.jobs.n_reused IS 'Rows answered by reuse (not counting duplicates that took a reused answer from their first row).';

-- comment COLUMN jobs.reused_usd

COMMENT ON COLUMN batchdb.jobs.reused_usd IS 'What the reused answers cost when they were first paid for: the money reuse saved.';

-- comment COLUMN jobs.deadline

COMMENT ON COLUMN batchdb.jobs.deadline IS 'mode auto: when every row must be answered; rows go through the Batch API while a batch can still end before it, online otherwise (0022).';

-- sequence requests_id_seq

CREATE SEQUENCE batchdb.requests_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

-- table requests

CREATE TABLE batchdb.requests (
    job_id bigint NOT NULL,
    id bigint DEFAULT nextval('batchdb.requests_id_seq'::regclass) NOT NULL,
    custom_id text NOT NULL,
    payload jsonb,
    input jsonb,
    status text DEFAULT 'queued'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    max_attempts integer,
    run_after timestamp with time zone DEFAULT now() NOT NULL,
    lease_owner text,
    lease_expires_at timestamp with time zone,
    lease_token bigint DEFAULT 0 NOT NULL,
    prompt_tokens integer DEFAULT 0 NOT NULL,
    completion_tokens integer DEFAULT 0 NOT NULL,
    cost_usd numeric DEFAULT 0 NOT NULL,
    error_class text,
    error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    latency_ms integer,
    cached_tokens integer DEFAULT 0 NOT NULL,
    request_key bytea,
    duplicate_of bigint,
    batch_id bigint,
    reused_from bigint,
    reused_from_job bigint,
    reused_usd numeric(18,8),
    CONSTRAINT requests_attempts_nonnegative CHECK ((attempts >= 0)),
    CONSTRAINT requests_max_attempts_positive CHECK (((max_attempts IS NULL) OR (max_attempts >= 1))),
    CONSTRAINT requests_status_valid CHECK ((status = ANY (ARRAY['queued'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'dead'::text, 'cancelled'::text])))
)
PARTITION BY LIST (job_id);

-- comment COLUMN requests.cached_tokens

COMMENT ON COLUMN batchdb.requests.cached_tokens IS 'Prompt tokens of this row''s calls that the provider served from its prompt cache (part of prompt_tokens).';

-- comment COLUMN requests.request_key

COMMENT ON COLUMN batchdb.requests.request_key IS 'Rows of a job with equal keys are one request: sent once, its answer given to all (NULL: never deduplicated).';

-- comment COLUMN requests.duplicate_of

COMMENT ON COLUMN batchdb.requests.duplicate_of IS 'Set by batchdb: the id of the earlier row with the same request_key whose answer this row takes.';

-- comment COLUMN requests.batch_id

COMMENT ON COLUMN batchdb.requests.batch_id IS 'Set by batchdb: the chunk (batchdb.provider_batches) that sent this row last (batch-mode jobs).';

-- comment COLUMN requests.reused_from

COMMENT ON COLUMN batchdb.requests.reused_from IS 'Set by batchdb: the id of the row (of job reused_from_job) whose stored answer this row took (jobs.reuse).';

-- comment COLUMN requests.reused_from_job

COMMENT ON COLUMN batchdb.requests.reused_from_job IS 'Set by batchdb: the job of reused_from.';

-- comment COLUMN requests.reused_usd

COMMENT ON COLUMN batchdb.requests.reused_usd IS 'Set by batchdb: what the reused answer cost when it was paid for (this row cost $0).';

-- view job_progress

CREATE VIEW batchdb.job_progress WITH (security_invoker='true') AS
 SELECT j.id AS job_id,
    j.name,
    j.owner,
    j.provider,
    j.model,
    j.status,
    j.status_reason,
    j.priority,
    j.n_total,
    GREATEST(((j.n_total - j.n_done) - COALESCE(r.n_running, (0)::bigint)), (0)::bigint) AS n_queued,
    COALESCE(r.n_running, (0)::bigint) AS n_running,
    j.n_succeeded,
    j.n_failed,
    j.n_dead,
    j.n_cancelled,
    j.n_done,
        CASE
            WHEN (j.n_total > 0) THEN round(((100.0 * (j.n_done)::numeric) / (j.n_total)::numeric), 2)
            ELSE (0)::numeric
        END AS pct_done,
    j.n_retries,
    j.prompt_tokens,
    j.completion_tokens,
    j.cost_usd,
    j.budget_usd,
    j.created_at,
    j.started_at,
    j.finished_at,
        CASE
            WHEN ((j.started_at IS NOT NULL) AND (COALESCE(j.finished_at, now()) > j.started_at)) THEN round(((j.n_done)::numeric / EXTRACT(epoch FROM (COALESCE(j.finished_at, now()) - j.started_at))), 2)
            ELSE NULL::numeric
        END AS rows_per_second,
        CASE
            WHEN ((j.status = 'running'::text) AND (j.started_at IS NOT NULL) AND (j.n_done > 0) AND (now() > j.started_at)) THEN (((j.n_total - j.n_done))::double precision * ((now() - j.started_at) / (j.n_done)::double precision))
            ELSE NULL::interval
        END AS eta,
    j.key_alias,
    j.reserved_usd,
    j.cached_tokens,
    j.wasted_calls,
    j.wasted_usd,
    j.n_duplicates,
    j.mode,
    j.deadline
   FROM (batchdb.jobs j
     LEFT JOIN LATERAL ( SELECT count(*) AS n_running
           FROM batchdb.requests q
          WHERE ((j.status = ANY (ARRAY['running'::text, 'paused'::text, 'cancelled'::text])) AND (q.job_id = j.id) AND (q.status = 'running'::text))) r ON (true));

-- sequence jobs_id_seq

ALTER TABLE batchdb.jobs ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME batchdb.jobs_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- view lane_states

CREATE VIEW batchdb.lane_states AS
 SELECT l.provider,
    l.key_alias,
    l.model,
    l.pace_now,
    l.token_credit_now,
    l.state,
    l.until,
    l.state_text,
    COALESCE((l.until > (now() + '00:00:05'::interval)), false) AS stalled
   FROM ( SELECT r.provider,
            r.key_alias,
            r.model,
            s.pace_now,
            s.token_credit_now,
                CASE
                    WHEN (r.blocked_until > now()) THEN 'held by a 429'::text
                    WHEN ((r.rpd IS NOT NULL) AND (r.day_key = ((now() AT TIME ZONE 'America/Los_Angeles'::text))::date) AND (r.day_requests >= r.rpd)) THEN 'daily quota used up'::text
                    WHEN (s.token_credit_now < (0)::double precision) THEN 'waiting for tokens'::text
                    WHEN (s.request_credit_now < (1)::double precision) THEN 'waiting for requests'::text
                    ELSE 'ready'::text
                END AS state,
                CASE
                    WHEN (r.blocked_until > now()) THEN r.blocked_until
                    WHEN ((r.rpd IS NOT NULL) AND (r.day_key = ((now() AT TIME ZONE 'America/Los_Angeles'::text))::date) AND (r.day_requests >= r.rpd)) THEN (((((now() AT TIME ZONE 'America/Los_Angeles'::text))::date + 1))::timestamp without time zone AT TIME ZONE 'America/Los_Angeles'::text)
                    WHEN ((s.token_credit_now < (0)::double precision) AND (s.tok_rate > (0)::double precision)) THEN (now() + make_interval(secs => ((- s.token_credit_now) / s.tok_rate)))
                    WHEN ((s.request_credit_now < (1)::double precision) AND (s.req_rate > (0)::double precision)) THEN (now() + make_interval(secs => (((1)::double precision - s.request_credit_now) / s.req_rate)))
                    ELSE NULL::timestamp with time zone
                END AS until,
                CASE
                    WHEN (r.blocked_until > now()) THEN format('held by a 429 until %s UTC'::text, to_char((r.blocked_until AT TIME ZONE 'UTC'::text), 'HH24:MI:SS'::text))
                    WHEN ((r.rpd IS NOT NULL) AND (r.day_key = ((now() AT TIME ZONE 'America/Los_Angeles'::text))::date) AND (r.day_requests >= r.rpd)) THEN format('daily quota of %s requests used up; resets at midnight Pacific'::text, r.rpd)
                    WHEN (s.token_credit_now < (0)::double precision) THEN format('waiting for tokens: %s in debt, moving again about %s UTC'::text, to_char((- s.token_credit_now), 'FM999,999,999,990'::text), to_char(((now() + make_interval(secs => ((- s.token_credit_now) / NULLIF(s.tok_rate, (0)::double precision)))) AT TIME ZONE 'UTC'::text), 'HH24:MI:SS'::text))
                    WHEN (s.request_credit_now < (1)::double precision) THEN format('waiting for requests: limit %s per minute, next in %s s'::text, r.rpm, round(((((1)::double precision - s.request_credit_now) / NULLIF(s.req_rate, (0)::double precision)))::numeric, 1))
                    ELSE 'ready'::text
                END AS state_text
           FROM ((batchdb.rate_limits r
             CROSS JOIN LATERAL ( SELECT LEAST((1.0)::double precision, (r.pace + ((0.02 * GREATEST((0)::numeric, EXTRACT(epoch FROM (now() - r.refilled_at)))))::double precision)) AS pace_now) p)
             CROSS JOIN LATERAL ( SELECT p.pace_now,
                        CASE
                            WHEN (r.tpm IS NULL) THEN NULL::double precision
                            ELSE (((((r.tpm)::numeric / 60.0))::double precision * r.target_fraction) * p.pace_now)
                        END AS tok_rate,
                        CASE
                            WHEN (r.tpm IS NULL) THEN NULL::double precision
                            ELSE LEAST(((((((r.tpm)::numeric / 60.0))::double precision * r.target_fraction) * p.pace_now) * r.burst_seconds), (r.token_credit + (((((GREATEST((0)::numeric, EXTRACT(epoch FROM (now() - r.refilled_at))) * (r.tpm)::numeric) / 60.0))::double precision * r.target_fraction) * p.pace_now)))
                        END AS token_credit_now,
                        CASE
                            WHEN (r.rpm IS NULL) THEN NULL::double precision
                            ELSE (((((r.rpm)::numeric / 60.0))::double precision * r.target_fraction) * p.pace_now)
                        END AS req_rate,
                        CASE
                            WHEN (r.rpm IS NULL) THEN NULL::double precision
                            ELSE LEAST(GREATEST((1.0)::double precision, ((((((r.rpm)::numeric / 60.0))::double precision * r.target_fraction) * p.pace_now) * r.burst_seconds)), (r.request_credit + (((((GREATEST((0)::numeric, EXTRACT(epoch FROM (now() - r.refilled_at))) * (r.rpm)::numeric) / 60.0))::double precision * r.target_fraction) * p.pace_now)))
                        END AS request_credit_now) s)) l;

-- table workers

CREATE TABLE batchdb.workers (
    id text NOT NULL,
    hostname text NOT NULL,
    pid integer NOT NULL,
    concurrency integer NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    heartbeat_at timestamp with time zone DEFAULT now() NOT NULL,
    stopped_at timestamp with time zone,
    in_flight integer DEFAULT 0 NOT NULL,
    n_completed bigint DEFAULT 0 NOT NULL,
    lanes jsonb DEFAULT '[]'::jsonb NOT NULL
);

-- comment COLUMN workers.lanes

COMMENT ON COLUMN batchdb.workers.lanes IS 'Lanes this worker can serve: [{"provider", "key_alias", "endpoint"}] as resolved from its environment; no keys';

-- view live_workers

CREATE VIEW batchdb.live_workers AS
 SELECT w.id,
    w.hostname,
    w.pid,
    w.concurrency,
    w.started_at,
    w.heartbeat_at,
    w.stopped_at,
    w.in_flight,
    w.n_completed,
    ((w.heartbeat_at > (now() - '00:00:30'::interval)) AND (w.stopped_at IS NULL)) AS alive,
    w.lanes
   FROM batchdb.workers w;

-- table notification_attempts

CREATE TABLE batchdb.notification_attempts (
    id bigint NOT NULL,
    delivery_id bigint NOT NULL,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    worker_id text,
    started_at timestamp with time zone NOT NULL,
    duration_ms integer NOT NULL,
    ok boolean NOT NULL,
    http_status integer,
    reply text,
    error text
);

-- sequence notification_attempts_id_seq

ALTER TABLE batchdb.notification_attempts ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME batchdb.notification_attempts_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table notification_deliveries

CREATE TABLE batchdb.notification_deliveries (
    id bigint NOT NULL,
    job_id bigint NOT NULL,
    target_id bigint NOT NULL,
    channel text NOT NULL,
    event text NOT NULL,
    payload jsonb NOT NULL,
    status text DEFAULT 'pending'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    claimed_by text,
    last_error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    delivered_at timestamp with time zone,
    CONSTRAINT notification_deliveries_channel_valid CHECK ((channel = ANY (ARRAY['webhook'::text, 'email'::text]))),
    CONSTRAINT notification_deliveries_status_valid CHECK ((status = ANY (ARRAY['pending'::text, 'delivering'::text, 'delivered'::text, 'failed'::text])))
);

-- sequence notification_deliveries_id_seq

ALTER TABLE batchdb.notification_deliveries ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME batchdb.notification_deliveries_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table notification_targets

CREATE TABLE batchdb.notification_targets (
    id bigint NOT NULL,
    job_id bigint NOT NULL,
    channel text NOT NULL,
    target text NOT NULL,
    secret text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT notification_targets_channel_valid CHECK ((channel = ANY (ARRAY['webhook'::text, 'email'::text]))),
    CONSTRAINT notification_targets_email_address CHECK (((channel <> 'email'::text) OR (target ~ '^[^@[:space:]<>,;]+@[^@[:space:]<>,;]+\.[^@[:space:]<>,;]+$'::text))),
    CONSTRAINT notification_targets_webhook_secret CHECK (((channel <> 'webhook'::text) OR (length(secret) >= 16))),
    CONSTRAINT notification_targets_webhook_url CHECK (((channel <> 'webhook'::text) OR (target ~* '^https?://[^/?#[:space:]]+[^[:space:]]*$'::text)))
);

-- sequence notification_targets_id_seq

ALTER TABLE batchdb.notification_targets ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME batchdb.notification_targets_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table prices

CREATE TABLE batchdb.prices (
    provider text NOT NULL,
    model text NOT NULL,
    input_per_mtok numeric(12,6) NOT NULL,
    output_per_mtok numeric(12,6) NOT NULL,
    cached_input_per_mtok numeric(12,6),
    batch_discount numeric(4,3),
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    context_window integer,
    max_input_tokens integer,
    max_output_tokens integer,
    source text,
    as_of date,
    CONSTRAINT prices_batch_discount_is_a_share CHECK (((batch_discount IS NULL) OR ((batch_discount >= (0)::numeric) AND (batch_discount <= (1)::numeric)))),
    CONSTRAINT prices_cached_input_nonnegative CHECK (((cached_input_per_mtok IS NULL) OR (cached_input_per_mtok >= (0)::numeric))),
    CONSTRAINT prices_model_limits_positive CHECK ((((context_window IS NULL) OR (context_window > 0)) AND ((max_input_tokens IS NULL) OR (max_input_tokens > 0)) AND ((max_output_tokens IS NULL) OR (max_output_tokens > 0)))),
    CONSTRAINT prices_nonnegative CHECK (((input_per_mtok >= (0)::numeric) AND (output_per_mtok >= (0)::numeric)))
);

-- comment COLUMN prices.cached_input_per_mtok

COMMENT ON COLUMN batchdb.prices.cached_input_per_mtok IS 'USD per 1M prompt tokens served from the provider''s prompt cache; NULL: charged at input_per_mtok.';

-- comment COLUMN prices.batch_discount

COMMENT ON COLUMN batchdb.prices.batch_discount IS 'Share taken off every token price for calls made through the provider''s Batch API (0.5: half price); NULL: none.';

-- comment COLUMN prices.source

COMMENT ON COLUMN batchdb.prices.source IS 'The price map this row was last written or confirmed from (batchdb prices update); NULL: by hand or seeded.';

-- comment COLUMN prices.as_of

COMMENT ON COLUMN batchdb.prices.as_of IS 'The date of the prices in that map; NULL: unknown.';

-- sequence provider_batches_id_seq

ALTER TABLE batchdb.provider_batches ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME batchdb.provider_batches_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- view queue_depth

CREATE VIEW batchdb.queue_depth AS
 WITH job_depth AS (
         SELECT j.provider,
            j.key_alias,
            j.model,
            j.status,
            j.n_dead,
            (c.state = 'open'::text) AS circuit_open,
            first_queued.run_after AS first_run_after,
            rr.running,
            later.scheduled,
            GREATEST((((j.n_total - j.n_done) - rr.running) - later.n_later), (0)::bigint) AS due
           FROM ((((batchdb.jobs j
             LEFT JOIN batchdb.circuits c ON (((c.provider = j.provider) AND (c.key_alias = j.key_alias) AND (c.model = j.model))))
             LEFT JOIN LATERAL ( SELECT q.run_after
                   FROM batchdb.requests q
                  WHERE ((q.job_id = j.id) AND (q.status = 'queued'::text))
                  ORDER BY q.run_after, q.id
                 LIMIT 1) first_queued ON (true))
             CROSS JOIN LATERAL ( SELECT count(*) AS running
                   FROM batchdb.requests q
                  WHERE ((q.job_id = j.id) AND (q.status = 'running'::text))) rr)
             CROSS JOIN LATERAL ( SELECT count(*) AS n_later,
                    count(*) FILTER (WHERE (q.run_after < 'infinity'::timestamp with time zone)) AS scheduled
                   FROM batchdb.requests q
                  WHERE ((q.job_id = j.id) AND (q.status = 'queued'::text) AND (q.run_after > now()))) later)
          WHERE ((j.status = ANY (ARRAY['running'::text, 'paused'::text])) AND (j.n_done < j.n_total))
        )
 SELECT job_depth.provider,
    job_depth.key_alias,
    job_depth.model,
    (COALESCE(sum(job_depth.due) FILTER (WHERE ((job_depth.status = 'running'::text) AND (NOT COALESCE(job_depth.circuit_open, false)))), (0)::numeric))::bigint AS due_rows,
    (EXTRACT(epoch FROM (now() - min(job_depth.first_run_after) FILTER (WHERE ((job_depth.status = 'running'::text) AND (job_depth.due > 0) AND (NOT COALESCE(job_depth.circuit_open, false)))))))::double precision AS oldest_due_age_seconds,
    (COALESCE(sum(job_depth.due) FILTER (WHERE ((job_depth.status = 'paused'::text) OR COALESCE(job_depth.circuit_open, false))), (0)::numeric))::bigint AS held_rows,
    (sum(job_depth.scheduled))::bigint AS scheduled_rows,
    (sum(job_depth.running))::bigint AS running_rows,
    (sum(job_depth.n_dead))::bigint AS dead_rows,
    count(*) AS jobs,
    COALESCE(bool_or(job_depth.circuit_open), false) AS circuit_open
   FROM job_depth
  GROUP BY job_depth.provider, job_depth.key_alias, job_depth.model;

-- comment VIEW queue_depth

COMMENT ON VIEW batchdb.queue_depth IS 'Per lane with an unfinished job: rows due now (due_rows: what autoscalers scale on), the age of the oldest, and rows held (paused job, open circuit), scheduled for later, running and dead (0025).';

-- table rate_limit_history

CREATE TABLE batchdb.rate_limit_history (
    id bigint NOT NULL,
    provider text NOT NULL,
    key_alias text NOT NULL,
    model text NOT NULL,
    changed_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    rpm integer,
    tpm integer,
    rpd integer,
    source text
);

-- sequence rate_limit_history_id_seq

ALTER TABLE batchdb.rate_limit_history ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME batchdb.rate_limit_history_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table rate_usage

CREATE TABLE batchdb.rate_usage (
    provider text NOT NULL,
    key_alias text NOT NULL,
    model text NOT NULL,
    minute timestamp with time zone NOT NULL,
    requests bigint DEFAULT 0 NOT NULL,
    tokens bigint DEFAULT 0 NOT NULL,
    rate_limited bigint DEFAULT 0 NOT NULL
);

-- table request_params

CREATE TABLE batchdb.request_params (
    name text NOT NULL,
    in_job boolean NOT NULL,
    in_row boolean NOT NULL,
    meaning text NOT NULL
);

-- table requests_orphan

CREATE TABLE batchdb.requests_orphan (
    job_id bigint NOT NULL,
    id bigint DEFAULT nextval('batchdb.requests_id_seq'::regclass) NOT NULL,
    custom_id text NOT NULL,
    payload jsonb,
    input jsonb,
    status text DEFAULT 'queued'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    max_attempts integer,
    run_after timestamp with time zone DEFAULT now() NOT NULL,
    lease_owner text,
    lease_expires_at timestamp with time zone,
    lease_token bigint DEFAULT 0 NOT NULL,
    prompt_tokens integer DEFAULT 0 NOT NULL,
    completion_tokens integer DEFAULT 0 NOT NULL,
    cost_usd numeric DEFAULT 0 NOT NULL,
    error_class text,
    error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    latency_ms integer,
    cached_tokens integer DEFAULT 0 NOT NULL,
    request_key bytea,
    duplicate_of bigint,
    batch_id bigint,
    reused_from bigint,
    reused_from_job bigint,
    reused_usd numeric(18,8),
    CONSTRAINT requests_attempts_nonnegative CHECK ((attempts >= 0)),
    CONSTRAINT requests_max_attempts_positive CHECK (((max_attempts IS NULL) OR (max_attempts >= 1))),
    CONSTRAINT requests_status_valid CHECK ((status = ANY (ARRAY['queued'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'dead'::text, 'cancelled'::text])))
);

-- table results

CREATE TABLE batchdb.results (
    job_id bigint NOT NULL,
    request_id bigint NOT NULL,
    response_text text,
    response_json jsonb,
    finish_reason text,
    model text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    writes integer DEFAULT 1 NOT NULL
)
PARTITION BY LIST (job_id);

-- table results_orphan

CREATE TABLE batchdb.results_orphan (
    job_id bigint NOT NULL,
    request_id bigint NOT NULL,
    response_text text,
    response_json jsonb,
    finish_reason text,
    model text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    writes integer DEFAULT 1 NOT NULL
);

-- table unrecorded_calls

CREATE TABLE batchdb.unrecorded_calls (
    job_id bigint NOT NULL,
    request_id bigint NOT NULL,
    lease_token bigint NOT NULL,
    reason text NOT NULL,
    prompt_tokens integer NOT NULL,
    cached_tokens integer NOT NULL,
    completion_tokens integer NOT NULL,
    cost_usd numeric NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL
);

-- table user_spend

CREATE TABLE batchdb.user_spend (
    owner text NOT NULL,
    day date NOT NULL,
    spent_usd numeric DEFAULT 0 NOT NULL,
    reserved_usd numeric DEFAULT 0 NOT NULL
);

-- table attach requests_orphan

ALTER TABLE ONLY batchdb.requests ATTACH PARTITION batchdb.requests_orphan DEFAULT;

-- table attach results_orphan

ALTER TABLE ONLY batchdb.results ATTACH PARTITION batchdb.results_orphan DEFAULT;

-- constraint budget_reservations budget_reservations_pkey

ALTER TABLE ONLY batchdb.budget_reservations
    ADD CONSTRAINT budget_reservations_pkey PRIMARY KEY (job_id, request_id, lease_token, seq);

-- constraint circuits circuits_pkey

ALTER TABLE ONLY batchdb.circuits
    ADD CONSTRAINT circuits_pkey PRIMARY KEY (provider, key_alias, model);

-- constraint jobs jobs_owner_idempotency_key_key

ALTER TABLE ONLY batchdb.jobs
    ADD CONSTRAINT jobs_owner_idempotency_key_key UNIQUE (owner, idempotency_key);

-- constraint jobs jobs_pkey

ALTER TABLE ONLY batchdb.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);

-- constraint notification_attempts notification_attempts_pkey

ALTER TABLE ONLY batchdb.notification_attempts
    ADD CONSTRAINT notification_attempts_pkey PRIMARY KEY (id);

-- constraint notification_deliveries notification_deliveries_pkey

ALTER TABLE ONLY batchdb.notification_deliveries
    ADD CONSTRAINT notification_deliveries_pkey PRIMARY KEY (id);

-- constraint notification_targets notification_targets_pkey

ALTER TABLE ONLY batchdb.notification_targets
    ADD CONSTRAINT notification_targets_pkey PRIMARY KEY (id);

-- constraint notification_targets notification_targets_unique

ALTER TABLE ONLY batchdb.notification_targets
    ADD CONSTRAINT notification_targets_unique UNIQUE (job_id, channel, target);

-- constraint prices prices_pkey

ALTER TABLE ONLY batchdb.prices
    ADD CONSTRAINT prices_pkey PRIMARY KEY (provider, model);

-- constraint provider_batches provider_batches_pkey

ALTER TABLE ONLY batchdb.provider_batches
    ADD CONSTRAINT provider_batches_pkey PRIMARY KEY (id);

-- constraint provider_batches provider_batches_uid_key

ALTER TABLE ONLY batchdb.provider_batches
    ADD CONSTRAINT provider_batches_uid_key UNIQUE (uid);

-- constraint rate_limit_history rate_limit_history_pkey

ALTER TABLE ONLY batchdb.rate_limit_history
    ADD CONSTRAINT rate_limit_history_pkey PRIMARY KEY (id);

-- constraint rate_limits rate_limits_pkey

ALTER TABLE ONLY batchdb.rate_limits
    ADD CONSTRAINT rate_limits_pkey PRIMARY KEY (provider, key_alias, model);

-- constraint rate_usage rate_usage_pkey

ALTER TABLE ONLY batchdb.rate_usage
    ADD CONSTRAINT rate_usage_pkey PRIMARY KEY (provider, key_alias, model, minute);

-- constraint request_params request_params_pkey

ALTER TABLE ONLY batchdb.request_params
    ADD CONSTRAINT request_params_pkey PRIMARY KEY (name);

-- constraint requests requests_custom_id_unique

ALTER TABLE ONLY batchdb.requests
    ADD CONSTRAINT requests_custom_id_unique UNIQUE (job_id, custom_id);

-- constraint requests_orphan requests_orphan_job_id_custom_id_key

ALTER TABLE ONLY batchdb.requests_orphan
    ADD CONSTRAINT requests_orphan_job_id_custom_id_key UNIQUE (job_id, custom_id);

-- constraint requests requests_pkey

ALTER TABLE ONLY batchdb.requests
    ADD CONSTRAINT requests_pkey PRIMARY KEY (job_id, id);

-- constraint requests_orphan requests_orphan_pkey

ALTER TABLE ONLY batchdb.requests_orphan
    ADD CONSTRAINT requests_orphan_pkey PRIMARY KEY (job_id, id);

-- constraint results results_pkey

ALTER TABLE ONLY batchdb.results
    ADD CONSTRAINT results_pkey PRIMARY KEY (job_id, request_id);

-- constraint results_orphan results_orphan_pkey

ALTER TABLE ONLY batchdb.results_orphan
    ADD CONSTRAINT results_orphan_pkey PRIMARY KEY (job_id, request_id);

-- constraint unrecorded_calls unrecorded_calls_pkey

ALTER TABLE ONLY batchdb.unrecorded_calls
    ADD CONSTRAINT unrecorded_calls_pkey PRIMARY KEY (job_id, request_id, lease_token);

-- constraint user_spend user_spend_pkey

ALTER TABLE ONLY batchdb.user_spend
    ADD CONSTRAINT user_spend_pkey PRIMARY KEY (owner, day);

-- constraint users users_pkey

ALTER TABLE ONLY batchdb.users
    ADD CONSTRAINT users_pkey PRIMARY KEY (name);

-- constraint workers workers_pkey

ALTER TABLE ONLY batchdb.workers
    ADD CONSTRAINT workers_pkey PRIMARY KEY (id);

-- index jobs_active_idx

CREATE INDEX jobs_active_idx ON batchdb.jobs USING btree (id) WHERE (status = 'running'::text);

-- index jobs_lanes_idx

CREATE INDEX jobs_lanes_idx ON batchdb.jobs USING btree (provider, key_alias) WHERE (status = ANY (ARRAY['running'::text, 'paused'::text]));

-- index jobs_paused_until_idx

CREATE INDEX jobs_paused_until_idx ON batchdb.jobs USING btree (paused_until) WHERE ((status = 'paused'::text) AND (paused_until IS NOT NULL));

-- index jobs_reusing_idx

CREATE INDEX jobs_reusing_idx ON batchdb.jobs USING btree (id) WHERE ((reuse IS NOT NULL) AND (status = ANY (ARRAY['loading'::text, 'running'::text, 'paused'::text])));

-- index notification_attempts_delivery_idx

CREATE INDEX notification_attempts_delivery_idx ON batchdb.notification_attempts USING btree (delivery_id);

-- index notification_attempts_job_idx

CREATE INDEX notification_attempts_job_idx ON batchdb.notification_attempts USING btree (job_id);

-- index notification_deliveries_due_idx

CREATE INDEX notification_deliveries_due_idx ON batchdb.notification_deliveries USING btree (next_attempt_at) WHERE (status = ANY (ARRAY['pending'::text, 'delivering'::text]));

-- index notification_deliveries_job_idx

CREATE INDEX notification_deliveries_job_idx ON batchdb.notification_deliveries USING btree (job_id);

-- index notification_deliveries_target_idx

CREATE INDEX notification_deliveries_target_idx ON batchdb.notification_deliveries USING btree (target_id);

-- index provider_batches_due_idx

CREATE INDEX provider_batches_due_idx ON batchdb.provider_batches USING btree (next_check_at) WHERE (state <> 'collected'::text);

-- index provider_batches_job_idx

CREATE INDEX provider_batches_job_idx ON batchdb.provider_batches USING btree (job_id);

-- index provider_batches_lane_idx

CREATE INDEX provider_batches_lane_idx ON batchdb.provider_batches USING btree (provider, key_alias, model) WHERE (state = ANY (ARRAY['file_uploaded'::text, 'submitted'::text, 'in_progress'::text]));

-- index rate_limit_history_lane_idx

CREATE INDEX rate_limit_history_lane_idx ON batchdb.rate_limit_history USING btree (provider, key_alias, model, changed_at);

-- index requests_answers_idx

CREATE INDEX requests_answers_idx ON ONLY batchdb.requests USING btree (request_key, finished_at) WHERE ((status = 'succeeded'::text) AND (request_key IS NOT NULL) AND (duplicate_of IS NULL) AND (reused_from IS NULL));

-- index requests_batch_idx

CREATE INDEX requests_batch_idx ON ONLY batchdb.requests USING btree (batch_id) WHERE (batch_id IS NOT NULL);

-- index requests_claimable_idx

CREATE INDEX requests_claimable_idx ON ONLY batchdb.requests USING btree (job_id, run_after, id) WHERE (status = 'queued'::text);

-- index requests_duplicates_idx

CREATE INDEX requests_duplicates_idx ON ONLY batchdb.requests USING btree (job_id, duplicate_of) WHERE (duplicate_of IS NOT NULL);

-- index requests_leased_idx

CREATE INDEX requests_leased_idx ON ONLY batchdb.requests USING btree (lease_expires_at) WHERE (status = 'running'::text);

-- index requests_orphan_batch_id_idx

CREATE INDEX requests_orphan_batch_id_idx ON batchdb.requests_orphan USING btree (batch_id) WHERE (batch_id IS NOT NULL);

-- index requests_orphan_job_id_duplicate_of_idx

CREATE INDEX requests_orphan_job_id_duplicate_of_idx ON batchdb.requests_orphan USING btree (job_id, duplicate_of) WHERE (duplicate_of IS NOT NULL);

-- index requests_orphan_job_id_run_after_id_idx

CREATE INDEX requests_orphan_job_id_run_after_id_idx ON batchdb.requests_orphan USING btree (job_id, run_after, id) WHERE (status = 'queued'::text);

-- index requests_orphan_lease_expires_at_idx

CREATE INDEX requests_orphan_lease_expires_at_idx ON batchdb.requests_orphan USING btree (lease_expires_at) WHERE (status = 'running'::text);

-- index requests_orphan_request_key_finished_at_idx

CREATE INDEX requests_orphan_request_key_finished_at_idx ON batchdb.requests_orphan USING btree (request_key, finished_at) WHERE ((status = 'succeeded'::text) AND (request_key IS NOT NULL) AND (duplicate_of IS NULL) AND (reused_from IS NULL));

-- index attach requests_orphan_batch_id_idx

ALTER INDEX batchdb.requests_batch_idx ATTACH PARTITION batchdb.requests_orphan_batch_id_idx;

-- index attach requests_orphan_job_id_custom_id_key

ALTER INDEX batchdb.requests_custom_id_unique ATTACH PARTITION batchdb.requests_orphan_job_id_custom_id_key;

-- index attach requests_orphan_job_id_duplicate_of_idx

ALTER INDEX batchdb.requests_duplicates_idx ATTACH PARTITION batchdb.requests_orphan_job_id_duplicate_of_idx;

-- index attach requests_orphan_job_id_run_after_id_idx

ALTER INDEX batchdb.requests_claimable_idx ATTACH PARTITION batchdb.requests_orphan_job_id_run_after_id_idx;

-- index attach requests_orphan_lease_expires_at_idx

ALTER INDEX batchdb.requests_leased_idx ATTACH PARTITION batchdb.requests_orphan_lease_expires_at_idx;

-- index attach requests_orphan_pkey

ALTER INDEX batchdb.requests_pkey ATTACH PARTITION batchdb.requests_orphan_pkey;

-- index attach requests_orphan_request_key_finished_at_idx

ALTER INDEX batchdb.requests_answers_idx ATTACH PARTITION batchdb.requests_orphan_request_key_finished_at_idx;

-- index attach results_orphan_pkey

ALTER INDEX batchdb.results_pkey ATTACH PARTITION batchdb.results_orphan_pkey;

-- trigger jobs jobs_after_delete

CREATE TRIGGER jobs_after_delete AFTER DELETE ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_after_delete();

-- trigger jobs jobs_after_insert

CREATE TRIGGER jobs_after_insert AFTER INSERT ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_after_insert();

-- trigger jobs jobs_before_delete

CREATE TRIGGER jobs_before_delete BEFORE DELETE ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_before_delete();

-- trigger jobs jobs_check_params

CREATE TRIGGER jobs_check_params BEFORE INSERT OR UPDATE OF params ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_check_params();

-- trigger jobs jobs_clear_paused_until

CREATE TRIGGER jobs_clear_paused_until BEFORE UPDATE OF status, status_reason ON batchdb.jobs FOR EACH ROW WHEN ((new.paused_until IS NOT NULL)) EXECUTE FUNCTION batchdb.jobs_clear_paused_until();

-- trigger jobs jobs_enqueue_notifications

CREATE CONSTRAINT TRIGGER jobs_enqueue_notifications AFTER UPDATE OF status ON batchdb.jobs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (((old.status IS DISTINCT FROM new.status) AND (new.status = ANY (ARRAY['completed'::text, 'cancelled'::text, 'paused'::text])))) EXECUTE FUNCTION batchdb.jobs_enqueue_notifications();

-- trigger jobs jobs_enqueue_provider_unavailable

CREATE CONSTRAINT TRIGGER jobs_enqueue_provider_unavailable AFTER UPDATE OF status_reason ON batchdb.jobs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (((new.status = 'running'::text) AND (new.status_reason ~~ 'waiting: provider unavailable%'::text) AND ((old.status_reason IS NULL) OR (old.status_reason !~~ 'waiting: provider unavailable%'::text)))) EXECUTE FUNCTION batchdb.jobs_enqueue_notifications();

-- trigger jobs jobs_notify_owner_email

CREATE TRIGGER jobs_notify_owner_email AFTER INSERT ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_notify_owner_email();

-- trigger jobs jobs_notify_status

CREATE TRIGGER jobs_notify_status AFTER UPDATE OF status ON batchdb.jobs FOR EACH ROW WHEN ((old.status IS DISTINCT FROM new.status)) EXECUTE FUNCTION batchdb.jobs_notify_status();

-- trigger jobs jobs_notify_waiting

CREATE TRIGGER jobs_notify_waiting AFTER UPDATE OF status_reason ON batchdb.jobs FOR EACH ROW WHEN (((old.status = 'running'::text) AND (new.status = 'running'::text) AND (COALESCE((old.status_reason ~~ 'waiting: provider unavailable%'::text), false) IS DISTINCT FROM COALESCE((new.status_reason ~~ 'waiting: provider unavailable%'::text), false)))) EXECUTE FUNCTION batchdb.jobs_notify_status();

-- trigger jobs jobs_validate

CREATE TRIGGER jobs_validate BEFORE INSERT OR UPDATE OF model, provider, priority, budget_usd, params, mode, deadline ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_validate();

-- trigger jobs jobs_validate_model

CREATE TRIGGER jobs_validate_model BEFORE INSERT ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_check_model();

-- trigger jobs jobs_validate_reuse

CREATE TRIGGER jobs_validate_reuse BEFORE INSERT OR UPDATE OF reuse, reuse_scope, reuse_max_age ON batchdb.jobs FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_validate_reuse();

-- trigger notification_targets notification_targets_validate

CREATE TRIGGER notification_targets_validate BEFORE INSERT OR UPDATE ON batchdb.notification_targets FOR EACH ROW EXECUTE FUNCTION batchdb.notification_targets_validate();

-- trigger rate_limits rate_limits_history_delete

CREATE TRIGGER rate_limits_history_delete AFTER DELETE ON batchdb.rate_limits FOR EACH ROW EXECUTE FUNCTION batchdb.rate_limits_record_history();

-- trigger rate_limits rate_limits_history_insert

CREATE TRIGGER rate_limits_history_insert AFTER INSERT ON batchdb.rate_limits FOR EACH ROW EXECUTE FUNCTION batchdb.rate_limits_record_history();

-- trigger rate_limits rate_limits_history_update

CREATE TRIGGER rate_limits_history_update AFTER UPDATE OF rpm, tpm, rpd ON batchdb.rate_limits
    FOR EACH ROW WHEN ((old.rpm, old.tpm, old.rpd) IS DISTINCT FROM (new.rpm, new.tpm, new.rpd))
    EXECUTE FUNCTION batchdb.rate_limits_record_history();

-- trigger requests requests_after_delete

CREATE TRIGGER requests_after_delete AFTER DELETE ON batchdb.requests REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_after_delete();

-- trigger requests requests_after_insert

CREATE TRIGGER requests_after_insert AFTER INSERT ON batchdb.requests REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_after_insert();

-- trigger requests requests_after_update

CREATE TRIGGER requests_after_update AFTER UPDATE ON batchdb.requests REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_after_update();

-- trigger requests requests_check_keys

CREATE TRIGGER requests_check_keys AFTER INSERT ON batchdb.requests REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_check_keys();

-- trigger requests_orphan requests_orphan_refuse

CREATE TRIGGER requests_orphan_refuse BEFORE INSERT ON batchdb.requests_orphan FOR EACH ROW EXECUTE FUNCTION batchdb.requests_orphan_refuse();

-- trigger requests requests_refuse

CREATE TRIGGER requests_refuse BEFORE INSERT ON batchdb.requests FOR EACH ROW WHEN ((((new.payload IS NULL) AND (new.input IS NULL)) OR ((new.payload IS NOT NULL) AND ((jsonb_typeof(new.payload) IS DISTINCT FROM 'object'::text) OR ((jsonb_typeof((new.payload -> 'prompt'::text)) IS DISTINCT FROM 'string'::text) AND (jsonb_typeof((new.payload -> 'messages'::text)) IS DISTINCT FROM 'array'::text)))) OR ((new.input IS NOT NULL) AND (jsonb_typeof(new.input) IS DISTINCT FROM 'object'::text)) OR (new.status IS DISTINCT FROM 'queued'::text))) EXECUTE FUNCTION batchdb.requests_refuse();

-- trigger requests requests_refuse_oversized

CREATE TRIGGER requests_refuse_oversized BEFORE INSERT ON batchdb.requests FOR EACH ROW WHEN (((COALESCE(pg_column_size(new.payload), 0) + COALESCE(pg_column_size(new.input), 0)) > 8000)) EXECUTE FUNCTION batchdb.requests_refuse_oversized();

-- trigger requests requests_reuse

CREATE TRIGGER requests_reuse AFTER INSERT ON batchdb.requests REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_reuse();

-- trigger results_orphan results_orphan_refuse

CREATE TRIGGER results_orphan_refuse BEFORE INSERT ON batchdb.results_orphan FOR EACH ROW EXECUTE FUNCTION batchdb.requests_orphan_refuse();

-- trigger unrecorded_calls unrecorded_calls_after_insert

CREATE TRIGGER unrecorded_calls_after_insert AFTER INSERT ON batchdb.unrecorded_calls REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION batchdb.unrecorded_calls_after_insert();

-- fk constraint notification_attempts notification_attempts_delivery_id_fkey

ALTER TABLE ONLY batchdb.notification_attempts
    ADD CONSTRAINT notification_attempts_delivery_id_fkey FOREIGN KEY (delivery_id) REFERENCES batchdb.notification_deliveries(id) ON DELETE CASCADE;

-- fk constraint notification_attempts notification_attempts_job_id_fkey

ALTER TABLE ONLY batchdb.notification_attempts
    ADD CONSTRAINT notification_attempts_job_id_fkey FOREIGN KEY (job_id) REFERENCES batchdb.jobs(id) ON DELETE CASCADE;

-- fk constraint notification_deliveries notification_deliveries_job_id_fkey

ALTER TABLE ONLY batchdb.notification_deliveries
    ADD CONSTRAINT notification_deliveries_job_id_fkey FOREIGN KEY (job_id) REFERENCES batchdb.jobs(id) ON DELETE CASCADE;

-- fk constraint notification_deliveries notification_deliveries_target_id_fkey

ALTER TABLE ONLY batchdb.notification_deliveries
    ADD CONSTRAINT notification_deliveries_target_id_fkey FOREIGN KEY (target_id) REFERENCES batchdb.notification_targets(id) ON DELETE CASCADE;

-- fk constraint notification_targets notification_targets_job_id_fkey

ALTER TABLE ONLY batchdb.notification_targets
    ADD CONSTRAINT notification_targets_job_id_fkey FOREIGN KEY (job_id) REFERENCES batchdb.jobs(id) ON DELETE CASCADE;

-- fk constraint provider_batches provider_batches_job_id_fkey

ALTER TABLE ONLY batchdb.provider_batches
    ADD CONSTRAINT provider_batches_job_id_fkey FOREIGN KEY (job_id) REFERENCES batchdb.jobs(id) ON DELETE CASCADE;

-- fk constraint unrecorded_calls unrecorded_calls_job_id_fkey

ALTER TABLE ONLY batchdb.unrecorded_calls
    ADD CONSTRAINT unrecorded_calls_job_id_fkey FOREIGN KEY (job_id) REFERENCES batchdb.jobs(id) ON DELETE CASCADE;

-- row security budget_reservations

ALTER TABLE batchdb.budget_reservations ENABLE ROW LEVEL SECURITY;

-- policy budget_reservations budget_reservations_all

CREATE POLICY budget_reservations_all ON batchdb.budget_reservations TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- row security jobs

ALTER TABLE batchdb.jobs ENABLE ROW LEVEL SECURITY;

-- policy jobs jobs_all

CREATE POLICY jobs_all ON batchdb.jobs TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy jobs jobs_own

CREATE POLICY jobs_own ON batchdb.jobs TO batchdb_user USING ((owner = CURRENT_USER)) WITH CHECK ((owner = CURRENT_USER));

-- row security notification_attempts

ALTER TABLE batchdb.notification_attempts ENABLE ROW LEVEL SECURITY;

-- policy notification_attempts notification_attempts_all

CREATE POLICY notification_attempts_all ON batchdb.notification_attempts TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy notification_attempts notification_attempts_own

CREATE POLICY notification_attempts_own ON batchdb.notification_attempts TO batchdb_user USING ((EXISTS ( SELECT 1
   FROM batchdb.jobs j
  WHERE ((j.id = notification_attempts.job_id) AND (j.owner = CURRENT_USER)))));

-- row security notification_deliveries

ALTER TABLE batchdb.notification_deliveries ENABLE ROW LEVEL SECURITY;

-- policy notification_deliveries notification_deliveries_all

CREATE POLICY notification_deliveries_all ON batchdb.notification_deliveries TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy notification_deliveries notification_deliveries_own

CREATE POLICY notification_deliveries_own ON batchdb.notification_deliveries TO batchdb_user USING ((EXISTS ( SELECT 1
   FROM batchdb.jobs j
  WHERE ((j.id = notification_deliveries.job_id) AND (j.owner = CURRENT_USER)))));

-- row security notification_targets

ALTER TABLE batchdb.notification_targets ENABLE ROW LEVEL SECURITY;

-- policy notification_targets notification_targets_all

CREATE POLICY notification_targets_all ON batchdb.notification_targets TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy notification_targets notification_targets_own

CREATE POLICY notification_targets_own ON batchdb.notification_targets TO batchdb_user USING ((EXISTS ( SELECT 1
   FROM batchdb.jobs j
  WHERE ((j.id = notification_targets.job_id) AND (j.owner = CURRENT_USER)))));

-- row security provider_batches

ALTER TABLE batchdb.provider_batches ENABLE ROW LEVEL SECURITY;

-- policy provider_batches provider_batches_all

CREATE POLICY provider_batches_all ON batchdb.provider_batches TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy provider_batches provider_batches_own

CREATE POLICY provider_batches_own ON batchdb.provider_batches TO batchdb_user USING ((EXISTS ( SELECT 1
   FROM batchdb.jobs j
  WHERE ((j.id = provider_batches.job_id) AND (j.owner = CURRENT_USER)))));

-- row security requests

ALTER TABLE batchdb.requests ENABLE ROW LEVEL SECURITY;

-- policy requests requests_all

CREATE POLICY requests_all ON batchdb.requests TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy requests requests_own

CREATE POLICY requests_own ON batchdb.requests TO batchdb_user USING ((EXISTS ( SELECT 1
   FROM batchdb.jobs j
  WHERE ((j.id = requests.job_id) AND (j.owner = CURRENT_USER)))));

-- row security results

ALTER TABLE batchdb.results ENABLE ROW LEVEL SECURITY;

-- policy results results_all

CREATE POLICY results_all ON batchdb.results TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy results results_own

CREATE POLICY results_own ON batchdb.results TO batchdb_user USING ((EXISTS ( SELECT 1
   FROM batchdb.jobs j
  WHERE ((j.id = results.job_id) AND (j.owner = CURRENT_USER)))));

-- row security unrecorded_calls

ALTER TABLE batchdb.unrecorded_calls ENABLE ROW LEVEL SECURITY;

-- policy unrecorded_calls unrecorded_calls_all

CREATE POLICY unrecorded_calls_all ON batchdb.unrecorded_calls TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy unrecorded_calls unrecorded_calls_own

CREATE POLICY unrecorded_calls_own ON batchdb.unrecorded_calls TO batchdb_user USING ((EXISTS ( SELECT 1
   FROM batchdb.jobs j
  WHERE ((j.id = unrecorded_calls.job_id) AND (j.owner = CURRENT_USER)))));

-- row security user_spend

ALTER TABLE batchdb.user_spend ENABLE ROW LEVEL SECURITY;

-- policy user_spend user_spend_all

CREATE POLICY user_spend_all ON batchdb.user_spend TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy user_spend user_spend_own

CREATE POLICY user_spend_own ON batchdb.user_spend TO batchdb_user USING ((owner = CURRENT_USER));

-- row security users

ALTER TABLE batchdb.users ENABLE ROW LEVEL SECURITY;

-- policy users users_all

CREATE POLICY users_all ON batchdb.users TO batchdb_admin, batchdb_worker USING (true) WITH CHECK (true);

-- policy users users_own

CREATE POLICY users_own ON batchdb.users TO batchdb_user USING ((name = CURRENT_USER));

-- acl SCHEMA batchdb

GRANT USAGE ON SCHEMA batchdb TO batchdb_user;
GRANT USAGE ON SCHEMA batchdb TO batchdb_admin;
GRANT USAGE ON SCHEMA batchdb TO batchdb_worker;
GRANT USAGE ON SCHEMA batchdb TO batchdb_monitor;

-- acl TABLE users

GRANT SELECT ON TABLE batchdb.users TO batchdb_user;
GRANT ALL ON TABLE batchdb.users TO batchdb_admin;
GRANT SELECT ON TABLE batchdb.users TO batchdb_worker;

-- acl FUNCTION add_user(p_name text, p_kind text, p_weight double precision, p_budget_usd_day numeric, p_budget_usd_month numeric, p_email text, p_password text)

REVOKE ALL ON FUNCTION batchdb.add_user(p_name text, p_kind text, p_weight double precision, p_budget_usd_day numeric, p_budget_usd_month numeric, p_email text, p_password text) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.add_user(p_name text, p_kind text, p_weight double precision, p_budget_usd_day numeric, p_budget_usd_month numeric, p_email text, p_password text) TO batchdb_admin;

-- acl FUNCTION auto_goes_online(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone)

GRANT ALL ON FUNCTION batchdb.auto_goes_online(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone) TO batchdb_user;
GRANT ALL ON FUNCTION batchdb.auto_goes_online(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.auto_goes_online(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone) TO batchdb_admin;

-- acl FUNCTION auto_lane(p_job_id bigint)

GRANT ALL ON FUNCTION batchdb.auto_lane(p_job_id bigint) TO batchdb_user;
GRANT ALL ON FUNCTION batchdb.auto_lane(p_job_id bigint) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.auto_lane(p_job_id bigint) TO batchdb_admin;

-- acl FUNCTION auto_times(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone)

GRANT ALL ON FUNCTION batchdb.auto_times(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone) TO batchdb_user;
GRANT ALL ON FUNCTION batchdb.auto_times(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.auto_times(p_provider text, p_key_alias text, p_model text, p_deadline timestamp with time zone) TO batchdb_admin;

-- acl FUNCTION batch_queue_full(p_provider text, p_key_alias text, p_model text)

GRANT ALL ON FUNCTION batchdb.batch_queue_full(p_provider text, p_key_alias text, p_model text) TO batchdb_user;
GRANT ALL ON FUNCTION batchdb.batch_queue_full(p_provider text, p_key_alias text, p_model text) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.batch_queue_full(p_provider text, p_key_alias text, p_model text) TO batchdb_admin;

-- acl FUNCTION batch_window(p_provider text, p_key_alias text, p_model text)

GRANT ALL ON FUNCTION batchdb.batch_window(p_provider text, p_key_alias text, p_model text) TO batchdb_user;
GRANT ALL ON FUNCTION batchdb.batch_window(p_provider text, p_key_alias text, p_model text) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.batch_window(p_provider text, p_key_alias text, p_model text) TO batchdb_admin;

-- acl FUNCTION circuit_close(p_provider text, p_key_alias text, p_model text)

GRANT ALL ON FUNCTION batchdb.circuit_close(p_provider text, p_key_alias text, p_model text) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.circuit_close(p_provider text, p_key_alias text, p_model text) TO batchdb_admin;

-- acl FUNCTION circuit_mark_jobs(p_provider text, p_key_alias text, p_model text)

GRANT ALL ON FUNCTION batchdb.circuit_mark_jobs(p_provider text, p_key_alias text, p_model text) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.circuit_mark_jobs(p_provider text, p_key_alias text, p_model text) TO batchdb_admin;

-- acl FUNCTION circuit_open(p_provider text, p_key_alias text, p_model text, p_error text, p_first_probe_s double precision)

GRANT ALL ON FUNCTION batchdb.circuit_open(p_provider text, p_key_alias text, p_model text, p_error text, p_first_probe_s double precision) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.circuit_open(p_provider text, p_key_alias text, p_model text, p_error text, p_first_probe_s double precision) TO batchdb_admin;

-- acl FUNCTION circuit_probe_failed(p_provider text, p_key_alias text, p_model text, p_error text, p_base_s double precision, p_max_s double precision)

GRANT ALL ON FUNCTION batchdb.circuit_probe_failed(p_provider text, p_key_alias text, p_model text, p_error text, p_base_s double precision, p_max_s double precision) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.circuit_probe_failed(p_provider text, p_key_alias text, p_model text, p_error text, p_base_s double precision, p_max_s double precision) TO batchdb_admin;

-- acl FUNCTION circuit_wait_reason(p_opened_at timestamp with time zone, p_error text)

GRANT ALL ON FUNCTION batchdb.circuit_wait_reason(p_opened_at timestamp with time zone, p_error text) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.circuit_wait_reason(p_opened_at timestamp with time zone, p_error text) TO batchdb_admin;

-- acl FUNCTION create_job_partitions(p_job_id bigint)

REVOKE ALL ON FUNCTION batchdb.create_job_partitions(p_job_id bigint) FROM PUBLIC;

-- acl FUNCTION drop_job_partitions(p_job_id bigint)

REVOKE ALL ON FUNCTION batchdb.drop_job_partitions(p_job_id bigint) FROM PUBLIC;

-- acl FUNCTION form_provider_batch(p_provider text, p_key_aliases text[], p_max_rows integer)

REVOKE ALL ON FUNCTION batchdb.form_provider_batch(p_provider text, p_key_aliases text[], p_max_rows integer) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.form_provider_batch(p_provider text, p_key_aliases text[], p_max_rows integer) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.form_provider_batch(p_provider text, p_key_aliases text[], p_max_rows integer) TO batchdb_admin;

-- acl FUNCTION jobs_before_delete()

REVOKE ALL ON FUNCTION batchdb.jobs_before_delete() FROM PUBLIC;

-- acl FUNCTION provider_batch_reserve(p_id bigint, p_lease_token bigint)

REVOKE ALL ON FUNCTION batchdb.provider_batch_reserve(p_id bigint, p_lease_token bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.provider_batch_reserve(p_id bigint, p_lease_token bigint) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.provider_batch_reserve(p_id bigint, p_lease_token bigint) TO batchdb_admin;

-- acl FUNCTION release_budget(p_job_ids bigint[], p_usd numeric[])

REVOKE ALL ON FUNCTION batchdb.release_budget(p_job_ids bigint[], p_usd numeric[]) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.release_budget(p_job_ids bigint[], p_usd numeric[]) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.release_budget(p_job_ids bigint[], p_usd numeric[]) TO batchdb_admin;

-- acl FUNCTION require_lock_capacity_for_requests(p_capacity bigint)

REVOKE ALL ON FUNCTION batchdb.require_lock_capacity_for_requests(p_capacity bigint) FROM PUBLIC;

-- acl FUNCTION reserve_budget(p_job_id bigint, p_usd numeric)

REVOKE ALL ON FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric) TO batchdb_admin;

-- acl FUNCTION reserve_budget(p_job_id bigint, p_usd numeric, p_request_id bigint, p_lease_token bigint, p_seq integer)

REVOKE ALL ON FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric, p_request_id bigint, p_lease_token bigint, p_seq integer) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric, p_request_id bigint, p_lease_token bigint, p_seq integer) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric, p_request_id bigint, p_lease_token bigint, p_seq integer) TO batchdb_admin;

-- acl FUNCTION resume_due_jobs()

REVOKE ALL ON FUNCTION batchdb.resume_due_jobs() FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.resume_due_jobs() TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.resume_due_jobs() TO batchdb_admin;

-- acl FUNCTION settle_abandoned_budget(p_older_than_s double precision, p_limit integer)

REVOKE ALL ON FUNCTION batchdb.settle_abandoned_budget(p_older_than_s double precision, p_limit integer) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.settle_abandoned_budget(p_older_than_s double precision, p_limit integer) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.settle_abandoned_budget(p_older_than_s double precision, p_limit integer) TO batchdb_admin;

-- acl FUNCTION settle_budget(p_job_ids bigint[], p_request_ids bigint[], p_lease_tokens bigint[], p_spent numeric[])

REVOKE ALL ON FUNCTION batchdb.settle_budget(p_job_ids bigint[], p_request_ids bigint[], p_lease_tokens bigint[], p_spent numeric[]) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.settle_budget(p_job_ids bigint[], p_request_ids bigint[], p_lease_tokens bigint[], p_spent numeric[]) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.settle_budget(p_job_ids bigint[], p_request_ids bigint[], p_lease_tokens bigint[], p_spent numeric[]) TO batchdb_admin;

-- acl FUNCTION settle_user_spend(p_owners text[], p_reserved numeric[], p_spent numeric[])

REVOKE ALL ON FUNCTION batchdb.settle_user_spend(p_owners text[], p_reserved numeric[], p_spent numeric[]) FROM PUBLIC;
GRANT ALL ON FUNCTION batchdb.settle_user_spend(p_owners text[], p_reserved numeric[], p_spent numeric[]) TO batchdb_worker;
GRANT ALL ON FUNCTION batchdb.settle_user_spend(p_owners text[], p_reserved numeric[], p_spent numeric[]) TO batchdb_admin;

-- acl TABLE provider_batches

GRANT SELECT ON TABLE batchdb.provider_batches TO batchdb_user;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE batchdb.provider_batches TO batchdb_worker;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE batchdb.provider_batches TO batchdb_admin;

-- acl TABLE rate_limits

GRANT SELECT ON TABLE batchdb.rate_limits TO batchdb_user;
GRANT ALL ON TABLE batchdb.rate_limits TO batchdb_admin;
GRANT SELECT,INSERT,UPDATE ON TABLE batchdb.rate_limits TO batchdb_worker;

-- acl TABLE batch_queues

GRANT SELECT ON TABLE batchdb.batch_queues TO batchdb_user;
GRANT SELECT ON TABLE batchdb.batch_queues TO batchdb_worker;
GRANT SELECT ON TABLE batchdb.batch_queues TO batchdb_admin;

-- acl TABLE budget_reservations

GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE batchdb.budget_reservations TO batchdb_worker;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE batchdb.budget_reservations TO batchdb_admin;

-- acl TABLE circuits

GRANT SELECT ON TABLE batchdb.circuits TO batchdb_user;
GRANT ALL ON TABLE batchdb.circuits TO batchdb_admin;
GRANT SELECT,INSERT,UPDATE ON TABLE batchdb.circuits TO batchdb_worker;

-- acl TABLE jobs

GRANT SELECT,DELETE ON TABLE batchdb.jobs TO batchdb_user;
GRANT ALL ON TABLE batchdb.jobs TO batchdb_admin;
GRANT SELECT,UPDATE ON TABLE batchdb.jobs TO batchdb_worker;

-- column privileges

GRANT INSERT (name, owner, provider, model, params, priority, status, max_attempts, budget_usd, idempotency_key, key_alias, allow_unknown_model, mode, reuse, reuse_scope, reuse_max_age, deadline) ON TABLE batchdb.jobs TO batchdb_user;
GRANT UPDATE (name, priority, status, status_reason, budget_usd, finished_at, paused_until, input_sha256) ON TABLE batchdb.jobs TO batchdb_user;
GRANT INSERT (job_id, custom_id, payload, input, max_attempts, request_key) ON TABLE batchdb.requests TO batchdb_user;
GRANT UPDATE (status, attempts, run_after, lease_owner, lease_expires_at, error_class, error, finished_at) ON TABLE batchdb.requests TO batchdb_user;
GRANT INSERT (job_id, channel, target, secret) ON TABLE batchdb.notification_targets TO batchdb_user;

-- acl SEQUENCE requests_id_seq

GRANT USAGE ON SEQUENCE batchdb.requests_id_seq TO batchdb_user;
GRANT ALL ON SEQUENCE batchdb.requests_id_seq TO batchdb_admin;
GRANT USAGE ON SEQUENCE batchdb.requests_id_seq TO batchdb_worker;

-- acl TABLE requests

GRANT SELECT ON TABLE batchdb.requests TO batchdb_user;
GRANT ALL ON TABLE batchdb.requests TO batchdb_admin;
GRANT SELECT,UPDATE ON TABLE batchdb.requests TO batchdb_worker;

-- acl TABLE job_progress

GRANT SELECT ON TABLE batchdb.job_progress TO batchdb_user;
GRANT ALL ON TABLE batchdb.job_progress TO batchdb_admin;
GRANT SELECT ON TABLE batchdb.job_progress TO batchdb_worker;

-- acl SEQUENCE jobs_id_seq

GRANT ALL ON SEQUENCE batchdb.jobs_id_seq TO batchdb_admin;

-- acl TABLE lane_states

GRANT SELECT ON TABLE batchdb.lane_states TO batchdb_user;
GRANT SELECT ON TABLE batchdb.lane_states TO batchdb_worker;
GRANT SELECT ON TABLE batchdb.lane_states TO batchdb_admin;

-- acl TABLE workers

GRANT SELECT ON TABLE batchdb.workers TO batchdb_user;
GRANT ALL ON TABLE batchdb.workers TO batchdb_admin;
GRANT SELECT,INSERT,UPDATE ON TABLE batchdb.workers TO batchdb_worker;

-- acl TABLE live_workers

GRANT SELECT ON TABLE batchdb.live_workers TO batchdb_user;
GRANT ALL ON TABLE batchdb.live_workers TO batchdb_admin;
GRANT SELECT ON TABLE batchdb.live_workers TO batchdb_worker;

-- acl TABLE notification_attempts

GRANT SELECT ON TABLE batchdb.notification_attempts TO batchdb_user;
GRANT ALL ON TABLE batchdb.notification_attempts TO batchdb_admin;
GRANT SELECT,INSERT ON TABLE batchdb.notification_attempts TO batchdb_worker;

-- acl SEQUENCE notification_attempts_id_seq

GRANT ALL ON SEQUENCE batchdb.notification_attempts_id_seq TO batchdb_admin;

-- acl TABLE notification_deliveries

GRANT SELECT ON TABLE batchdb.notification_deliveries TO batchdb_user;
GRANT ALL ON TABLE batchdb.notification_deliveries TO batchdb_admin;
GRANT SELECT,UPDATE ON TABLE batchdb.notification_deliveries TO batchdb_worker;

-- acl SEQUENCE notification_deliveries_id_seq

GRANT ALL ON SEQUENCE batchdb.notification_deliveries_id_seq TO batchdb_admin;

-- acl TABLE notification_targets

GRANT SELECT,DELETE ON TABLE batchdb.notification_targets TO batchdb_user;
GRANT ALL ON TABLE batchdb.notification_targets TO batchdb_admin;
GRANT SELECT ON TABLE batchdb.notification_targets TO batchdb_worker;

-- acl SEQUENCE notification_targets_id_seq

GRANT ALL ON SEQUENCE batchdb.notification_targets_id_seq TO batchdb_admin;

-- acl TABLE prices

GRANT SELECT ON TABLE batchdb.prices TO batchdb_user;
GRANT ALL ON TABLE batchdb.prices TO batchdb_admin;
GRANT SELECT ON TABLE batchdb.prices TO batchdb_worker;

-- acl TABLE queue_depth

GRANT SELECT ON TABLE batchdb.queue_depth TO batchdb_admin;
GRANT SELECT ON TABLE batchdb.queue_depth TO batchdb_worker;
GRANT SELECT ON TABLE batchdb.queue_depth TO batchdb_monitor;

-- acl TABLE rate_limit_history

GRANT SELECT ON TABLE batchdb.rate_limit_history TO batchdb_user;
GRANT SELECT ON TABLE batchdb.rate_limit_history TO batchdb_worker;
GRANT ALL ON TABLE batchdb.rate_limit_history TO batchdb_admin;

-- acl TABLE rate_usage

GRANT SELECT ON TABLE batchdb.rate_usage TO batchdb_user;
GRANT ALL ON TABLE batchdb.rate_usage TO batchdb_admin;
GRANT SELECT,INSERT,UPDATE ON TABLE batchdb.rate_usage TO batchdb_worker;

-- acl TABLE request_params

GRANT SELECT ON TABLE batchdb.request_params TO batchdb_user;
GRANT SELECT ON TABLE batchdb.request_params TO batchdb_worker;
GRANT ALL ON TABLE batchdb.request_params TO batchdb_admin;

-- acl TABLE requests_orphan

GRANT ALL ON TABLE batchdb.requests_orphan TO batchdb_admin;

-- acl TABLE results

GRANT SELECT,DELETE ON TABLE batchdb.results TO batchdb_user;
GRANT ALL ON TABLE batchdb.results TO batchdb_admin;
GRANT SELECT,INSERT,UPDATE ON TABLE batchdb.results TO batchdb_worker;

-- acl TABLE results_orphan

GRANT ALL ON TABLE batchdb.results_orphan TO batchdb_admin;

-- acl TABLE unrecorded_calls

GRANT SELECT ON TABLE batchdb.unrecorded_calls TO batchdb_user;
GRANT SELECT,INSERT ON TABLE batchdb.unrecorded_calls TO batchdb_worker;
GRANT SELECT,INSERT ON TABLE batchdb.unrecorded_calls TO batchdb_admin;

-- acl TABLE user_spend

GRANT SELECT ON TABLE batchdb.user_spend TO batchdb_user;
GRANT ALL ON TABLE batchdb.user_spend TO batchdb_admin;
GRANT SELECT,INSERT,UPDATE ON TABLE batchdb.user_spend TO batchdb_worker;

--
--

-- Reference data.

-- batchdb.prices
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('azure', 'gpt-4o', '2.500000', '10.000000', '1.250000', '0.500', '128000', NULL, '16384', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('azure', 'gpt-4o-mini', '0.150000', '0.600000', '0.075000', '0.500', '128000', NULL, '16384', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('gemini', 'gemini-2.0-flash', '0.100000', '0.400000', '0.025000', '0.500', NULL, '1048576', '8192', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('gemini', 'gemini-2.5-flash', '0.300000', '2.500000', '0.075000', '0.500', NULL, '1048576', '65536', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('gemini', 'gemini-2.5-flash-lite', '0.100000', '0.400000', '0.025000', '0.500', NULL, '1048576', '65536', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('gemini', 'gemini-2.5-pro', '1.250000', '10.000000', '0.310000', '0.500', NULL, '1048576', '65536', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'gpt-4.1', '2.000000', '8.000000', '0.500000', '0.500', '1047576', NULL, '32768', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'gpt-4.1-mini', '0.400000', '1.600000', '0.100000', '0.500', '1047576', NULL, '32768', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'gpt-4.1-nano', '0.100000', '0.400000', '0.025000', '0.500', '1047576', NULL, '32768', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'gpt-4o', '2.500000', '10.000000', '1.250000', '0.500', '128000', NULL, '16384', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'gpt-4o-mini', '0.150000', '0.600000', '0.075000', '0.500', '128000', NULL, '16384', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'gpt-5', '1.250000', '10.000000', '0.125000', '0.500', '400000', '272000', '128000', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'gpt-5-mini', '0.250000', '2.000000', '0.025000', '0.500', '400000', '272000', '128000', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'gpt-5-nano', '0.050000', '0.400000', '0.005000', '0.500', '400000', '272000', '128000', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('openai', 'o4-mini', '1.100000', '4.400000', '0.275000', '0.500', '200000', NULL, '100000', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('vertex', 'gemini-2.0-flash', '0.150000', '0.600000', '0.037500', NULL, NULL, '1048576', '8192', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('vertex', 'gemini-2.5-flash', '0.300000', '2.500000', '0.030000', NULL, NULL, '1048576', '65535', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('vertex', 'gemini-2.5-flash-lite', '0.100000', '0.400000', '0.010000', NULL, NULL, '1048576', '65535', NULL, NULL);
INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, cached_input_per_mtok, batch_discount, context_window, max_input_tokens, max_output_tokens, source, as_of) VALUES ('vertex', 'gemini-2.5-pro', '1.250000', '10.000000', '0.125000', NULL, NULL, '1048576', '65535', NULL, NULL);

-- batchdb.request_params
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('audio', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('dedupe', 'true', 'false', 'batchdb: false sends every row, identical or not (submit(dedupe=False))');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('frequency_penalty', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('function_call', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('functions', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('input_columns', 'true', 'false', 'input column names (the SDK records them)');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('input_types', 'true', 'false', 'input column types (the SDK records them)');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('logit_bias', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('logprobs', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('max_completion_tokens', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('max_tokens', 'true', 'true', 'most tokens in the answer');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('messages', 'false', 'true', 'the row''s chat messages');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('metadata', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('modalities', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('model', 'false', 'true', 'the row''s model, overriding the job''s');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('n', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('parallel_tool_calls', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('prediction', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('presence_penalty', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('prompt', 'true', 'true', 'job: prompt template over the input columns; row: the prompt text');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('reasoning_effort', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('response_format', 'true', 'true', 'text, json_object or json_schema');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('seed', 'true', 'true', 'sampling seed');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('service_tier', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('stop', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('store', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('stream', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('stream_options', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('system', 'true', 'false', 'system message template');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('temperature', 'true', 'true', 'sampling temperature, 0 to 2');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('tool_choice', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('tools', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('top_logprobs', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('top_p', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('user', 'true', 'false', 'chat-completion parameter');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('validation_retries', 'true', 'false', 're-asks for an answer that fails the JSON schema');
INSERT INTO batchdb.request_params (name, in_job, in_row, meaning) VALUES ('web_search_options', 'true', 'false', 'chat-completion parameter');

