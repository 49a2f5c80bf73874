"""`batchdb workers` (batchdb/fleet.py): the live worker processes, as `celery inspect` shows them."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from click.testing import CliRunner

import batchdb
from batchdb import ledger
from batchdb.cli import cli
from batchdb.workers.processes import WorkerProcesses


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_no_live_workers_says_how_to_start_one(dsn: str) -> None:
    assert invoke("workers").strip() == "no live workers (start one with `batchdb worker`)"
    assert json.loads(invoke("workers", "--json")) == []


@pytest.mark.slow
def test_lists_a_live_worker_and_not_once_it_stopped(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    # 8 rows held by the worker: waiting on a 1-request-per-minute lane.
    with psycopg.connect(dsn, autocommit=True) as c:
        ledger.set_limits(c, ledger.Lane("instant", "default", "paced"), rpm=1)
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(8)]})
    batchdb.submit(frame, prompt="{text}", model="paced", provider="instant", dsn=dsn)
    with WorkerProcesses(
        dsn, args=("--concurrency", "8", "--lease-seconds", "3"), log_dir=tmp_path, grace=10
    ) as workers:
        workers.start()
        pid = workers.processes[0].pid
        deadline = time.monotonic() + 60
        while (
            conn.execute(
                "SELECT count(*) AS n FROM batchdb.workers WHERE pid = %s AND in_flight = 8", (pid,)
            ).fetchone()["n"]
            == 0
        ):
            assert time.monotonic() < deadline, workers.log_text()
            time.sleep(0.1)
        [listed] = json.loads(invoke("workers", "--json"))
        table = invoke("workers")
        assert workers.stop() == [0]
    assert (listed["hostname"], listed["pid"], listed["in_flight"], listed["n_completed"]) == (
        socket.gethostname(),
        pid,
        8,
        0,
    )
    assert listed["lanes"] == ["instant/default"]  # advertised (workers/lanes.py): it serves the job's lane
    assert 0 <= listed["heartbeat_age_s"] < 30
    header, line = table.splitlines()
    assert header.split() == ["host", "pid", "in", "flight", "rows", "done", "heartbeat", "lanes"]
    assert line.split()[:3] == [socket.gethostname(), str(pid), "8/8"]
    assert line.rstrip().endswith("instant/default")
    # Stopped: no longer listed (it is still in batchdb.workers, with stopped_at set).
    assert invoke("workers").strip() == "no live workers (start one with `batchdb worker`)"
