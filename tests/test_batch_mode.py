"""Batch mode end to end: jobs submitted with mode="batch" go through the OpenAI Batch API (and Azure
OpenAI Global Batch) of the provider simulator, through the real openai SDK, in compressed time.

A batch here validates, runs and finalizes in well under a second (`FAST`), and workers poll every
50 ms. What a batch answers is decided by the simulator's clock, not by when it is polled, and every
test waits for an outcome rather than for a time, so none depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import openai
import pandas as pd
import psycopg
import pytest
from batch_support import FAST, QUICK_BATCHES
from click.testing import CliRunner
from google import genai
from google.genai import types as genai_types

import batchdb
from batchdb.cli import cli
from batchdb.simulator import Distribution, SimulatorConfig, SimulatorProcess
from batchdb.workers.batch_driver import BatchDriverConfig
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig

MODEL = "gpt-4o-mini"
KEY = "sk-batch-test"


@pytest.fixture
def sim(simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch) -> SimulatorProcess:
    running = simulator(SimulatorConfig(**FAST))
    monkeypatch.setenv("OPENAI_BASE_URL", running.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return running


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[openai.OpenAI]:
    made = openai.OpenAI(base_url=sim.openai_base_url, api_key=KEY, max_retries=0)
    yield made
    made.close()


def run_worker(dsn: str, **batch: Any) -> Worker:
    """One worker until nothing is left to do, batch mode included."""
    config = BatchDriverConfig(**{**QUICK_BATCHES.__dict__, **batch})
    worker = Worker(WorkerConfig(dsn=dsn, concurrency=4, exit_when_idle=True, poll_interval=0.2, batch=config))
    asyncio.run(worker.run())
    return worker


def submit(dsn: str, n: int, **options: Any) -> batchdb.Job:
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "text": [f"Review number {i}: fine." for i in range(n)]})
    return batchdb.submit(
        frame, prompt="Sentiment of: {text}", id_column="id", model=MODEL, mode="batch", dsn=dsn, **options
    )


def chunks(conn: psycopg.Connection, job_id: int) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT id, state, n_requests, batch_id, input_file_id, create_try, last_error "
        "FROM batchdb.provider_batches WHERE job_id = %s ORDER BY id",
        (job_id,),
    ).fetchall()


def batch_price(
    conn: psycopg.Connection, prompt: int, cached: int, completion: int, *, provider: str = "openai", model: str = MODEL
) -> Decimal:
    row = conn.execute(
        "SELECT batchdb.call_cost_usd(input_per_mtok, cached_input_per_mtok, output_per_mtok, batch_discount, "
        "%s, %s, %s, true) AS usd FROM batchdb.prices WHERE provider = %s AND model = %s",
        (prompt, cached, completion, provider, model),
    ).fetchone()
    return Decimal(row["usd"])


def assert_billed(recorded: Decimal, billed: Decimal, rows: int) -> None:
    """Each row's cost is stored to 1e-8 USD: their sum equals the bill priced at once to within that."""
    assert abs(recorded - billed) <= Decimal("0.5e-8") * rows, (recorded, billed)


def test_a_batch_job_is_answered_once_at_the_batch_price(
    dsn: str, conn: psycopg.Connection, sim: SimulatorProcess, client: openai.OpenAI
) -> None:
    job = submit(dsn, 25)
    run_worker(dsn, chunk_rows=10)

    done = job.status()
    assert (done.status, done.mode, done.n_succeeded, done.n_total) == ("completed", "batch", 25, 25)
    results = job.results()
    assert results["response"].notna().all()
    assert set(results["attempts"]) == {1}  # every row sent once
    # Three chunks of at most 10 rows, each one batch at the provider: no batch twice.
    made = chunks(conn, job.id)
    assert [c["n_requests"] for c in made] == [10, 10, 5]
    assert {c["state"] for c in made} == {"collected"}
    remote = list(client.batches.list(limit=100))
    assert len(remote) == 3 and {b.id for b in remote} == {c["batch_id"] for c in made}
    # Every answer is in the database: the input and output files are gone from the key's storage.
    assert all(c["input_file_id"] for c in made) and list(client.files.list()) == []
    # The provider's bill (its batch lines) equals the job's recorded tokens and cost at the batch price.
    totals = sim.stats(series=False)["totals"]
    assert totals["batch_requests"] == 25 and totals["requests"] == 0  # not one online call
    assert (done.prompt_tokens, done.cached_tokens, done.completion_tokens) == (
        totals["batch_prompt_tokens"],
        totals["batch_cached_tokens"],
        totals["batch_completion_tokens"],
    )
    billed = batch_price(conn, done.prompt_tokens, done.cached_tokens, done.completion_tokens)
    assert_billed(done.cost_usd, billed, 25)
    online = conn.execute(
        "SELECT batchdb.call_cost_usd(input_per_mtok, cached_input_per_mtok, output_per_mtok, batch_discount, "
        "%s, %s, %s, false) AS usd FROM batchdb.prices WHERE provider = 'openai' AND model = %s",
        (done.prompt_tokens, done.cached_tokens, done.completion_tokens, MODEL),
    ).fetchone()["usd"]
    assert billed == online / 2
    assert done.wasted_calls == 0
    status = CliRunner().invoke(cli, ["status", str(job.id), "--dsn", dsn])
    assert status.exit_code == 0, status.output
    assert f"job {job.id} completed (batch mode): 25/25 done" in status.output
    assert "batches: 0 open, 3 collected" in status.output


def test_online_claims_never_take_a_batch_jobs_rows(dsn: str, conn: psycopg.Connection) -> None:
    from batchdb import queue

    job = submit(dsn, 5)

    async def claim() -> int:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            return len(await queue.claim_batch(c, worker_id="w", limit=10, lease_seconds=30))

    assert asyncio.run(claim()) == 0
    assert job.status().n_queued == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"provider": "instant", "model": "any"}, "provider 'instant' has none in batchdb yet"),
        ({"budget_usd": 5.0}, "budget_usd: not supported with mode='batch'"),
        ({"mode": "later"}, "mode: expected one of online, batch, auto, got 'later'"),
    ],
)
def test_batch_mode_is_refused_where_it_cannot_run(dsn: str, options: dict[str, Any], message: str) -> None:
    frame = pd.DataFrame({"text": ["a", "b"]})
    arguments: dict[str, Any] = {"model": MODEL, "mode": "batch", **options}
    with pytest.raises(batchdb.InputError, match=message):
        batchdb.submit(frame, prompt="{text}", dsn=dsn, **arguments)


def test_lines_the_provider_answered_with_an_error_are_sent_again_in_a_later_batch(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(SimulatorConfig(**FAST, batch_error_rate=0.4, seed=7))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    job = submit(dsn, 20, max_attempts=10)
    run_worker(dsn)

    done = job.status()
    assert (done.status, done.n_succeeded) == ("completed", 20)
    results = job.results()
    retried = results[results["attempts"] > 1]
    totals = sim.stats(series=False)["totals"]
    assert totals["batch_failed"] > 0 and len(retried) > 0
    assert results["attempts"].sum() == 20 + totals["batch_failed"]  # one attempt per line sent
    assert len(chunks(conn, job.id)) > 1  # the failed lines went in later batches
    # Failed lines are not billed: the job's tokens are the succeeded lines', at the batch price.
    assert (done.prompt_tokens, done.completion_tokens) == (
        totals["batch_prompt_tokens"],
        totals["batch_completion_tokens"],
    )
    assert_billed(done.cost_usd, batch_price(conn, done.prompt_tokens, done.cached_tokens, done.completion_tokens), 20)


def test_a_line_failing_every_time_is_dead_after_max_attempts_with_the_providers_reason(
    dsn: str, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(SimulatorConfig(**FAST, batch_error_rate=1.0))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    job = submit(dsn, 3, max_attempts=2)
    run_worker(dsn)

    done = job.status()
    assert (done.status, done.n_dead) == ("completed", 3)
    results = job.results()
    assert set(results["attempts"]) == {2}
    assert all(e.startswith("gave up after 2 attempt(s): OpenAI batch line 500") for e in results["error"])


def test_an_expired_batch_records_what_it_answered_and_sends_the_rest_again(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each batch runs for 1 s but the window closes after 0.6 s: of n lines, those due by then (the
    # first ones, up to 55% of them) are answered, the rest come back as batch_expired. So 8 rows go
    # 4 + 2 + 1 answered in three batches, and the last row, never reached, is dead after its
    # max_attempts windows (an expired line spends its attempt: rows cannot circle forever).
    config = {**FAST, "batch_duration_s": Distribution(kind="fixed", value=1.0), "batch_window_s": 0.6}
    sim = simulator(SimulatorConfig(**config))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    job = submit(dsn, 8, max_attempts=3)
    # Retried rows due at once: each batch after the first takes every row the previous one left.
    run_worker(dsn, retry=RetryPolicy(base_seconds=0, max_seconds=0))

    done = job.status()
    assert (done.status, done.n_succeeded, done.n_dead) == ("completed", 7, 1)
    results = job.results().set_index("custom_id")
    assert list(results["attempts"]) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert results.loc["r7", "status"] == "dead"
    assert "batch_expired" in results.loc["r7", "error"]
    statuses = [
        r["provider_status"]
        for r in conn.execute(
            "SELECT provider_status FROM batchdb.provider_batches WHERE job_id = %s ORDER BY id", (job.id,)
        )
    ]
    assert statuses == ["expired"] * 3
    assert sim.stats(series=False)["totals"]["batch_requests"] == 7  # each answered row answered once


def test_cancelling_a_job_cancels_its_open_batch_and_counts_what_was_answered_as_waste(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long batch, cancelled while it runs: lines due before the cancel ends are answered (and billed).
    config = {**FAST, "batch_duration_s": Distribution(kind="fixed", value=10.0), "batch_cancelling_s": 0.1}
    sim = simulator(SimulatorConfig(**config))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    job = submit(dsn, 30)

    async def scenario() -> None:
        worker = Worker(
            WorkerConfig(dsn=dsn, concurrency=4, exit_when_idle=True, poll_interval=0.2, batch=QUICK_BATCHES)
        )
        running = asyncio.create_task(worker.run())
        # Cancel once the batch has answered some of its lines (the provider's counts say so).
        while True:
            await asyncio.sleep(0.05)
            chunk = await asyncio.to_thread(
                lambda: conn.execute(
                    "SELECT n_completed FROM batchdb.provider_batches WHERE job_id = %s", (job.id,)
                ).fetchone()
            )
            if chunk and (chunk["n_completed"] or 0) > 0:
                break
        await asyncio.to_thread(job.cancel)
        await asyncio.wait_for(running, 60)

    asyncio.run(scenario())
    done = job.status()
    assert (done.status, done.n_cancelled, done.n_succeeded) == ("cancelled", 30, 0)
    made = conn.execute(
        "SELECT state, provider_status FROM batchdb.provider_batches WHERE job_id = %s", (job.id,)
    ).fetchall()
    assert made == [{"state": "collected", "provider_status": "cancelled"}]
    totals = sim.stats(series=False)["totals"]
    assert 0 < totals["batch_requests"] < 30  # cancelled part way
    # Answers that came back for rows already cancelled were paid: counted as waste, at the batch price.
    assert done.wasted_calls == totals["batch_requests"]
    wasted = conn.execute(
        "SELECT sum(prompt_tokens) AS p, sum(cached_tokens) AS c, sum(completion_tokens) AS o "
        "FROM batchdb.unrecorded_calls WHERE job_id = %s",
        (job.id,),
    ).fetchone()
    assert (wasted["p"], wasted["o"]) == (totals["batch_prompt_tokens"], totals["batch_completion_tokens"])
    assert_billed(done.wasted_usd, batch_price(conn, wasted["p"], wasted["c"], wasted["o"]), 30)


def test_a_job_with_a_batch_open_at_the_provider_cannot_be_deleted_until_cancelled(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deleting the job would drop its chunk: nobody would cancel the batch, which the provider goes on
    # answering and billing. The delete is refused with what to do; after the cancel it goes through.
    config = {**FAST, "batch_duration_s": Distribution(kind="fixed", value=30.0), "batch_cancelling_s": 0.1}
    sim = simulator(SimulatorConfig(**config))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    job = submit(dsn, 6)

    def chunk() -> dict[str, Any] | None:
        return conn.execute(
            "SELECT state, batch_id, provider_status FROM batchdb.provider_batches WHERE job_id = %s", (job.id,)
        ).fetchone()

    async def scenario() -> None:
        worker = Worker(
            WorkerConfig(dsn=dsn, concurrency=4, exit_when_idle=True, poll_interval=0.2, batch=QUICK_BATCHES)
        )
        running = asyncio.create_task(worker.run())
        while not ((found := await asyncio.to_thread(chunk)) and found["batch_id"]):
            await asyncio.sleep(0.05)
        with pytest.raises(psycopg.errors.ObjectInUse) as refused:
            await asyncio.to_thread(lambda: conn.execute("DELETE FROM batchdb.jobs WHERE id = %s", (job.id,)))
        assert f"job {job.id} has 1 batch(es) open at openai" in str(refused.value)
        assert f"batchdb cancel {job.id}" in (refused.value.diag.message_hint or "")
        await asyncio.to_thread(job.cancel)
        await asyncio.wait_for(running, 60)

    asyncio.run(scenario())
    batch_id = chunk()["batch_id"]  # type: ignore[index]
    assert chunk() == {"state": "collected", "batch_id": batch_id, "provider_status": "cancelled"}
    with openai.OpenAI(base_url=sim.openai_base_url, api_key=KEY, max_retries=0) as provider:
        assert provider.batches.retrieve(batch_id).status == "cancelled"
    conn.execute("DELETE FROM batchdb.jobs WHERE id = %s", (job.id,))
    assert conn.execute("SELECT count(*) AS n FROM batchdb.jobs WHERE id = %s", (job.id,)).fetchone()["n"] == 0


def test_a_job_whose_chunk_never_reached_the_provider_deletes_at_once(dsn: str, conn: psycopg.Connection) -> None:
    job = submit(dsn, 3)
    conn.execute(
        "INSERT INTO batchdb.provider_batches (job_id, provider, key_alias, model) "
        "VALUES (%s, 'openai', 'default', %s)",
        (job.id, MODEL),
    )
    conn.execute("DELETE FROM batchdb.jobs WHERE id = %s", (job.id,))
    assert conn.execute("SELECT count(*) AS n FROM batchdb.provider_batches").fetchone()["n"] == 0


def test_a_batch_that_fails_validation_fails_its_rows_with_the_providers_reason(
    dsn: str, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(SimulatorConfig(**FAST, models=("gpt-4o",)))  # the key cannot use gpt-4o-mini
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    job = submit(dsn, 4)
    run_worker(dsn)

    done = job.status()
    assert (done.status, done.n_failed) == ("completed", 4)
    results = job.results()
    assert set(results["error_class"]) == {"batch_failed"}
    assert all("failed validation: model_not_found" in e for e in results["error"])


def test_the_configured_batch_queue_limit_keeps_one_batch_open_at_a_time(
    dsn: str, conn: psycopg.Connection, sim: SimulatorProcess
) -> None:
    from batchdb import ledger

    job = submit(dsn, 12)
    # Room for one chunk of 4 rows but not two (each row's prompt is about 15 tokens).
    with psycopg.connect(dsn, autocommit=True) as c:
        ledger.set_limits(c, ledger.Lane("openai", "default", MODEL), batch_queue_tokens=100)
    run_worker(dsn, chunk_rows=4)

    assert job.status().n_succeeded == 12
    made = conn.execute(
        "SELECT enqueued_tokens, create_started_at, ended_at, create_try FROM batchdb.provider_batches "
        "WHERE job_id = %s ORDER BY create_started_at",
        (job.id,),
    ).fetchall()
    assert len(made) == 3 and all(50 < c["enqueued_tokens"] <= 100 for c in made)
    for earlier, later in itertools.pairwise(made):
        assert later["create_started_at"] >= earlier["ended_at"]  # never two holding the queue at once
    assert {c["create_try"] for c in made} == {1}  # the provider never had to refuse one


def test_a_batch_the_provider_refuses_for_its_queue_limit_waits_and_is_created_again(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # batchdb knows no limit; the provider's is room for one 4-row batch at a time.
    sim = simulator(SimulatorConfig(**FAST, batch_queue_tokens=100))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    first = submit(dsn, 4)
    second = submit(dsn, 4)
    run_worker(dsn, chunk_rows=4)

    for job in (first, second):
        done = job.status()
        assert (done.n_succeeded, set(job.results()["attempts"])) == (4, {1})
    made = conn.execute("SELECT create_try, batch_id FROM batchdb.provider_batches ORDER BY id").fetchall()
    assert len(made) == 2 and max(c["create_try"] for c in made) > 1  # one was refused, then created
    with openai.OpenAI(base_url=sim.openai_base_url, api_key=KEY, max_retries=0) as c:
        remote = list(c.batches.list(limit=100))
    refused = [b for b in remote if b.status == "failed"]
    assert refused and all(b.errors and b.errors.data[0].code == "token_limit_exceeded" for b in refused)
    assert len(remote) == 2 + len(refused)
    assert sim.stats(series=False)["totals"]["batch_requests"] == 8


def test_azure_openai_global_batch(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(SimulatorConfig(**FAST))
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", sim.azure_endpoint)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-batch-test")
    frame = pd.DataFrame({"text": [f"Ticket {i}: printer on fire." for i in range(7)]})
    job = batchdb.submit(frame, prompt="Urgency of: {text}", model=MODEL, provider="azure", mode="batch", dsn=dsn)
    run_worker(dsn, chunk_rows=5)

    done = job.status()
    assert (done.status, done.n_succeeded) == ("completed", 7)
    totals = sim.stats(series=False)["totals"]
    assert totals["batch_requests"] == 7 and totals["requests"] == 0
    assert done.prompt_tokens == totals["batch_prompt_tokens"]
    billed = batch_price(conn, done.prompt_tokens, done.cached_tokens, done.completion_tokens, provider="azure")
    assert_billed(done.cost_usd, billed, 7)
    with openai.AzureOpenAI(
        azure_endpoint=sim.azure_endpoint, api_key="az-batch-test", api_version="2024-10-21", max_retries=0
    ) as c:
        assert len(list(c.batches.list(limit=100))) == 2


def test_identical_rows_of_a_batch_job_are_sent_once(dsn: str, sim: SimulatorProcess) -> None:
    frame = pd.DataFrame({"id": [f"h{i}" for i in range(6)], "text": ["up", "down", "up", "flat", "down", "up"]})
    job = batchdb.submit(frame, prompt="Trend: {text}", id_column="id", model=MODEL, mode="batch", dsn=dsn)
    run_worker(dsn)

    done = job.status()
    assert (done.n_succeeded, done.n_duplicates) == (6, 3)
    assert sim.stats(series=False)["totals"]["batch_requests"] == 3  # one line per distinct request
    results = job.results().set_index("custom_id")
    assert results.loc["h2", "response"] == results.loc["h0", "response"]
    assert list(results["duplicate_of"].fillna("")) == ["", "", "h0", "", "h1", "h0"]


def test_answers_that_break_the_schema_are_sent_again_and_every_answer_is_paid_for(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(SimulatorConfig(**FAST, invalid_json_rate=0.4, seed=3))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    schema = {
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
        "required": ["sentiment"],
    }
    frame = pd.DataFrame({"text": [f"Review {i}: it works." for i in range(12)]})
    job = batchdb.submit(
        frame,
        prompt="Sentiment of: {text}",
        model=MODEL,
        mode="batch",
        response_schema=schema,
        max_attempts=10,
        dsn=dsn,
    )
    run_worker(dsn)

    done = job.status()
    assert (done.status, done.n_succeeded) == ("completed", 12)
    results = job.results()
    assert results["attempts"].max() > 1  # some answers were broken and sent again
    # Every answer the provider returned was billed, broken ones included: all are on the rows.
    totals = sim.stats(series=False)["totals"]
    assert totals["batch_requests"] == results["attempts"].sum()
    assert (done.prompt_tokens, done.completion_tokens) == (
        totals["batch_prompt_tokens"],
        totals["batch_completion_tokens"],
    )


def gemini_sim(
    simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch, **config: Any
) -> SimulatorProcess:
    sim = simulator(SimulatorConfig(**{**FAST, **config}))
    monkeypatch.setenv("GEMINI_BASE_URL", sim.gemini_base_url)
    monkeypatch.setenv("GEMINI_API_KEY", "g-batch-test")
    return sim


def submit_gemini(dsn: str, n: int, **options: Any) -> batchdb.Job:
    frame = pd.DataFrame({"id": [f"g{i}" for i in range(n)], "text": [f"Note {i}: the pump hums." for i in range(n)]})
    return batchdb.submit(
        frame,
        prompt="Is this a fault? {text}",
        system="Answer yes or no.",
        id_column="id",
        model="gemini-2.0-flash",
        provider="gemini",
        max_tokens=20,
        mode="batch",
        dsn=dsn,
        **options,
    )


def test_gemini_batch_mode_answers_every_row_once_at_the_batch_price(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = gemini_sim(simulator, monkeypatch, batch_error_rate=0.3, seed=5)
    job = submit_gemini(dsn, 9, max_attempts=10)
    run_worker(dsn, chunk_rows=4)

    done = job.status()
    assert (done.status, done.n_succeeded) == ("completed", 9)
    results = job.results()
    totals = sim.stats(series=False)["totals"]
    assert totals["requests"] == 0 and totals["batch_failed"] > 0  # failed lines were sent again
    assert results["attempts"].sum() == totals["batch_requests"]
    assert (done.prompt_tokens, done.completion_tokens) == (
        totals["batch_prompt_tokens"],
        totals["batch_completion_tokens"],
    )
    billed = batch_price(
        conn,
        done.prompt_tokens,
        done.cached_tokens,
        done.completion_tokens,
        provider="gemini",
        model="gemini-2.0-flash",
    )
    assert_billed(done.cost_usd, billed, int(results["attempts"].sum()))
    gemini = genai.Client(api_key="g-batch-test", http_options=genai_types.HttpOptions(base_url=sim.base_url))
    assert list(gemini.files.list()) == []  # the batches' result files deleted once recorded


def test_a_gemini_batch_refused_for_its_queue_quota_is_created_again_when_there_is_room(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = gemini_sim(simulator, monkeypatch, batch_queue_tokens=120)  # room for one 4-row batch
    first, second = submit_gemini(dsn, 4), submit_gemini(dsn, 4)
    run_worker(dsn, chunk_rows=4)

    assert first.status().n_succeeded == 4 and second.status().n_succeeded == 4
    tries = [r["create_try"] for r in conn.execute("SELECT create_try FROM batchdb.provider_batches ORDER BY id")]
    assert len(tries) == 2 and max(tries) > 1  # refused with a 429, then created
    assert sim.stats(series=False)["totals"]["batch_requests"] == 8


def test_an_expired_gemini_batch_has_no_results_and_its_rows_are_sent_again(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every batch outlives its window: Gemini returns nothing, each row spends an attempt per window.
    gemini_sim(simulator, monkeypatch, batch_window_s=0.1)
    job = submit_gemini(dsn, 3, max_attempts=2)
    run_worker(dsn, retry=RetryPolicy(base_seconds=0, max_seconds=0))

    done = job.status()
    assert (done.status, done.n_dead) == ("completed", 3)
    results = job.results()
    assert set(results["attempts"]) == {2}
    assert all("gemini batch" in e and "expired" in e for e in results["error"])
