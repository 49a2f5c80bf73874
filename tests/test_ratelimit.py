"""The shared ledger end to end: worker processes, the simulator's own record, the real SDKs."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import openai
import pandas as pd
import psycopg
import pytest
from psycopg import sql

import batchdb
from batchdb import ledger
from batchdb.simulator.config import Distribution, LimitRule, Limits, Outage, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator
from batchdb.workers.processes import WorkerProcesses, start_workers

pytestmark = pytest.mark.slow

MODEL = "gpt-4o-mini"
LANE = ledger.Lane("openai", "default", MODEL)
VERBOSE_WORKER = (sys.executable, "-m", "batchdb", "-vv", "worker")


def start_logged_workers(n: int, dsn: str, env: dict[str, str], log_dir: Path, *args: str) -> WorkerProcesses:
    """`batchdb -vv worker` processes with their logs in `log_dir` (a full pipe would stall them)."""
    return start_workers(n, dsn, env=env, args=args, log_dir=log_dir, command=VERBOSE_WORKER)


def headlines(n: int, words: int = 12) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [" ".join(f"word{(i * 7 + j) % 97}" for j in range(words)) + f" #{i}" for i in range(n)]}
    )


def per_second(stats: dict, field: str) -> list[int]:
    totals: dict[int, int] = defaultdict(int)
    for point in stats["series"]:
        totals[point["t"]] += point[field]
    return [totals.get(t, 0) for t in range(max(totals, default=-1) + 1)]


def max_window(series: list[int], width: int = 60) -> int:
    return max((sum(series[i : i + width]) for i in range(max(1, len(series) - width + 1))), default=0)


@pytest.fixture
def sim_factory() -> Iterator:
    started: list[SimulatorProcess] = []

    def start(**config: object) -> SimulatorProcess:
        defaults = {
            "seed": 5,
            "latency_s": Distribution(kind="uniform", low=0.2, high=1.0),
            "output_tokens": Distribution(kind="uniform", low=10, high=60),
        }
        sim = start_simulator(SimulatorConfig(**{**defaults, **config}))  # type: ignore[arg-type]
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


def openai_env(sim: SimulatorProcess, key: str = "sk-test") -> dict[str, str]:
    return {"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": key}


def test_four_workers_together_stay_inside_rpm_and_tpm(
    dsn: str,
    conn: psycopg.Connection,
    sim_factory,
    tmp_path: Path,
) -> None:
    sim = sim_factory(default_limits=Limits(rpm=600, tpm=60_000))
    ledger.set_limits(conn, LANE, rpm=600, tpm=60_000)
    # ~29 prompt tokens + max_tokens 80 = ~109 tokens a call: TPM binds at ~9.2 calls/s, RPM at 10.
    job = batchdb.submit(
        headlines(640), prompt="Classify: {text}", model=MODEL, provider="openai", max_tokens=80, dsn=dsn
    )
    workers = start_logged_workers(4, dsn, openai_env(sim), tmp_path, "--concurrency", "16")
    try:
        final = job.wait(timeout=150)
    finally:
        codes = workers.stop()
    assert codes == [0, 0, 0, 0]
    assert (final.status, final.n_succeeded) == ("completed", 640)
    stats = sim.stats()
    admitted, charged = per_second(stats, "admitted"), per_second(stats, "charged_tokens")
    assert len(admitted) >= 60
    # The provider's own record: no 60-second window over either limit ...
    assert max_window(admitted) <= 600
    assert max_window(charged) <= 60_000
    # ... near-zero 429s, and the binding limit (TPM) well used once started.
    totals = stats["totals"]
    assert totals["rate_limited"] <= 0.005 * totals["requests"] + 1, totals
    # Counted from the simulator's first admitted call, not from its start: workers start late on a busy machine.
    first = next(t for t, n in enumerate(admitted) if n)
    steady = sum(charged[first + 5 : first + 65]) / 60_000
    assert steady >= 0.90, f"used {steady:.1%} of TPM in seconds 5-65 after the first call (second {first})"


def test_another_client_spending_half_the_key_behind_our_back(
    dsn: str,
    conn: psycopg.Connection,
    sim_factory,
    tmp_path: Path,
) -> None:
    sim = sim_factory(default_limits=Limits(rpm=600))
    ledger.set_limits(conn, LANE, rpm=600)
    stop = threading.Event()
    rival = {"ok": 0, "429": 0}
    rival_answered: list[float] = []  # time.monotonic() of each of the rival's answered calls

    def spend_half() -> None:
        async def run() -> None:
            client = openai.AsyncOpenAI(api_key="sk-test", base_url=sim.openai_base_url, max_retries=0)
            calls: set[asyncio.Task[None]] = set()

            async def one() -> None:
                try:
                    await client.chat.completions.create(
                        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}]
                    )
                    rival["ok"] += 1
                    rival_answered.append(time.monotonic())
                except openai.RateLimitError:
                    rival["429"] += 1

            while not stop.is_set():
                task = asyncio.create_task(one())
                calls.add(task)
                task.add_done_callback(calls.discard)
                await asyncio.sleep(0.2)  # 5 calls/s: half of 600 RPM
            await asyncio.gather(*calls, return_exceptions=True)
            await client.close()

        asyncio.run(run())

    thread = threading.Thread(target=spend_half)
    thread.start()
    job = batchdb.submit(
        headlines(2000), prompt="Classify: {text}", model=MODEL, provider="openai", max_tokens=20, dsn=dsn
    )
    workers = start_logged_workers(2, dsn, openai_env(sim), tmp_path, "--concurrency", "16")
    window_s = 20.0
    try:
        # Measure once the workers are under way (they start slowly on a busy machine), over a
        # window whose ends are read from the database: rows finished inside it are ours.
        deadline = time.monotonic() + 120
        while job.status().n_succeeded == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(5)  # the ledger learns the rival is there
        with psycopg.connect(dsn) as c:
            window_start = c.execute("SELECT clock_timestamp()").fetchone()[0]
        started = time.monotonic()
        time.sleep(window_s)
        with psycopg.connect(dsn) as c:
            window_end = c.execute("SELECT clock_timestamp()").fetchone()[0]
        ended = time.monotonic()
    finally:
        workers.stop()
        stop.set()
        thread.join()
    status = job.status()
    with psycopg.connect(dsn) as c:
        attempts, ours = c.execute(
            "SELECT coalesce(sum(attempts), 0), count(*) FILTER (WHERE status = 'succeeded' AND finished_at >= %s "
            "AND finished_at < %s) FROM batchdb.requests WHERE job_id = %s",
            (window_start, window_end, job.id),
        ).fetchone()
    our_rate = ours / (window_end - window_start).total_seconds()
    rival_rate = sum(1 for t in rival_answered if started <= t < ended) / (ended - started)
    # batchdb settled near what the other client left it of the key's 10 calls/s (about half) ...
    assert our_rate >= 3.5, (our_rate, rival_rate, rival)
    assert our_rate + rival_rate <= 10 * 1.1, (our_rate, rival_rate, rival)  # never more than it left
    # ... and rarely ran into the limit doing so.
    assert status.n_retries <= 0.03 * attempts, (status.n_retries, attempts)
    with psycopg.connect(dsn) as c:
        pace = c.execute("SELECT pace FROM batchdb.rate_limits").fetchone()[0]
    assert pace < 0.9


def test_outage_is_ridden_out_with_backoff(dsn: str, conn: psycopg.Connection, sim_factory, tmp_path: Path) -> None:
    # The outage runs until the test ends it, 6 s after the workers first ran into it: timed from what
    # the workers saw, not from the simulator's start (workers start late on a busy machine).
    sim = sim_factory(latency_s=Distribution(kind="fixed", value=0.05), outage=Outage(start_s=0.0, duration_s=None))
    job = batchdb.submit(
        headlines(400), prompt="{text}", model=MODEL, provider="openai", max_tokens=10, max_attempts=8, dsn=dsn
    )
    workers = start_logged_workers(2, dsn, openai_env(sim), tmp_path, "--concurrency", "8")
    try:
        deadline = time.monotonic() + 120
        while sim.stats(series=False)["outcomes"].get("outage", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(6.0)
        sim.set_config(outage=None)
        final = job.wait(timeout=120)
    finally:
        workers.stop()
    assert (final.status, final.n_succeeded, final.n_dead) == ("completed", 400, 0)
    assert sim.stats(series=False)["outcomes"]["outage"] > 0
    assert final.n_retries > 0


def test_insufficient_quota_pauses_the_job_without_spending_retries(dsn: str, sim_factory, tmp_path: Path) -> None:
    sim = sim_factory(quota_exhausted_keys=("sk-empty",))
    job = batchdb.submit(headlines(200), prompt="{text}", model=MODEL, provider="openai", max_tokens=10, dsn=dsn)
    workers = start_logged_workers(1, dsn, openai_env(sim, "sk-empty"), tmp_path, "--concurrency", "8")
    try:
        final = job.wait(timeout=60, until="paused")
    finally:
        workers.stop()
    assert final.status == "paused" and "insufficient_quota" in (final.status_reason or "")
    with psycopg.connect(dsn) as c:
        spent = c.execute(
            "SELECT sum(attempts), count(*) FILTER (WHERE status = 'queued') FROM batchdb.requests WHERE job_id = %s",
            (job.id,),
        ).fetchone()
    assert spent == (0, 200)
    assert sim.stats(series=False)["totals"]["requests"] <= 8


def test_gemini_daily_quota_pauses_the_job(dsn: str, sim_factory, tmp_path: Path) -> None:
    sim = sim_factory(
        limits=(LimitRule(model="gemini-2.5-flash", rpd=5),), latency_s=Distribution(kind="fixed", value=0.01)
    )
    job = batchdb.submit(
        headlines(20), prompt="{text}", model="gemini-2.5-flash", provider="gemini", max_tokens=10, dsn=dsn
    )
    workers = start_logged_workers(
        1, dsn, {"GEMINI_BASE_URL": sim.gemini_base_url, "GEMINI_API_KEY": "gm-test"}, tmp_path, "--concurrency", "1"
    )
    try:
        assert job.wait(timeout=60, until="paused").status == "paused"
    finally:
        workers.stop()  # graceful: outcomes still being batched are written first
    final = job.status()
    assert final.status == "paused" and "daily" in (final.status_reason or "").lower(), final
    assert final.n_succeeded == 5
    with psycopg.connect(dsn) as c:
        queued_attempts = c.execute(
            "SELECT sum(attempts) FROM batchdb.requests WHERE job_id = %s AND status = 'queued'", (job.id,)
        ).fetchone()[0]
    assert queued_attempts == 0


def test_api_keys_never_reach_the_database_or_logs(
    dsn: str,
    conn: psycopg.Connection,
    sim_factory,
    tmp_path: Path,
) -> None:
    canary = "sk-CANARY-7f3a9b2c4d5e6f"
    good = sim_factory(latency_s=Distribution(kind="fixed", value=0.01))
    refusing = sim_factory(api_keys=("sk-only-this-one",))
    ok_job = batchdb.submit(headlines(30), prompt="{text}", model=MODEL, provider="openai", max_tokens=10, dsn=dsn)
    workers = start_logged_workers(1, dsn, openai_env(good, canary), tmp_path, "--concurrency", "4")
    try:
        assert ok_job.wait(timeout=60).status == "completed"
    finally:
        workers.stop()
    refused_job = batchdb.submit(headlines(5), prompt="{text}", model=MODEL, provider="openai", max_tokens=10, dsn=dsn)
    (tmp_path / "refused").mkdir()
    workers2 = start_logged_workers(1, dsn, openai_env(refusing, canary), tmp_path / "refused", "--concurrency", "1")
    try:
        # A refused key opens the lane's circuit: the job keeps running, waiting, with the refusal as its reason.
        deadline = time.monotonic() + 60
        while not ((refused := refused_job.status()).status_reason or "").startswith("waiting: provider unavailable"):
            assert refused.status == "running" and time.monotonic() < deadline, refused
            time.sleep(0.2)
    finally:
        workers2.stop()
    reason = refused.status_reason or ""
    assert refused.status == "running" and "401 invalid_api_key" in reason, reason
    tables = [
        r["table_name"]
        for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'batchdb'"
        ).fetchall()
    ]
    for table in tables:
        statement = sql.SQL("SELECT coalesce(string_agg(t::text, ' '), '') AS d FROM batchdb.{} t").format(
            sql.Identifier(table)
        )
        dump = conn.execute(statement).fetchone()["d"]
        assert canary not in dump, table
        assert canary[:12] not in dump, table
    logs = workers.log_text() + workers2.log_text()
    assert " DEBUG " in logs  # the logs are real, at debug level, and hold the refusal
    assert "circuit openai/default/gpt-4o-mini opened: OpenAI refused the API key" in workers2.log_text()
    assert canary not in logs and canary[3:15] not in logs
