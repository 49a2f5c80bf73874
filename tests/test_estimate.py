"""`batchdb estimate` / `batchdb.estimate()`: what a job would queue, cost and take, before anything is queued.

The figures are checked against what a real run through the simulator (real OpenAI SDK) then records.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from click.testing import CliRunner

import batchdb
from batchdb.cli import cli
from batchdb.demo import SENTIMENT_SCHEMA, demo_headlines
from batchdb.pricing import Price
from batchdb.providers.openai import OpenAIProvider
from batchdb.simulator import SimulatorProcess
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig

PROMPT = "Classify the sentiment of: {headline}"
GPT_4O_MINI = Price.of("0.15", "0.60", cached_input_per_mtok="0.075", batch_discount="0.5")


def headlines(n: int) -> pd.DataFrame:
    """`n` rows, every third one repeating the row before it."""
    texts = [f"Company {i // 3 if i % 3 == 2 else i} reports quarterly results number {i}" for i in range(n)]
    texts = [texts[i - 1] if i % 3 == 2 else texts[i] for i in range(n)]
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "headline": texts})


def jobs(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT count(*) AS n FROM batchdb.jobs").fetchone()["n"])


def openai_worker(dsn: str, sim: SimulatorProcess, *, exit_when_idle: bool) -> Worker:
    provider = OpenAIProvider(api_key="sk-test", base_url=sim.openai_base_url, timeout=30)
    config = WorkerConfig(
        dsn=dsn, concurrency=16, poll_interval=0.2, retry=RetryPolicy(0.05, 0.2), exit_when_idle=exit_when_idle
    )
    return Worker(config, providers={"openai": provider})  # type: ignore[dict-item]


@pytest.fixture
def background_worker(dsn: str, simulator) -> Iterator[SimulatorProcess]:
    """A worker answering through the simulator in a thread, for as long as the test runs (a pilot needs one)."""
    sim = simulator()
    worker = openai_worker(dsn, sim, exit_when_idle=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    thread.start()
    try:
        yield sim
    finally:
        loop.call_soon_threadsafe(worker.stop)
        thread.join(timeout=60)
        assert not thread.is_alive()
        loop.close()


def test_the_estimate_queues_nothing_and_counts_the_tokens_workers_then_record(
    dsn: str, conn: psycopg.Connection, simulator
) -> None:
    sim = simulator()
    frame = headlines(30)
    estimate = batchdb.estimate(frame, prompt=PROMPT, id_column="id", model="gpt-4o-mini", max_tokens=12, dsn=dsn)
    assert jobs(conn) == 0
    assert (estimate.rows, estimate.distinct_requests) == (30, 20)
    assert estimate.output_tokens_per_row == estimate.max_output_tokens_per_row == 12
    assert "the max_tokens bound" in estimate.output_basis
    assert estimate.sample_messages == [
        {"role": "user", "content": "Classify the sentiment of: Company 0 reports quarterly results number 0"}
    ]

    job = batchdb.submit(frame, prompt=PROMPT, id_column="id", model="gpt-4o-mini", max_tokens=12, dsn=dsn)
    asyncio.run(openai_worker(dsn, sim, exit_when_idle=True).run())
    done = job.status()
    assert (done.n_succeeded, done.n_duplicates) == (30, 10)  # 20 calls: each distinct request once
    assert sim.stats(series=False)["totals"]["requests"] == estimate.calls == 20
    # The offline count is the simulator's (OpenAI's recipe): exact, call for call.
    assert estimate.distinct_prompt_tokens == done.prompt_tokens
    assert estimate.distinct_charged_tpm_tokens == done.prompt_tokens + 20 * 12
    # With every answer at most max_tokens long, the bound is a ceiling on the real cost.
    assert GPT_4O_MINI is not None and estimate.price == GPT_4O_MINI
    assert Decimal(str(done.cost_usd)) <= estimate.cost_usd(ceiling=True)
    assert estimate.cost_usd(batch=True) == estimate.cost_usd() / 2
    assert estimate.cost_usd(dedupe=False) > estimate.cost_usd()


def test_earlier_similar_jobs_give_the_answer_length(dsn: str, conn: psycopg.Connection, simulator) -> None:
    sim = simulator()
    frame = headlines(24)
    job = batchdb.submit(frame, prompt=PROMPT, model="gpt-4o-mini", max_tokens=200, dsn=dsn)
    asyncio.run(openai_worker(dsn, sim, exit_when_idle=True).run())
    done = job.status()
    per_row = done.completion_tokens / (done.n_succeeded - done.n_duplicates)  # per call
    assert per_row < 200  # the simulator's answers are shorter than the bound

    again = batchdb.estimate(frame, prompt=PROMPT, model="gpt-4o-mini", max_tokens=200, dsn=dsn)
    assert again.output_tokens_per_row == pytest.approx(per_row)
    assert again.output_basis == "mean of 16 calls of 1 earlier similar job(s)"
    # The same data asked the same way: the estimate is the recorded cost, to the rounding of one token.
    assert abs(again.cost_usd() - done.cost_usd) <= Decimal("0.6") / 1_000_000
    other = batchdb.estimate(frame, prompt="Summarise: {headline}", model="gpt-4o-mini", max_tokens=200, dsn=dsn)
    assert other.output_tokens_per_row == 200  # another template: no history


@pytest.mark.slow
def test_a_50_row_pilot_estimates_the_demo_within_10_percent(
    dsn: str, conn: psycopg.Connection, background_worker: SimulatorProcess
) -> None:
    """The issue's target: on the demo data, with a 50-row pilot, within 10% of the final cost."""
    data = demo_headlines(1_000)
    options = {
        "prompt": "Classify the market sentiment of this headline: {headline}",
        "system": "You are a financial analyst. Answer in JSON.",
        "id_column": "headline_id",
        "model": "gpt-4o-mini",
        "max_tokens": 20,
        "temperature": 0,
        "response_format": SENTIMENT_SCHEMA,
        "dsn": dsn,
    }
    estimate = batchdb.estimate(data, pilot_rows=50, pilot_timeout_s=120, **options)
    assert estimate.pilot_job_id is not None and estimate.output_basis.startswith(f"pilot job {estimate.pilot_job_id}")
    assert batchdb.get_job(estimate.pilot_job_id, dsn=dsn).status().n_total == 50
    job = batchdb.submit(data, **options)
    job.wait(timeout=300)
    final = job.status().cost_usd
    assert final > 0
    assert abs(estimate.cost_usd() - final) / final <= Decimal("0.10"), (estimate.cost_usd(), final)


def test_rows_over_the_context_window_and_unknown_models_are_named(dsn: str, conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok, context_window) "
        "VALUES ('openai', 'tiny-window', 1, 2, 60)"
    )
    frame = pd.DataFrame({"headline": ["short", "word " * 80, "also short"]})
    estimate = batchdb.estimate(frame, prompt="{headline}", model="tiny-window", max_tokens=10, dsn=dsn)
    assert (estimate.rows_over_context_window, estimate.rows_over_context_window_named) == (1, ["row 1"])
    assert "over the context window: 1 rows (row 1); submit refuses them" in estimate.text()

    typo = batchdb.estimate(frame, prompt="{headline}", model="gpt-4o-mni", max_tokens=10, dsn=dsn)
    assert typo.price is None and typo.cost_usd() is None
    assert "did you mean 'gpt-4o-mini'" in (typo.model_problem or "")
    assert "cost:              unknown" in typo.text()
    assert jobs(conn) == 0


def test_the_online_duration_is_what_the_lanes_limits_allow(dsn: str, conn: psycopg.Connection) -> None:
    frame = headlines(120)
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, key_alias, model, rpm)"
        " VALUES ('openai', 'default', 'gpt-4o-mini', 60)"
    )
    by_requests = batchdb.estimate(frame, prompt=PROMPT, model="gpt-4o-mini", max_tokens=10, dsn=dsn)
    assert by_requests.online_seconds() == 80.0  # 80 distinct requests (of 120 rows) at 60 a minute
    assert "80 s at the lane's limits (rpm 60, tpm -, rpd -; requests per minute bind)" in by_requests.text()
    every_row = batchdb.estimate(frame, prompt=PROMPT, model="gpt-4o-mini", max_tokens=10, dedupe=False, dsn=dsn)
    assert every_row.online_seconds() == 120.0
    conn.execute("UPDATE batchdb.rate_limits SET tpm = %s", (by_requests.distinct_charged_tpm_tokens // 4,))
    by_tokens = batchdb.estimate(frame, prompt=PROMPT, model="gpt-4o-mini", max_tokens=10, dsn=dsn)
    assert by_tokens.online_seconds() == pytest.approx(240.0, rel=0.01)  # four minutes of TPM
    assert "tokens per minute bind" in by_tokens.text()
    unlimited = batchdb.estimate(frame, prompt=PROMPT, model="gpt-4o-mini", key_alias="other", max_tokens=10, dsn=dsn)
    assert unlimited.online_seconds() is None
    assert "batchdb limits set openai gpt-4o-mini --key-alias other" in unlimited.text()


def test_a_bad_option_is_refused_as_submit_refuses_it(dsn: str) -> None:
    frame = headlines(3)
    with pytest.raises(batchdb.InputError, match="max_tokens: expected a positive integer"):
        batchdb.estimate(frame, prompt=PROMPT, model="gpt-4o-mini", max_tokens=0, dsn=dsn)
    with pytest.raises(batchdb.InputError, match="missing_col"):
        batchdb.estimate(frame, prompt="{missing_col}", model="gpt-4o-mini", dsn=dsn)
    with pytest.raises(TypeError, match="max_token"):
        batchdb.estimate(frame, prompt=PROMPT, model="gpt-4o-mini", max_token=5, dsn=dsn)


def test_the_cli_prints_the_estimate_and_queues_nothing(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    source = tmp_path / "rows.csv"
    headlines(9).to_csv(source, index=False)
    runner = CliRunner()
    args = [str(source), "--model", "gpt-4o-mini", "--prompt", PROMPT, "--max-tokens", "10", "--dsn", dsn]
    for command in (["estimate", *args], ["submit", *args, "--dry-run"]):
        result = runner.invoke(cli, command, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0] == "openai/gpt-4o-mini: 9 rows"
        assert "  distinct requests: 6 (3 rows repeat an earlier row's request)" in lines
        assert lines[-1] == "nothing was queued"
    assert jobs(conn) == 0


def test_a_pilot_no_worker_answers_is_cancelled_and_leaves_the_idempotency_key_alone(
    dsn: str, conn: psycopg.Connection
) -> None:
    frame = headlines(5)
    with pytest.raises(batchdb.BatchDBError) as failed:
        batchdb.estimate(
            frame, prompt=PROMPT, model="gpt-4o-mini", pilot_rows=2, pilot_timeout_s=0.5, idempotency_key="K1", dsn=dsn
        )
    [pilot] = conn.execute("SELECT id, status, name, idempotency_key FROM batchdb.jobs").fetchall()
    assert (pilot["status"], pilot["name"], pilot["idempotency_key"]) == ("cancelled", "pilot: estimate", None)
    assert str(failed.value).startswith(f"pilot job {pilot['id']} answered 0 of 2 rows in 0 s and was cancelled")
    assert "start one with: batchdb worker" in str(failed.value)
    job = batchdb.submit(frame, prompt=PROMPT, model="gpt-4o-mini", idempotency_key="K1", dsn=dsn)
    assert job.id != pilot["id"]  # the key is still the real job's


def test_what_submit_refuses_the_estimate_refuses(dsn: str, conn: psycopg.Connection) -> None:
    repeated = pd.DataFrame({"id": ["a", "b", "a"], "headline": ["x", "y", "z"]})
    with pytest.raises(batchdb.InputError, match="id 'a' appears twice"):
        batchdb.estimate(repeated, prompt=PROMPT, id_column="id", model="gpt-4o-mini", dsn=dsn)
    with pytest.raises(batchdb.InputError, match="max_tokens: "):
        batchdb.estimate(headlines(2), prompt=PROMPT, model="gpt-4o-mini", max_tokens=999_999, dsn=dsn)
    with pytest.raises(batchdb.InputError, match="webhook"):
        batchdb.estimate(headlines(2), prompt=PROMPT, model="gpt-4o-mini", webhook_url="ftp://x", dsn=dsn)


def test_a_daily_quota_makes_the_duration_days(dsn: str, conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, key_alias, model, rpm, rpd)"
        " VALUES ('gemini', 'default', 'gemini-2.5-flash', 1000, 50)"
    )
    frame = headlines(120)  # 80 distinct requests: 50 today, 30 tomorrow
    estimate = batchdb.estimate(frame, prompt=PROMPT, model="gemini-2.5-flash", provider="gemini", dsn=dsn)
    assert estimate.online_seconds() == 86_400
    assert "24.0 h at the lane's limits (rpm 1000, tpm -, rpd 50; requests per day bind)" in estimate.text()


def test_distinct_requests_are_the_calls_dedupe_makes(dsn: str, conn: psycopg.Connection) -> None:
    """The estimate counts rows as one request exactly when submit stores equal request keys: the
    values the templates use, not the rendered text (two splits of 'xyz' are two calls)."""
    frame = pd.DataFrame({"id": [1, 2, 3, 4], "a": ["x", "xy", "x", "q"], "b": ["yz", "z", "yz", "r"]})
    estimate = batchdb.estimate(frame, prompt="{a}{b}", id_column="id", model="gpt-4o-mini", max_tokens=5, dsn=dsn)
    job = batchdb.submit(frame, prompt="{a}{b}", id_column="id", model="gpt-4o-mini", max_tokens=5, dsn=dsn)
    keys = conn.execute("SELECT count(DISTINCT request_key) AS n FROM batchdb.requests WHERE job_id = %s", (job.id,))
    assert estimate.distinct_requests == keys.fetchone()["n"] == 3
