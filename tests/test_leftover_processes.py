"""tests/leftover_processes.py: a test session that leaves a process running fails, naming it.

Each case runs an inner pytest session in a subprocess with the plugin loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent

CLEAN = """
import signal, subprocess, sys, pytest

@pytest.fixture(scope="session")
def server():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.terminate()
    process.wait()

def test_uses_a_session_fixture(server):
    assert server.poll() is None

def test_a_process_still_stopping_is_no_leak():
    # Exits 2 s after SIGTERM; nobody waits for it.
    slow = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                             "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(2), exit(0))); "
                             "print(1, flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
    slow.stdout.readline()
    slow.send_signal(signal.SIGTERM)
"""

LEAKY = """
import subprocess, sys

def test_forgets_a_child(tmp_path):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600) # forgotten child"],
                     start_new_session=True)

def test_forgets_a_grandchild_whose_parent_exited():
    # Like a code server left behind by a webserver that exited: no longer a descendant of pytest.
    subprocess.run([sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
                    "'import time; time.sleep(600) # orphaned grandchild'], start_new_session=True)"], check=True)
"""


def run_session(tmp_path: Path, source: str, grace: float) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(source)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
        "BATCHDB_TEST_LEFTOVER_GRACE_S": str(grace),
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "leftover_processes", "-p", "no:cacheprovider", "-q", "test_inner.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _sleepers(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_session_whose_processes_all_stop_passes(tmp_path: Path) -> None:
    result = run_session(tmp_path, CLEAN, grace=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leftover processes" not in result.stdout


def test_a_session_that_leaves_processes_running_fails_naming_them_and_kills_them(tmp_path: Path) -> None:
    result = run_session(tmp_path, LEAKY, grace=1)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert "2 process(es) started by the tests were still running" in result.stdout
    assert "# forgotten child" in result.stdout and "# orphaned grandchild" in result.stdout
    assert _sleepers("# forgotten child") == [] and _sleepers("# orphaned grandchild") == []
