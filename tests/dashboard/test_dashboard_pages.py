"""Every page of the Streamlit app, run by `streamlit.testing.v1.AppTest` against a real database."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from batchdb.dashboard.run import APP as dashboard_app

APP = str(dashboard_app)  # batchdb/dashboard/app.py, as `batchdb dashboard` runs it
PAGES = ["views/overview.py", "views/jobs.py", "views/job_detail.py", "views/providers.py", "views/cost.py"]


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    st.cache_data.clear()
    yield
    st.cache_data.clear()


def open_page(page: str, **query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    for key, value in query.items():
        at.query_params[key] = value
    if page != PAGES[0]:
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(at: AppTest) -> str:
    parts = [e.value for e in (*at.markdown, *at.caption, *at.info, *at.success, *at.warning, *at.title)]
    parts += [str(getattr(e.proto, "text", "")) for e in at.get("progress")]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_an_empty_database(dsn: str, page: str) -> None:
    at = open_page(page)
    body = texts(at)
    assert any(word in body for word in ("No jobs", "No active jobs", "No provider key")), body


def test_overview_numbers_match_sql(seeded, sql) -> None:
    at = open_page(PAGES[0])
    shown = metrics(at)
    active = sql.one("SELECT count(*) AS n FROM batchdb.jobs WHERE status IN ('running', 'paused', 'loading')")["n"]
    finished = sql.one("""SELECT count(*) AS n FROM batchdb.requests q JOIN batchdb.jobs j ON j.id = q.job_id
                           WHERE j.status = 'running' AND q.finished_at >= now() - interval '1 minute'""")["n"]
    errors = sql.one("""SELECT count(*) AS n FROM batchdb.requests q JOIN batchdb.jobs j ON j.id = q.job_id
                         WHERE j.status = 'running' AND q.error_class IS NOT NULL
                           AND q.finished_at >= now() - interval '5 minutes'""")["n"]
    rate_limited = sql.one("""SELECT sum(rate_limited) AS n FROM batchdb.rate_usage
                               WHERE minute >= date_trunc('minute', now()) - interval '4 minutes'""")["n"]
    cost = sql.one("SELECT sum(cost_usd) AS c FROM batchdb.requests WHERE finished_at >= date_trunc('day', now())")["c"]
    assert shown == {
        "Active jobs": str(active),
        "Rows/s now": f"{finished / 60:,.1f}",
        "429s (5 min)": str(rate_limited),
        "Errors (5 min)": str(errors),
        "Cost today (UTC)": f"${cost:,.4f}",
        "Workers alive": "1",
    }
    assert (active, finished, errors, rate_limited) == (2, 40, 5, 7)
    body = texts(at)
    assert "#1 headlines-alpha · running · 40 / 50 rows" in body and "#3 backfill-gamma · running · 0 / 25" in body
    lanes = at.dataframe[0].value
    openai = lanes[lanes["provider"] == "openai"].iloc[0]
    assert (openai["tpm"], openai["rpm"], openai["rate_limited_5m"]) == (100000, 500, 3)


def test_jobs_page_lists_and_filters(seeded, sql) -> None:
    at = open_page(PAGES[1])
    table = at.dataframe[0].value.set_index("job_id")
    assert list(table.index) == [seeded.gamma, seeded.beta, seeded.alpha]
    for row in sql.all(
        "SELECT job_id, name, status, owner, model, n_succeeded, n_failed, n_dead, n_queued, pct_done "
        "FROM batchdb.job_progress"
    ):
        shown = table.loc[row["job_id"]]
        assert (
            shown["name"],
            shown["status"],
            shown["owner"],
            shown["model"],
            shown["n_succeeded"],
            shown["n_failed"],
            shown["n_dead"],
            shown["n_queued"],
        ) == (
            row["name"],
            row["status"],
            row["owner"],
            row["model"],
            row["n_succeeded"],
            row["n_failed"],
            row["n_dead"],
            row["n_queued"],
        )
        assert shown["pct_done"] == pytest.approx(float(row["pct_done"]))
    assert table.loc[seeded.alpha, "detail"] == f"job?job={seeded.alpha}"
    at.multiselect[0].set_value(["alice"]).run()
    assert list(at.dataframe[0].value["name"]) == ["headlines-alpha"]
    at.multiselect[0].set_value([]).run()
    at.multiselect[1].set_value(["completed"]).run()
    assert list(at.dataframe[0].value["name"]) == ["summaries-beta"]
    at.multiselect[2].set_value(["gpt-4o"]).run()
    assert list(at.dataframe[0].value["name"]) == ["summaries-beta"]
    at.multiselect[1].set_value(["paused"]).run()
    assert "No job matches these filters." in texts(at)


def test_job_detail_shows_the_jobs_numbers(seeded, sql) -> None:
    at = open_page(PAGES[2], job=str(seeded.alpha))
    job = sql.one("SELECT * FROM batchdb.job_progress WHERE job_id = %(j)s", {"j": seeded.alpha})
    shown = metrics(at)
    assert shown["Succeeded"] == str(job["n_succeeded"]) == "35"
    assert shown["Failed / dead"] == f"{job['n_failed']} / {job['n_dead']}" == "3 / 2"
    assert shown["Queued / running"] == f"{job['n_queued']} / {job['n_running']}" == "10 / 0"
    assert shown["Cost"] == f"${job['cost_usd']:,.4f}"
    p50 = sql.one(
        """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p FROM batchdb.requests
                      WHERE job_id = %(j)s AND status = 'succeeded'""",
        {"j": seeded.alpha},
    )["p"]
    assert shown["p50 (ms)"] == f"{round(p50):,}"
    assert at.title[0].value == "#1 headlines-alpha"
    errors = at.dataframe[0].value
    assert sorted(zip(errors["error_class"], errors["n"], strict=True)) == [("permanent", 3), ("rate_limited", 2)]
    assert "400 content filter: prompt refused" in set(errors["examples"])
    cost = at.dataframe[1].value
    assert cost["tokens"].sum() == job["prompt_tokens"] + job["completion_tokens"]
    saved = at.dataframe[2].value.set_index("saved by")["usd"]  # batch discount, dedupe, reuse, cached input
    assert len(saved) == 4 and saved.sum() == 0
    assert any(text.startswith("Saved in all: $0.0000") for text in (c.value for c in at.caption))
    pairs = at.dataframe[3].value
    assert len(pairs) == 10 and pairs["response"].str.startswith("echo: Classify: Company a").all()
    first = list(pairs["custom_id"])
    at.button(key="another_sample").click().run()
    assert list(at.dataframe[3].value["custom_id"]) != first
    assert at.query_params["job"] == str(seeded.alpha)


def test_cancel_needs_a_confirmation_and_goes_through_the_sdk(seeded, sql) -> None:
    at = open_page(PAGES[2], job=str(seeded.gamma))
    at.button(key="cancel").click().run()
    assert "Cancel job #3 backfill-gamma? Its 25 queued rows will never run" in texts(at)
    at.button(key="abort").click().run()
    assert sql.one("SELECT status FROM batchdb.jobs WHERE id = %(j)s", {"j": seeded.gamma})["status"] == "running"
    at.button(key="cancel").click().run()
    at.button(key="confirm").click().run()
    assert not at.exception
    assert "Job 3 cancelled (25 rows)." in texts(at)
    after = sql.one("SELECT status, status_reason, n_cancelled FROM batchdb.jobs WHERE id = %(j)s", {"j": seeded.gamma})
    assert (after["status"], after["n_cancelled"]) == ("cancelled", 25)
    assert after["status_reason"] == "cancelled by postgres"  # batchdb.cancel_job, as the CLI calls it
    assert metrics(at)["Queued / running"] == "0 / 0"
    assert at.button(key="cancel").disabled


def test_retry_requeues_the_chosen_final_rows(seeded, sql) -> None:
    at = open_page(PAGES[2], job=str(seeded.alpha))
    at.checkbox(key="retry_failed").uncheck().run()
    at.button(key="retry").click().run()
    assert "Queue the dead rows of job #1 headlines-alpha again (2 rows" in texts(at)
    at.button(key="confirm").click().run()
    assert "Job 1: 2 rows queued again." in texts(at)
    job = sql.one(
        "SELECT n_failed, n_dead, n_queued FROM batchdb.job_progress WHERE job_id = %(j)s", {"j": seeded.alpha}
    )
    assert (job["n_failed"], job["n_dead"], job["n_queued"]) == (3, 0, 12)
    assert metrics(at)["Failed / dead"] == "3 / 0"


def test_providers_page(seeded, sql) -> None:
    at = open_page(PAGES[3])
    lanes = at.dataframe[0].value.set_index(["provider", "key_alias", "model"])
    assert lanes.loc[("openai", "default", "gpt-4o-mini"), "rate_limited_5m"] == 3
    assert lanes.loc[("instant", "default", "gpt-4o-mini"), "rate_limited_5m"] == 4
    limits = next(d.value for d in at.dataframe if "target_fraction" in d.value)  # a wide table may come in parts
    row = sql.one("SELECT rpm, tpm, source FROM batchdb.rate_limits")
    assert (limits["rpm"].iloc[0], limits["tpm"].iloc[0], limits["source"].iloc[0]) == (
        row["rpm"],
        row["tpm"],
        row["source"],
    )
    assert "**openai/default/gpt-4o-mini**" in [m.value for m in at.markdown]
    at.get("button_group")[0].set_value("24 hours").run()
    assert not at.exception


def test_cost_page_numbers_match_sql(seeded, sql) -> None:
    at = open_page(PAGES[4])
    total = sql.one("SELECT sum(cost_usd) AS c, sum(prompt_tokens + completion_tokens) AS t FROM batchdb.jobs")
    shown = metrics(at)
    assert shown["Total cost"] == f"${total['c']:,.4f}"
    assert shown["Today (UTC)"] == f"${total['c']:,.4f}"
    assert shown["Tokens"] == f"{total['t']:,}"
    by_owner = at.dataframe[0].value.set_index("owner")["cost_usd"]
    for row in sql.all("SELECT owner, sum(cost_usd) AS c FROM batchdb.jobs GROUP BY owner"):
        assert by_owner[row["owner"]] == pytest.approx(float(row["c"]))
    queued = next(d.value for d in at.dataframe if "rows_left" in d.value)
    assert sorted(queued["rows_left"]) == [10, 25]
    assert shown["Queued work (estimate)"] == f"${queued['estimated_usd'].sum():,.4f}"
    # The price date of each model the jobs use: the seeds record none until `batchdb prices update`.
    models = sql.all("SELECT DISTINCT provider || '/' || model AS m FROM batchdb.jobs ORDER BY 1")
    caption = next(c.value for c in at.caption if c.value.startswith("List prices"))
    assert caption.startswith("List prices in batchdb.prices (no date recorded: " + ", ".join(r["m"] for r in models))
    with psycopg.connect(sql.dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE batchdb.prices SET as_of = '2026-12-01', source = 'prices.json' WHERE model = 'gpt-4o-mini'"
            " AND provider = 'openai'"
        )
    st.cache_data.clear()  # the page caches its reads for the refresh interval
    dated = next(c.value for c in open_page(PAGES[4]).caption if c.value.startswith("List prices"))
    assert "as of 2026-12-01 (prices.json): openai/gpt-4o-mini" in dated


def test_providers_page_says_why_a_lane_is_not_moving(dsn: str, sql) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm, blocked_until) VALUES "
            "('openai', 'gpt-4o', 600, 60000, clock_timestamp() + interval '5 minutes')"
        )
        conn.execute(
            "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm, token_credit, refilled_at) VALUES "
            "('openai', 'gpt-4o-mini', 600, 150000, -248000, clock_timestamp())"
        )
    at = open_page(PAGES[3])
    warnings = [w.value for w in at.warning]
    assert any(w.startswith("openai/default/gpt-4o: held by a 429 until") for w in warnings), warnings
    assert any(w.startswith("openai/default/gpt-4o-mini: waiting for tokens") for w in warnings), warnings
    lanes = at.dataframe[0].value.set_index(["provider", "key_alias", "model"])
    assert lanes.loc[("openai", "default", "gpt-4o"), "state"].startswith("held by a 429 until")


def test_providers_page_says_a_lanes_circuit_is_open(dsn: str, sql) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm) VALUES ('openai', 'gpt-4o', 600, 60000)"
        )
        conn.execute(
            "INSERT INTO batchdb.circuits (provider, key_alias, model, state, opened_at, last_error, "
            "next_probe_at, n_opened) VALUES ('openai', 'default', 'gpt-4o', 'open', clock_timestamp(), "
            "'503 at http://127.0.0.1:9/v1/chat/completions', clock_timestamp() + interval '1 minute', 1)"
        )
    at = open_page(PAGES[3])
    warnings = [w.value for w in at.warning]
    assert any(
        w.startswith("openai/default/gpt-4o: circuit open since") and "last error: 503 at" in w for w in warnings
    ), warnings


def test_a_batch_mode_job_shows_its_mode_and_its_batches(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        job_id = conn.execute(
            "INSERT INTO batchdb.jobs (name, model, mode, params) VALUES ('overnight', 'gpt-4o-mini', 'batch', "
            '\'{"prompt": "{h}"}\') RETURNING id'
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'r1', '{\"h\": 1}')", (job_id,)
        )
        conn.execute(
            "INSERT INTO batchdb.provider_batches (job_id, provider, key_alias, model, state, provider_status, "
            "n_requests, batch_id) VALUES (%s, 'openai', 'default', 'gpt-4o-mini', 'in_progress', 'finalizing', 1, "
            "'batch_abc')",
            (job_id,),
        )
    at = open_page(PAGES[2], job=str(job_id))
    body = texts(at)
    assert "**batch mode** (the provider's Batch API)" in body
    assert "1 open, 0 collected" in body
    assert "Saved by batch mode: $0.0000 (50% off the $0.0000 the same calls cost online)." in body
    batches = next(d.value for d in at.dataframe if "batch_id" in d.value.columns)
    assert list(batches["batch_id"]) == ["batch_abc"] and list(batches["provider_status"]) == ["finalizing"]


def test_an_auto_mode_job_shows_its_deadline_and_its_rows_by_batch_and_online(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        job_id = conn.execute(
            "INSERT INTO batchdb.jobs (name, model, mode, deadline, status, params) VALUES ('by nine', 'gpt-4o-mini', "
            "'auto', '2099-12-08 09:00+00', 'running', '{\"prompt\": \"{h}\"}') RETURNING id"
        ).fetchone()[0]
        for custom_id in ("r1", "r2", "r3", "r4"):
            conn.execute(
                "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, %s, '{\"h\": 1}')",
                (job_id, custom_id),
            )
        # r1 answered by a batch (its chunk's id in batch_id), r2 and r3 online, r4 still queued.
        conn.execute(
            "UPDATE batchdb.requests SET status = 'succeeded', batch_id = CASE custom_id WHEN 'r1' THEN 7 END "
            "WHERE job_id = %s AND custom_id <> 'r4'",
            (job_id,),
        )
    at = open_page(PAGES[2], job=str(job_id))
    body = texts(at)
    assert "**auto mode**, deadline **2099-12-08 09:00:00" in body
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["Answered by batch"], metrics["Answered online"], metrics["Rows go now"]) == ("1", "2", "batch")
    assert "No batch is created after 2099-12-07 08:00:00" in body  # 24 h window + 1 h margin before
