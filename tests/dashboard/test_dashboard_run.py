"""`batchdb dashboard` (dashboard/run.py) as a user runs it: SIGTERM stops it at once, without a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from batchdb.dashboard.run import free_port

SOURCE_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_stops_the_dashboard_and_streamlit_promptly_and_quietly(dsn: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BATCHDB_DSN": dsn,
        "PYTHONPATH": os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchdb", "dashboard", "--port", str(free_port())],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "batchdb dashboard on http://127.0.0.1:" not in out.read_text():
            assert process.poll() is None and time.monotonic() < deadline, (out.read_text(), err.read_text())
            time.sleep(0.2)
        streamlit = psutil.Process(process.pid).children(recursive=True)
        assert streamlit, "no Streamlit child"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert code == 0, err.read_text()
    assert "Traceback" not in err.read_text() and "TimeoutExpired" not in err.read_text(), err.read_text()
    # Streamlit stops within a second or two of SIGTERM; the old handler waited out two 10 s timeouts.
    assert took < 15, took
    assert not [p for p in streamlit if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
