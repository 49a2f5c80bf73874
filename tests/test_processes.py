"""workers/processes.py: starting worker processes and stopping them, against real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from batchdb.workers import processes
from batchdb.workers.processes import SOURCE_ROOT, WorkerProcesses, start_workers, stop_processes


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def registered(dsn: str, workers: WorkerProcesses) -> dict[int, object]:
    """pid -> stopped_at of the worker rows of these processes."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT pid, stopped_at FROM batchdb.workers WHERE pid = ANY(%s)", ([p.pid for p in workers.processes],)
        ).fetchall()
    return dict(rows)


def test_workers_on_an_empty_queue_stop_gracefully_with_their_logs(dsn: str, tmp_path: Path) -> None:
    with start_workers(2, dsn, args=("--poll-interval", "0.5"), log_dir=tmp_path) as workers:
        wait_for(lambda: len(registered(dsn, workers)) == 2, "both workers to register in batchdb.workers")
        assert len(workers.alive()) == 2
    # Leaving the block stopped them: SIGTERM, a graceful exit, the row marked stopped.
    assert [p.returncode for p in workers.processes] == [0, 0]
    assert workers.stop() == [0, 0]  # stopping again only reports the codes
    assert all(stopped is not None for stopped in registered(dsn, workers).values())
    assert workers.log_paths == [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    assert "stopped after 0 rows" in workers.log_text()


def test_kill_sigkills_one_worker_and_stop_reports_every_code(dsn: str) -> None:
    workers = start_workers(2, dsn, args=("--poll-interval", "0.5"))
    try:
        wait_for(lambda: len(registered(dsn, workers)) == 2, "both workers to register")
        victim = workers.kill()
        assert victim.returncode == -9
        assert workers.alive() == [p for p in workers.processes if p is not victim]
    finally:
        codes = workers.stop()
    assert sorted(codes, key=lambda c: c or 0) == [-9, 0]
    assert registered(dsn, workers)[victim.pid] is None  # a killed worker never marks itself stopped


def test_a_process_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    ignore_sigterm = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(os.environ['BATCHDB_DSN'], os.environ['PYTHONPATH'], os.environ['EXTRA'], flush=True); "
        "time.sleep(60)"
    )
    workers = WorkerProcesses(
        "dbname=nowhere",
        env={"EXTRA": "yes", "PYTHONPATH": "/elsewhere"},
        log_dir=tmp_path,
        command=(sys.executable, "-c", ignore_sigterm),
        grace=0.5,
    )
    workers.start()
    wait_for(lambda: workers.log_text().strip(), "the child to ignore SIGTERM", timeout=20)
    began = time.monotonic()
    assert workers.stop() == [-9]
    assert time.monotonic() - began < 10
    assert workers.log_text().split() == ["dbname=nowhere", os.pathsep.join([str(SOURCE_ROOT), "/elsewhere"]), "yes"]


def test_stop_processes_waits_for_a_process_that_exits_on_sigterm() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop_processes([process], grace=20) == [-15]


def test_a_failed_start_stops_the_workers_already_started(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        if started:
            raise OSError("no more processes")
        started.append(real_popen(*args, **kwargs))  # type: ignore[call-overload]
        return started[0]

    monkeypatch.setattr(processes.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="no more processes"):
        start_workers(2, "dbname=nowhere", command=(sys.executable, "-c", "import time; time.sleep(60)"), grace=5)
    assert started[0].returncode == -15


def test_workers_do_not_inherit_one_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """`batchdb demo` starts two workers from the caller's environment: a BATCHDB_METRICS_PORT there
    would make the second fail to bind it. Children get a port only when the caller passes one."""
    monkeypatch.setenv(processes.settings.METRICS_PORT, "9100")
    assert processes.settings.METRICS_PORT not in WorkerProcesses("dbname=x").env
    given = WorkerProcesses("dbname=x", env={processes.settings.METRICS_PORT: "9101"}).env
    assert given[processes.settings.METRICS_PORT] == "9101"
