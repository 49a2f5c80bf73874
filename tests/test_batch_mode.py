"""Batch mode end to end: jobs submitted with mode="batch" go through the OpenAI Batch API (and Azure
OpenAI Global Batch) of the provider simulator, through the real openai SDK, in compressed time.

A batch here validates, runs and finalizes in well under a second (`FAST`), and workers poll every
50 ms. What a batch answers is decided by the simulator's clock, not by when it is polled, and every
test waits for an outcome rather than for a time, so none depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import openai
import pandas as pd
import psycopg
import pytest

import batchdb
from batchdb.simulator import Distribution, SimulatorConfig, SimulatorProcess
from batchdb.workers.batch_driver import BatchDriverConfig
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig

MODEL = "gpt-4o-mini"
KEY = "sk-batch-test"
FAST: dict[str, Any] = {
    "batch_validation_s": 0.05,
    "batch_duration_s": Distribution(kind="fixed", value=0.3),
    "batch_finalizing_s": 0.05,
    "batch_cancelling_s": 0.05,
    "output_tokens": Distribution(kind="fixed", value=12),
}
QUICK_BATCHES = BatchDriverConfig(
    interval=0.05,
    poll_interval=0.05,
    lease_seconds=10.0,
    request_timeout=3.0,
    queue_wait=0.1,
    error_wait=0.1,
    retry=RetryPolicy(base_seconds=0.05, max_seconds=0.1),
)


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


def batch_price(conn: psycopg.Connection, prompt: int, cached: int, completion: int) -> Decimal:
    row = conn.execute(
        "SELECT batchdb.call_cost_usd(input_per_mtok, cached_input_per_mtok, output_per_mtok, batch_discount, "
        "%s, %s, %s, true) AS usd FROM batchdb.prices WHERE provider = 'openai' AND model = %s",
        (prompt, cached, completion, MODEL),
    ).fetchone()
    return Decimal(row["usd"])


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
    # The provider's bill (its batch lines) equals the job's recorded tokens and cost at the batch price.
    totals = sim.stats(series=False)["totals"]
    assert totals["batch_requests"] == 25 and totals["requests"] == 0  # not one online call
    assert (done.prompt_tokens, done.cached_tokens, done.completion_tokens) == (
        totals["batch_prompt_tokens"],
        totals["batch_cached_tokens"],
        totals["batch_completion_tokens"],
    )
    billed = batch_price(conn, done.prompt_tokens, done.cached_tokens, done.completion_tokens)
    assert done.cost_usd == billed
    online = conn.execute(
        "SELECT batchdb.call_cost_usd(input_per_mtok, cached_input_per_mtok, output_per_mtok, batch_discount, "
        "%s, %s, %s, false) AS usd FROM batchdb.prices WHERE provider = 'openai' AND model = %s",
        (done.prompt_tokens, done.cached_tokens, done.completion_tokens, MODEL),
    ).fetchone()["usd"]
    assert done.cost_usd == online / 2
    assert done.wasted_calls == 0


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
        ({"provider": "gemini", "model": "gemini-2.5-flash"}, "provider 'gemini' has none in batchdb yet"),
        ({"budget_usd": 5.0}, "budget_usd: not supported with mode='batch'"),
        ({"mode": "later"}, "mode: expected one of online, batch, got 'later'"),
    ],
)
def test_batch_mode_is_refused_where_it_cannot_run(dsn: str, options: dict[str, Any], message: str) -> None:
    frame = pd.DataFrame({"text": ["a", "b"]})
    arguments: dict[str, Any] = {"model": MODEL, "mode": "batch", **options}
    with pytest.raises(batchdb.InputError, match=message):
        batchdb.submit(frame, prompt="{text}", dsn=dsn, **arguments)
