"""Budget settlement (workers/settler.py, 0010_idempotent_spend.sql): reservations and spend
are booked once, even when a statement that committed is run again after its reply was lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal

import pandas as pd
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

import batchdb
from batchdb import queue, users
from batchdb.providers.instant import InstantProvider
from batchdb.workers.budget_settler import BudgetSettler, Settlement
from batchdb.workers.connection import Reconnecting
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig


@pytest.fixture
def alice(dsn: str, conn: psycopg.Connection):  # noqa: ANN201
    """A user with a daily budget, and prices for the instant provider."""
    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) "
        "VALUES ('instant', 'instant', 1000, 1000)"
    )
    name = f"alice_{uuid.uuid4().hex[:8]}"
    users.add_user(conn, name, budget_usd_day=100)
    yield name, make_conninfo(dsn, user=name)
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
    conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def submit(owner_dsn: str, rows: int, **options: object) -> batchdb.Job:
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": [f"row {i}" for i in range(rows)]})
    return batchdb.submit(
        frame,
        prompt="Say: {text}",
        model="instant",
        provider="instant",
        id_column="id",
        max_tokens=20,
        dsn=owner_dsn,
        **options,
    )  # type: ignore[arg-type]


def books(conn: psycopg.Connection, owner: str, job_id: int) -> dict:
    return conn.execute(
        "SELECT (SELECT coalesce(sum(spent_usd), 0) FROM batchdb.user_spend WHERE owner = %(owner)s) AS spent,"
        "       (SELECT coalesce(sum(reserved_usd), 0) FROM batchdb.user_spend WHERE owner = %(owner)s) AS reserved,"
        "       (SELECT reserved_usd FROM batchdb.jobs WHERE id = %(job)s) AS job_reserved,"
        "       (SELECT sum(cost_usd) FROM batchdb.requests WHERE job_id = %(job)s) AS cost,"
        "       (SELECT count(*) FROM batchdb.budget_reservations) AS open_reservations",
        {"owner": owner, "job": job_id},
    ).fetchone()


def test_a_worker_whose_replies_are_lost_after_commit_books_every_call_once(
    dsn: str, conn: psycopg.Connection, alice, lost_reply_proxy
) -> None:
    """The worker reconnects and re-runs a statement whose reply was lost. The first
    reservation's and the first settlement's replies are dropped after their commit."""
    owner, owner_dsn = alice
    job = submit(owner_dsn, 40, budget_usd=50)
    lost_reply_proxy.drop_reply_after(b"reserve_budget")
    lost_reply_proxy.drop_reply_after(b"settle_")
    worker = Worker(
        WorkerConfig(
            dsn=lost_reply_proxy.dsn,
            exit_when_idle=True,
            concurrency=8,
            poll_interval=0.2,
            retry=RetryPolicy(0.05, 0.2),
        ),
        providers={"instant": InstantProvider()},
    )
    asyncio.run(worker.run())

    assert lost_reply_proxy.dropped == [b"reserve_budget", b"settle_"]  # both faults were injected
    assert job.status().n_succeeded == 40
    booked = books(conn, owner, job.id)
    assert booked["cost"] > 0
    assert booked["spent"] == booked["cost"], booked  # the settlement run twice added the spend once
    assert booked["reserved"] == 0, booked  # the reservation run twice was held (and released) once
    assert booked["job_reserved"] == 0, booked
    assert booked["open_reservations"] == 0, booked


def claimed(dsn: str, job_id: int) -> list:
    async def claim() -> list:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as c:
            return await queue.claim_batch(c, worker_id="test:1:x", limit=10, lease_seconds=60)

    rows = asyncio.run(claim())
    assert rows and all(r.job_id == job_id for r in rows)
    return rows


def test_a_reservation_or_settlement_repeated_by_key_counts_once(dsn: str, conn: psycopg.Connection, alice) -> None:
    owner, owner_dsn = alice
    job = submit(owner_dsn, 2)
    row = claimed(dsn, job.id)[0]

    def reserve(seq: int, usd: str) -> str:
        return conn.execute(
            "SELECT batchdb.reserve_budget(%s, %s::numeric, %s, %s, %s) AS r",
            (job.id, usd, row.id, row.lease_token, seq),
        ).fetchone()["r"]

    assert reserve(1, "0.25") == "ok"
    assert reserve(1, "0.25") == "ok"  # the same call again: nothing more reserved
    assert reserve(2, "0.5") == "ok"  # the row's second call (a re-ask)
    assert books(conn, owner, job.id)["reserved"] == Decimal("0.75")
    assert books(conn, owner, job.id)["job_reserved"] == Decimal("0.75")

    settler = BudgetSettler(Reconnecting(dsn, name="settle-test"))

    async def settle_twice() -> list[int]:
        try:
            batch = [Settlement(job.id, row.id, row.lease_token, Decimal("0.1"))]
            return [await settler.settle(batch), await settler.settle(batch)]
        finally:
            await settler.disconnect()

    assert asyncio.run(settle_twice()) == [1, 0]
    booked = books(conn, owner, job.id)
    assert (booked["spent"], booked["reserved"], booked["job_reserved"]) == (Decimal("0.1"), 0, 0)
    assert booked["open_reservations"] == 0


def test_a_refused_reservation_holds_nothing_and_can_be_asked_again(dsn: str, conn: psycopg.Connection, alice) -> None:
    owner, owner_dsn = alice
    job = submit(owner_dsn, 2, budget_usd=1)
    row = claimed(dsn, job.id)[0]
    reserve = "SELECT batchdb.reserve_budget(%s, %s::numeric, %s, %s, 1) AS r"
    assert conn.execute(reserve, (job.id, "0.8", row.id, row.lease_token)).fetchone()["r"] == "ok"
    # A second call of another lease does not fit while the first is in flight: 'wait', nothing held.
    assert conn.execute(reserve, (job.id, "0.8", row.id, row.lease_token + 1)).fetchone()["r"] == "wait"
    assert books(conn, owner, job.id)["open_reservations"] == 1
    assert books(conn, owner, job.id)["job_reserved"] == Decimal("0.8")


def test_settler_settles_everything_submitted_before_close(dsn: str, conn: psycopg.Connection, alice) -> None:
    owner, owner_dsn = alice
    job = submit(owner_dsn, 5)
    rows = claimed(dsn, job.id)
    for row in rows:
        conn.execute("SELECT batchdb.reserve_budget(%s, 0.5, %s, %s, 1)", (job.id, row.id, row.lease_token))
    settler = BudgetSettler(Reconnecting(dsn, name="settle-test"), flush_interval=0.01, max_batch=2)

    async def run() -> None:
        task = asyncio.create_task(settler.run())
        for row in rows:
            settler.submit(Settlement(row.job_id, row.id, row.lease_token, Decimal("0.01")))
        await settler.close()
        await task
        await settler.disconnect()

    asyncio.run(run())
    assert settler.settled == len(rows) == 5
    booked = books(conn, owner, job.id)
    assert (booked["spent"], booked["reserved"], booked["job_reserved"]) == (Decimal("0.05"), 0, 0)


def test_a_worker_role_may_reserve_and_settle_but_a_user_may_not(dsn: str, conn: psycopg.Connection, alice) -> None:
    owner, owner_dsn = alice
    job = submit(owner_dsn, 2)
    row = claimed(dsn, job.id)[0]
    worker = f"wrk_{uuid.uuid4().hex[:8]}"
    users.add_user(conn, worker, kind=users.UserKind.WORKER)
    try:
        with psycopg.connect(make_conninfo(dsn, user=worker), autocommit=True) as c:
            assert (
                c.execute(
                    "SELECT batchdb.reserve_budget(%s, 0.5, %s, %s, 1)", (job.id, row.id, row.lease_token)
                ).fetchone()[0]
                == "ok"
            )
            assert (
                c.execute(
                    "SELECT batchdb.settle_budget(ARRAY[%s]::bigint[], ARRAY[%s]::bigint[], "
                    "ARRAY[%s]::bigint[], ARRAY[0.2]::numeric[])",
                    (job.id, row.id, row.lease_token),
                ).fetchone()[0]
                == 1
            )
        with psycopg.connect(owner_dsn, autocommit=True) as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(
                "SELECT batchdb.settle_budget(ARRAY[1]::bigint[], ARRAY[1]::bigint[], ARRAY[1]::bigint[], "
                "ARRAY[-100]::numeric[])"
            )
    finally:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (worker,))
        conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(worker)))
    booked = books(conn, owner, job.id)
    assert (booked["spent"], booked["reserved"], booked["job_reserved"]) == (Decimal("0.2"), 0, 0)


def expire_leases(conn: psycopg.Connection, job_id: int) -> None:
    """The worker that claimed the rows is dead: its leases run out (as they would, in database time)."""
    conn.execute(
        "UPDATE batchdb.requests SET lease_expires_at = now() - interval '1 second' "
        "WHERE job_id = %s AND status = 'running'",
        (job_id,),
    )


def test_a_killed_workers_reservations_are_settled_at_their_reserved_cost(
    dsn: str, conn: psycopg.Connection, alice
) -> None:
    owner, owner_dsn = alice
    job = submit(owner_dsn, 3)
    rows = claimed(dsn, job.id)
    for row in rows:
        conn.execute("SELECT batchdb.reserve_budget(%s, 0.5, %s, %s, 1)", (job.id, row.id, row.lease_token))
    assert books(conn, owner, job.id)["reserved"] == Decimal("1.5")

    def sweep(older_than_s: float) -> int:
        settler = BudgetSettler(Reconnecting(dsn, name="sweep-test"), abandoned_after=older_than_s)

        async def run() -> int:
            try:
                return await settler.settle_abandoned()
            finally:
                await settler.disconnect()

        return asyncio.run(run())

    assert sweep(0) == 0  # the rows are still leased to the calls that reserved: nothing is abandoned
    expire_leases(conn, job.id)

    async def reclaim() -> int:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as c:
            return await queue.reclaim_expired(c)

    assert asyncio.run(reclaim()) == 3
    assert sweep(3600) == 0  # abandoned, but younger than the margin a live settler gets
    assert sweep(0) == 3
    booked = books(conn, owner, job.id)
    assert (booked["spent"], booked["reserved"], booked["job_reserved"]) == (Decimal("1.5"), 0, 0), booked
    assert booked["open_reservations"] == 0
    assert sweep(0) == 0  # settled once


def test_a_worker_gives_back_the_reservations_a_killed_worker_left(dsn: str, conn: psycopg.Connection, alice) -> None:
    """A live worker reclaims the dead one's rows, runs them, and settles what the dead one reserved."""
    owner, owner_dsn = alice
    job = submit(owner_dsn, 6, budget_usd=50)
    left = claimed(dsn, job.id)
    for row in left:
        conn.execute("SELECT batchdb.reserve_budget(%s, 0.5, %s, %s, 1)", (job.id, row.id, row.lease_token))
    expire_leases(conn, job.id)
    # The dead worker reserved an hour ago; the live worker's own reservations, younger than the
    # margin, are left to its settler even in the moment between recording an outcome and settling it.
    conn.execute("UPDATE batchdb.budget_reservations SET created_at = now() - interval '1 hour'")
    worker = Worker(
        WorkerConfig(
            dsn=dsn,
            concurrency=4,
            poll_interval=0.2,
            reclaim_interval=0.2,
            heartbeat_interval=0.2,
            abandoned_budget_after=600,
            abandoned_budget_interval=0.2,
            retry=RetryPolicy(0.05, 0.2),
        ),
        providers={"instant": InstantProvider()},
    )

    async def run_until_settled() -> dict:
        task = asyncio.create_task(worker.run())
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                booked = books(conn, owner, job.id)
                if job.status().finished and booked["open_reservations"] == 0:
                    return booked
                await asyncio.sleep(0.1)
            raise AssertionError(f"not settled: {books(conn, owner, job.id)}, {job.status()}")
        finally:
            worker.stop()
            await task

    booked = asyncio.run(run_until_settled())
    assert job.status().n_succeeded == 6
    assert (booked["reserved"], booked["job_reserved"]) == (0, 0), booked
    # What the dead worker reserved counts as spent (it may have sent those calls), plus what was run.
    assert booked["spent"] == Decimal("0.5") * len(left) + booked["cost"], booked
