"""Workers vacuum busy partitions themselves: the queue stays fast where autovacuum is off or late."""

from __future__ import annotations

import asyncio
import time

import psycopg

from batchdb.workers.connection import Reconnecting
from batchdb.workers.vacuumer import Vacuumer


def dead_tuples(conn: psycopg.Connection, partition: str) -> tuple[int, object]:
    row = conn.execute(
        "SELECT n_dead_tup, last_vacuum FROM pg_stat_user_tables WHERE relname = %s", (partition,)
    ).fetchone()
    return row["n_dead_tup"], row["last_vacuum"]


def churn(conn: psycopg.Connection, rows: int) -> int:
    job_id = conn.execute("INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mini') RETURNING id").fetchone()["id"]
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) "
        'SELECT %s, g::text, \'{"prompt": "x"}\' FROM generate_series(1, %s) g',
        (job_id, rows + 1),
    )
    # Claim-like and completion-like updates of all but one row: two dead versions each.
    conn.execute("UPDATE batchdb.requests SET status = 'running' WHERE job_id = %s AND custom_id <> '1'", (job_id,))
    conn.execute("UPDATE batchdb.requests SET status = 'succeeded' WHERE job_id = %s AND status = 'running'", (job_id,))
    conn.execute("SELECT pg_stat_force_next_flush()")
    return job_id


def test_vacuums_a_running_jobs_partition_once_it_has_enough_dead_rows(dsn: str, conn: psycopg.Connection) -> None:
    job_id = churn(conn, 5000)
    small = churn(conn, 10)
    partition = f"requests_{job_id}"
    deadline = time.monotonic() + 10
    while dead_tuples(conn, partition)[0] < 5000 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dead_tuples(conn, partition)[0] >= 5000

    async def once() -> tuple[list[str], list[str]]:
        vacuumer = Vacuumer(Reconnecting(dsn, name="vacuum"), min_dead=1000, min_interval=30)
        try:
            return await vacuumer.vacuum_once(), await vacuumer.vacuum_once()
        finally:
            await vacuumer.close()

    first, second = asyncio.run(once())
    assert first == [partition]  # the small job's partition is below the threshold
    assert second == []  # vacuumed lately: not again within min_interval
    dead, last_vacuum = dead_tuples(conn, partition)
    assert last_vacuum is not None and dead < 5000
    assert dead_tuples(conn, f"requests_{small}")[1] is None


def test_a_finished_jobs_partition_is_left_alone(dsn: str, conn: psycopg.Connection) -> None:
    job_id = churn(conn, 3000)
    conn.execute("UPDATE batchdb.jobs SET status = 'completed' WHERE id = %s", (job_id,))

    async def once() -> list[str]:
        vacuumer = Vacuumer(Reconnecting(dsn, name="vacuum"), min_dead=100, min_interval=0)
        try:
            return await vacuumer.vacuum_once()
        finally:
            await vacuumer.close()

    assert asyncio.run(once()) == []


def test_a_partition_someone_else_is_vacuuming_is_skipped_then_done(dsn: str, conn: psycopg.Connection) -> None:
    """One vacuum per partition at a time without a session advisory lock (which a transaction
    pooler would strand): VACUUM (SKIP_LOCKED) passes over a partition whose lock is taken."""
    job_id = churn(conn, 3000)
    partition = f"requests_{job_id}"
    deadline = time.monotonic() + 10
    while dead_tuples(conn, partition)[0] < 3000 and time.monotonic() < deadline:
        time.sleep(0.2)

    async def once() -> list[str]:
        vacuumer = Vacuumer(Reconnecting(dsn, name="vacuum"), min_dead=1000, min_interval=0)
        try:
            return await vacuumer.vacuum_once()
        finally:
            await vacuumer.close()

    with psycopg.connect(dsn) as other, other.transaction():
        # The lock VACUUM itself takes (as another worker's or autovacuum's vacuum would hold it).
        other.execute(f"LOCK TABLE batchdb.{partition} IN SHARE UPDATE EXCLUSIVE MODE")
        assert asyncio.run(once()) == []
    assert dead_tuples(conn, partition)[1] is None
    assert asyncio.run(once()) == [partition]
    assert dead_tuples(conn, partition)[1] is not None
