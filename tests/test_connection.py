"""A worker's server connections (workers/connection.py): 3 at most, whatever its concurrency,
and a pool that heals when the server kills its connections mid-job, losing nothing."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import psycopg
import pytest
from test_notifications import Receiver

import batchdb
from batchdb.providers.openai import OpenAIProvider
from batchdb.simulator.config import Distribution
from batchdb.workers.connection import Database, Listener
from batchdb.workers.notifier import NotifierConfig
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig

# The worker's own connections: its pool and its listener carry "<pid>:<end of worker id>".
WORKER_BACKENDS = """
SELECT pid, application_name FROM pg_stat_activity
 WHERE datname = current_database() AND application_name LIKE %s AND application_name LIKE 'batchdb-%%'
"""


def tag_of(worker: Worker) -> str:
    """What the worker's application_names end with (workers/worker.py)."""
    return worker.id.rsplit(":", 2)[1] + ":" + worker.id.rsplit(":", 1)[1]


@dataclass
class Census:
    """The worker's backends, sampled every 20 ms from another thread for the whole run."""

    most_at_once: int = 0
    pids: set[int] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    samples: int = 0


@contextmanager
def census(dsn: str, tag: Callable[[], str | None]) -> Iterator[Census]:
    seen = Census()
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                current = tag()
                if current is not None:
                    rows = conn.execute(WORKER_BACKENDS, (f"%{current}",)).fetchall()
                    seen.most_at_once = max(seen.most_at_once, len(rows))
                    seen.pids.update(pid for pid, _ in rows)
                    seen.names.update(name for _, name in rows)
                    seen.samples += 1
                stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def submit(dsn: str, rows: int) -> batchdb.Job:
    frame = pd.DataFrame({"text": [f"headline {i}" for i in range(rows)]})
    return batchdb.submit(frame, prompt="{text}", model="gpt-4o-mini", provider="openai", max_tokens=8, dsn=dsn)


def worker_for(dsn: str, sim, **config: object) -> Worker:
    provider = OpenAIProvider(api_key="sk-test", base_url=sim.openai_base_url, timeout=30)
    settings = {"poll_interval": 0.2, "retry": RetryPolicy(0.05, 0.2), "exit_when_idle": True, **config}
    return Worker(WorkerConfig(dsn=dsn, **settings), providers={"openai": provider})  # type: ignore[arg-type]


def assert_every_row_recorded_once(conn: psycopg.Connection, job: batchdb.Job, rows: int) -> None:
    status = conn.execute("SELECT status, n_total, n_succeeded FROM batchdb.jobs WHERE id = %s", (job.id,)).fetchone()
    assert (status["status"], status["n_total"], status["n_succeeded"]) == ("completed", rows, rows)
    results = conn.execute(
        "SELECT count(*) AS n, count(DISTINCT request_id) AS distinct_rows FROM batchdb.results WHERE job_id = %s",
        (job.id,),
    ).fetchone()
    assert results["n"] == results["distinct_rows"] == rows


def test_a_worker_at_concurrency_256_with_a_notifier_uses_at_most_3_connections(
    conn: psycopg.Connection, dsn: str, simulator
) -> None:
    rows = 1500
    sim = simulator(latency_s=Distribution(kind="uniform", low=0.05, high=0.3))
    job = submit(dsn, rows)

    async def scenario() -> tuple[Census, int]:
        async with Receiver() as receiver:
            # The job's webhook: its 'completed' event goes through the notifier, on the same 3 connections.
            conn.execute(
                "INSERT INTO batchdb.notification_targets (job_id, channel, target, secret) "
                "VALUES (%s, 'webhook', %s, 'test-secret-0123456789')",
                (job.id, receiver.url),
            )
            worker = worker_for(dsn, sim, concurrency=256, notifier=NotifierConfig(smtp=None, poll_interval=0.2))
            with census(dsn, lambda: tag_of(worker)) as seen:
                run = asyncio.create_task(worker.run())
                deadline = time.monotonic() + 120
                while not receiver.requests:
                    assert time.monotonic() < deadline, "the job's webhook never arrived"
                    assert not run.done(), "the worker stopped before the webhook arrived"
                    await asyncio.sleep(0.05)
                await asyncio.wait_for(run, 120)
            return seen, len(receiver.requests)

    seen, webhooks = asyncio.run(scenario())
    assert_every_row_recorded_once(conn, job, rows)
    assert webhooks >= 1
    assert seen.samples > 10
    assert seen.most_at_once <= 3, seen
    assert len(seen.pids) <= 3, seen  # the same connections throughout: none opened per service or per call
    assert {name.split(" ")[0] for name in seen.names} == {"batchdb-worker", "batchdb-listen"}


def test_the_pool_heals_after_each_connection_is_terminated_mid_job(
    conn: psycopg.Connection, dsn: str, simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rows = 600
    sim = simulator(latency_s=Distribution(kind="uniform", low=0.05, high=0.2))
    job = submit(dsn, rows)

    async def scenario() -> tuple[list[int], int]:
        # A short lease: a claim whose reply the termination cut off after its commit comes back soon.
        worker = worker_for(dsn, sim, concurrency=32, notifier=None, lease_seconds=6.0)
        run = asyncio.create_task(worker.run())
        tag = tag_of(worker)

        def done() -> int:
            return int(
                conn.execute(
                    "SELECT count(*) AS n FROM batchdb.requests WHERE job_id = %s AND status = 'succeeded'", (job.id,)
                ).fetchone()["n"]
            )

        killed: list[int] = []
        # Terminate one of the worker's backends at a time, each once, while rows are in flight:
        # both pool connections, then the LISTEN connection.
        for target in ("batchdb-worker", "batchdb-worker", "batchdb-listen"):
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, f"no {target} backend to terminate"
                assert not run.done(), "the worker stopped early"
                backends = [
                    row["pid"]
                    for row in conn.execute(WORKER_BACKENDS, (f"%{tag}",)).fetchall()
                    if row["application_name"].startswith(target) and row["pid"] not in killed
                ]
                if backends and done() >= len(killed) * 50 + 50:
                    break
                await asyncio.sleep(0.05)
            conn.execute("SELECT pg_terminate_backend(%s)", (backends[0],))
            killed.append(backends[0])
        await asyncio.wait_for(run, 180)
        return killed, done()

    killed, succeeded = asyncio.run(scenario())
    assert len(killed) == 3 and succeeded == rows
    assert_every_row_recorded_once(conn, job, rows)
    assert sim.stats(series=False)["totals"]["requests"] >= rows
    # Reported by the worker, once per loss and once per recovery; psycopg_pool's own lines are filtered.
    assert not [r for r in caplog.records if r.name == "psycopg.pool" and r.levelno >= logging.WARNING]
    lost = [r.getMessage() for r in caplog.records if r.name == "batchdb.workers.connection"]
    assert any("connection failed" in m for m in lost) and any("LISTEN connection lost" in m for m in lost), lost


def test_slow_handles_share_one_slot_so_a_hot_statement_never_waits_for_them(dsn: str) -> None:
    async def scenario() -> tuple[int, bool]:
        database = Database(dsn, name="test-slow", size=2)
        slow_a, slow_b = database.handle("a", slow=True), database.handle("b", slow=True)
        hot = database.handle("hot")
        sleeping = asyncio.Event()

        async def long(c: psycopg.AsyncConnection) -> None:
            sleeping.set()
            await c.execute("SELECT pg_sleep(5)")

        try:
            first = asyncio.create_task(slow_a.run(long, what="long"))
            await asyncio.wait_for(sleeping.wait(), 30)
            second = asyncio.create_task(slow_b.run(long, what="long"))  # waits for the slow slot
            await asyncio.sleep(0.2)
            # Had the second slow statement taken the other connection, this would wait for the
            # first to finish: it runs beside it instead.
            pid = await hot.run(_pid, what="pid")
            first_still_running = not first.done()
            await asyncio.gather(first, second)
            return pid, first_still_running
        finally:
            await database.close()

    pid, first_still_running = asyncio.run(scenario())
    assert pid > 0
    assert first_still_running


async def _pid(c: psycopg.AsyncConnection) -> int:
    cur = await c.execute("SELECT pg_backend_pid() AS pid")
    row = await cur.fetchone()
    assert row is not None
    return int(row["pid"])


def test_listener_calls_each_channels_subscribers_and_says_when_it_connects(dsn: str) -> None:
    async def scenario() -> list[tuple[str, str | None]]:
        got: list[tuple[str, str | None]] = []
        listener = Listener(dsn, name="test-listen")
        listener.subscribe("-- a comment first\nLISTEN chan_a\n\n-- a trailing comment", lambda p: got.append(("a", p)))
        listener.subscribe("LISTEN chan_b", lambda p: got.append(("b", p)))
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.connected.wait(), 30)
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
                await c.execute("SELECT pg_notify('chan_b', 'hello'), pg_notify('chan_c', 'nobody')")
            deadline = time.monotonic() + 30
            while ("b", "hello") not in got:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            return got
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    got = asyncio.run(scenario())
    assert got[:2] == [("a", None), ("b", None)]  # on connect: look now, anything may have been missed
    assert got[2:] == [("b", "hello")]


@pytest.mark.parametrize("size", [1, 2])
def test_a_database_never_opens_more_than_its_size(dsn: str, size: int) -> None:
    async def scenario() -> set[int]:
        database = Database(dsn, name=f"test-size-{size}", size=size)
        handles = [database.handle(f"h{i}") for i in range(8)]
        try:
            pids = await asyncio.gather(*(h.run(_pid, what="pid") for h in handles for _ in range(5)))
            return set(pids)
        finally:
            await database.close()

    assert len(asyncio.run(scenario())) <= size
