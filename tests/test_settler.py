"""Every ledger reservation settles, whatever the call's outcome (workers/settler.py).

A call refused without running gives its tokens back at once; a 429, a 5xx or a
timeout keeps them (the providers count a call on arrival; docs/ratelimits.md).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Iterator

import pandas as pd
import psycopg
import pytest

import batchdb
from batchdb.ledger import Lane
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.openai import OpenAIProvider
from batchdb.simulator.config import SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator
from batchdb.workers.connection import Reconnecting
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.settler import Settler, never_sent, tokens_to_give_back
from batchdb.workers.worker import Worker, WorkerConfig

LANE = Lane("instant", "default", "gpt-4o-mini")
# ~20,000 prompt tokens against a 6,000 TPM lane: a refill of 99 tokens/s would need ~200 s.
BIG = "word " * 20_000


def refused_before_sending() -> ProviderError:
    """As an adapter raises it: `raise ProviderError(...) from None` inside the SDK's except block."""
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            raise ProviderError(ErrorKind.TRANSIENT, "APIConnectionError: Connection error.") from None
    except ProviderError as exc:
        return exc


def failed_with(error: ProviderError) -> ProviderError:
    """A ProviderError raised from inside an except block, as the adapters raise them (context kept)."""
    try:
        raise error
    except ProviderError as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "back"),
    [
        (ProviderError(ErrorKind.PERMANENT, "context_length_exceeded", status_code=400), 1000),
        (ProviderError(ErrorKind.QUOTA_EXHAUSTED, "invalid key", status_code=401), 1000),
        (ProviderError(ErrorKind.QUOTA_EXHAUSTED, "forbidden", status_code=403), 1000),
        (ProviderError(ErrorKind.PERMANENT, "model not found", status_code=404), 1000),
        (ProviderError(ErrorKind.PERMANENT, "request too large", status_code=413), 1000),
        (ProviderError(ErrorKind.RATE_LIMITED, "rate limited", status_code=429), 0),
        (ProviderError(ErrorKind.TRANSIENT, "server error", status_code=500), 0),
        (ProviderError(ErrorKind.TRANSIENT, "overloaded", status_code=503), 0),
        (ProviderError(ErrorKind.TRANSIENT, "no answer within 120s"), 0),
        (TimeoutError(), 0),
    ],
)
def test_what_a_failed_call_gives_back(error: BaseException, back: int) -> None:
    assert tokens_to_give_back(error, 1000) == back


def test_a_connection_refused_before_sending_gives_everything_back() -> None:
    error = refused_before_sending()
    assert never_sent(error) and tokens_to_give_back(error, 1000) == 1000


def test_the_real_sdk_shows_a_refused_connection_as_never_sent() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = OpenAIProvider(api_key="sk-test", base_url=f"http://127.0.0.1:{port}/v1", timeout=5)

    async def call() -> ProviderError:
        try:
            await provider.complete(ChatRequest(messages=[{"role": "user", "content": "hi"}], model="gpt-4o-mini"))
        except ProviderError as exc:
            return exc
        finally:
            await provider.aclose()
        raise AssertionError("the call went through")

    error = asyncio.run(call())
    assert error.kind is ErrorKind.TRANSIENT
    assert tokens_to_give_back(error, 500) == 500


def test_settle_capacity_gives_back_up_to_the_burst_and_takes_without_floor(dsn: str, conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm, token_credit, refilled_at) "
        "VALUES ('instant', 'gpt-4o-mini', 600, 6000, -20000, clock_timestamp())"
    )

    async def settle(tokens: int) -> None:
        settler = Settler(Reconnecting(dsn, name="settle-test"))
        settler.give_back(LANE, tokens)
        await settler.close()

    asyncio.run(settle(19_000))
    credit = conn.execute("SELECT token_credit FROM batchdb.rate_limits").fetchone()["token_credit"]
    assert credit == pytest.approx(-1000)
    asyncio.run(settle(50_000))  # capped at the burst: 6000/60 * 0.99 * 0.5 = 49.5 tokens
    credit = conn.execute("SELECT token_credit FROM batchdb.rate_limits").fetchone()["token_credit"]
    assert credit == pytest.approx(49.5)
    asyncio.run(settle(-300))
    credit = conn.execute("SELECT token_credit FROM batchdb.rate_limits").fetchone()["token_credit"]
    assert credit == pytest.approx(-250.5)


class FailingProvider:
    """Raises the given error for the big prompt; answers anything else."""

    name = "instant"

    def __init__(self, error: ProviderError) -> None:
        self.error = error
        self.calls: Counter[str] = Counter()

    async def complete(self, request: ChatRequest) -> ChatResponse:
        prompt = request.messages[-1]["content"]
        self.calls["big" if len(prompt) > 1000 else prompt] += 1
        if len(prompt) > 1000:
            raise failed_with(self.error) if self.error.__context__ is None else self.error
        return ChatResponse(text="ok", finish_reason="stop", prompt_tokens=5, completion_tokens=1, model=request.model)

    async def aclose(self) -> None:
        return None


def run_big_row(dsn: str, conn: psycopg.Connection, error: ProviderError) -> tuple[float, int]:
    """One ~20k-token row on a 6,000 TPM lane whose call fails with `error`: the lane's token credit as the
    ledger last wrote it (reservation or settlement) and its tokens granted."""
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm) VALUES ('instant', 'gpt-4o-mini', 600, 6000)"
    )
    batchdb.submit(
        pd.DataFrame({"text": [BIG]}),
        prompt="{text}",
        model="gpt-4o-mini",
        provider="instant",
        max_tokens=10,
        max_attempts=1,
        dsn=dsn,
    )
    provider = FailingProvider(error)
    worker = Worker(
        WorkerConfig(dsn=dsn, concurrency=2, exit_when_idle=True, poll_interval=0.3, retry=RetryPolicy(0.05, 0.2)),
        providers={"instant": provider},
    )  # type: ignore[dict-item]
    asyncio.run(worker.run())
    assert provider.calls["big"] == 1
    row = conn.execute("SELECT token_credit, tokens_granted FROM batchdb.rate_limits").fetchone()
    return float(row["token_credit"]), row["tokens_granted"]


@pytest.mark.parametrize(
    "error",
    [
        ProviderError(ErrorKind.PERMANENT, "BadRequestError (context_length_exceeded): too long", status_code=400),
        ProviderError(ErrorKind.QUOTA_EXHAUSTED, "AuthenticationError: invalid key", status_code=401),
        ProviderError(ErrorKind.PERMANENT, "NotFoundError: no such model", status_code=404),
        ProviderError(ErrorKind.PERMANENT, "request entity too large", status_code=413),
        refused_before_sending(),
    ],
    ids=["400-context-length", "401", "404", "413", "connection-refused"],
)
def test_a_call_refused_without_running_gives_its_tokens_back(
    dsn: str, conn: psycopg.Connection, error: ProviderError
) -> None:
    credit, granted = run_big_row(dsn, conn, error)
    # Without the give-back the lane sat ~20,000 tokens in debt (200 s of refill at this TPM).
    assert credit > -1000, credit
    assert granted < 1000  # the ledger's total no longer counts the refused call


@pytest.mark.parametrize(
    "error",
    [
        ProviderError(ErrorKind.TRANSIENT, "InternalServerError: boom", status_code=500),
        ProviderError(ErrorKind.TRANSIENT, "ServiceUnavailable", status_code=503),
        ProviderError(ErrorKind.RATE_LIMITED, "RateLimitError", status_code=429, retry_after=0.1),
    ],
    ids=["500", "503", "429"],
)
def test_a_call_the_provider_admitted_keeps_its_charge(
    dsn: str, conn: psycopg.Connection, error: ProviderError
) -> None:
    credit, _ = run_big_row(dsn, conn, error)
    assert credit < -10_000, credit  # counted on arrival, as the providers do


# -- the scenario end to end: simulator, real SDK, a worker ---------------------------------


@pytest.fixture
def small_window_simulator() -> Iterator[SimulatorProcess]:
    """gpt-4o-mini refuses prompts over 30,000 tokens here although batchdb.prices says 128,000 (a window
    that changed, a proxy in front): the worker sends the row and the provider answers 400."""
    with start_simulator(SimulatorConfig(seed=3, context_windows={"gpt-4o-mini": 30_000})) as sim:
        yield sim


@pytest.mark.slow
def test_one_refused_huge_row_does_not_freeze_its_key_or_starve_another_model(
    dsn: str, conn: psycopg.Connection, small_window_simulator: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", small_window_simulator.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # 120,000 TPM: 1,980 tokens/s; the ~50,000-token row would leave the lane ~48,000 in debt (~25 s).
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm) VALUES ('openai', 'gpt-4o-mini', 6000, 120000)"
    )
    huge = " ".join(f"word{i % 50} lorem" for i in range(25_000))
    mini = batchdb.submit(
        pd.DataFrame({"text": [huge] + [f"row {i}" for i in range(20)]}),
        prompt="{text}",
        model="gpt-4o-mini",
        max_tokens=20,
        dsn=dsn,
    )
    other = batchdb.submit(
        pd.DataFrame({"text": [f"other {i}" for i in range(20)]}),
        prompt="{text}",
        model="gpt-4.1-mini",
        max_tokens=20,
        dsn=dsn,
    )
    started = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
    worker = Worker(
        WorkerConfig(dsn=dsn, concurrency=4, exit_when_idle=True, poll_interval=0.3, retry=RetryPolicy(0.05, 0.2))
    )
    asyncio.run(worker.run())
    jobs = {r["id"]: r for r in conn.execute("SELECT id, n_succeeded, n_failed, finished_at FROM batchdb.jobs")}
    assert (jobs[mini.id]["n_succeeded"], jobs[mini.id]["n_failed"]) == (20, 1)
    assert jobs[other.id]["n_succeeded"] == 20
    error = conn.execute(
        "SELECT error FROM batchdb.requests WHERE job_id = %s AND status = 'failed'", (mini.id,)
    ).fetchone()["error"]
    assert "context_length_exceeded" in error
    # The refused row's ~50,000 tokens came back: neither job waited the ~25 s a debt of that size
    # takes to refill (measured in database time), and the lane is not in debt.
    debt_refill_s = 48_000 / (120_000 / 60 * 0.99)
    took = max(j["finished_at"] for j in jobs.values()) - started
    assert took.total_seconds() < debt_refill_s / 2, took
    credit = conn.execute("SELECT token_credit FROM batchdb.rate_limits").fetchone()["token_credit"]
    assert credit > -2000, credit
    assert conn.execute("SELECT state FROM batchdb.lane_states").fetchone()["state"] == "ready"
