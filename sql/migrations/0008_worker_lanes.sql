-- 0008_worker_lanes: workers advertise the lanes they can serve.
--
-- A job names a provider and a key alias; each worker resolves the alias to a
-- key (and an endpoint) from its own environment, so workers started with
-- different environments can serve different jobs. Each worker writes what it
-- resolved to `workers.lanes` (workers/lanes.py) and claims only rows of jobs on
-- those lanes; a job pauses for a missing key only when no live worker
-- advertises its lane, and resumes by itself when one does.

-- One JSON object per (provider, key alias) the worker can call:
--   {"provider": "gemini", "key_alias": "default", "endpoint": "http://127.0.0.1:8000"}
-- endpoint is scheme://host[:port]/path, or null for the provider's public endpoint;
-- never a key, never user:password or a query string.
ALTER TABLE batchdb.workers ADD COLUMN lanes jsonb NOT NULL DEFAULT '[]'::jsonb;
COMMENT ON COLUMN batchdb.workers.lanes IS
    'Lanes this worker can serve: [{"provider", "key_alias", "endpoint"}] as resolved from its environment; no keys';

-- The lanes of unfinished jobs, read by every worker every few seconds.
CREATE INDEX jobs_lanes_idx ON batchdb.jobs (provider, key_alias) WHERE status IN ('running', 'paused');

-- `SELECT w.*` in a view is expanded when the view is created: restate it so it shows `lanes`
-- (a replaced view may only add columns at the end).
CREATE OR REPLACE VIEW batchdb.live_workers AS
SELECT w.id, w.hostname, w.pid, w.concurrency, w.started_at, w.heartbeat_at, w.stopped_at, w.in_flight,
       w.n_completed,
       (w.heartbeat_at > now() - interval '30 seconds' AND w.stopped_at IS NULL) AS alive,
       w.lanes
  FROM batchdb.workers w;
