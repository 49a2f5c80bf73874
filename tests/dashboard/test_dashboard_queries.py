"""The dashboard's loaders (dashboard/queries.py) against plain SQL on a seeded database."""

from __future__ import annotations

import datetime as dt
import math

import pandas as pd
import psycopg
import pyarrow.parquet as pq
import pytest

import batchdb
from batchdb.dashboard import queries
from batchdb.dashboard.source import fetch, read_connection, read_only_dsn


def test_read_connections_refuse_writes(seeded) -> None:
    with read_connection(seeded.dsn) as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        assert conn.execute("SELECT current_setting('application_name')").fetchone()[0] == "batchdb-dashboard"
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("SELECT batchdb.cancel_job(%s)", (seeded.gamma,))
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM batchdb.jobs")


def test_read_only_dsn_keeps_the_users_options() -> None:
    dsn = read_only_dsn("host=127.0.0.1 dbname=x options='-c search_path=foo'")
    assert "search_path=foo" in dsn and "default_transaction_read_only=on" in dsn


def test_empty_answers_keep_their_column_types(dsn: str) -> None:
    with read_connection(dsn) as conn:
        table = fetch(conn, queries.PG_JOBS, {"job_id": None, "limit": 10})
    assert table.num_rows == 0
    assert str(table.schema.field("n_total").type) == "int64"
    assert str(table.schema.field("cost_usd").type) == "double"
    assert str(table.schema.field("created_at").type) == "timestamp[us]"


def test_every_loader_works_on_an_empty_database(dsn: str) -> None:
    overview = queries.load_overview(dsn)
    assert (overview["n_active"], overview["rows_per_second_now"], overview["errors_5m"]) == (0, 0.0, 0.0)
    assert (overview["rate_limited_5m"], overview["cost_today"], overview["workers"]["alive"]) == (0, 0.0, 0)
    assert queries.load_jobs(dsn).empty
    assert queries.load_job_detail(dsn, 1) is None
    providers = queries.load_providers(dsn)
    assert providers["lanes"].empty and providers["series"].empty
    cost = queries.load_cost(dsn)
    assert cost["by_day"].empty and cost["queued"].empty and cost["by_owner"].empty
    assert queries.load_workers(dsn).empty


def test_overview_figures_match_sql(seeded, sql) -> None:
    data = queries.load_overview(seeded.dsn)
    assert (
        data["n_active"]
        == sql.one("SELECT count(*) AS n FROM batchdb.jobs WHERE status IN ('running', 'paused', 'loading')")["n"]
        == 2
    )
    finished = sql.one("""SELECT count(*) AS n FROM batchdb.requests q JOIN batchdb.jobs j ON j.id = q.job_id
                           WHERE j.status = 'running' AND q.finished_at >= now() - interval '1 minute'""")["n"]
    assert finished == 40
    assert data["rows_per_second_now"] == pytest.approx(finished / 60)
    errors = sql.one("""SELECT count(*) AS n FROM batchdb.requests q JOIN batchdb.jobs j ON j.id = q.job_id
                         WHERE j.status = 'running' AND q.error_class IS NOT NULL
                           AND q.finished_at >= now() - interval '5 minutes'""")["n"]
    assert errors == 5 and data["errors_5m"] == errors
    assert dict(zip(data["errors_by_class"]["error_class"], data["errors_by_class"]["errors_5m"], strict=True)) == {
        "permanent": 3,
        "rate_limited": 2,
    }
    rate_limited = sql.one("""SELECT sum(rate_limited) AS n FROM batchdb.rate_usage
                               WHERE minute >= date_trunc('minute', now()) - interval '4 minutes'""")["n"]
    assert rate_limited == 3 + 4  # 2 + 1 seeded, and the worker's 2 SLOW rows x 2 attempts
    assert data["rate_limited_5m"] == rate_limited
    assert data["cost_today"] == pytest.approx(
        float(
            sql.one("SELECT sum(cost_usd) AS c FROM batchdb.requests WHERE finished_at >= date_trunc('day', now())")[
                "c"
            ]
        )
    )
    assert data["cost_today"] > 0
    assert data["workers"]["alive"] == sql.one("SELECT count(*) AS n FROM batchdb.live_workers WHERE alive")["n"] == 1


def test_lane_usage_now_is_a_sliding_minute_against_the_limits() -> None:
    minute = dt.datetime(2026, 11, 25, 12, 0)
    limits = pd.DataFrame(
        {
            "provider": ["openai"],
            "key_alias": ["default"],
            "model": ["m"],
            "rpm": [500],
            "tpm": [100_000],
            "pace_now": [1.0],
            "blocked": [False],
            "source": ["configured"],
            "state_text": ["held by a 429 until 12:00:30 UTC"],
        }
    )
    usage = pd.DataFrame(
        {
            "provider": ["openai"] * 3,
            "key_alias": ["default"] * 3,
            "model": ["m"] * 3,
            "minute": [minute, minute - dt.timedelta(minutes=1), minute - dt.timedelta(minutes=9)],
            "requests": [100, 200, 7],
            "tokens": [30_000, 60_000, 1],
            "rate_limited": [2, 1, 9],
        }
    )
    lanes = pd.DataFrame({"provider": ["openai", "gemini"], "key_alias": ["default", "k2"], "model": ["m", "g"]})
    out = queries.lanes_now(limits, usage, lanes, {"current_minute": minute, "seconds_into_minute": 15.0})
    row = out[out["provider"] == "openai"].iloc[0]
    assert row["tokens_per_min"] == pytest.approx(30_000 + 60_000 * 45 / 60)
    assert row["tpm_used_pct"] == pytest.approx(75.0)
    assert row["requests_per_min"] == pytest.approx(100 + 200 * 45 / 60)
    assert row["rpm_used_pct"] == pytest.approx(50.0)
    assert row["rate_limited_5m"] == 3
    unpaced = out[out["provider"] == "gemini"].iloc[0]
    assert unpaced["tokens_per_min"] == 0 and pd.isna(unpaced["tpm"]) and pd.isna(unpaced["tpm_used_pct"])
    # Each lane says why it is (not) moving; a lane without limits is not paced.
    assert row["state"] == "held by a 429 until 12:00:30 UTC" and unpaced["state"] == "not paced (no limits)"


def test_jobs_table_matches_the_counters(seeded, sql) -> None:
    table = queries.load_jobs(seeded.dsn).set_index("job_id")
    for row in sql.all("""SELECT job_id, status, n_total, n_succeeded, n_failed, n_dead, n_queued, cost_usd
                            FROM batchdb.job_progress"""):
        shown = table.loc[row["job_id"]]
        assert (
            shown["status"],
            shown["n_total"],
            shown["n_succeeded"],
            shown["n_failed"],
            shown["n_dead"],
            shown["n_queued"],
        ) == (row["status"], row["n_total"], row["n_succeeded"], row["n_failed"], row["n_dead"], row["n_queued"])
        assert shown["cost_usd"] == pytest.approx(float(row["cost_usd"]))
    alpha = table.loc[seeded.alpha]
    assert (alpha["status"], alpha["n_total"], alpha["n_succeeded"], alpha["n_failed"], alpha["n_dead"]) == (
        "running",
        50,
        35,
        3,
        2,
    )
    assert alpha["rows_per_second_now"] == pytest.approx(40 / 60)
    assert pd.isna(table.loc[seeded.beta, "rows_per_second_now"])  # completed: not read
    only_alice = queries.filter_jobs(table.reset_index(), owners=["alice"])
    assert list(only_alice["job_id"]) == [seeded.alpha]
    assert list(queries.filter_jobs(table.reset_index(), statuses=["completed"])["name"]) == ["summaries-beta"]
    assert len(queries.filter_jobs(table.reset_index(), models=["gpt-4o-mini"], statuses=["running"])) == 2


def test_job_detail_matches_sql(seeded, sql) -> None:
    detail = queries.load_job_detail(seeded.dsn, seeded.alpha)
    assert detail is not None and detail["estimate"].exact
    job = detail["job"]
    assert (job["name"], job["owner"], job["n_total"], job["n_done"]) == ("headlines-alpha", "alice", 50, 40)
    timeline = detail["timeline"]
    assert timeline["finished"].sum() == 40 and timeline["done_cumulative"].iloc[-1] == 40
    assert timeline["succeeded"].sum() == 35 and timeline["failed"].sum() == 5
    latency = sql.one(
        """SELECT count(*) AS n, percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
                                percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99
                           FROM batchdb.requests WHERE job_id = %(j)s AND status = 'succeeded'""",
        {"j": seeded.alpha},
    )
    assert detail["latency"]["n"] == latency["n"] == 35
    assert detail["latency"]["p50_ms"] == pytest.approx(latency["p50"])
    assert detail["latency"]["p99_ms"] == pytest.approx(latency["p99"])
    errors = {(r.state, r.error_class): (r.n, list(r.examples)) for r in detail["errors"].itertuples()}
    assert errors == {
        ("failed", "permanent"): (3, ["400 content filter: prompt refused"]),
        ("dead", "rate_limited"): (2, ["gave up after 2 attempt(s): 429 rate limit exceeded for requests"]),
    }
    cost = detail["cost_by_token_type"].set_index("token type")
    assert cost.loc["input (prompt)", "tokens"] == job["prompt_tokens"] > 0
    assert cost.loc["input served from the prompt cache", "tokens"] == 0
    assert cost["cost_usd"].sum() == pytest.approx(job["cost_usd"])


def test_sampled_reads_scale_back_up(dsn: str, sql) -> None:
    assert queries.sample_percent(50, exact_rows=10, target_rows=50) == 100.0
    assert queries.sample_percent(1_000_000) == pytest.approx(10.0)
    # 20,000 rows read through a 20% page sample: the real scale-up path, checked against exact SQL.
    job_id = _job_with_finished_rows(sql, 20_000)
    detail = queries.load_job_detail(dsn, job_id, exact_rows=1_000, target_rows=4_000)
    assert detail is not None
    est = detail["estimate"]
    assert (est.exact, est.pct, est.scale) == (False, pytest.approx(20.0), pytest.approx(5.0))
    job = sql.one("SELECT n_done, n_succeeded, n_failed, n_dead FROM batchdb.jobs WHERE id = %(j)s", {"j": job_id})
    timeline, errors = detail["timeline"], detail["errors"]
    # Calibrated to the exact counters (a ratio estimate): the totals are exact, the shape is sampled.
    assert timeline["finished"].sum() == pytest.approx(job["n_done"])
    assert timeline["succeeded"].sum() == pytest.approx(job["n_succeeded"])
    assert timeline["failed"].sum() == pytest.approx(job["n_failed"] + job["n_dead"])
    final_errors = errors[errors["state"].isin(["failed", "dead"])]
    assert final_errors["n"].sum() == pytest.approx(job["n_failed"] + job["n_dead"])
    # Scaled by the sampling rate alone: within four standard errors of the exact sums, the standard
    # error of a Bernoulli page sample's total being sqrt((1 - p) / p * sum of squared page totals).
    p = est.pct / 100
    for figure, shown, rows in (
        ("prompt tokens", timeline["prompt_tokens"].sum(), "finished_at IS NOT NULL"),
        ("cost", timeline["cost_usd"].sum(), "finished_at IS NOT NULL"),
        (
            "rows waiting for a retry",
            errors.loc[errors["state"] == "retrying", "n"].sum(),
            "status = 'queued' AND error_class IS NOT NULL",
        ),
    ):
        column = {"prompt tokens": "prompt_tokens", "cost": "cost_usd"}.get(figure, "1")
        pages = sql.all(
            f"""SELECT sum({column})::float8 AS t FROM batchdb.requests
                             WHERE job_id = %(j)s AND {rows} GROUP BY (ctid::text::point)[0]""",
            {"j": job_id},
        )
        exact = sum(page["t"] for page in pages)
        se = math.sqrt((1 - p) / p * sum(page["t"] ** 2 for page in pages))
        assert len(pages) > 50 and 0 < se < exact / 5, (figure, len(pages), se, exact)  # a real sample
        assert abs(shown - exact) <= 4 * se, (figure, shown, exact, se)
        assert shown != exact  # scaled up from a sample, not read whole


def _job_with_finished_rows(sql, n: int) -> int:
    """A running job of `n` rows finished over the last 10 minutes: most succeeded, some failed or dead,
    some waiting for a retry, with varied tokens and cost."""
    job_id = sql.one(
        "INSERT INTO batchdb.jobs (name, model, provider) VALUES ('sampled', 'm', 'instant') RETURNING id"
    )["id"]
    sql.all(
        """INSERT INTO batchdb.requests (job_id, custom_id, payload)
               SELECT %(j)s, g::text, '{"prompt": "x"}' FROM generate_series(1, %(n)s) g RETURNING 1""",
        {"j": job_id, "n": n},
    )
    sql.all(
        """
        UPDATE batchdb.requests
           SET status = CASE WHEN custom_id::int %% 41 = 0 THEN 'queued' WHEN custom_id::int %% 50 = 0 THEN 'failed'
                             WHEN custom_id::int %% 77 = 0 THEN 'dead' ELSE 'succeeded' END,
               error_class = CASE WHEN custom_id::int %% 41 = 0 THEN 'rate_limited'
                                  WHEN custom_id::int %% 50 = 0 THEN 'permanent'
                                  WHEN custom_id::int %% 77 = 0 THEN 'timeout' END,
               finished_at = CASE WHEN custom_id::int %% 41 <> 0
                                  THEN now() - (custom_id::int %% 600) * interval '1 second' END,
               latency_ms = custom_id::int %% 900,
               prompt_tokens = 10 + (custom_id::int * 7919) %% 97,
               completion_tokens = 5 + custom_id::int %% 13,
               cost_usd = (10 + (custom_id::int * 7919) %% 97) * 0.000001
         WHERE job_id = %(j)s RETURNING 1""",
        {"j": job_id},
    )
    return int(job_id)


def test_samples_show_the_prompt_as_sent_and_the_stored_answer(seeded, sql) -> None:
    pairs = queries.load_job_samples(seeded.dsn, seeded.beta, n_succeeded=12, limit=5)
    assert len(pairs) == 5
    stored = {
        r["custom_id"]: r["response_text"]
        for r in sql.all(
            """SELECT q.custom_id, r.response_text FROM batchdb.requests q
             JOIN batchdb.results r ON r.job_id = q.job_id AND r.request_id = q.id WHERE q.job_id = %(j)s""",
            {"j": seeded.beta},
        )
    }
    for row in pairs.itertuples():
        assert row.response == stored[row.custom_id]
        assert row.prompt.startswith("[user] Summarise: Company b")
    assert list(queries.load_job_samples(seeded.dsn, seeded.beta, n_succeeded=12, limit=5)["custom_id"]) == list(
        pairs["custom_id"]
    )  # same seed, same sample


def test_providers_page_data(seeded, sql) -> None:
    data = queries.load_providers(seeded.dsn, minutes=60)
    lanes = data["lanes"].set_index(["provider", "key_alias", "model"])
    openai = lanes.loc[("openai", "default", "gpt-4o-mini")]
    assert (openai["rpm"], openai["tpm"]) == (500, 100000)
    assert 30000 <= openai["tokens_per_min"] <= 90000
    assert openai["tpm_used_pct"] == pytest.approx(openai["tokens_per_min"] / 1000)
    assert openai["rate_limited_5m"] == 3
    assert lanes.loc[("instant", "default", "gpt-4o-mini"), "rate_limited_5m"] == 4
    series = data["series"]
    per_lane = series.groupby("lane")[["tokens", "rate_limited"]].sum()
    assert (
        per_lane.loc["openai/default/gpt-4o-mini", "tokens"]
        == sql.one("SELECT sum(tokens) AS t FROM batchdb.rate_usage WHERE provider = 'openai'")["t"]
        == 99000
    )
    assert len(series[series["lane"] == "openai/default/gpt-4o-mini"]) == 61  # every minute, gaps as zero
    assert list(data["limits"]["model"]) == ["gpt-4o-mini"]


def test_cost_page_data(seeded, sql) -> None:
    data = queries.load_cost(seeded.dsn)
    by_owner = dict(zip(data["by_owner"]["owner"], data["by_owner"]["cost_usd"], strict=True))
    for row in sql.all("SELECT owner, sum(cost_usd) AS c FROM batchdb.jobs GROUP BY owner"):
        assert by_owner[row["owner"]] == pytest.approx(float(row["c"]))
    by_model = dict(zip(data["by_model"]["model"], data["by_model"]["cost_usd"], strict=True))
    assert by_model["gpt-4o"] == pytest.approx(
        float(sql.one("SELECT cost_usd AS c FROM batchdb.jobs WHERE id = %(j)s", {"j": seeded.beta})["c"])
    )
    assert data["by_day"]["cost_usd"].sum() == pytest.approx(
        float(sql.one("SELECT sum(cost_usd) AS c FROM batchdb.jobs")["c"])
    )
    queued = data["queued"].set_index("job_id")
    assert queued.loc[seeded.alpha, "rows_left"] == 10 and queued.loc[seeded.gamma, "rows_left"] == 25
    alpha = sql.one("SELECT cost_usd / n_done AS per_row FROM batchdb.jobs WHERE id = %(j)s", {"j": seeded.alpha})
    assert queued.loc[seeded.alpha, "estimated_usd"] == pytest.approx(10 * float(alpha["per_row"]))
    assert queued.loc[seeded.gamma, "basis"].startswith("list price")
    # gpt-4o-mini list price: prompt tokens x $0.15/M + 20 max_tokens x $0.60/M per row
    assert 25 * 20 * 0.60 / 1e6 < queued.loc[seeded.gamma, "estimated_usd"] < 25 * (100 * 0.15 + 20 * 0.60) / 1e6


def test_cost_by_day_splits_a_job_that_crossed_midnight() -> None:
    jobs = pd.DataFrame(
        {
            "job_id": [1, 2],
            "name": ["a", "b"],
            "owner": ["u", "u"],
            "model": ["m", "m"],
            "cost_usd": [3.0, 1.0],
            "created_at": [dt.datetime(2026, 11, 1, 20), dt.datetime(2026, 11, 2, 9)],
            "started_at": [dt.datetime(2026, 11, 1, 22), dt.datetime(2026, 11, 2, 10)],
            "finished_at": [dt.datetime(2026, 11, 2, 1), dt.datetime(2026, 11, 2, 11)],
            "db_now": [dt.datetime(2026, 11, 3)] * 2,
        }
    )
    by_day = queries.cost_by_day(jobs).groupby("day")["cost_usd"].sum()
    assert by_day[pd.Timestamp("2026-11-01")] == pytest.approx(2.0)  # 2 of job 1's 3 hours
    assert by_day[pd.Timestamp("2026-11-02")] == pytest.approx(1.0 + 1.0)


def test_parquet_output_is_read_by_duckdb(seeded, tmp_path) -> None:
    path = tmp_path / "out" / f"job-{seeded.beta}.parquet"
    assert batchdb.Job(seeded.beta, dsn=seeded.dsn).to_parquet(path) == 12
    (tmp_path / "out" / "other.parquet").write_bytes(path.read_bytes())
    files = queries.find_outputs(tmp_path)
    assert queries.output_for_job(files, seeded.beta) == path
    assert queries.output_for_job(files, seeded.beta * 10 + 7) is None
    out = queries.load_parquet_output(path, sample_rows=4)
    table = pq.read_table(path).to_pandas()
    assert dict(zip(out["status"]["status"], out["status"]["n"], strict=True)) == {"succeeded": 12}
    assert out["status"]["cost_usd"].sum() == pytest.approx(table["cost_usd"].sum())
    assert out["latency"]["n"] == 12 and len(out["sample"]) == 4 and out["errors"].empty
    assert set(out["sample"]["custom_id"]) <= set(table["custom_id"])


def test_reads_stay_on_one_partition_and_use_the_indexes(seeded, sql) -> None:
    # The guard rail for "no full scans of requests": the per-job reads plan as a sample scan of the
    # job's own partition when sampled, never a scan of other partitions.
    with read_connection(seeded.dsn) as conn:
        for query in (queries.PG_RECENT_ACTIVITY, queries.PG_JOB_ROWS_SUMMARY):
            plan = "\n".join(
                r[0]
                for r in conn.execute(
                    "EXPLAIN " + query, {"job_id": seeded.alpha, "pct": 10.0, "bucket_seconds": 60}
                ).fetchall()
            )
            assert f"requests_{seeded.alpha}" in plan and "Sample Scan" in plan, plan
            assert f"requests_{seeded.beta}" not in plan and "requests_orphan" not in plan, plan
        # rate_usage grows by one row per lane and minute: it must be readable by its primary key
        # (the planner rightly prefers a seq scan on this tiny test table, so forbid that here).
        conn.execute("SET enable_seqscan = off")
        usage_plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + queries.PG_LANE_USAGE, {"minutes": 60}))
        assert "rate_usage_pkey" in usage_plan, usage_plan


def test_a_page_sample_is_scaled_to_the_exact_counters() -> None:
    timeline = pd.DataFrame(
        {
            "bucket": pd.to_datetime(["2026-11-25 10:00", "2026-11-25 10:01"]),
            "finished": [40.0, 60.0],
            "succeeded": [39.0, 58.0],
            "failed": [1.0, 2.0],
            "prompt_tokens": [10.0, 10.0],
            "completion_tokens": [1.0, 1.0],
            "cost_usd": [0.1, 0.1],
        }
    )
    errors = pd.DataFrame(
        {
            "state": ["failed", "failed", "retrying"],
            "error_class": ["permanent", "invalid_response", "rate_limited"],
            "n": [2.0, 1.0, 5.0],
            "examples": [["x"], ["y"], ["z"]],
            "last_seen": pd.to_datetime(["2026-11-25 10:01"] * 3),
        }
    )
    job = {"n_done": 1000, "n_succeeded": 968, "n_failed": 30, "n_dead": 2}
    scaled_timeline, scaled_errors = queries.calibrate(timeline, errors, job, queries.Estimate(10.0))
    assert scaled_timeline["finished"].sum() == pytest.approx(1000)
    assert scaled_timeline["succeeded"].sum() == pytest.approx(968)
    assert scaled_timeline["failed"].sum() == pytest.approx(32)
    assert scaled_timeline["cost_usd"].sum() == pytest.approx(2.0)  # no counter per bucket: x 100 / 10%
    by = {(r.state, r.error_class): r.n for r in scaled_errors.itertuples()}
    assert by == pytest.approx(
        {
            ("failed", "permanent"): 20,
            ("failed", "invalid_response"): 10,
            ("retrying", "rate_limited"): 50,
            ("dead", "(none in the sample)"): 2,
        }
    )


def test_a_batch_mode_jobs_detail_lists_its_batches_and_prices_tokens_at_the_batch_price(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        job_id = conn.execute(
            "INSERT INTO batchdb.jobs (name, model, mode, params) VALUES ('overnight', 'gpt-4o-mini', 'batch', "
            '\'{"prompt": "{h}"}\') RETURNING id'
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, input) SELECT %s, 'r' || i, jsonb_build_object('h', i) "
            "FROM generate_series(1, 4) i",
            (job_id,),
        )
        conn.execute(
            "INSERT INTO batchdb.provider_batches (job_id, provider, key_alias, model, state, provider_status, "
            "n_requests, batch_id, n_completed) VALUES (%s, 'openai', 'default', 'gpt-4o-mini', 'collected', "
            "'completed', 3, 'batch_a', 3), (%s, 'openai', 'default', 'gpt-4o-mini', 'in_progress', 'in_progress', "
            "1, 'batch_b', 0)",
            (job_id, job_id),
        )
        # Three rows answered at the batch price, as the batch driver records them.
        conn.execute(
            "UPDATE batchdb.requests q SET status = 'succeeded', prompt_tokens = 1000, completion_tokens = 100, "
            "cost_usd = batchdb.call_cost_usd(p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok, "
            "p.batch_discount, 1000, 0, 100, true), finished_at = now() "
            "FROM batchdb.prices p WHERE p.provider = 'openai' AND p.model = 'gpt-4o-mini' "
            "AND q.job_id = %s AND q.custom_id <> 'r4'",
            (job_id,),
        )

    detail = queries.load_job_detail(dsn, job_id)
    assert detail is not None and detail["job"]["mode"] == "batch"
    batches = detail["batches"]
    assert list(batches["state"]) == ["collected", "in_progress"] and list(batches["batch_id"]) == [
        "batch_a",
        "batch_b",
    ]
    cost = detail["cost_by_token_type"]
    assert cost["cost_usd"].sum() == pytest.approx(detail["job"]["cost_usd"])  # the batch price, not the list price
    saved = detail["savings"].set_index("saved by")["usd"]
    assert saved.iloc[0] == pytest.approx(detail["job"]["cost_usd"])  # a 50% discount saved what was paid
    assert saved.iloc[1:].sum() == 0


def test_a_jobs_detail_shows_the_money_saved_by_each_cause_in_one_place(dsn: str) -> None:
    """Dedupe (each duplicate at its first row's answer's cost), reuse (each reused answer at what it
    first cost: 0021) and cached input (at the input price less the cached price), side by side."""
    with psycopg.connect(dsn, autocommit=True) as conn:

        def job(**columns: str) -> int:
            names = ", ".join(["model", "params", *columns])
            values = ", ".join(["%s"] * (2 + len(columns)))
            return conn.execute(
                f"INSERT INTO batchdb.jobs ({names}) VALUES ({values}) RETURNING id",
                ("gpt-4o-mini", '{"prompt": "{h}"}', *columns.values()),
            ).fetchone()[0]

        def answer(job_id: int, where: str, cost: str, cached: int = 0) -> None:
            conn.execute(
                "INSERT INTO batchdb.results (job_id, request_id, response_text) SELECT job_id, id, 'yes' "
                f"FROM batchdb.requests WHERE job_id = %s AND status = 'queued' AND {where}",
                (job_id,),
            )
            conn.execute(
                "UPDATE batchdb.requests SET status = 'succeeded', attempts = 1, finished_at = now(), "
                f"prompt_tokens = 1000, cached_tokens = %s, cost_usd = %s WHERE job_id = %s AND {where}",
                (cached, cost, job_id),
            )

        first = job()
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, input, request_key) VALUES "
            "(%(j)s, 'a', '{\"h\": 1}', 'k1'), (%(j)s, 'b', '{\"h\": 2}', 'k2')",
            {"j": first},
        )
        answer(first, "true", "0.01")
        second = job(reuse="exact")
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, input, request_key) VALUES "
            "(%(j)s, 'a', '{\"h\": 1}', 'k1'), (%(j)s, 'a2', '{\"h\": 1}', 'k1'), (%(j)s, 'c', '{\"h\": 3}', 'k3'),"
            "(%(j)s, 'c2', '{\"h\": 3}', 'k3')",
            {"j": second},
        )
        answer(second, "custom_id = 'c'", "0.02", cached=400)

    detail = queries.load_job_detail(dsn, second)
    assert detail is not None
    saved = detail["savings"].set_index("saved by")
    assert saved["rows or tokens"].tolist() == [0, 2, 1, 400]  # a2 (of a reused answer) and c2; a; c's cache
    assert saved["usd"].tolist() == pytest.approx([0, 0.01 + 0.02, 0.01, 400 * (0.15 - 0.075) / 1_000_000])
    assert detail["job"]["cost_usd"] == pytest.approx(0.02)  # one call paid: c
