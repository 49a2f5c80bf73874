-- 0021_response_reuse: opt-in reuse of answers across jobs (issue 12, "Halve the bill").
--
-- A job with reuse = 'exact' takes, for each of its rows, a stored successful answer to the same
-- request instead of calling the provider: the row is 'succeeded' at once, with a copy of that
-- answer's result, no tokens and no cost, reused_from naming the row whose answer it took and
-- reused_usd what that answer cost (the money reuse saved). Default off: an answer given at a
-- temperature above 0 is one sample of many, and a job may want fresh ones.
--
-- The same request: the jobs have the same provider, model and parameters (jobs.params, apart
-- from input_columns, input_types and dedupe, which do not change what is sent) and the rows the
-- same request_key (0019: the SDK's is a hash of the row's payload and the values its templates
-- use; a plain SQL insert gives its own, which must then cover what decides the answer).
-- A source is a row answered by its own call: status 'succeeded' (never failed, dead or
-- cancelled) whose result is still stored, not a duplicate and not itself reused, finished no longer than reuse_max_age ago
-- (database time; NULL: any age). The latest such answer is taken.
--
-- Whose answers: reuse_scope 'user' (the default) takes only the job owner's own answers;
-- 'team' also those of every user with the same batchdb.users.team (a user without a team has
-- only their own). Teams are set by an admin; a user cannot put themselves in a team, and nothing
-- else crosses users: row-level security still shows each user only their own rows, and the
-- reused copy is the only thing a teammate's answer becomes.
--
-- Where: when the rows are inserted (the statement trigger requests_reuse, after 0019's
-- dedupe has marked the rows that repeat one another). A reused row is final before any worker
-- or batch chunk can see it (both take only 'queued' rows), so it is never sent; a row that
-- leads duplicates passes the reused answer on to them through 0019's fan-out. A statement with
-- no row of a reusing job pays one index probe on jobs when no such job is open.

SELECT batchdb.require_lock_capacity_for_requests();

ALTER TABLE batchdb.jobs
    ADD COLUMN reuse text,
    ADD COLUMN reuse_scope text NOT NULL DEFAULT 'user',
    ADD COLUMN reuse_max_age interval,
    ADD COLUMN n_reused bigint NOT NULL DEFAULT 0,
    ADD COLUMN reused_usd numeric(18, 8) NOT NULL DEFAULT 0;
COMMENT ON COLUMN batchdb.jobs.reuse IS
    'exact: rows take a stored successful answer to the same request (another job''s, within reuse_scope and reuse_max_age) at $0; NULL: off.';
COMMENT ON COLUMN batchdb.jobs.reuse_scope IS
    'Whose answers reuse takes: user (the owner''s) or team (every user with the owner''s batchdb.users.team).';
COMMENT ON COLUMN batchdb.jobs.reuse_max_age IS
    'Oldest answer reuse takes, by the time it was answered (database time); NULL: any age.';
COMMENT ON COLUMN batchdb.jobs.n_reused IS
    'Rows answered by reuse (not counting duplicates that took a reused answer from their first row).';
COMMENT ON COLUMN batchdb.jobs.reused_usd IS
    'What the reused answers cost when they were first paid for: the money reuse saved.';
GRANT INSERT (reuse, reuse_scope, reuse_max_age) ON batchdb.jobs TO batchdb_user;

ALTER TABLE batchdb.requests
    ADD COLUMN reused_from bigint,
    ADD COLUMN reused_from_job bigint,
    ADD COLUMN reused_usd numeric(18, 8);
COMMENT ON COLUMN batchdb.requests.reused_from IS
    'Set by batchdb: the id of the row (of job reused_from_job) whose stored answer this row took (jobs.reuse).';
COMMENT ON COLUMN batchdb.requests.reused_from_job IS
    'Set by batchdb: the job of reused_from.';
COMMENT ON COLUMN batchdb.requests.reused_usd IS
    'Set by batchdb: what the reused answer cost when it was paid for (this row cost $0).';

ALTER TABLE batchdb.users ADD COLUMN team text,
    ADD CONSTRAINT users_team_name CHECK (team IS NULL OR team ~ '^[a-z_][a-z0-9_.-]{0,62}$');
COMMENT ON COLUMN batchdb.users.team IS
    'Users with the same team may reuse one another''s answers (jobs.reuse_scope = team); NULL: no team.';

-- Answers that may be reused, by request: only rows answered by a call of their own are indexed,
-- and only once answered, so inserting rows (a 1,000,000-row submit) never writes to it.
CREATE INDEX requests_answers_idx ON batchdb.requests (request_key, finished_at)
    WHERE status = 'succeeded' AND request_key IS NOT NULL AND duplicate_of IS NULL AND reused_from IS NULL;

-- Open jobs that reuse: what lets every other insert skip reuse with one probe.
CREATE INDEX jobs_reusing_idx ON batchdb.jobs (id)
    WHERE reuse IS NOT NULL AND status IN ('loading', 'running', 'paused');

-- The reuse options are checked with the job, each named (jobs_validate, the other checks, is
-- left as it is).
CREATE FUNCTION batchdb.jobs_validate_reuse() RETURNS trigger
LANGUAGE plpgsql AS $$
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
CREATE TRIGGER jobs_validate_reuse BEFORE INSERT OR UPDATE OF reuse, reuse_scope, reuse_max_age ON batchdb.jobs
    FOR EACH ROW EXECUTE FUNCTION batchdb.jobs_validate_reuse();

-- Rows of a reusing job take stored answers as they are inserted. Runs after requests_after_insert
-- (triggers of one event run in name order), so rows repeating an earlier row of the job are
-- already marked duplicate_of and only the first of them is looked up.
-- SECURITY DEFINER: a team's answers are in rows the inserting user cannot see.
CREATE FUNCTION batchdb.requests_reuse() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
CREATE TRIGGER requests_reuse AFTER INSERT ON batchdb.requests
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION batchdb.requests_reuse();
