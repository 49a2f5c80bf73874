"""A row that cannot fit its model is refused before it costs anything: at submit (SDK, CLI), at
INSERT (SQL), or failed at claim time without a call (batchdb/context_window.py, 0006)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from click.testing import CliRunner

import batchdb
from batchdb.cli import cli
from batchdb.context_window import ModelLimits
from batchdb.ingest import InputError
from batchdb.providers.base import ChatRequest, ChatResponse
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig

# ~2 MB of ordinary words: about 400,000 o200k tokens, three times gpt-4o-mini's 128,000.
HUGE = " ".join(f"word{i % 50} lorem ipsum" for i in range(110_000))


class CountingProvider:
    """Answers every call and counts them per prompt: a refused row must never get here."""

    name = "openai"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def complete(self, request: ChatRequest) -> ChatResponse:
        prompt = request.messages[-1]["content"]
        self.calls[prompt[:20]] += 1
        return ChatResponse(text="ok", finish_reason="stop", prompt_tokens=5, completion_tokens=1, model=request.model)

    async def aclose(self) -> None:
        return None


def test_model_limits_say_what_does_not_fit() -> None:
    limits = ModelLimits("gpt-5", context_window=400_000, max_input_tokens=272_000, max_output_tokens=128_000)
    assert limits.problem(1000, 1000) is None
    assert "takes at most 272,000 input tokens" in (limits.problem(300_000, 10) or "")
    assert "context window of 1,000" in (ModelLimits("m", context_window=1000).problem(600, 500) or "")
    assert "at most 128,000 output tokens" in (limits.max_tokens_problem(200_000) or "")
    mini = ModelLimits("gpt-4o-mini", context_window=128_000, max_output_tokens=16_384)
    assert "context window of 128,000" in (mini.problem(127_000, 2_000) or "")
    assert ModelLimits("unknown").problem(10**9, 10**9) is None
    # Short rows are never tokenized: a token is at least one byte.
    assert mini.surely_fits(10_000, 2, 1000) and not mini.surely_fits(100_000, 2, 1000)


def test_the_seeded_models_know_their_windows(conn: psycopg.Connection) -> None:
    rows = {
        (r["provider"], r["model"]): r
        for r in conn.execute(
            "SELECT provider, model, context_window, max_input_tokens, max_output_tokens FROM batchdb.prices"
        )
    }
    assert rows[("openai", "gpt-4o-mini")]["context_window"] == 128_000
    assert rows[("openai", "gpt-4o-mini")]["max_output_tokens"] == 16_384
    assert rows[("gemini", "gemini-2.5-flash")]["max_input_tokens"] == 1_048_576
    assert all(r["context_window"] or r["max_input_tokens"] for r in rows.values())


def test_sdk_refuses_the_row_that_cannot_fit_and_names_it(dsn: str, conn: psycopg.Connection) -> None:
    frame = pd.DataFrame({"id": ["a", "b", "c"], "text": ["short", HUGE, "short too"]})
    with pytest.raises(InputError) as refused:
        batchdb.submit(frame, prompt="Summarise: {text}", id_column="id", model="gpt-4o-mini", dsn=dsn)
    message = str(refused.value)
    assert "row 1 (id 'b')" in message and "context window of 128,000 tokens" in message, message
    assert conn.execute("SELECT count(*) AS n FROM batchdb.jobs").fetchone()["n"] == 0  # nothing left behind


def test_sdk_refuses_max_tokens_above_the_models_output_limit(dsn: str) -> None:
    with pytest.raises(InputError, match="at most 16,384 output tokens"):
        batchdb.submit(pd.DataFrame({"text": ["hi"]}), prompt="{text}", model="gpt-4o-mini", max_tokens=50_000, dsn=dsn)


def test_cli_refuses_the_csv_row_in_one_line(dsn: str, tmp_path: Path) -> None:
    source = tmp_path / "rows.csv"
    pd.DataFrame({"id": ["r1", "r2"], "text": ["fine", HUGE]}).to_csv(source, index=False)
    result = CliRunner().invoke(
        cli, ["submit", str(source), "--model", "gpt-4o-mini", "--prompt", "{text}", "--id-column", "id"]
    )
    assert result.exit_code != 0
    assert "row 1 (id 'r2')" in result.output and "context window" in result.output, result.output
    assert "Traceback" not in result.output


def test_sql_insert_of_a_row_that_cannot_fit_is_refused_with_its_custom_id(conn: psycopg.Connection) -> None:
    job = conn.execute(
        "INSERT INTO batchdb.jobs (model, status) VALUES ('gpt-4o-mini', 'loading') RETURNING id"
    ).fetchone()["id"]
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES (%s, 'ok', %s)",
        (job, psycopg.types.json.Jsonb({"prompt": "x " * 5000})),
    )
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES (%s, 'the-2mb-row', %s)",
            (job, psycopg.types.json.Jsonb({"prompt": HUGE})),
        )
    assert "custom_id='the-2mb-row'" in str(refused.value) and "128000" in str(refused.value)
    conn.rollback()
    # A template job: the row's columns that the template names are what counts.
    job = conn.execute(
        "INSERT INTO batchdb.jobs (model, params) VALUES ('gpt-4o-mini', %s) RETURNING id",
        (psycopg.types.json.Jsonb({"prompt": "Summarise {body}"}),),
    ).fetchone()["id"]
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'unused-column', %s)",
        (job, psycopg.types.json.Jsonb({"body": "short", "notes": HUGE})),
    )
    with pytest.raises(psycopg.errors.CheckViolation, match="custom_id='templated'"):
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'templated', %s)",
            (job, psycopg.types.json.Jsonb({"body": HUGE})),
        )


def test_worker_fails_a_row_that_cannot_fit_at_claim_time_without_a_call(dsn: str, conn: psycopg.Connection) -> None:
    """Limits learnt (or corrected) after submit: the worker checks every row before reserving for it."""
    job = batchdb.submit(
        pd.DataFrame({"id": ["small", "big"], "text": ["hi", "word " * 3000]}),
        prompt="{text}",
        id_column="id",
        model="gpt-4o-mini",
        provider="openai",
        dsn=dsn,
    )
    conn.execute("UPDATE batchdb.prices SET context_window = 1000 WHERE provider = 'openai' AND model = 'gpt-4o-mini'")
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm) VALUES ('openai', 'gpt-4o-mini', 600, 60000)"
    )
    provider = CountingProvider()
    worker = Worker(
        WorkerConfig(dsn=dsn, concurrency=4, exit_when_idle=True, poll_interval=0.3, retry=RetryPolicy(0.05, 0.2)),
        providers={"openai": provider},
    )  # type: ignore[dict-item]
    asyncio.run(worker.run())
    rows = {
        r["custom_id"]: r
        for r in conn.execute(
            "SELECT custom_id, status, attempts, error FROM batchdb.requests WHERE job_id = %s", (job.id,)
        )
    }
    assert rows["small"]["status"] == "succeeded"
    assert rows["big"]["status"] == "failed"
    assert "'big' not sent" in rows["big"]["error"] and "context window of 1,000" in rows["big"]["error"]
    assert provider.calls == Counter({"hi": 1})  # the big row never reached the provider
    # ... and never took the lane's tokens: only the small call was granted.
    granted = conn.execute("SELECT requests_granted FROM batchdb.rate_limits").fetchone()["requests_granted"]
    assert granted == 1


def test_the_simulator_enforces_the_windows_batchdb_stores(conn: psycopg.Connection, simulator) -> None:
    """The simulator's published windows are the ones in batchdb.prices (OpenAI: the context window;
    Gemini: the input limit), so a row the worker lets through is one the simulator accepts."""
    from batchdb.simulator.config import SimulatorConfig

    config = SimulatorConfig()
    for row in conn.execute("SELECT model, coalesce(context_window, max_input_tokens) AS window FROM batchdb.prices"):
        assert config.context_window_for(row["model"]) == row["window"], row["model"]
    import openai

    sim = simulator(SimulatorConfig(seed=1))
    client = openai.OpenAI(base_url=sim.openai_base_url, api_key="sk-test", max_retries=0)
    long_prompt = "word " * 140_000  # over 128,000: too long for gpt-4o-mini, fine for gpt-4.1-mini
    try:
        answer = client.chat.completions.create(
            model="gpt-4.1-mini", max_tokens=5, messages=[{"role": "user", "content": long_prompt}]
        )
        assert answer.usage.prompt_tokens > 128_000
        with pytest.raises(openai.BadRequestError, match=r"context_length_exceeded|maximum context length"):
            client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": long_prompt}]
            )
    finally:
        client.close()
