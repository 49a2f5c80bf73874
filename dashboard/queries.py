"""Every query the dashboard runs, and one loader per page that runs them.

Two kinds of SQL live here and nowhere else:

- PostgreSQL (`PG_*`): the selective questions, answered from the exact job
  counters (`batchdb.job_progress`), the ledger (`rate_limits`, `rate_usage`,
  read through its primary key one lane at a time) and, for what only the rows
  know (recent completions, progress over time, latency, errors, samples), a
  read of one job's partition: whole when the job has at most
  `EXACT_SCAN_ROWS` rows, else a `TABLESAMPLE SYSTEM` page sample sized to
  about `SAMPLE_TARGET_ROWS` rows, scaled back up and marked as an estimate.
  No query reads all of `batchdb.requests`.
- DuckDB (`DUCK_*`): shaping the fetched answers (filters, lane utilisation,
  cost by day/user/model/job) and reading finished jobs' Parquet outputs.

Loaders take a DSN and return plain DataFrames/dicts, so the pages cache them
with `st.cache_data`, and the tests and `bench/dashboard.py` call the very
same functions without Streamlit. Times are naive UTC throughout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from batchdb.dashboard.source import Engine, duck_df, fetch_df, fetch_rows, read_connection
from batchdb.pricing import Price, output_charge
from batchdb.queries import query

# A job partition up to this many rows is read whole (about 20 ms); a bigger one is page-sampled
# down to about as many rows, so one read of a 1M-row job costs what a 100k-row job costs.
EXACT_SCAN_ROWS = 100_000
SAMPLE_TARGET_ROWS = 100_000
MAX_TIMELINE_POINTS = 400
MAX_JOBS = 10_000
ACTIVE_STATUSES = ("running", "paused", "loading")
FINAL_STATUSES = ("completed", "cancelled")
JOB_STATUSES = ("loading", "running", "paused", "cancelled", "completed")


def sample_percent(rows: int, *, exact_rows: int = EXACT_SCAN_ROWS, target_rows: int = SAMPLE_TARGET_ROWS) -> float:
    """Share of a partition's pages to read: 100 (exact) for small jobs, else about `target_rows` rows' worth."""
    if rows <= exact_rows:
        return 100.0
    return max(0.01, min(100.0, 100.0 * target_rows / rows))


# =================================================================================================
# PostgreSQL
# =================================================================================================

# One row per job (exact counters, ETA from the view), with what cost estimates need.
PG_JOBS = """
SELECT p.job_id, p.name, p.owner, p.provider, p.key_alias, p.model, p.status, p.status_reason, p.priority,
       p.n_total, p.n_queued, p.n_running, p.n_succeeded, p.n_failed, p.n_dead, p.n_cancelled, p.n_done,
       p.pct_done::float8 AS pct_done, p.n_retries, p.prompt_tokens, p.cached_tokens, p.completion_tokens,
       p.cost_usd::float8 AS cost_usd, p.budget_usd::float8 AS budget_usd, p.reserved_usd::float8 AS reserved_usd,
       p.created_at, p.started_at, p.finished_at,
       p.rows_per_second::float8 AS avg_rows_per_second,
       extract(epoch FROM p.eta)::float8 AS eta_seconds,
       CASE WHEN jsonb_typeof(j.params -> 'max_tokens') = 'number'
            THEN (j.params ->> 'max_tokens')::numeric::bigint END AS max_tokens,
       pr.input_per_mtok::float8 AS input_per_mtok, pr.output_per_mtok::float8 AS output_per_mtok,
       pr.cached_input_per_mtok::float8 AS cached_input_per_mtok,
       pr.as_of AS price_as_of, pr.source AS price_source,
       now() AS db_now,
       p.mode, pr.batch_discount::float8 AS batch_discount, p.deadline,
       p.n_duplicates, j.n_reused, j.reused_usd::float8 AS reused_usd
  FROM batchdb.job_progress p
  JOIN batchdb.jobs j ON j.id = p.job_id
  LEFT JOIN batchdb.prices pr ON pr.provider = p.provider AND pr.model = p.model
 WHERE %(job_id)s::bigint IS NULL OR p.job_id = %(job_id)s::bigint
 ORDER BY p.job_id DESC
 LIMIT %(limit)s
"""

# What a job's duplicates (0019) would have cost sent on their own: each its first row's answer, as
# that row paid for it or, reused (0021), as its source paid for it.
PG_JOB_DEDUPE_SAVED = """
SELECT count(*) AS n, coalesce(sum(l.cost_usd + coalesce(l.reused_usd, 0)), 0)::float8 AS usd
  FROM batchdb.requests d
  JOIN batchdb.requests l ON l.job_id = d.job_id AND l.id = d.duplicate_of
 WHERE d.job_id = %(job_id)s AND d.duplicate_of IS NOT NULL AND d.status = 'succeeded'
"""

# The last minutes of one running job, by error class (NULL class: rows without an error).
# A retrying row's error happened up to its back-off before `run_after`; counted when that is < 5 min ago.
PG_RECENT_ACTIVITY = """
SELECT error_class,
       count(*) FILTER (WHERE finished_at >= now() - interval '1 minute') AS finished_1m,
       coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE finished_at >= now() - interval '1 minute'), 0)
           AS tokens_1m,
       count(*) FILTER (WHERE error_class IS NOT NULL
                          AND (finished_at >= now() - interval '5 minutes'
                               OR (status IN ('queued', 'running') AND run_after >= now() - interval '5 minutes')))
           AS errors_5m
  FROM batchdb.requests TABLESAMPLE SYSTEM (%(pct)s) REPEATABLE (0)
 WHERE job_id = %(job_id)s
   AND (finished_at >= now() - interval '5 minutes' OR (error_class IS NOT NULL AND status IN ('queued', 'running')))
 GROUP BY error_class
"""

# One read of one job's rows (whole, or a page sample) answers the three questions of the detail page:
# finished rows per time bucket (progress over time, throughput), latency of succeeded calls, and
# rows with an error (final, or waiting for a retry) by class with examples. The sample is taken
# once and aggregated three times, so a big job's page costs one sample scan, not three.
PG_JOB_ROWS_SUMMARY = """
WITH s AS MATERIALIZED (
    SELECT status, finished_at, latency_ms, prompt_tokens, completion_tokens, cost_usd, error_class, error
      FROM batchdb.requests TABLESAMPLE SYSTEM (%(pct)s) REPEATABLE (0)
     WHERE job_id = %(job_id)s AND (finished_at IS NOT NULL OR error_class IS NOT NULL)
)
SELECT
    (SELECT coalesce(json_agg(t ORDER BY t.bucket), '[]')
       FROM (SELECT date_bin(make_interval(secs => %(bucket_seconds)s), finished_at, timestamptz '2000-01-01')
                        AT TIME ZONE 'UTC' AS bucket,
                    count(*) AS finished,
                    count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                    count(*) FILTER (WHERE status IN ('failed', 'dead')) AS failed,
                    sum(prompt_tokens) AS prompt_tokens,
                    sum(completion_tokens) AS completion_tokens,
                    sum(cost_usd)::float8 AS cost_usd
               FROM s
              WHERE finished_at IS NOT NULL
              GROUP BY 1) t) AS timeline,
    (SELECT row_to_json(l)
       FROM (SELECT count(*) AS n,
                    avg(latency_ms)::float8 AS mean_ms,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_ms,
                    percentile_cont(0.9) WITHIN GROUP (ORDER BY latency_ms) AS p90_ms,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99_ms,
                    max(latency_ms)::float8 AS max_ms
               FROM s
              WHERE status = 'succeeded' AND latency_ms IS NOT NULL) l) AS latency,
    (SELECT coalesce(json_agg(e ORDER BY e.n DESC, e.state, e.error_class), '[]')
       FROM (SELECT CASE WHEN status IN ('queued', 'running') THEN 'retrying' ELSE status END AS state,
                    error_class,
                    count(*) AS n,
                    (array_agg(DISTINCT left(error, 400)))[1:3] AS examples,
                    max(finished_at) AT TIME ZONE 'UTC' AS last_seen
               FROM s
              WHERE error_class IS NOT NULL
              GROUP BY 1, 2) e) AS errors
"""

# A few answered rows of one job with their inputs, for auditing outputs. The sample is picked
# from a page sample of `results`, then each row is fetched by primary key (never a join scan).
PG_JOB_SAMPLES = """
WITH picked AS MATERIALIZED (
    SELECT r.request_id, r.response_text, r.finish_reason
      FROM batchdb.results r TABLESAMPLE SYSTEM (%(pct)s) REPEATABLE (%(seed)s)
     WHERE r.job_id = %(job_id)s
     ORDER BY md5(r.request_id::text || %(seed)s::text)
     LIMIT %(limit)s
)
SELECT q.id AS request_id, q.custom_id, q.status, q.payload, q.input, p.response_text, p.finish_reason,
       q.prompt_tokens, q.completion_tokens, q.cost_usd::float8 AS cost_usd, q.latency_ms, q.attempts
  FROM picked p
  JOIN LATERAL (SELECT * FROM batchdb.requests q WHERE q.job_id = %(job_id)s AND q.id = p.request_id) q ON true
 ORDER BY q.id
"""

PG_JOB_PARAMS = "SELECT model, provider, params FROM batchdb.jobs WHERE id = %(job_id)s"

# The job picker: ids and names only.
PG_JOB_CHOICES = "SELECT id AS job_id, name FROM batchdb.jobs ORDER BY id DESC LIMIT %(limit)s"

# The next rows a job would send (the claimable index), for pricing queued work before any row finished.
PG_NEXT_QUEUED = """
SELECT payload, input FROM batchdb.requests
 WHERE job_id = %(job_id)s AND status = 'queued'
 ORDER BY run_after, id
 LIMIT %(limit)s
"""

# Configured (or learnt) limits and the pacer's live state, one row per provider key and model.
PG_LIMITS = """
SELECT provider, key_alias, model, rpm, tpm, rpd, burst_seconds, target_fraction, source,
       pace,
       least(1.0, pace + 0.02 * greatest(0, extract(epoch FROM now() - refilled_at)))::float8 AS pace_now,
       blocked_until,
       coalesce(blocked_until > now(), false) AS blocked,
       day_requests, requests_granted, tokens_granted, rate_limited, updated_at,
       s.state, s.state_text, s.stalled
  FROM batchdb.rate_limits
  JOIN batchdb.lane_states s USING (provider, key_alias, model)
 ORDER BY provider, key_alias, model
"""

# Per-minute ledger usage for every lane that has limits or jobs, read through rate_usage's
# primary key one lane at a time (the table grows by one row per lane and minute).
PG_LANE_USAGE = """
WITH lanes AS (
    SELECT provider, key_alias, model FROM batchdb.rate_limits
    UNION
    SELECT DISTINCT provider, key_alias, model FROM batchdb.jobs
)
SELECT l.provider, l.key_alias, l.model, u.minute, u.requests, u.tokens, u.rate_limited
  FROM lanes l
  CROSS JOIN LATERAL (
        SELECT u.minute, u.requests, u.tokens, u.rate_limited
          FROM batchdb.rate_usage u
         WHERE u.provider = l.provider AND u.key_alias = l.key_alias AND u.model = l.model
           AND u.minute >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s)
  ) u
 ORDER BY l.provider, l.key_alias, l.model, u.minute
"""

# Lanes whose circuit is open (workers/breaker.py): the same statement `batchdb limits show` runs.
PG_OPEN_CIRCUITS = query("open_circuits")

# A batch-mode job's chunks and their batches at the provider: the statement `batchdb status JOB` runs.
PG_JOB_BATCHES = query("job_batches")
# An auto-mode job: rows answered by batch and online (`batchdb status JOB`, Job.lanes()), and where
# its rows go now with its cutoff and cancel times.
PG_JOB_LANE_SPLIT = query("job_lane_split")
PG_AUTO_JOB_CLOCK = query("auto_job_clock")

# The limits in effect over the window: each lane's last change before it, and every change in it.
PG_LIMIT_HISTORY = """
SELECT provider, key_alias, model, changed_at, rpm, tpm
  FROM (SELECT DISTINCT ON (provider, key_alias, model) provider, key_alias, model, changed_at, rpm, tpm
          FROM batchdb.rate_limit_history
         WHERE changed_at < %(since)s
         ORDER BY provider, key_alias, model, changed_at DESC) before_window
UNION ALL
SELECT provider, key_alias, model, changed_at, rpm, tpm
  FROM batchdb.rate_limit_history
 WHERE changed_at >= %(since)s
 ORDER BY provider, key_alias, model, changed_at
"""

PG_LANES = """
SELECT provider, key_alias, model FROM batchdb.rate_limits
UNION
SELECT DISTINCT provider, key_alias, model FROM batchdb.jobs
ORDER BY 1, 2, 3
"""

PG_CLOCK = """
SELECT now() AS db_now,
       date_trunc('minute', now()) AS current_minute,
       extract(epoch FROM now() - date_trunc('minute', now()))::float8 AS seconds_into_minute
"""

# Who is looking, and whether row-level security limits them to their own jobs.
PG_VIEWER = """
SELECT current_user AS name, row_security_active('batchdb.jobs') AS own_jobs_only
"""

PG_WORKERS = """
SELECT id, hostname, pid, concurrency, in_flight, n_completed, started_at, heartbeat_at, stopped_at, alive
  FROM batchdb.live_workers
 ORDER BY alive DESC, heartbeat_at DESC
 LIMIT 500
"""

PG_WORKER_TOTALS = """
SELECT count(*) FILTER (WHERE alive) AS alive,
       count(*) AS seen,
       coalesce(sum(in_flight) FILTER (WHERE alive), 0) AS in_flight,
       coalesce(sum(concurrency) FILTER (WHERE alive), 0) AS capacity
  FROM batchdb.live_workers
"""


# =================================================================================================
# DuckDB
# =================================================================================================

DUCK_JOBS_FILTERED = """
SELECT *
  FROM jobs
 WHERE (len($owners::VARCHAR[]) = 0 OR list_contains($owners::VARCHAR[], owner))
   AND (len($statuses::VARCHAR[]) = 0 OR list_contains($statuses::VARCHAR[], status))
   AND (len($models::VARCHAR[]) = 0 OR list_contains($models::VARCHAR[], model))
 ORDER BY job_id DESC
"""

# Jobs table: the view's columns plus "now" rates from the recent-activity read.
DUCK_JOBS_TABLE = """
SELECT j.job_id, j.name, j.status, j.owner, j.provider, j.model, j.pct_done,
       j.n_total, j.n_done, j.n_queued, j.n_running, j.n_succeeded, j.n_failed, j.n_dead, j.n_cancelled,
       j.cost_usd,
       r.rows_per_second_now,
       j.avg_rows_per_second,
       j.eta_seconds,
       j.created_at, j.started_at, j.finished_at, j.status_reason
  FROM jobs j
  LEFT JOIN (SELECT job_id, sum(finished_1m) / 60.0 AS rows_per_second_now FROM recent GROUP BY job_id) r
         USING (job_id)
 ORDER BY j.job_id DESC
"""

# A job's cost spread evenly over its active time, split at UTC midnight. Exact for jobs
# that ran within one day; an estimate for jobs that crossed midnight.
DUCK_COST_BY_DAY = """
WITH j AS (
    SELECT job_id, name, owner, model, cost_usd,
           coalesce(started_at, created_at) AS s,
           greatest(coalesce(finished_at, db_now), coalesce(started_at, created_at)) AS e
      FROM jobs
     WHERE cost_usd > 0
), d AS (
    SELECT j.*, unnest(range(date_trunc('day', s), date_trunc('day', e) + INTERVAL 1 DAY, INTERVAL 1 DAY)) AS day
      FROM j
)
SELECT CAST(day AS DATE) AS day, owner, model, job_id,
       sum(cost_usd * CASE WHEN e > s
                           THEN (epoch(least(e, day + INTERVAL 1 DAY)) - epoch(greatest(s, day)))
                                / (epoch(e) - epoch(s))
                           ELSE 1 END) AS cost_usd
  FROM d
 GROUP BY ALL
HAVING sum(cost_usd) > 0
 ORDER BY day, owner, model, job_id
"""

DUCK_COST_BY = """
SELECT {column}, sum(cost_usd) AS cost_usd, count(*) AS jobs, sum(n_done) AS rows_done,
       sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens
  FROM jobs
 GROUP BY {column}
 ORDER BY cost_usd DESC, {column}
"""

DUCK_COST_BY_JOB = """
SELECT job_id, name, owner, model, status, cost_usd, budget_usd, n_done, n_total, prompt_tokens, completion_tokens
  FROM jobs
 WHERE cost_usd > 0 OR status IN ('running', 'paused', 'loading')
 ORDER BY cost_usd DESC, job_id DESC
"""

# Tokens and requests per minute "now" per lane: the current minute plus the share of the previous
# minute that is still inside the trailing 60 s (a sliding-window estimate), against the limits.
DUCK_LANES_NOW = """
WITH u AS (
    SELECT provider, key_alias, model,
           sum(tokens) FILTER (WHERE minute = $current_minute) AS tok_cur,
           sum(tokens) FILTER (WHERE minute = $current_minute - INTERVAL 1 MINUTE) AS tok_prev,
           sum(requests) FILTER (WHERE minute = $current_minute) AS req_cur,
           sum(requests) FILTER (WHERE minute = $current_minute - INTERVAL 1 MINUTE) AS req_prev,
           sum(rate_limited) FILTER (WHERE minute >= $current_minute - INTERVAL 4 MINUTE) AS rate_limited_5m
      FROM usage
     GROUP BY ALL
), lanes AS (
    SELECT provider, key_alias, model FROM lanes_seen
    UNION
    SELECT provider, key_alias, model FROM limits
)
SELECT l.provider, l.key_alias, l.model, lim.rpm, lim.tpm,
       coalesce(u.tok_cur, 0) + coalesce(u.tok_prev, 0) * (60 - $seconds) / 60 AS tokens_per_min,
       coalesce(u.req_cur, 0) + coalesce(u.req_prev, 0) * (60 - $seconds) / 60 AS requests_per_min,
       100.0 * (coalesce(u.tok_cur, 0) + coalesce(u.tok_prev, 0) * (60 - $seconds) / 60) / lim.tpm AS tpm_used_pct,
       100.0 * (coalesce(u.req_cur, 0) + coalesce(u.req_prev, 0) * (60 - $seconds) / 60) / lim.rpm AS rpm_used_pct,
       coalesce(u.rate_limited_5m, 0) AS rate_limited_5m,
       lim.pace_now, lim.blocked, lim.source, coalesce(lim.state_text, 'not paced (no limits)') AS state
  FROM lanes l
  LEFT JOIN u USING (provider, key_alias, model)
  LEFT JOIN limits lim USING (provider, key_alias, model)
 ORDER BY l.provider, l.key_alias, l.model
"""

# Per-minute usage against the limits, minute by minute (missing minutes count as zero). Each minute's
# limit is the one in effect at its end (the last change before then, from rate_limit_history).
DUCK_LANE_SERIES = """
WITH lanes AS (SELECT DISTINCT provider, key_alias, model FROM usage),
     minutes AS (SELECT unnest(range($first_minute, $current_minute + INTERVAL 1 MINUTE, INTERVAL 1 MINUTE)) AS minute),
     grid AS (SELECT l.provider, l.key_alias, l.model, m.minute, m.minute + INTERVAL 1 MINUTE AS minute_end
                FROM lanes l CROSS JOIN minutes m)
SELECT g.provider || '/' || g.key_alias || '/' || g.model AS lane, g.minute,
       coalesce(u.requests, 0) AS requests, coalesce(u.tokens, 0) AS tokens,
       coalesce(u.rate_limited, 0) AS rate_limited,
       h.rpm, h.tpm
  FROM grid g
  LEFT JOIN usage u USING (provider, key_alias, model, minute)
  ASOF LEFT JOIN history h
    ON h.provider = g.provider AND h.key_alias = g.key_alias AND h.model = g.model AND h.changed_at < g.minute_end
 ORDER BY lane, g.minute
"""

DUCK_PARQUET_STATUS = """
SELECT status, count(*) AS n, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       sum(cost_usd) AS cost_usd
  FROM read_parquet($path)
 GROUP BY status
 ORDER BY n DESC
"""

DUCK_PARQUET_ERRORS = """
SELECT status, error_class, count(*) AS n, min(error) AS example
  FROM read_parquet($path)
 WHERE error_class IS NOT NULL
 GROUP BY ALL
 ORDER BY n DESC
"""

DUCK_PARQUET_LATENCY = """
SELECT count(latency_ms) AS n, avg(latency_ms) AS mean_ms,
       quantile_cont(latency_ms, 0.5) AS p50_ms, quantile_cont(latency_ms, 0.9) AS p90_ms,
       quantile_cont(latency_ms, 0.99) AS p99_ms, max(latency_ms) AS max_ms
  FROM read_parquet($path)
 WHERE status = 'succeeded'
"""

DUCK_PARQUET_SAMPLE = """
SELECT * FROM read_parquet($path) USING SAMPLE reservoir({limit} ROWS) REPEATABLE ({seed})
"""


# =================================================================================================
# Loaders
# =================================================================================================


@dataclass(frozen=True)
class Estimate:
    """How a figure was obtained: read whole (pct 100) or scaled up from a page sample."""

    pct: float

    @property
    def exact(self) -> bool:
        return self.pct >= 100.0

    @property
    def scale(self) -> float:
        return 100.0 / self.pct

    def label(self) -> str:
        return "exact" if self.exact else f"estimated from a {self.pct:.2g}% page sample"


def jobs(conn: Any, *, job_id: int | None = None, limit: int = MAX_JOBS) -> pd.DataFrame:
    return fetch_df(conn, PG_JOBS, {"job_id": job_id, "limit": limit})


def recent_activity(conn: Any, jobs_df: pd.DataFrame, *, exact_rows: int = EXACT_SCAN_ROWS) -> pd.DataFrame:
    """Per running job and error class: rows finished in the last minute, errors in the last 5 minutes."""
    frames = []
    running = jobs_df[jobs_df["status"] == "running"]
    for job_id, n_total in zip(running["job_id"], running["n_total"], strict=True):
        est = Estimate(sample_percent(int(n_total), exact_rows=exact_rows))
        part = fetch_df(conn, PG_RECENT_ACTIVITY, {"job_id": int(job_id), "pct": est.pct})
        for column in ("finished_1m", "tokens_1m", "errors_5m"):
            part[column] = part[column].astype("float64") * est.scale
        part.insert(0, "job_id", int(job_id))
        part["sample_pct"] = est.pct
        frames.append(part)
    if not frames:
        return pd.DataFrame(
            {
                "job_id": pd.Series(dtype="int64"),
                "error_class": pd.Series(dtype="object"),
                "finished_1m": pd.Series(dtype="float64"),
                "tokens_1m": pd.Series(dtype="float64"),
                "errors_5m": pd.Series(dtype="float64"),
                "sample_pct": pd.Series(dtype="float64"),
            }
        )
    return pd.concat(frames, ignore_index=True)


def clock(conn: Any) -> dict[str, Any]:
    return dict(fetch_df(conn, PG_CLOCK).iloc[0].to_dict())


def limits(conn: Any) -> pd.DataFrame:
    return fetch_df(conn, PG_LIMITS)


def lane_usage(conn: Any, *, minutes: int) -> pd.DataFrame:
    return fetch_df(conn, PG_LANE_USAGE, {"minutes": minutes})


def lanes_now(
    limits_df: pd.DataFrame, usage_df: pd.DataFrame, lanes_df: pd.DataFrame, now: Mapping[str, Any]
) -> pd.DataFrame:
    return duck_df(
        DUCK_LANES_NOW,
        {"limits": limits_df, "usage": usage_df, "lanes_seen": lanes_df},
        {"current_minute": now["current_minute"], "seconds": float(now["seconds_into_minute"])},
    )


def cost_by_day(jobs_df: pd.DataFrame) -> pd.DataFrame:
    return duck_df(DUCK_COST_BY_DAY, {"jobs": jobs_df})


def cost_by(jobs_df: pd.DataFrame, column: str) -> pd.DataFrame:
    if column not in ("owner", "model", "provider", "status"):
        raise ValueError(f"cannot group cost by {column!r}")
    return duck_df(DUCK_COST_BY.format(column=column), {"jobs": jobs_df})


def filter_jobs(
    jobs_df: pd.DataFrame, *, owners: Iterable[str] = (), statuses: Iterable[str] = (), models: Iterable[str] = ()
) -> pd.DataFrame:
    return duck_df(
        DUCK_JOBS_FILTERED,
        {"jobs": jobs_df},
        {"owners": list(owners), "statuses": list(statuses), "models": list(models)},
    )


def load_overview(dsn: str | None, *, exact_rows: int = EXACT_SCAN_ROWS, engine: Engine = "psycopg") -> dict[str, Any]:
    """Overview: active jobs, rows/s now, tokens/min vs limits, 429s and errors (5 min), cost today, workers."""
    with read_connection(dsn, engine=engine) as conn:
        now = clock(conn)
        jobs_df = jobs(conn)
        recent = recent_activity(conn, jobs_df, exact_rows=exact_rows)
        limits_df = limits(conn)
        usage = lane_usage(conn, minutes=5)
        lanes_df = fetch_df(conn, PG_LANES)
        workers_totals = fetch_df(conn, PG_WORKER_TOTALS).iloc[0].to_dict()
    lanes = lanes_now(limits_df, usage, lanes_df, now)
    by_day = cost_by_day(jobs_df)
    today = pd.Timestamp(now["db_now"]).normalize()
    active = jobs_df[jobs_df["status"].isin(ACTIVE_STATUSES)]
    errors = (
        recent[recent["error_class"].notna() & (recent["errors_5m"] > 0)]
        .groupby("error_class", as_index=False)["errors_5m"]
        .sum()
        .sort_values("errors_5m", ascending=False, ignore_index=True)
    )
    return {
        "now": now,
        "active_jobs": active.reset_index(drop=True),
        "n_active": len(active),
        "n_running": int((jobs_df["status"] == "running").sum()),
        "n_paused": int((jobs_df["status"] == "paused").sum()),
        "rows_per_second_now": float(recent["finished_1m"].sum()) / 60.0,
        "recent": recent,
        "rows_exact": bool((recent["sample_pct"] >= 100).all()),
        "errors_5m": float(errors["errors_5m"].sum()) if len(errors) else 0.0,
        "errors_by_class": errors,
        "rate_limited_5m": int(lanes["rate_limited_5m"].sum()) if len(lanes) else 0,
        "lanes": lanes,
        "cost_today": float(by_day.loc[pd.to_datetime(by_day["day"]) == today, "cost_usd"].sum())
        if len(by_day)
        else 0.0,
        "cost_total": float(jobs_df["cost_usd"].sum()) if len(jobs_df) else 0.0,
        "workers": workers_totals,
    }


def load_jobs(dsn: str | None, *, exact_rows: int = EXACT_SCAN_ROWS, engine: Engine = "psycopg") -> pd.DataFrame:
    """Jobs page: every job with progress, rows by status, cost, rates and ETA."""
    with read_connection(dsn, engine=engine) as conn:
        jobs_df = jobs(conn)
        recent = recent_activity(conn, jobs_df, exact_rows=exact_rows)
    return duck_df(DUCK_JOBS_TABLE, {"jobs": jobs_df, "recent": recent})


def load_job_choices(dsn: str | None, *, limit: int = MAX_JOBS, engine: Engine = "psycopg") -> pd.DataFrame:
    with read_connection(dsn, engine=engine) as conn:
        return fetch_df(conn, PG_JOB_CHOICES, {"limit": limit})


def bucket_seconds(duration_seconds: float, *, target_buckets: int = 120) -> int:
    """A round bucket size giving at most about `target_buckets` points over the duration."""
    for size in (1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 7 * 86400):
        if duration_seconds / size <= target_buckets:
            return size
    return 30 * 86400


def load_job_detail(
    dsn: str | None,
    job_id: int,
    *,
    exact_rows: int = EXACT_SCAN_ROWS,
    target_rows: int = SAMPLE_TARGET_ROWS,
    engine: Engine = "psycopg",
) -> dict[str, Any] | None:
    """Job detail: the job's counters, progress over time, throughput, latency, errors, cost by token type."""
    with read_connection(dsn, engine=engine) as conn:
        found = jobs(conn, job_id=job_id, limit=1)
        if found.empty:
            return None
        job = found.iloc[0].to_dict()
        est = Estimate(sample_percent(int(job["n_total"]), exact_rows=exact_rows, target_rows=target_rows))
        start = job["started_at"] if pd.notna(job["started_at"]) else job["created_at"]
        end = job["finished_at"] if pd.notna(job["finished_at"]) else job["db_now"]
        bucket = bucket_seconds(max(1.0, (pd.Timestamp(end) - pd.Timestamp(start)).total_seconds()))
        summary = fetch_rows(conn, PG_JOB_ROWS_SUMMARY, {"job_id": job_id, "pct": est.pct, "bucket_seconds": bucket})[0]
        sends_batches = job.get("mode") in ("batch", "auto")
        batches = fetch_df(conn, PG_JOB_BATCHES, {"job_id": job_id}) if sends_batches else None
        lanes = None
        if job.get("mode") == "auto":
            lanes = fetch_rows(conn, PG_JOB_LANE_SPLIT, {"job_id": job_id})[0]
            clock = fetch_rows(conn, PG_AUTO_JOB_CLOCK, {"job_id": job_id})
            lanes.update(clock[0] if clock else {})
        deduped = (
            fetch_rows(conn, PG_JOB_DEDUPE_SAVED, {"job_id": job_id})[0]
            if int(job.get("n_duplicates") or 0)
            else {"n": 0, "usd": 0.0}
        )
    timeline = _frame(summary["timeline"], TIMELINE_COLUMNS)
    errors = _frame(summary["errors"], ERROR_COLUMNS)
    if not est.exact:
        timeline, errors = calibrate(timeline, errors, job, est)
    if len(timeline) > 1:
        span = (timeline["bucket"].max() - timeline["bucket"].min()).total_seconds()
        if span / bucket > MAX_TIMELINE_POINTS:  # rows finished outside the job's recorded run (hand-made data)
            bucket = bucket_seconds(span)
            timeline["bucket"] = timeline["bucket"].dt.floor(f"{bucket}s")
            timeline = timeline.groupby("bucket", as_index=False).sum()
    if len(timeline) and pd.notna(job["started_at"]) and timeline["bucket"].iloc[0] > job["started_at"]:
        # The curve starts from nothing at the job's first claim.
        start_row = {c: 0.0 for c in TIMELINE_COLUMNS if c != "bucket"} | {"bucket": job["started_at"]}
        timeline = pd.concat([pd.DataFrame([start_row]).astype(TIMELINE_COLUMNS), timeline], ignore_index=True)
    timeline["done_cumulative"] = timeline["finished"].cumsum()
    timeline["rows_per_second"] = timeline["finished"] / bucket
    latency = dict.fromkeys(LATENCY_KEYS, None) | (summary["latency"] or {})
    return {
        "job": job,
        "estimate": est,
        "bucket_seconds": bucket,
        "timeline": timeline,
        "latency": latency,
        "errors": errors,
        "cost_by_token_type": cost_by_token_type(job),
        "savings": savings(job, dedupe_rows=int(deduped["n"]), dedupe_usd=float(deduped["usd"])),
        "batches": batches,
        "lanes": lanes,
    }


def calibrate(
    timeline: pd.DataFrame, errors: pd.DataFrame, job: Mapping[str, Any], est: Estimate
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scale a page sample up to the job's exact counters (a ratio estimate).

    The sample gives shapes: when rows finished, and which error classes the failed and dead rows
    have. The counters give the totals. So the progress curve ends at exactly `n_done`, and the
    failed and dead rows per class add up to exactly `n_failed` and `n_dead`. Rows waiting for a
    retry have no counter and are scaled by the sampling rate alone.
    """
    timeline = timeline.copy()
    for column, total in (
        ("finished", job["n_done"]),
        ("succeeded", job["n_succeeded"]),
        ("failed", job["n_failed"] + job["n_dead"]),
    ):
        seen = timeline[column].sum()
        timeline[column] = timeline[column] * (total / seen if seen else est.scale)
    for column in ("prompt_tokens", "completion_tokens", "cost_usd"):
        timeline[column] = timeline[column] * est.scale
    errors = errors.copy()
    errors["n"] = errors["n"] * est.scale
    missing = []
    for state, total in (("failed", job["n_failed"]), ("dead", job["n_dead"])):
        rows = errors["state"] == state
        seen = errors.loc[rows, "n"].sum()
        if seen:
            errors.loc[rows, "n"] = errors.loc[rows, "n"] * (total / seen)
        elif total:
            missing.append(
                {
                    "state": state,
                    "error_class": "(none in the sample)",
                    "n": float(total),
                    "examples": [],
                    "last_seen": pd.NaT,
                }
            )
    if missing:
        errors = pd.concat([errors, pd.DataFrame(missing).astype(ERROR_COLUMNS)], ignore_index=True)
    return timeline, errors.sort_values("n", ascending=False, ignore_index=True)


TIMELINE_COLUMNS = {
    "bucket": "datetime64[us]",
    "finished": "float64",
    "succeeded": "float64",
    "failed": "float64",
    "prompt_tokens": "float64",
    "completion_tokens": "float64",
    "cost_usd": "float64",
}
ERROR_COLUMNS = {
    "state": "object",
    "error_class": "object",
    "n": "float64",
    "examples": "object",
    "last_seen": "datetime64[us]",
}
LATENCY_KEYS = ("n", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")


def _frame(records: list[dict[str, Any]] | None, columns: Mapping[str, str]) -> pd.DataFrame:
    """JSON records from PostgreSQL as a DataFrame with these columns and types (also when empty)."""
    frame = pd.DataFrame(records or [], columns=list(columns))
    for name, dtype in columns.items():
        frame[name] = (
            pd.to_datetime(frame[name]).astype(dtype) if dtype.startswith("datetime") else frame[name].astype(dtype)
        )
    return frame


def _job_prices(job: Mapping[str, Any]) -> tuple[float | None, float | None, float | None]:
    """Input, output and cached-input list prices per 1M tokens as the job pays them: a batch-mode
    job's less the batch discount."""
    prices = [job.get(k) for k in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok")]
    keep = 1.0
    discount = job.get("batch_discount")
    if job.get("mode") == "batch" and discount is not None and pd.notna(discount):
        keep = 1 - float(discount)
    input_price, output_price, cached_price = (
        None if value is None or pd.isna(value) else float(value) * keep for value in prices
    )
    return input_price, output_price, cached_price


def savings(job: Mapping[str, Any], *, dedupe_rows: int = 0, dedupe_usd: float = 0.0) -> pd.DataFrame:
    """What a job did not pay, in one place, by cause: the batch discount (the same calls online),
    duplicates sent once (`dedupe_rows`, each at its first row's cost: PG_JOB_DEDUPE_SAVED), answers
    reused from earlier jobs (what they cost when first paid for, jobs.reused_usd) and prompt tokens
    served from the provider's cache (at the input price less the cached-input price).

        >>> savings({"cost_usd": 1.0, "mode": "batch", "batch_discount": 0.5})["usd"].sum()
        1.0
    """
    cost = float(job.get("cost_usd") or 0)
    batch = 0.0
    discount = job.get("batch_discount")
    if job.get("mode") == "batch" and discount is not None and pd.notna(discount) and 0 < float(discount) < 1:
        batch = cost / (1 - float(discount)) - cost
    input_price, _, cached_price = _job_prices(job)
    cached_tokens = int(job.get("cached_tokens") or 0)
    cached = 0.0
    if input_price is not None and cached_price is not None:
        cached = cached_tokens * max(input_price - cached_price, 0.0) / 1_000_000
    return pd.DataFrame(
        {
            "saved by": [
                "batch mode (the provider's Batch API discount)",
                "dedupe (identical rows sent once)",
                "reuse (stored answers of earlier jobs)",
                "cached input (prompt cache)",
            ],
            "rows or tokens": [
                int(job.get("n_succeeded") or 0) if batch else 0,
                dedupe_rows,
                int(job.get("n_reused") or 0),
                cached_tokens,
            ],
            "usd": [batch, dedupe_usd, float(job.get("reused_usd") or 0), cached],
        }
    )


def cost_by_token_type(job: Mapping[str, Any]) -> pd.DataFrame:
    """Recorded tokens priced at today's list price, next to the cost recorded row by row: prompt
    tokens the provider served from its prompt cache at the cached-input price, the rest at the
    input price (batchdb/pricing.py, the rule completions are recorded with); a batch-mode job's at
    the batch price (the list price less `batch_discount`)."""
    input_price, output_price, cached_price = _job_prices(job)
    price = Price.of(input_price, output_price, cached_input_per_mtok=cached_price)
    prompt_tokens, completion_tokens = int(job["prompt_tokens"]), int(job["completion_tokens"])
    cached_tokens = min(int(job.get("cached_tokens") or 0), prompt_tokens)
    costs: list[float | None] = [None, None, None]
    if price is not None:
        costs = [
            float(price.cost_usd(prompt_tokens - cached_tokens, 0)),
            float(price.cost_usd(cached_tokens, 0, cached_tokens=cached_tokens)),
            float(price.cost_usd(0, completion_tokens)),
        ]
    return pd.DataFrame(
        {
            "token type": ["input (prompt)", "input served from the prompt cache", "output (completion)"],
            "tokens": [prompt_tokens - cached_tokens, cached_tokens, completion_tokens],
            "usd per 1M tokens": [
                input_price,
                cached_price if price and price.cached_input_per_mtok else input_price,
                output_price,
            ],
            "cost_usd": costs,
        }
    )


def load_job_samples(
    dsn: str | None, job_id: int, *, n_succeeded: int, seed: int = 0, limit: int = 10, engine: Engine = "psycopg"
) -> pd.DataFrame:
    """A reproducible random sample (by `seed`) of answered rows, with the prompt as it was sent."""
    from batchdb.prompts import PromptError, build_request

    pct = 100.0 if n_succeeded <= 2_000 else max(0.01, 100.0 * 2_000 / n_succeeded)
    with read_connection(dsn, engine=engine) as conn:
        job = fetch_rows(conn, PG_JOB_PARAMS, {"job_id": job_id})[0]
        rows = fetch_rows(conn, PG_JOB_SAMPLES, {"job_id": job_id, "pct": pct, "seed": seed, "limit": limit})
    out = []
    for row in rows:
        try:
            request = build_request(
                model=job["model"], params=job["params"] or {}, payload=row["payload"], input=row["input"]
            )
            prompt = "\n\n".join(f"[{m.get('role')}] {m.get('content')}" for m in request.messages)
        except PromptError as exc:
            prompt = f"(prompt cannot be rendered: {exc})"
        out.append(
            {
                "custom_id": row["custom_id"],
                "prompt": prompt,
                "response": row["response_text"],
                "finish_reason": row["finish_reason"],
                "prompt_tokens": row["prompt_tokens"],
                "completion_tokens": row["completion_tokens"],
                "cost_usd": row["cost_usd"],
                "latency_ms": row["latency_ms"],
                "attempts": row["attempts"],
            }
        )
    columns = [
        "custom_id",
        "prompt",
        "response",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "latency_ms",
        "attempts",
    ]
    return pd.DataFrame(out, columns=columns)


def load_providers(dsn: str | None, *, minutes: int = 60, engine: Engine = "psycopg") -> dict[str, Any]:
    """Providers: limits, the pacer's state, per-minute usage against the limits, 429s."""
    with read_connection(dsn, engine=engine) as conn:
        now = clock(conn)
        limits_df = limits(conn)
        usage = lane_usage(conn, minutes=minutes)
        lanes_df = fetch_df(conn, PG_LANES)
        first = pd.Timestamp(now["current_minute"]) - pd.Timedelta(minutes=minutes)
        history = fetch_df(conn, PG_LIMIT_HISTORY, {"since": _utc(first)})
        circuits = fetch_df(conn, PG_OPEN_CIRCUITS)
    series = duck_df(
        DUCK_LANE_SERIES,
        {"usage": usage, "history": history},
        {"first_minute": first.to_pydatetime(), "current_minute": now["current_minute"]},
    )
    return {
        "now": now,
        "limits": limits_df,
        "circuits": circuits,
        "lanes": lanes_now(limits_df, usage, lanes_df, now),
        "series": series,
        "minutes": minutes,
    }


def _utc(when: pd.Timestamp) -> Any:
    """A naive-UTC time (the dashboard's) as an aware datetime, whatever the session's TimeZone."""
    return (when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")).to_pydatetime()


def load_viewer(dsn: str | None) -> dict[str, Any]:
    with read_connection(dsn) as conn:
        return fetch_rows(conn, PG_VIEWER)[0]


def load_workers(dsn: str | None, *, engine: Engine = "psycopg") -> pd.DataFrame:
    with read_connection(dsn, engine=engine) as conn:
        return fetch_df(conn, PG_WORKERS)


def load_cost(dsn: str | None, *, engine: Engine = "psycopg") -> dict[str, Any]:
    """Cost: by day, user, model and job; and what the queued work will cost at the observed or list price."""
    with read_connection(dsn, engine=engine) as conn:
        jobs_df = jobs(conn)
        queued = queued_cost(conn, jobs_df)
    return {
        "jobs": jobs_df,
        "by_day": cost_by_day(jobs_df),
        "by_owner": cost_by(jobs_df, "owner"),
        "by_model": cost_by(jobs_df, "model"),
        "by_job": duck_df(DUCK_COST_BY_JOB, {"jobs": jobs_df}),
        "queued": queued,
        "price_dates": price_dates(jobs_df),
    }


def price_dates(jobs_df: pd.DataFrame) -> list[str]:
    """One line per date the jobs' prices are as of (batchdb prices update records it), oldest first:
    "as of 2026-12-07 (batchdb/price_list.json): openai/gpt-4o-mini, ..."; "no date recorded: ..." for the rest."""
    if jobs_df.empty:
        return []
    lines = []
    models = jobs_df[["provider", "model", "price_as_of", "price_source"]].drop_duplicates(["provider", "model"])
    models = models.assign(
        when=[
            "no date recorded" if pd.isna(as_of) else f"as of {as_of} ({source})"
            for as_of, source in zip(models["price_as_of"], models["price_source"], strict=True)
        ]
    )
    for when, group in sorted(models.groupby("when"), key=lambda item: (item[0] == "no date recorded", item[0])):
        names = ", ".join(sorted(f"{p}/{m}" for p, m in zip(group["provider"], group["model"], strict=True)))
        lines.append(f"{when}: {names}")
    return lines


def queued_cost(conn: Any, jobs_df: pd.DataFrame, *, sample_rows: int = 20) -> pd.DataFrame:
    """Estimated cost of each active job's unfinished rows.

    With finished rows: their average cost per row (retries and failures included). Before any
    row finished: the most a row can cost at list price (prompt tokens counted on the next
    `sample_rows` queued rows + `max_tokens`, or the ledger's 4,096 without it), which the basis says.
    """
    from batchdb.prompts import PromptError, build_request
    from batchdb.tokens import estimate_prompt_tokens

    out = []
    active = jobs_df[jobs_df["status"].isin(ACTIVE_STATUSES)]
    for job in active.to_dict("records"):
        remaining = int(job["n_total"] - job["n_done"])
        if remaining <= 0:
            continue
        if job["n_done"] > 0 and job["cost_usd"] > 0:
            per_row = job["cost_usd"] / job["n_done"]
            basis = f"observed: ${per_row:.6f} per finished row"
        elif (price := Price.of(job["input_per_mtok"], job["output_per_mtok"])) is not None:
            params = fetch_rows(conn, PG_JOB_PARAMS, {"job_id": int(job["job_id"])})[0]
            rows = fetch_rows(conn, PG_NEXT_QUEUED, {"job_id": int(job["job_id"]), "limit": sample_rows})
            counts = []
            for row in rows:
                try:
                    request = build_request(
                        model=params["model"], params=params["params"] or {}, payload=row["payload"], input=row["input"]
                    )
                except PromptError:
                    continue
                counts.append(estimate_prompt_tokens(params["provider"], request.messages))
            if not counts:
                continue
            prompt_tokens = sum(counts) / len(counts)
            max_tokens = int(job["max_tokens"]) if pd.notna(job["max_tokens"]) else None
            # The most a row can cost, as a budget reserves it (batchdb/pricing.py): the same rule everywhere.
            per_row = float(price.ceiling_usd(round(prompt_tokens), max_tokens))
            basis = f"list price, at most: ~{prompt_tokens:.0f} prompt tokens (next {len(counts)} rows)" + (
                f" + max_tokens {max_tokens}"
                if max_tokens
                else f" + {output_charge(None):,} output tokens (no max_tokens; the ledger's charge)"
            )
        else:
            per_row = math.nan
            basis = f"no price for {job['provider']}/{job['model']} and no finished rows"
        out.append(
            {
                "job_id": job["job_id"],
                "name": job["name"],
                "owner": job["owner"],
                "model": job["model"],
                "status": job["status"],
                "rows_left": remaining,
                "usd_per_row": per_row,
                "estimated_usd": remaining * per_row if not math.isnan(per_row) else math.nan,
                "basis": basis,
            }
        )
    columns = ["job_id", "name", "owner", "model", "status", "rows_left", "usd_per_row", "estimated_usd", "basis"]
    return pd.DataFrame(out, columns=columns)


# -- Parquet outputs ------------------------------------------------------------------------------

_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".pytest_cache"}


def find_outputs(root: str | os.PathLike[str], *, max_depth: int = 3, max_files: int = 200) -> list[Path]:
    """Parquet files under `root` (results written by `batchdb results` / `job.to_parquet`)."""
    base = Path(root)
    found: list[Path] = []
    if not base.is_dir():
        return found
    for folder, dirs, files in os.walk(base):
        depth = len(Path(folder).relative_to(base).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS and depth < max_depth)
        for name in sorted(files):
            if name.endswith(".parquet") and not name.startswith("."):
                found.append(Path(folder) / name)
                if len(found) >= max_files:
                    return found
    return found


def output_for_job(paths: Iterable[Path], job_id: int) -> Path | None:
    """The job's output file: the one whose Parquet metadata names the job (batchdb writes it, so a
    Dagster partition's `<asset>/<partition>.parquet` is found), else one named after it (job-12.parquet,
    job_12_results.parquet, 12.parquet), else None: never another job's file."""
    import re

    from batchdb.results import job_id_of

    paths = list(paths)
    for path in paths:
        if job_id_of(path) == job_id:
            return path
    named = re.compile(rf"(^|[^a-z0-9])job[-_]?{job_id}($|[^0-9])", re.IGNORECASE)
    for path in paths:
        if job_id_of(path) is None and (path.stem == str(job_id) or named.search(path.stem)):
            return path
    return None


def load_parquet_output(path: str | os.PathLike[str], *, sample_rows: int = 10, seed: int = 0) -> dict[str, Any]:
    """A finished job's Parquet output, read directly by DuckDB: statuses, errors, latency, a sample."""
    p = str(path)
    return {
        "status": duck_df(DUCK_PARQUET_STATUS, params={"path": p}),
        "errors": duck_df(DUCK_PARQUET_ERRORS, params={"path": p}),
        "latency": duck_df(DUCK_PARQUET_LATENCY, params={"path": p}).iloc[0].to_dict(),
        "sample": duck_df(DUCK_PARQUET_SAMPLE.format(limit=int(sample_rows), seed=int(seed)), params={"path": p}),
    }
