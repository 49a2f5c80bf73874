"""The send guard (workers/send_guard.py): no call is sent for a row that is no longer ours or a job that stopped.

Calls are counted where they arrive: at the provider simulator, through the real OpenAI SDK.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pandas as pd
import psycopg
import pytest
from pgbouncer_support import in_front_of, pgbouncer_binary

import batchdb
from batchdb.models import ClaimedRequest
from batchdb.providers.openai import OpenAIProvider
from batchdb.queries import query
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.send_guard import CallDropped, SendGuard
from batchdb.workers.worker import Worker, WorkerConfig


def slow_key_job(conn: psycopg.Connection, dsn: str, rows: int, rpm: int = 60) -> batchdb.Job:
    """A job on a key the ledger paces at `rpm` (60: one call a second), so claimed rows wait in the pacer."""
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, key_alias, model, rpm, tpm) "
        "VALUES ('openai', 'default', 'gpt-4o-mini', %s, 10000000)",
        (rpm,),
    )
    frame = pd.DataFrame({"text": [f"headline {i}" for i in range(rows)]})
    return batchdb.submit(frame, prompt="{text}", model="gpt-4o-mini", provider="openai", max_tokens=8, dsn=dsn)


def calls(sim) -> int:
    return int(sim.stats(series=False)["totals"]["requests"])


def openai_worker(dsn: str, sim, **config: object) -> Worker:
    provider = OpenAIProvider(api_key="sk-test", base_url=sim.openai_base_url, timeout=30)
    settings = {"concurrency": 20, "poll_interval": 0.2, "retry": RetryPolicy(0.05, 0.2), "notifier": None, **config}
    return Worker(WorkerConfig(dsn=dsn, **settings), providers={"openai": provider})  # type: ignore[arg-type]


async def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_cancel_stops_the_sends_of_claimed_rows_on_a_slow_key(conn: psycopg.Connection, dsn: str, simulator) -> None:
    sim = simulator()
    job = slow_key_job(conn, dsn, rows=15)

    async def scenario() -> tuple[int, int]:
        worker = openai_worker(dsn, sim)
        task = asyncio.create_task(worker.run())
        try:
            # All 15 rows claimed, two sent: the others wait in the pacer, one a second.
            await wait_for(lambda: calls(sim) >= 2 and len(worker._held) >= 10 and worker._guard.listening.is_set())
            before = calls(sim)
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT batchdb.cancel_job(%s)", (job.id,))  # committed when this returns
            # The dropped rows leave the worker (old code: after being sent, one a second, fenced out).
            await wait_for(lambda: not worker._held, timeout=60)
            return before, calls(sim)
        finally:
            worker.stop()
            await task

    before, after = asyncio.run(scenario())
    assert job.status().status == "cancelled"
    # At most the one call the pacer had already let go when the cancel committed.
    assert after - before <= 1, f"{after - before} call(s) reached the provider after the cancel"


def test_worker_stalled_past_its_lease_sends_nothing_for_reclaimed_rows(
    conn: psycopg.Connection, dsn: str, simulator
) -> None:
    sim = simulator()
    job = slow_key_job(conn, dsn, rows=10)
    lease = 3.0

    def stall_until_reclaimed_by_another_worker() -> tuple[int, int]:
        """Runs on the worker's event loop and blocks it, as SIGSTOP would: nothing of the worker runs."""
        with psycopg.connect(dsn, autocommit=True) as c:
            deadline = time.monotonic() + 60
            while c.execute(
                "SELECT count(*) FROM batchdb.requests WHERE status = 'running' "
                "AND lease_expires_at >= clock_timestamp()"
            ).fetchone()[0]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            reclaimed = c.execute(query("reclaim_expired"), {"limit": 1000}).rowcount
            taken = c.execute(
                query("claim_batch"),
                {
                    "worker_id": "other",
                    "limit": 100,
                    "lease_seconds": 600,
                    "max_jobs": 16,
                    "lane_providers": None,
                    "lane_key_aliases": None,
                },
            ).rowcount
        return reclaimed, taken

    async def scenario() -> tuple[int, int, int, int]:
        worker = openai_worker(
            dsn, sim, concurrency=10, lease_seconds=lease, heartbeat_interval=1.0, reclaim_interval=1.0
        )
        task = asyncio.create_task(worker.run())
        try:
            await wait_for(lambda: calls(sim) >= 1 and len(worker._held) >= 8)
            reclaimed, taken = stall_until_reclaimed_by_another_worker()
            before = calls(sim)
            await wait_for(lambda: not worker._held, timeout=60)
            return reclaimed, taken, before, calls(sim)
        finally:
            worker.stop()
            await task

    reclaimed, taken, before, after = asyncio.run(scenario())
    assert reclaimed >= 8 and taken == reclaimed
    assert after == before, f"{after - before} call(s) sent for rows another worker had reclaimed"
    # The rows are the other worker's, untouched: still running under its lease, one attempt more.
    rows = conn.execute(
        "SELECT status, lease_owner FROM batchdb.requests WHERE job_id = %s AND lease_owner = 'other'", (job.id,)
    ).fetchall()
    assert len(rows) == taken and {r["status"] for r in rows} == {"running"}


@pytest.mark.parametrize("forged", [True, False])
def test_job_status_comes_from_the_database_not_the_notify_payload(
    conn: psycopg.Connection, dsn: str, forged: bool
) -> None:
    job_id = conn.execute("INSERT INTO batchdb.jobs (model, provider) VALUES ('m', 'instant') RETURNING id").fetchone()[
        "id"
    ]
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES (%s, 'a', '{\"prompt\": \"x\"}')", (job_id,)
    )
    row = ClaimedRequest(job_id, 1, "a", None, None, 1, 5, 1)

    async def scenario() -> str | None:
        guard = SendGuard(dsn, lease_seconds=60)
        guard.leased([row], since=time.monotonic())
        service = asyncio.create_task(guard.run())
        await asyncio.wait_for(guard.listening.wait(), 30)
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        held = asyncio.create_task(guard.hold(row, waiting))
        await asyncio.sleep(0)
        with psycopg.connect(dsn, autocommit=True) as c:
            if forged:
                c.execute(
                    "SELECT pg_notify('batchdb_events', json_build_object('job_id', %s::bigint, "
                    "'status', 'cancelled')::text)",
                    (job_id,),
                )
            else:
                c.execute("SELECT batchdb.cancel_job(%s)", (job_id,))
        try:
            await asyncio.wait_for(asyncio.shield(held), 3 if forged else 30)
        except TimeoutError:
            pass
        except CallDropped as exc:
            return exc.reason
        finally:
            service.cancel()
        if not held.done():
            waiting.set_result(None)
            await held
        return None

    reason = asyncio.run(scenario())
    if forged:
        assert reason is None  # the job still runs: the call goes ahead
    else:
        assert reason == f"job {job_id} is cancelled"


def test_lease_deadline_is_counted_from_before_the_claim() -> None:
    guard = SendGuard("postgresql://unused", lease_seconds=10)
    row = ClaimedRequest(1, 1, "a", None, None, 1, 5, 7)
    guard.leased([row], since=time.monotonic() - 9.5)
    with pytest.raises(CallDropped, match=r"lease .* ran out"):
        guard.check(row)
    guard.extended({row.key}, since=time.monotonic(), held={row.key: row})
    guard.check(row)
    # Another claim's token: not our deadline to judge.
    guard.leased([ClaimedRequest(1, 1, "a", None, None, 2, 5, 8)], since=time.monotonic() - 60)
    guard.check(row)


def test_calls_in_flight_when_the_job_is_cancelled_are_billed_and_counted(
    conn: psycopg.Connection, dsn: str, simulator
) -> None:
    """Calls already at the provider when the job is cancelled are answered and billed; their completions are
    fenced out, and their usage is counted on the job (wasted_*): the job's tokens equal the provider's bill."""
    from batchdb.simulator import Distribution

    sim = simulator(latency_s=Distribution(kind="fixed", value=3.0))
    job = slow_key_job(conn, dsn, rows=6, rpm=60_000)

    def granted() -> int:
        row = conn.execute("SELECT coalesce(sum(requests_granted), 0) AS n FROM batchdb.rate_limits").fetchone()
        return int(row["n"])

    async def scenario() -> None:
        worker = openai_worker(dsn, sim)
        task = asyncio.create_task(worker.run())
        try:
            # The ledger granted every row's call: each is sent right after, and is then 3 s at the provider.
            await wait_for(lambda: granted() >= 6)
            await asyncio.sleep(0.5)  # the loop free: the granted calls go out (the test's SQL blocks it)
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT batchdb.cancel_job(%s)", (job.id,))
            await wait_for(lambda: not worker._held and worker._completer.backlog == 0)
        finally:
            worker.stop()
            await task

    asyncio.run(scenario())
    done = job.status()
    assert done.status == "cancelled" and done.n_succeeded == 0
    # Every call the provider answered is billed; a call the send guard still stopped is neither.
    assert 1 <= done.wasted_calls == calls(sim) and done.wasted_usd > 0
    billed = sim.stats(series=False)["totals"]
    unrecorded = conn.execute(
        "SELECT sum(prompt_tokens) AS p, sum(completion_tokens) AS c FROM batchdb.unrecorded_calls WHERE job_id = %s",
        (job.id,),
    ).fetchone()
    assert (done.prompt_tokens + unrecorded["p"], done.completion_tokens + unrecorded["c"]) == (
        billed["prompt_tokens"],
        billed["completion_tokens"],
    )
    assert f"{done.wasted_calls} call(s) recorded on no row" in done.cost_text


@pytest.mark.skipif(pgbouncer_binary() is None, reason="pgbouncer is not installed (apt-get install -y pgbouncer)")
def test_through_a_transaction_pooler_job_statuses_are_polled(conn: psycopg.Connection, dsn: str) -> None:
    """PgBouncer in transaction mode loses LISTEN: the guard re-reads the statuses instead."""
    job_id = conn.execute("INSERT INTO batchdb.jobs (model, provider) VALUES ('m', 'instant') RETURNING id").fetchone()[
        "id"
    ]
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES (%s, 'a', '{\"prompt\": \"x\"}')", (job_id,)
    )
    row = ClaimedRequest(job_id, 1, "a", None, None, 1, 5, 1)

    async def scenario(pooled: str) -> str:
        guard = SendGuard(pooled, lease_seconds=60)
        guard.leased([row], since=time.monotonic())
        service = asyncio.create_task(guard.run())
        try:
            await asyncio.wait_for(guard.listening.wait(), 30)
            waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            held = asyncio.create_task(guard.hold(row, waiting))
            await asyncio.sleep(0)
            conn.execute("SELECT batchdb.cancel_job(%s)", (job_id,))
            with pytest.raises(CallDropped) as dropped:
                await asyncio.wait_for(held, 30)
            return dropped.value.reason
        finally:
            service.cancel()

    with in_front_of(dsn) as pooled:
        assert asyncio.run(scenario(pooled)) == f"job {job_id} is cancelled"
