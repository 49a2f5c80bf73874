"""Several real worker processes against real PostgreSQL and the provider simulator over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pandas as pd
import psycopg
import pytest

import batchdb
from batchdb.simulator.config import Distribution, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator
from batchdb.workers.processes import WorkerProcesses, start_workers
from bench import write_audit

pytestmark = pytest.mark.slow


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    config = SimulatorConfig(
        seed=1,
        latency_s=Distribution(kind="uniform", low=0.01, high=0.05),
        output_tokens=Distribution(kind="uniform", low=3, high=12),
    )
    with start_simulator(config) as sim:
        yield sim


def start_openai_workers(n: int, dsn: str, sim: SimulatorProcess, *args: str) -> WorkerProcesses:
    return start_workers(n, dsn, env={"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": "sk-test"}, args=args)


def submit_rows(dsn: str, n: int) -> batchdb.Job:
    write_audit.install(dsn)  # completions are counted from the writes (assert_exactly_once)
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(n)], "text": [f"headline number {i}" for i in range(n)]})
    return batchdb.submit(
        frame,
        prompt="Sentiment: {text}",
        id_column="key",
        model="gpt-4o-mini",
        provider="openai",
        max_tokens=16,
        dsn=dsn,
    )


def assert_exactly_once(dsn: str, job: batchdb.Job, rows: int) -> None:
    status = job.status()
    assert (status.status, status.n_succeeded, status.n_total) == ("completed", rows, rows)
    with psycopg.connect(dsn) as conn:
        results, overwritten = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE writes > 1) FROM batchdb.results WHERE job_id = %s", (job.id,)
        ).fetchone()
        audited = write_audit.writes(conn, job.id)
        tokens = conn.execute(
            "SELECT sum(prompt_tokens), sum(completion_tokens), sum(cost_usd) FROM batchdb.requests WHERE job_id = %s",
            (job.id,),
        ).fetchone()
    assert results == rows and overwritten == 0
    # Counted from the writes: each row written succeeded once and its result written once.
    assert audited.violations == [], audited
    assert audited.final_writes == audited.result_writes == rows, audited
    assert (status.prompt_tokens, status.completion_tokens, status.cost_usd) == tokens
    assert status.cost_usd > 0


@pytest.mark.timeout(900)
def test_four_worker_processes_drain_20000_rows_exactly_once(dsn: str, simulator: SimulatorProcess) -> None:
    rows = 20_000
    job = submit_rows(dsn, rows)
    workers = start_openai_workers(4, dsn, simulator, "--concurrency", "32")
    try:
        final = job.wait(timeout=780)  # ~1 min on a quiet machine; 230 s measured with the machine loaded
    finally:
        codes = workers.stop()
    assert codes == [0, 0, 0, 0]
    assert final.status == "completed"
    assert_exactly_once(dsn, job, rows)
    served = simulator.stats(series=False)["totals"]
    # Every accepted provider call became exactly one recorded result: no duplicate calls.
    assert served["accepted"] == rows
    with psycopg.connect(dsn) as conn:
        per_worker = conn.execute("SELECT n_completed FROM batchdb.workers ORDER BY id").fetchall()
    assert len(per_worker) == 4 and sum(n for (n,) in per_worker) == rows
    assert all(n > 0 for (n,) in per_worker)


def test_sigkilled_worker_loses_nothing(dsn: str, simulator: SimulatorProcess) -> None:
    rows = 2000
    simulator.set_config(latency_s={"kind": "uniform", "low": 0.2, "high": 0.4})
    job = submit_rows(dsn, rows)
    workers = start_openai_workers(2, dsn, simulator, "--concurrency", "32", "--lease-seconds", "6")
    try:
        deadline = time.monotonic() + 60
        while job.status().n_done < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = workers.kill(workers.processes[0])
        with psycopg.connect(dsn) as conn:
            # What the dead worker still held: nobody can touch these rows until their lease runs out.
            in_flight = conn.execute(
                "SELECT count(*) FROM batchdb.requests WHERE status = 'running' AND lease_owner LIKE %s",
                (f"%:{victim.pid}:%",),
            ).fetchone()[0]
        final = job.wait(timeout=180)
    finally:
        workers.stop()
    assert in_flight > 0
    assert final.status == "completed"
    assert_exactly_once(dsn, job, rows)
    with psycopg.connect(dsn) as conn:
        reclaimed = conn.execute(
            "SELECT count(*) FROM batchdb.requests WHERE job_id = %s AND attempts > 1", (job.id,)
        ).fetchone()[0]
    assert 0 < reclaimed <= in_flight
    duplicates = simulator.stats(series=False)["totals"]["accepted"] - rows
    # Calls repeated after the crash are bounded by the rows the dead worker held.
    assert 0 <= duplicates <= in_flight
