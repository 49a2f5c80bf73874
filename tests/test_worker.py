"""The worker in-process against real PostgreSQL, with scripted providers behind the Provider seam."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pandas as pd
import psycopg
import pytest

import batchdb
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.instant import InstantProvider
from batchdb.simulator import SimulatorProcess
from batchdb.simulator.config import Distribution
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.processes import WorkerProcesses
from batchdb.workers.worker import Worker, WorkerConfig

FAST_RETRY = RetryPolicy(base_seconds=0.05, max_seconds=0.2)


class ScriptedProvider:
    """Fails each prompt according to a script, then answers."""

    name = "instant"

    def __init__(self, script: dict[str, list[ProviderError]], delay: float = 0.0) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: Counter[str] = Counter()
        self.delay = delay

    async def complete(self, request: ChatRequest) -> ChatResponse:
        prompt = request.messages[-1]["content"]
        self.calls[prompt] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        pending = self.script.get(prompt)
        if pending:
            raise pending.pop(0)
        return ChatResponse(
            text=f"ok: {prompt}", finish_reason="stop", prompt_tokens=7, completion_tokens=3, model=request.model
        )

    async def aclose(self) -> None:
        return None


def drain(dsn: str, provider: object, **config: object) -> Worker:
    worker = Worker(
        WorkerConfig(dsn=dsn, concurrency=16, exit_when_idle=True, poll_interval=0.3, retry=FAST_RETRY, **config),
        providers={"instant": provider},  # type: ignore[dict-item]
    )
    asyncio.run(worker.run())
    return worker


def submit_prompts(dsn: str, prompts: list[str], **options: object) -> batchdb.Job:
    frame = pd.DataFrame({"text": prompts})
    return batchdb.submit(frame, prompt="{text}", model="gpt-4o-mini", provider="instant", dsn=dsn, **options)


def test_the_rows_of_one_claim_share_one_read_of_their_job(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim starts up to `max_claim` rows at once and each asks for its job: with the cache empty they
    wait for one read instead of queueing one each on the claim connection (issue 13: at 20 ms to the
    database, 256 reads held the next claim for 5 s and cut throughput to a seventh)."""
    from batchdb.workers import worker as worker_module

    reads = Counter[str]()
    real_query = worker_module.query

    def counting_query(name: str) -> str:
        reads[name] += 1
        return real_query(name)

    monkeypatch.setattr(worker_module, "query", counting_query)
    job = submit_prompts(dsn, [f"p{i}" for i in range(300)])
    worker = Worker(
        WorkerConfig(dsn=dsn, concurrency=300, exit_when_idle=True, poll_interval=0.3, job_cache_seconds=600),
        providers={"instant": InstantProvider()},  # type: ignore[dict-item]
    )
    asyncio.run(worker.run())
    assert job.status().n_succeeded == 300
    assert reads["job_for_worker"] == 1


def test_worker_drains_a_job_and_results_come_back(dsn: str) -> None:
    job = submit_prompts(dsn, [f"p{i}" for i in range(500)])
    drain(dsn, InstantProvider())
    status = job.status()
    assert (status.status, status.n_succeeded, status.n_total) == ("completed", 500, 500)
    results = job.results()
    assert list(results["text"]) == [f"p{i}" for i in range(500)]
    assert all(results["response"] == results["text"].map(lambda t: f"echo: {t}"))
    assert set(results["status"]) == {"succeeded"}


def test_retryable_errors_back_off_then_succeed_and_exhausted_rows_go_dead(dsn: str) -> None:
    transient = ProviderError(ErrorKind.TRANSIENT, "503 server_is_overloaded", status_code=503)
    limited = ProviderError(ErrorKind.RATE_LIMITED, "429 rate_limit_exceeded", status_code=429, retry_after=0.05)
    provider = ScriptedProvider(
        {
            "flaky": [transient, limited],  # succeeds on attempt 3
            "hopeless": [transient] * 4,  # fails all 4 attempts: dead
            "refused": [ProviderError(ErrorKind.PERMANENT, "400 context_length_exceeded", status_code=400)],
        }
    )
    job = submit_prompts(dsn, ["flaky", "hopeless", "refused", "fine"], max_attempts=4)
    drain(dsn, provider)
    assert provider.calls == {"flaky": 3, "hopeless": 4, "refused": 1, "fine": 1}
    results = job.results().set_index("text")
    assert results.loc["flaky", "status"] == "succeeded" and results.loc["flaky", "attempts"] == 3
    assert results.loc["hopeless", "status"] == "dead"
    assert "gave up after 4 attempt(s)" in results.loc["hopeless", "error"]
    assert results.loc["refused", "status"] == "failed"
    assert "context_length_exceeded" in results.loc["refused", "error"]
    status = job.status()
    assert (status.status, status.n_succeeded, status.n_dead, status.n_failed) == ("completed", 2, 1, 1)
    assert status.n_retries == 2 + 3

    # Replay the dead row: it runs again from attempt 1 and now succeeds.
    assert job.retry(dead=True, failed=False) == 1
    drain(dsn, provider)
    status = job.status()
    assert (status.status, status.n_succeeded, status.n_dead, status.n_failed) == ("completed", 3, 0, 1)


def test_quota_exhaustion_pauses_the_job_without_spending_attempts(dsn: str) -> None:
    quota = ProviderError(ErrorKind.QUOTA_EXHAUSTED, "429 insufficient_quota", status_code=429)
    provider = ScriptedProvider({"a": [quota]})
    job = submit_prompts(dsn, ["a"])
    drain(dsn, provider)
    status = job.status()
    assert status.status == "paused" and "insufficient_quota" in (status.status_reason or "")
    assert job.results().loc[0, "attempts"] == 0
    assert job.resume()
    drain(dsn, provider)
    assert job.status().status == "completed"


def test_bad_template_row_fails_with_the_reason_and_does_not_stop_the_worker(
    dsn: str, conn: psycopg.Connection
) -> None:
    job_id = conn.execute(
        "INSERT INTO batchdb.jobs (model, provider, params) VALUES ('m', 'instant', %s) RETURNING id",
        ('{"prompt": "Rate {headline}{title}"}',),
    ).fetchone()["id"]
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES "
        '(%s, \'good\', \'{"headline": "up", "title": ""}\'), '
        '(%s, \'bad\', \'{"title": "down", "headline": ""}\')',
        (job_id, job_id),
    )
    # Inserts are checked against the template (0009_input_checks.sql); a template changed afterwards is not,
    # so the worker still meets a row its template cannot format.
    conn.execute('UPDATE batchdb.jobs SET params = \'{"prompt": "Rate {headline}"}\' WHERE id = %s', (job_id,))
    conn.execute("UPDATE batchdb.requests SET input = input - 'headline' WHERE custom_id = 'bad'")
    drain(dsn, InstantProvider())
    rows = {
        r["custom_id"]: r
        for r in conn.execute(
            "SELECT custom_id, status, error FROM batchdb.requests WHERE job_id = %s", (job_id,)
        ).fetchall()
    }
    assert rows["good"]["status"] == "succeeded"
    assert rows["bad"]["status"] == "failed" and "needs column(s) headline" in rows["bad"]["error"]


def test_cancel_while_running_records_no_success_after_it(dsn: str) -> None:
    job = submit_prompts(dsn, [f"p{i}" for i in range(400)])
    provider = ScriptedProvider({}, delay=0.05)

    async def scenario() -> None:
        worker = Worker(
            WorkerConfig(dsn=dsn, concurrency=8, poll_interval=0.2, retry=FAST_RETRY), providers={"instant": provider}
        )  # type: ignore[dict-item]
        task = asyncio.create_task(worker.run())
        while job.status().n_succeeded < 20:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(job.cancel)
        cancelled_at = job.status()
        await asyncio.sleep(0.5)
        worker.stop()
        await task
        after = job.status()
        assert after.status == "cancelled"
        assert after.n_succeeded == cancelled_at.n_succeeded
        assert after.n_succeeded + after.n_cancelled == 400

    asyncio.run(scenario())


@pytest.mark.slow
def test_sigterm_finishes_in_flight_rows_and_exits_zero(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], tmp_path: Path
) -> None:
    sim = simulator(latency_s=Distribution(kind="fixed", value=5.0))
    frame = pd.DataFrame({"text": [f"p{i}" for i in range(3000)]})
    job = batchdb.submit(frame, prompt="{text}", model="gpt-4o-mini", provider="openai", dsn=dsn)
    env = {"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": "sk-test"}
    with WorkerProcesses(dsn, env=env, args=("--concurrency", "32"), log_dir=tmp_path) as workers:
        workers.start()
        deadline = time.monotonic() + 60
        held: list[int] = []
        while not held:
            assert time.monotonic() < deadline, workers.log_text()
            time.sleep(0.05)
            if job.status().n_succeeded == 0:
                continue  # the first calls are answered: the SDK is loaded, claimed rows go out at once
            # Rows claimed 1 to 3.5 s ago (a lease is taken for 60 s): their calls are out, and each
            # has over a second of its 5 s left, so it is still in flight when the signal lands.
            held = [
                r["id"]
                for r in conn.execute(
                    "SELECT id FROM batchdb.requests WHERE job_id = %s AND status = 'running' "
                    "AND lease_expires_at BETWEEN now() + interval '56.5 seconds' AND now() + interval '59 seconds'",
                    (job.id,),
                ).fetchall()
            ]
        workers.processes[0].send_signal(signal.SIGTERM)
        code = workers.processes[0].wait(timeout=60)
    assert code == 0, workers.log_text()
    rows = {
        r["id"]: (r["status"], r["attempts"])
        for r in conn.execute(
            "SELECT id, status, attempts FROM batchdb.requests WHERE job_id = %s", (job.id,)
        ).fetchall()
    }
    # Every call in flight at SIGTERM finished and was recorded, with its one attempt.
    assert {rows[i] for i in held} == {("succeeded", 1)}
    # Every other row either finished the same way or went back untouched; none is left leased.
    assert set(rows.values()) <= {("succeeded", 1), ("queued", 0)}
    assert len(rows) == 3000
    stopped = conn.execute("SELECT count(*) AS n FROM batchdb.workers WHERE stopped_at IS NOT NULL").fetchone()["n"]
    assert stopped == 1


@pytest.mark.parametrize("concurrency", [1, 64])
def test_worker_respects_its_concurrency(dsn: str, concurrency: int) -> None:
    peak = 0
    in_flight = 0
    full: asyncio.Event | None = None

    class Counting(InstantProvider):
        async def complete(self, request: ChatRequest) -> ChatResponse:
            nonlocal peak, in_flight, full
            full = full or asyncio.Event()
            in_flight += 1
            peak = max(peak, in_flight)
            if peak >= concurrency:
                full.set()
            # The first calls hold until the worker has `concurrency` of them out (bounded, in case
            # it never does), so the peak does not depend on how fast this machine starts them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(full.wait(), 10)
            await asyncio.sleep(0.01)
            in_flight -= 1
            return await super().complete(request)

    submit_prompts(dsn, [f"p{i}" for i in range(300)])
    worker = Worker(
        WorkerConfig(dsn=dsn, concurrency=concurrency, exit_when_idle=True, poll_interval=0.3),
        providers={"instant": Counting()},
    )
    asyncio.run(worker.run())
    assert peak == concurrency


class ShapeShifter:
    """Answers with the texts given, in order, then repeats the last."""

    name = "instant"

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.requests: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        text = self.answers[min(len(self.requests) - 1, len(self.answers) - 1)]
        return ChatResponse(text=text, finish_reason="stop", prompt_tokens=11, completion_tokens=4, model="m")

    async def aclose(self) -> None:
        return None


SCHEMA = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]}}, "required": ["sentiment"]}


def test_invalid_answers_are_re_asked_with_the_validation_error(dsn: str) -> None:
    provider = ShapeShifter(["not json", '{"sentiment": "meh"}', '{"sentiment": "positive"}'])
    job = submit_prompts(dsn, ["Acme up"], response_schema=SCHEMA, validation_retries=2)
    drain(dsn, provider)
    [row] = job.results().to_dict("records")
    assert row["status"] == "succeeded" and row["response"] == '{"sentiment": "positive"}'
    assert (row["prompt_tokens"], row["completion_tokens"], row["attempts"]) == (33, 12, 1)
    # The second call saw the bad answer and why it was refused.
    second = provider.requests[1].messages
    assert second[-2] == {"role": "assistant", "content": "not json"}
    assert "not valid JSON" in second[-1]["content"]
    third = provider.requests[2].messages
    assert "at sentiment: 'meh' is not one of ['positive', 'negative']" in third[-1]["content"]
    with psycopg.connect(dsn) as conn:
        stored = conn.execute("SELECT response_json FROM batchdb.results").fetchone()[0]
    assert stored == {"sentiment": "positive"}


def test_answers_that_never_validate_fail_the_row_and_keep_the_last_answer(dsn: str) -> None:
    provider = ShapeShifter(['{"mood": 1}'])
    job = submit_prompts(dsn, ["Acme up"], response_schema=SCHEMA, validation_retries=1)
    drain(dsn, provider)
    [row] = job.results().to_dict("records")
    assert row["status"] == "failed" and row["error_class"] == "invalid_response"
    assert row["response"] == '{"mood": 1}'
    assert "'sentiment' is a required property (after 1 re-ask(s))" in row["error"]
    assert len(provider.requests) == 2 and row["prompt_tokens"] == 22


def test_bad_response_schema_is_refused_at_submit(dsn: str) -> None:
    with pytest.raises(batchdb.InputError, match="response_schema: response schema is not a valid JSON schema"):
        submit_prompts(dsn, ["x"], response_schema={"type": "not-a-type"})


def test_budget_stops_the_job_within_the_calls_in_flight_and_resume_continues(
    dsn: str, conn: psycopg.Connection
) -> None:
    # 'instant' has no list price; give it one so every call costs money.
    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) "
        "VALUES ('instant', 'priced', 1000, 1000)"
    )
    frame = pd.DataFrame({"text": [f"p{i}" for i in range(200)]})
    job = batchdb.submit(
        frame, prompt="{text}", model="priced", provider="instant", max_tokens=10, budget_usd=0.5, dsn=dsn
    )
    drain(dsn, ScriptedProvider({}))
    status = job.status()
    assert status.status == "paused" and "budget of $0.500000 reached" in (status.status_reason or "")
    # Each call costs (7 + 3) tokens x $1000/M = $0.01, but reserves its worst case
    # (prompt estimate + max_tokens): the job stops at or under its budget, never over.
    assert 0 < status.cost_usd <= Decimal("0.5")
    assert status.n_succeeded == int(status.cost_usd / Decimal("0.01"))
    with psycopg.connect(dsn) as c:
        reserved, summed = c.execute(
            "SELECT j.reserved_usd, (SELECT sum(cost_usd) FROM batchdb.requests WHERE job_id = j.id) "
            "FROM batchdb.jobs j WHERE id = %s",
            (job.id,),
        ).fetchone()
    assert reserved == 0 and summed == status.cost_usd
    assert job.resume(budget_usd=100.0)
    drain(dsn, ScriptedProvider({}))
    final = job.status()
    assert (final.status, final.n_succeeded) == ("completed", 200)
    assert final.cost_usd == Decimal("2.00")


def test_wait_returns_on_the_completion_event_not_the_next_poll(dsn: str) -> None:
    job = submit_prompts(dsn, ["a", "b"])

    async def finish_soon() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(drain, dsn, InstantProvider())

    import threading

    worker = threading.Thread(target=lambda: asyncio.run(finish_soon()))
    worker.start()
    started = time.monotonic()
    final = job.wait(poll_interval=30)  # without LISTEN this would sleep 30 s
    waited = time.monotonic() - started
    worker.join()
    assert final.status == "completed"
    assert waited < 10


def test_watch_prints_job_events(dsn: str, conn: psycopg.Connection) -> None:
    import json
    import threading

    env = {**os.environ, "BATCHDB_DSN": dsn}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "batchdb", "watch"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)
    reader.start()

    def wait_for(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    try:
        # Ready once its LISTEN has run (visible in pg_stat_activity), not after a guessed sleep.
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                    "AND strpos(query, 'LISTEN batchdb_events') > 0 AND state = 'idle'"
                ).fetchone()["n"]
                > 0
            ),
            "the LISTEN",
        )
        job = submit_prompts(dsn, ["a"])
        drain(dsn, InstantProvider())

        def seen() -> set[tuple[int, str]]:
            return {(e["job_id"], e["event"]) for e in (json.loads(line) for line in list(lines) if line.strip())}

        wait_for(lambda: seen() >= {(job.id, "job.running"), (job.id, "job.completed")}, "both events")
    finally:
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=10)
        reader.join(timeout=10)
    assert watcher.returncode == 0, err


def test_the_heartbeat_follows_the_lease_unless_given() -> None:
    """A Python caller gets what `batchdb worker --lease-seconds` gets: extensions well inside the lease."""
    assert WorkerConfig(lease_seconds=6).heartbeat_seconds == 2.0
    assert WorkerConfig(lease_seconds=60).heartbeat_seconds == 10.0
    assert WorkerConfig(lease_seconds=1).heartbeat_seconds == 0.5
    assert WorkerConfig(lease_seconds=6, heartbeat_interval=1.0).heartbeat_seconds == 1.0
    with pytest.raises(ValueError, match=r"heartbeat_interval \(10.0 s\) must be above 0 and below lease_seconds"):
        WorkerConfig(lease_seconds=6, heartbeat_interval=10.0)


def test_calls_that_time_out_count_their_prompt_as_paid(dsn: str, simulator) -> None:
    """A call the provider accepted but did not answer within request_timeout is billed all the same:
    its prompt tokens (counted offline, as the provider counts them) are on the row and the job, so the
    job's prompt tokens equal the provider's count; its output, which nobody received, is not."""
    from batchdb.providers.openai import OpenAIProvider
    from batchdb.workers.breaker import BreakerConfig

    sim = simulator(latency_s=Distribution(kind="fixed", value=4.0))
    frame = pd.DataFrame({"text": [f"headline {i} moves markets" for i in range(4)]})
    job = batchdb.submit(frame, prompt="{text}", model="gpt-4o-mini", provider="openai", max_attempts=2, dsn=dsn)
    provider = OpenAIProvider(api_key="sk-test", base_url=sim.openai_base_url, timeout=60)
    worker = Worker(
        WorkerConfig(
            dsn=dsn,
            exit_when_idle=True,
            poll_interval=0.3,
            retry=FAST_RETRY,
            request_timeout=0.5,
            breaker=BreakerConfig(threshold=100),  # every attempt spent (an open circuit hands rows back unspent)
        ),
        providers={"openai": provider},
    )
    asyncio.run(worker.run())
    done = job.status()
    assert (done.status, done.n_dead) == ("completed", 4)
    deadline = time.monotonic() + 60
    while (billed := sim.stats(series=False)["totals"])["accepted"] < 8:  # answered after the worker left
        assert time.monotonic() < deadline, billed
        time.sleep(0.2)
    assert billed["accepted"] == 8  # two attempts a row, each sent and each billed
    assert done.prompt_tokens == billed["prompt_tokens"] > 0
    assert done.completion_tokens == 0 < billed["completion_tokens"]
    assert done.cost_usd > 0
