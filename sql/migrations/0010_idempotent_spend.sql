-- 0010_idempotent_spend: budget bookkeeping that a retried statement cannot count twice,
-- and completions that cannot silently overwrite a final result.
--
-- Workers re-run a statement when their connection drops (workers/connection.py), even
-- when the lost reply belonged to a statement that had already committed. Before this
-- migration that re-run reserved a call's budget twice (a reservation nobody released),
-- added a user's spend twice and released a job's reservation twice. Now every budget
-- reservation is a row keyed by the call (job, request, lease token, n-th call of that
-- lease): reserving the same key again is a no-op, and settling deletes the key's rows,
-- so a settlement repeated finds nothing left to settle.

CREATE TABLE batchdb.budget_reservations (
    job_id       bigint NOT NULL,
    request_id   bigint NOT NULL,
    lease_token  bigint NOT NULL,
    seq          integer NOT NULL,            -- the n-th reservation under this lease (re-asks)
    owner        text,                        -- set when it also holds the owner's budget ...
    day          date,                        -- ... on this UTC day's user_spend row
    usd          numeric(18, 8) NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, request_id, lease_token, seq)
);
ALTER TABLE batchdb.budget_reservations ENABLE ROW LEVEL SECURITY;
CREATE POLICY budget_reservations_all ON batchdb.budget_reservations TO batchdb_admin, batchdb_worker
    USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON batchdb.budget_reservations TO batchdb_worker, batchdb_admin;

-- Reserve one call's worst-case cost under a key. The key's row is inserted first: a
-- repeat of a reservation that committed finds it (or waits for the first attempt's
-- transaction to end) and answers 'ok' without reserving again. The budget rules are
-- 0005's reserve_budget(bigint, numeric), unchanged.
CREATE FUNCTION batchdb.reserve_budget(p_job_id bigint, p_usd numeric, p_request_id bigint, p_lease_token bigint,
                                       p_seq integer) RETURNS text
LANGUAGE plpgsql AS $$
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

-- Settle calls: each call's reservations (job and owner) are released and, for owners
-- with a budget, what the call cost (`p_spent`, per call) is added to the day it was
-- reserved on. A call is (job, request, lease token); a call with nothing reserved, or
-- already settled, changes nothing, so repeating a settlement is harmless. Handing a
-- row back unsent is a settlement that spent 0. Returns the number of calls settled.
-- Locks follow reserve_budget's order: the owners' day rows first, then the jobs.
CREATE FUNCTION batchdb.settle_budget(p_job_ids bigint[], p_request_ids bigint[], p_lease_tokens bigint[],
                                      p_spent numeric[]) RETURNS integer
LANGUAGE plpgsql AS $$
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

REVOKE EXECUTE ON FUNCTION batchdb.reserve_budget(bigint, numeric, bigint, bigint, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION batchdb.settle_budget(bigint[], bigint[], bigint[], numeric[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION batchdb.reserve_budget(bigint, numeric, bigint, bigint, integer),
                          batchdb.settle_budget(bigint[], bigint[], bigint[], numeric[])
    TO batchdb_worker, batchdb_admin;

-- ---------------------------------------------------------------------------
-- A result is written once. complete_batch is fenced (only the lease that claimed a
-- row can finish it), so a second write for the same row means a double completion:
-- a fencing bug, or a row put back in the queue by hand without its answer removed
-- (retry_job removes it). Instead of silently replacing the first answer, a second
-- write keeps the latest answer and counts itself in `writes`, where the drills, the
-- tests and an operator can see it.
-- ---------------------------------------------------------------------------
ALTER TABLE batchdb.results ADD COLUMN writes integer NOT NULL DEFAULT 1;
