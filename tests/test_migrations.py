"""Migrations that alter batchdb.requests (one partition per job) say when the server cannot lock them all."""

from __future__ import annotations

import psycopg
import pytest


def test_too_many_job_partitions_for_the_lock_table_is_told_with_the_setting_to_raise(
    conn: psycopg.Connection,
) -> None:
    for name in ("a", "b", "c"):
        conn.execute("INSERT INTO batchdb.jobs (name, model, provider) VALUES (%s, 'm', 'instant')", (name,))
    partitions = conn.execute(
        "SELECT count(*) AS n FROM pg_inherits WHERE inhparent = 'batchdb.requests'::regclass"
    ).fetchone()["n"]
    assert partitions >= 3
    conn.execute("SELECT batchdb.require_lock_capacity_for_requests()")  # the real lock table: room enough
    with pytest.raises(psycopg.errors.InsufficientResources) as refused:
        conn.execute("SELECT batchdb.require_lock_capacity_for_requests(100)")
    needed = 4 * partitions + 200
    assert str(refused.value).startswith(
        f"batchdb: this upgrade alters batchdb.requests, whose {partitions} job partitions need about {needed} locks"
    )
    message = str(refused.value).splitlines()[0]  # one line: what happened and the fix
    assert "set max_locks_per_transaction = " in message and message.endswith("then run: batchdb db upgrade")
