"""The per-lane circuit breaker (workers/breaker.py, sql/migrations/0007_circuit_breaker.sql).

The first tests drive `Breaker` objects (two of them stand for two workers) against real
PostgreSQL; the last ones run a real worker against the simulator through the OpenAI SDK:
an outage must leave every row's attempts alone and the job must finish by itself, and a
wrong base URL must leave the job waiting with the URL in its reason, not fail every row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
import psycopg
import pytest
from psycopg.rows import dict_row

import batchdb
from batchdb.ledger import Lane
from batchdb.models import ClaimedRequest
from batchdb.providers.base import ErrorKind, ProviderError
from batchdb.simulator import SimulatorConfig, SimulatorProcess, start_simulator
from batchdb.workers.breaker import Breaker, BreakerConfig
from batchdb.workers.connection import Reconnecting
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig

LANE = Lane("openai", "default", "gpt-4o-mini")
UNAVAILABLE_503 = ProviderError(
    ErrorKind.TRANSIENT, "InternalServerError: 503 (at http://sim/v1/chat/completions)", status_code=503
)
REFUSED = ProviderError(
    ErrorKind.TRANSIENT, "APIConnectionError: Connection error. (at http://sim/v1/chat/completions)"
)
BAD_ROW = ProviderError(ErrorKind.PERMANENT, "BadRequestError: context_length_exceeded", status_code=400)
NOT_FOUND = ProviderError(ErrorKind.UNAVAILABLE, "NotFoundError: 404 (at http://sim/chat/completions)", status_code=404)


def submit(dsn: str, rows: int = 20, *, webhook: bool = True, **options: Any) -> batchdb.Job:
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": [f"headline {i}" for i in range(rows)]})
    settings: dict[str, Any] = {"model": LANE.model, "provider": "openai", "max_tokens": 8, **options}
    if webhook:
        settings["webhook_url"] = "http://127.0.0.1:9/hook"
    return batchdb.submit(frame, prompt="Sentiment: {text}", id_column="id", dsn=dsn, **settings)


def a_row(job_id: int, n: int = 1) -> ClaimedRequest:
    return ClaimedRequest(
        job_id=job_id, id=n, custom_id=f"r{n}", payload=None, input=None, attempts=1, max_attempts=5, lease_token=1
    )


def breaker(dsn: str, name: str = "w1", started: list[ClaimedRequest] | None = None, **config: Any) -> Breaker:
    return Breaker(
        Reconnecting(dsn, name=name),
        BreakerConfig(**config),
        worker_id=name,
        lease_seconds=30,
        probe_lease_seconds=30,
        on_probe=(started if started is not None else []).append,
    )


def circuit(conn: psycopg.Connection) -> dict[str, Any]:
    return conn.execute(
        "SELECT * FROM batchdb.circuits WHERE provider = %s AND key_alias = %s AND model = %s",
        (LANE.provider, LANE.key_alias, LANE.model),
    ).fetchone()


def events(conn: psycopg.Connection, job_id: int, event: str = "job.provider_unavailable") -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM batchdb.notification_deliveries WHERE job_id = %s AND event = %s", (job_id, event)
    ).fetchone()["n"]


def reason(conn: psycopg.Connection, job_id: int) -> str | None:
    return conn.execute("SELECT status_reason FROM batchdb.jobs WHERE id = %s", (job_id,)).fetchone()["status_reason"]


# -- the breaker against the database ----------------------------------------------------------------


def test_sustained_lane_failures_open_the_circuit_for_every_worker_and_a_success_closes_it(
    dsn: str, conn: psycopg.Connection
) -> None:
    job = submit(dsn)

    async def scenario() -> None:
        one, two = breaker(dsn, "w1", threshold=3), breaker(dsn, "w2", threshold=3)
        row = a_row(job.id)
        sent_before_the_outage = time.monotonic()
        # A row's own failure says nothing about the lane, and an answer ends a streak.
        assert not await one.failed(LANE, row, REFUSED, time.monotonic())
        assert not await one.failed(LANE, row, BAD_ROW, time.monotonic())
        assert not await one.failed(LANE, row, REFUSED, time.monotonic())
        assert not await one.failed(LANE, row, UNAVAILABLE_503, time.monotonic())
        assert circuit(conn) is None
        assert await one.failed(LANE, row, UNAVAILABLE_503, time.monotonic())  # third in a row: open, for everyone
        assert one.is_open(LANE)
        state = circuit(conn)
        assert state["state"] == "open" and "503" in state["last_error"]
        text = reason(conn, job.id)
        assert text is not None and text.startswith("waiting: provider unavailable since ") and "503" in text, text
        assert job.status().status == "running"
        await two.poll_once()
        assert two.is_open(LANE)
        # Later failures (in-flight calls) go back to the queue and open nothing again.
        assert await two.failed(LANE, a_row(job.id, 2), REFUSED, time.monotonic())
        assert circuit(conn)["n_opened"] == 1
        # An answer to a call sent before the circuit opened (in flight at the outage's start) proves nothing.
        await one.succeeded(LANE, a_row(job.id, 4), sent_before_the_outage)
        assert circuit(conn)["state"] == "open"
        await two.succeeded(LANE, a_row(job.id, 3), time.monotonic())
        assert circuit(conn)["state"] == "closed"
        assert reason(conn, job.id) is None
        await one.poll_once()
        assert not one.is_open(LANE)
        for b in (one, two):
            await b.close()

    asyncio.run(scenario())
    # One event for the outage, sent through the job's webhook; the job was never paused.
    assert events(conn, job.id) == 1
    assert events(conn, job.id, "job.paused") == 0


def test_an_endpoint_error_opens_at_once_and_each_outage_fires_once_per_job(dsn: str, conn: psycopg.Connection) -> None:
    job = submit(dsn)
    other_lane = submit(dsn, model="gpt-4o")  # another model: another lane, never told

    async def scenario() -> None:
        one = breaker(dsn, threshold=5)
        assert await one.failed(LANE, a_row(job.id), NOT_FOUND, time.monotonic())
        assert "404" in (reason(conn, job.id) or "") and "http://sim/chat/completions" in (reason(conn, job.id) or "")
        await one.trip(LANE, "again")  # already open: no second event
        await one.succeeded(LANE, a_row(job.id), time.monotonic())
        assert await one.failed(LANE, a_row(job.id), NOT_FOUND, time.monotonic())  # a second outage: a second event
        await one.close()

    asyncio.run(scenario())
    assert events(conn, job.id) == 2
    assert events(conn, other_lane.id) == 0 and reason(conn, other_lane.id) is None
    assert circuit(conn)["n_opened"] == 2


def test_claim_skips_an_open_lane_and_one_worker_at_a_time_sends_its_probe(dsn: str, conn: psycopg.Connection) -> None:
    job = submit(dsn, rows=5)
    other = submit(dsn, rows=5, model="gpt-4o")

    async def scenario() -> None:
        from batchdb import queue

        started_one: list[ClaimedRequest] = []
        started_two: list[ClaimedRequest] = []
        one = breaker(dsn, "w1", started_one, base_backoff=0.01, max_backoff=0.01)
        two = breaker(dsn, "w2", started_two, base_backoff=0.01, max_backoff=0.01)
        await one.trip(LANE, "APIConnectionError: Connection error.")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            claimed = await queue.claim_batch(c, worker_id="w3", limit=100, lease_seconds=30)
        assert {r.job_id for r in claimed} == {other.id}  # the open lane's rows stay queued
        # Wait for the (tiny) first backoff in database time, then both workers try to probe.
        conn.execute(
            "SELECT pg_sleep(greatest(0, extract(epoch FROM next_probe_at - clock_timestamp())) + 0.01) "
            "FROM batchdb.circuits"
        )
        await asyncio.gather(one.poll_once(), two.poll_once())
        probes = started_one + started_two
        assert len(probes) == 1 and probes[0].job_id == job.id, probes
        prober = one if started_one else two
        state = circuit(conn)
        assert state["probe_owner"] == ("w1" if started_one else "w2")
        # A failed probe hands the row back (no attempt: the worker releases it) and backs off.
        assert await prober.failed(LANE, probes[0], REFUSED, time.monotonic())
        state = circuit(conn)
        assert state["state"] == "open" and state["probes_failed"] == 1 and state["probe_owner"] is None
        # A probe that succeeds closes the circuit for everyone.
        conn.execute(
            "SELECT pg_sleep(greatest(0, extract(epoch FROM next_probe_at - clock_timestamp())) + 0.01) "
            "FROM batchdb.circuits"
        )
        again = await prober.poll_once()
        assert len(again) == 1
        await prober.succeeded(LANE, again[0], time.monotonic())
        assert circuit(conn)["state"] == "closed"
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            claimed = await queue.claim_batch(c, worker_id="w3", limit=100, lease_seconds=30)
        assert {r.job_id for r in claimed} == {job.id}
        for b in (one, two):
            await b.close()

    asyncio.run(scenario())


def test_probe_backoff_doubles_up_to_the_cap(conn: psycopg.Connection) -> None:
    conn.execute("SELECT * FROM batchdb.circuit_open('openai', 'default', 'm', 'down', 2)")
    waits = []
    with conn.transaction():  # one transaction: now() is fixed, so the waits are exact
        for _ in range(6):
            waits.append(
                conn.execute(
                    "SELECT extract(epoch FROM batchdb.circuit_probe_failed('openai', 'default', 'm', 'down', 2, 20) "
                    "- now())::float AS s"
                ).fetchone()["s"]
            )
    assert waits == [4, 8, 16, 20, 20, 20]


# -- a real worker against the simulator ---------------------------------------------------------------


@pytest.fixture
def own_simulator() -> Iterator[SimulatorProcess]:
    with start_simulator(SimulatorConfig(seed=3)) as sim:
        yield sim


class Background:
    """A real worker in a thread of its own (its own event loop), stopped on exit."""

    def __init__(self, dsn: str, **config: Any) -> None:
        settings: dict[str, Any] = {
            "concurrency": 8,
            "poll_interval": 0.2,
            "retry": RetryPolicy(0.05, 0.2),
            "notifier": None,
            "lease_seconds": 30.0,
            "breaker": BreakerConfig(base_backoff=0.5, max_backoff=1.0, poll_interval=0.2),
        }
        settings.update(config)
        self.worker = Worker(WorkerConfig(dsn=dsn, **settings))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self.worker.run(),), daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self.worker.stop)
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "worker did not stop"
        self._loop.close()


def wait_until(what: str, check: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_an_outage_spends_no_attempts_and_the_job_finishes_by_itself(
    dsn: str, own_simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503s, then the provider process gone (connection refused), then back on the same port."""
    sim = own_simulator
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    sim.set_config(outage={"start_s": 0, "duration_s": None, "status": 503})
    job = submit(dsn, rows=200, max_attempts=2)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn, Background(dsn) as background:
        wait_until("the circuit to open", lambda: (circuit(conn) or {}).get("state") == "open")
        assert (reason(conn, job.id) or "").startswith("waiting: provider unavailable since")
        # Probes keep failing for a while: every 503 so far, then nothing listening at all.
        wait_until("two failed probes", lambda: circuit(conn)["probes_failed"] >= 2)
        port, config = sim.port, sim.config()
        sim.stop()
        wait_until("a refused probe", lambda: "Connection error" in (circuit(conn)["last_error"] or ""))
        assert job.status().status == "running"
        with start_simulator(config.updated({"outage": None}), port=port):
            final = job.wait(timeout=120)
        assert background.worker.completed == 200
        rows = conn.execute(
            "SELECT status, count(*) AS n, max(attempts) AS most, sum(attempts) AS total "
            "FROM batchdb.requests WHERE job_id = %s GROUP BY status",
            (job.id,),
        ).fetchall()
        state = circuit(conn)
    assert final.status == "completed" and final.n_succeeded == 200, rows
    assert [r["status"] for r in rows] == ["succeeded"]
    # Only the calls that failed before the circuit opened spent an attempt (threshold - 1 at most).
    assert rows[0]["total"] <= 200 + BreakerConfig().threshold - 1, rows
    assert state["state"] == "closed" and state["n_opened"] == 1
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        assert events(conn, job.id) == 1
        assert reason(conn, job.id) is None


@pytest.mark.slow
def test_a_base_url_without_v1_leaves_the_job_waiting_with_the_url_then_a_fixed_worker_finishes_it(
    dsn: str, own_simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = own_simulator
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)  # no /v1: every call is a 404
    job = submit(dsn, rows=30)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        with Background(dsn):
            wait_until("the circuit to open", lambda: (circuit(conn) or {}).get("state") == "open")
            wait_until("a failed probe", lambda: circuit(conn)["probes_failed"] >= 1)
        text = reason(conn, job.id) or ""
        assert text.startswith("waiting: provider unavailable since"), text
        assert f"{sim.base_url}/chat/completions" in text and "404" in text and "/v1" in text, text
        assert "sk-test" not in text
        counts = conn.execute(
            "SELECT count(*) FILTER (WHERE status IN ('failed', 'dead')) AS bad, "
            "sum(attempts) AS attempts FROM batchdb.requests WHERE job_id = %s",
            (job.id,),
        ).fetchone()
        assert counts == {"bad": 0, "attempts": 0}, counts
        monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
        with Background(dsn):
            final = job.wait(timeout=120)
    assert final.status == "completed" and final.n_succeeded == 30


# -- a refused key: the circuit opens (no pause), a good key closes it with no command -----------------


KEY_LANES = {
    "openai": (LANE, "OPENAI_API_KEY", "OpenAI refused the API key (401 invalid_api_key) at "),
    "gemini": (
        Lane("gemini", "default", "gemini-2.5-flash"),
        "GEMINI_API_KEY",
        "Gemini refused the API key (400 API_KEY_INVALID)",
    ),
}


def lane_circuit(conn: psycopg.Connection, lane: Lane) -> dict[str, Any] | None:
    return conn.execute(
        "SELECT * FROM batchdb.circuits WHERE provider = %s AND key_alias = %s AND model = %s",
        (lane.provider, lane.key_alias, lane.model),
    ).fetchone()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("provider", "fix"),
    [("openai", "restart the worker with the rotated key"), ("gemini", "the provider accepts the key again")],
)
def test_a_refused_key_opens_the_circuit_at_once_and_a_good_key_finishes_the_job_with_no_command(
    dsn: str, own_simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch, provider: str, fix: str
) -> None:
    """A refused key (401 / Gemini's API_KEY_INVALID) is the lane's fault, not the account's: the job
    keeps running, waiting, with the refusal as its reason; no attempt is spent; and once a call with
    a good key is possible (the operator rotated the key and restarted the worker, or the provider
    took the key back) the breaker's probe finds out and the job completes with nobody typing
    `batchdb resume`. The threshold is set out of reach: only the refusal itself can open the circuit."""
    sim = own_simulator
    lane, key_env, refusal = KEY_LANES[provider]
    sim.set_config(api_keys=("sk-rotated-good",), latency_s={"kind": "fixed", "value": 0.01})
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("GEMINI_BASE_URL", sim.gemini_base_url)
    monkeypatch.setenv(key_env, "sk-stale-refused-Zq8")
    job = submit(dsn, rows=20, provider=provider, model=lane.model)
    breaker_config = BreakerConfig(threshold=1000, base_backoff=0.5, max_backoff=1.0, poll_interval=0.2)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        with Background(dsn, concurrency=1, breaker=breaker_config):
            wait_until("the circuit to open", lambda: (lane_circuit(conn, lane) or {}).get("state") == "open")
            # Probes with the refused key keep failing; nothing pauses the job meanwhile.
            wait_until("a failed probe", lambda: lane_circuit(conn, lane)["probes_failed"] >= 1)
            assert job.status().status == "running"
        state = lane_circuit(conn, lane)
        refused_calls = sim.stats(series=False)["outcomes"].get("client_error", 0)
        # The first refusal opened it (threshold 1000); then only probes (one maybe in flight at the stop).
        assert 1 + state["probes_failed"] <= refused_calls <= 2 + state["probes_failed"], (refused_calls, state)
        assert state["n_opened"] == 1 and refusal in state["last_error"], state
        status = job.status()
        assert status.status == "running", status
        text = status.status_reason or ""
        assert text.startswith("waiting: provider unavailable since ") and refusal in text, text
        assert "stale-refused" not in text  # at most the provider's own mask, "sk-*****" and the last four
        counts = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'queued') AS queued, sum(attempts) AS attempts "
            "FROM batchdb.requests WHERE job_id = %s",
            (job.id,),
        ).fetchone()
        assert counts == {"queued": 20, "attempts": 0}, counts
        assert events(conn, job.id) == 1
        assert events(conn, job.id, "job.paused") == events(conn, job.id, "job.quota_exhausted") == 0

        if fix.startswith("restart"):
            monkeypatch.setenv(key_env, "sk-rotated-good")
        else:
            sim.set_config(api_keys=("sk-rotated-good", "sk-stale-refused-Zq8"))
        with Background(dsn, breaker=breaker_config):
            final = job.wait(timeout=120)
        state = lane_circuit(conn, lane)
        attempts = conn.execute(
            "SELECT sum(attempts) AS n FROM batchdb.requests WHERE job_id = %s", (job.id,)
        ).fetchone()["n"]
        assert final.status == "completed" and final.n_succeeded == 20, final
        assert attempts == 20  # one each: the refused calls spent none
        assert state["state"] == "closed" and state["n_opened"] == 1, state
        assert events(conn, job.id) == 1 and reason(conn, job.id) is None
        assert events(conn, job.id, "job.paused") == 0
