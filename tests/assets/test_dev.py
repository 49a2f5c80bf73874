"""`batchdb dagster` (assets/dev.py), run as a user runs it: where the workers' logs go, and that Ctrl-C /
SIGTERM stops every process it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from dagster_test_support import REPOSITORY_ROOT, wait_until
from psycopg.conninfo import conninfo_to_dict

pytestmark = pytest.mark.slow


def test_batchdb_dagster_keeps_worker_logs_out_of_dagster_home_and_stops_everything(
    dsn: str, admin_dsn: str, tmp_path: Path
) -> None:
    home, batchdb_home, output = tmp_path / "dagster_home", tmp_path / "batchdb_home", tmp_path / "out.log"
    port = _free_port()
    env = {
        **os.environ,
        "BATCHDB_HOME": str(batchdb_home),
        "BATCHDB_DSN": dsn,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("DAGSTER_HOME", None)
    with output.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batchdb",
                "dagster",
                "--port",
                str(port),
                "--workers",
                "1",
                "--home",
                str(home),
                "--output-root",
                str(tmp_path / "results"),
            ],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started: list[psutil.Process] = []
    try:
        wait_until(lambda: "Dagster UI:" in output.read_text() or process.poll() is not None, 180, "the Dagster UI")
        text = output.read_text()
        assert "Dagster UI:" in text, text[-3000:]
        started = psutil.Process(process.pid).children(recursive=True)
        workers = [p for p in started if p.cmdline()[1:3] == ["-m", "batchdb.workers"]]
        assert len(workers) == 1, [p.cmdline() for p in started]
        logs = {Path(f.path) for w in workers for f in w.open_files() if f.path.endswith(".log")}
        expected = (batchdb_home / "logs" / "dagster").resolve()
        assert logs and {path.parent for path in logs} == {expected}, logs
        assert all(path.exists() for path in logs)
        assert f"logs in {expected}" in text
        assert not (home / "logs" / "worker-0.log").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=90)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            _drop_dagster_database(admin_dsn, dsn)
    assert code == 0, output.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while (alive := [p for p in started if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == [], [p.cmdline() for p in alive]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _drop_dagster_database(admin_dsn: str, dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{conninfo_to_dict(dsn)["dbname"]}_dagster" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
