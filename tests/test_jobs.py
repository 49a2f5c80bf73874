"""`Job.wait()` never returns a paused job as if it had ended, and never waits in silence for a worker."""

from __future__ import annotations

import logging

import pandas as pd
import psycopg
import pytest

import batchdb
from batchdb.jobs import JobPaused

ROWS = pd.DataFrame({"headline": ["up", "down", "flat"]})


def submit(dsn: str) -> batchdb.Job:
    return batchdb.submit(ROWS, prompt="Rate: {headline}", model="m", provider="instant", dsn=dsn)


def test_wait_raises_job_paused_with_the_reason(dsn: str, conn: psycopg.Connection) -> None:
    job = submit(dsn)
    conn.execute(
        "UPDATE batchdb.jobs SET status = 'paused', status_reason = 'budget of $1.00 reached' WHERE id = %s", (job.id,)
    )
    with pytest.raises(JobPaused) as raised:
        job.wait(timeout=60)
    assert raised.value.reason == "budget of $1.00 reached"
    assert str(raised.value) == (
        f"job {job.id} paused at 0/3 done: budget of $1.00 reached; continue it with `batchdb resume {job.id}`"
    )
    assert raised.value.progress.status == "paused"
    # Asked for, a pause is an answer.
    assert job.wait(timeout=60, until="paused").status == "paused"


def test_wait_says_when_no_worker_is_alive_and_keeps_waiting(
    dsn: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    job = submit(dsn)
    caplog.set_level(logging.WARNING, logger="batchdb.jobs")
    with pytest.raises(TimeoutError):
        job.wait(progress=True, poll_interval=0.1, timeout=5, no_worker_after=0.5)
    warnings = [r.getMessage() for r in caplog.records if "no live worker" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"job {job.id}: no live worker for ")
    assert "workers=no live worker for" in capsys.readouterr().err  # the progress line


def test_wait_is_quiet_while_a_worker_is_alive(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    job = submit(dsn)
    conn.execute("INSERT INTO batchdb.workers (id, hostname, pid, concurrency) VALUES ('w1', 'h', 1, 1)")
    caplog.set_level(logging.WARNING, logger="batchdb.jobs")
    with pytest.raises(TimeoutError):
        job.wait(poll_interval=0.1, timeout=2, no_worker_after=0.3)
    assert not [r for r in caplog.records if "no live worker" in r.getMessage()]


def test_wait_says_once_when_the_job_waits_for_its_provider(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    job = submit(dsn)
    conn.execute("INSERT INTO batchdb.workers (id, hostname, pid, concurrency) VALUES ('w1', 'h', 1, 1)")
    lane = ("instant", "default", "m")
    conn.execute("SELECT * FROM batchdb.circuit_open(%s, %s, %s, '503 at http://sim/v1', 60)", lane)
    caplog.set_level(logging.WARNING, logger="batchdb.jobs")
    with pytest.raises(TimeoutError) as raised:
        job.wait(progress=True, poll_interval=0.1, timeout=2)
    warnings = [r.getMessage() for r in caplog.records if "provider unavailable" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not once per poll
    assert warnings[0].startswith(f"job {job.id} is waiting: provider unavailable since ")
    assert "503 at http://sim/v1" in warnings[0] and "resume by themselves" in warnings[0]
    assert "waiting=provider unavailable since" in capsys.readouterr().err  # the progress line
    assert "running" in str(raised.value)  # still running: waiting is not a pause
