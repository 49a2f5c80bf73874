"""The batch driver (workers/batch_driver.py) on its own, against real PostgreSQL and the simulator's
OpenAI Batch API through the openai SDK: a driver killed at each step of a chunk's life, or stalled
past its lease, is succeeded by another that never makes a second file or batch for the chunk and
never answers a row twice.

A kill is played in-process (the driver's checkpoint hook raises an exception no step catches, which
abandons the driver mid-pass: nothing is let go, the lease stays held until it runs out) and for real
(a process running the driver SIGKILLs itself at the step). Waits are for outcomes, never for a
length of time.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pandas as pd
import psycopg
import pytest
from google import genai
from google.genai import types as genai_types

import batchdb
from batchdb.providers.gemini import GeminiProvider
from batchdb.providers.openai import OpenAIProvider
from batchdb.simulator import Distribution, SimulatorConfig, SimulatorProcess
from batchdb.workers.batch_driver import BatchDriver, BatchDriverConfig, Chunk
from batchdb.workers.connection import Reconnecting
from batchdb.workers.outcomes import RetryPolicy

MODEL = "gpt-4o-mini"
KEY = "sk-driver-test"
GEMINI_MODEL = "gemini-2.0-flash"
GEMINI_KEY = "g-driver-test"
FAST: dict[str, Any] = {
    "batch_validation_s": 0.05,
    "batch_duration_s": Distribution(kind="fixed", value=0.2),
    "batch_finalizing_s": 0.05,
    "output_tokens": Distribution(kind="fixed", value=8),
}
STEPS = ["upload_intent", "uploaded", "create_intent", "created", "ended"]


class Killed(BaseException):
    """A worker dying at a checkpoint: no step catches it, nothing is cleaned up."""


@pytest.fixture
def sim(simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    return simulator(SimulatorConfig(**FAST))


def driver(dsn: str, sim: SimulatorProcess, name: str, **options: Any) -> BatchDriver:
    """A driver on its own connection, with the simulator's Batch API for every lane. Its lease is
    short so a successor takes over a killed driver's chunk within a second or two."""
    checkpoint = options.pop("checkpoint", None)
    provider = options.pop("provider", "openai")
    config = BatchDriverConfig(
        **{
            "interval": 0.05,
            "poll_interval": 0.05,
            "lease_seconds": 1.5,
            "request_timeout": 0.5,
            "queue_wait": 0.05,
            "error_wait": 0.05,
            "retry": RetryPolicy(0.05, 0.1),
            # The files stay at the provider, so the tests can count every file ever uploaded.
            "delete_files": False,
            **options,
        }
    )
    client: OpenAIProvider | GeminiProvider
    if provider == "gemini":
        client = GeminiProvider(api_key=GEMINI_KEY, base_url=sim.gemini_base_url, timeout=5.0)
    else:
        client = OpenAIProvider(api_key=KEY, base_url=sim.openai_base_url, timeout=5.0)
    _CLIENTS.append(client)
    api = client.batch_api(timeout=config.request_timeout)
    return BatchDriver(
        Reconnecting(dsn, name=name), config, worker_id=name, api_for=lambda _p, _a: api, checkpoint=checkpoint
    )


_CLIENTS: list[OpenAIProvider | GeminiProvider] = []


async def close(*drivers: BatchDriver) -> None:
    """Close the drivers' connections and every SDK client made in this event loop."""
    for each in drivers:
        await each.close()
    while _CLIENTS:
        await _CLIENTS.pop().aclose()


def submit(dsn: str, n: int = 6, provider: str = "openai") -> batchdb.Job:
    frame = pd.DataFrame({"text": [f"Line {i} of the test." for i in range(n)]})
    model = GEMINI_MODEL if provider == "gemini" else MODEL
    return batchdb.submit(frame, prompt="Summarise: {text}", model=model, provider=provider, mode="batch", dsn=dsn)


async def until_done(job: batchdb.Job, *drivers: BatchDriver, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(job.status)).status not in ("completed", "cancelled"):
        assert time.monotonic() < deadline, "the job did not finish"
        for each in drivers:
            await each.run_once()
        await asyncio.sleep(0.05)


def remote_counts(sim: SimulatorProcess, provider: str = "openai") -> tuple[int, int]:
    """(input files uploaded, batches) the provider holds for the test's key."""
    if provider == "gemini":
        client = genai.Client(api_key=GEMINI_KEY, http_options=genai_types.HttpOptions(base_url=sim.base_url))
        try:
            uploaded = [f for f in client.files.list() if f.source == genai_types.FileSource.UPLOADED]
            return len(uploaded), len(list(client.batches.list()))
        finally:
            client.close()
    with openai.OpenAI(base_url=sim.openai_base_url, api_key=KEY, max_retries=0) as c:
        return len(list(c.files.list(purpose="batch"))), len(list(c.batches.list(limit=100)))


def assert_answered_once(
    conn: psycopg.Connection, job: batchdb.Job, sim: SimulatorProcess, n: int, provider: str = "openai"
) -> None:
    rows = conn.execute(
        "SELECT q.status, q.attempts, r.writes FROM batchdb.requests q "
        "LEFT JOIN batchdb.results r ON r.job_id = q.job_id AND r.request_id = q.id WHERE q.job_id = %s",
        (job.id,),
    ).fetchall()
    assert [(r["status"], r["attempts"], r["writes"]) for r in rows] == [("succeeded", 1, 1)] * n
    assert remote_counts(sim, provider) == (1, 1)  # one file, one batch: nothing made twice
    totals = sim.stats(series=False)["totals"]
    status = job.status()
    assert totals["batch_requests"] == n
    assert (status.prompt_tokens, status.completion_tokens) == (
        totals["batch_prompt_tokens"],
        totals["batch_completion_tokens"],
    )
    assert status.wasted_calls == 0


@pytest.mark.parametrize(
    ("provider", "step"), [("openai", step) for step in STEPS] + [("gemini", step) for step in STEPS]
)
def test_a_driver_killed_at_any_step_is_succeeded_without_a_second_batch(
    dsn: str, conn: psycopg.Connection, sim: SimulatorProcess, provider: str, step: str
) -> None:
    job = submit(dsn, provider=provider)
    seen: list[str] = []

    def kill_at(name: str, chunk: Chunk) -> None:
        seen.append(name)
        if name == step:
            raise Killed

    async def scenario() -> None:
        first = driver(dsn, sim, "first", checkpoint=kill_at, provider=provider)
        with pytest.raises(Killed):
            while True:  # the first driver works until it dies at `step`
                await first.run_once()
                await asyncio.sleep(0.02)
        second = driver(dsn, sim, "second", provider=provider)
        try:
            await until_done(job, second)
        finally:
            await close(first, second)

    asyncio.run(scenario())
    assert seen[-1] == step
    assert_answered_once(conn, job, sim, 6, provider)
    chunk = conn.execute(
        "SELECT state, lease_owner FROM batchdb.provider_batches WHERE job_id = %s", (job.id,)
    ).fetchall()
    assert chunk == [{"state": "collected", "lease_owner": None}]


@pytest.mark.parametrize("step", STEPS)
def test_a_process_sigkilled_at_any_step_is_succeeded_without_a_second_batch(
    dsn: str, conn: psycopg.Connection, sim: SimulatorProcess, step: str
) -> None:
    """The same with a real death: the driver runs in a process of its own that SIGKILLs itself at
    `step` (tests/batch_driver_victim.py), its connection cut wherever it was."""
    job = submit(dsn)
    victim = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("batch_driver_victim.py")), dsn, sim.openai_base_url, KEY, step],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert victim.returncode == -signal.SIGKILL, victim.stderr

    async def scenario() -> None:
        successor = driver(dsn, sim, "successor")
        try:
            await until_done(job, successor)
        finally:
            await close(successor)

    asyncio.run(scenario())
    assert_answered_once(conn, job, sim, 6)


def test_a_driver_stalled_past_its_lease_cannot_record_the_batch_it_created(
    dsn: str, conn: psycopg.Connection, sim: SimulatorProcess
) -> None:
    """The first driver creates the batch, then stalls (a GC pause, a stopped VM) past its lease
    before recording it. The successor finds the batch by its metadata instead of creating one; the
    first, waking up, is fenced out of every write."""
    job = submit(dsn)
    stalled = asyncio.Event()
    resume = asyncio.Event()

    async def stall_after_create(name: str, chunk: Chunk) -> None:
        if name == "created":
            stalled.set()
            await resume.wait()

    async def scenario() -> None:
        first = driver(dsn, sim, "first", checkpoint=stall_after_create)
        second = driver(dsn, sim, "second")

        async def first_runs() -> None:
            while (await asyncio.to_thread(job.status)).status != "completed":
                await first.run_once()
                await asyncio.sleep(0.02)

        running = asyncio.create_task(first_runs())
        await stalled.wait()
        await until_done(job, second)
        resume.set()
        await asyncio.wait_for(running, 30)
        await close(first, second)

    asyncio.run(scenario())
    assert_answered_once(conn, job, sim, 6)


def test_chunks_follow_the_row_limit_and_rows_left_over_wait_in_the_queue(
    dsn: str, conn: psycopg.Connection, sim: SimulatorProcess
) -> None:
    """One chunk per job waits to be created at a time: the rows beyond it stay queued (claimable by a
    later chunk), not parked in chunks that cannot go yet."""
    job = submit(dsn, 7)

    async def scenario() -> list[dict[str, Any]]:
        one = driver(dsn, sim, "one", chunk_rows=3)
        try:
            await one._form(None)
            return await asyncio.to_thread(
                lambda: conn.execute(
                    "SELECT state, n_requests FROM batchdb.provider_batches WHERE job_id = %s", (job.id,)
                ).fetchall()
            )
        finally:
            await close(one)

    assert asyncio.run(scenario()) == [{"state": "planned", "n_requests": 3}]
    counts = conn.execute(
        "SELECT status, count(*) AS n FROM batchdb.requests WHERE job_id = %s GROUP BY status ORDER BY status",
        (job.id,),
    ).fetchall()
    assert counts == [{"status": "queued", "n": 4}, {"status": "running", "n": 3}]


def test_a_lease_shorter_than_twice_a_call_is_refused() -> None:
    with pytest.raises(ValueError, match="below half of lease_seconds"):
        BatchDriverConfig(lease_seconds=10, request_timeout=6)
