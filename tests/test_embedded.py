"""The embedded PostgreSQL server, on real servers in throwaway homes (no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from batchdb.embedded import (
    EmbeddedServer,
    batchdb_home,
    ensure_server,
    server_status,
    stop_server,
)

REPO = Path(__file__).resolve().parents[1]

# Run in another interpreter: wait until the shared start time, then ensure the server.
ENSURE_SCRIPT = """
import json, sys, time
from batchdb.embedded import ensure_server
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
server = ensure_server()
print(json.dumps({"port": server.port, "pid": server.pid}))
"""


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh BATCHDB_HOME; its server is stopped and its files removed afterwards.

    Made directly under the temp dir, not in pytest's tmp_path: as root the server runs as
    another OS user that must traverse the parents, and pytest keeps its own root at 0700.
    A short path also leaves room for the Unix socket's name.
    """
    path = Path(tempfile.mkdtemp(prefix="batchdb-test-")).resolve()
    monkeypatch.setenv("BATCHDB_HOME", str(path))
    yield path
    stop_server()
    shutil.rmtree(path, ignore_errors=True)


def ensure_in_subprocesses(home: Path, count: int) -> list[dict[str, int]]:
    """Call ensure_server() in `count` new processes at the same moment; their answers."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"BATCHDB_HOME": str(home), "PYTHONPATH": pythonpath}
    start_at = str(time.time() + 1.0)  # after every interpreter has imported batchdb
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_SCRIPT, start_at],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    answers = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        answers.append(json.loads(out))
    return answers


def live_postmasters(data_dir: Path) -> list[int]:
    """Pids of live (not zombie) postgres postmasters serving `data_dir`."""
    pids = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        if (
            (process.info["name"] or "").startswith("postgres")
            and process.info["status"] != psutil.STATUS_ZOMBIE
            and str(data_dir) in (process.info["cmdline"] or [])
        ):
            pids.append(process.pid)
    return pids


def fetch_one(server: EmbeddedServer, query: str) -> tuple[object, ...] | None:
    with psycopg.connect(server.dsn) as conn:
        return conn.execute(query).fetchone()


def test_home_is_batchdb_home_else_xdg_data_home_else_local_share(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BATCHDB_HOME", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert batchdb_home() == tmp_path.resolve() / "explicit"
    monkeypatch.delenv("BATCHDB_HOME")
    assert batchdb_home() == tmp_path.resolve() / "xdg" / "batchdb"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert batchdb_home() == tmp_path.resolve() / "user" / ".local" / "share" / "batchdb"


def test_first_start_serves_the_batchdb_database_and_later_calls_reuse_it(home: Path) -> None:
    assert server_status() is None

    server = ensure_server()

    assert server.data_dir == home / "pg"
    assert server.log_file == home / "pg" / "server.log"
    assert server.log_file.exists()
    assert server.dsn == f"postgresql://postgres@127.0.0.1:{server.port}/batchdb"
    assert fetch_one(server, "SELECT 1") == (1,)
    assert fetch_one(server, "SELECT current_database()") == ("batchdb",)
    assert fetch_one(server, "SHOW max_connections") == ("200",)
    assert fetch_one(server, "SHOW shared_buffers") == ("256MB",)
    assert fetch_one(server, "SHOW fsync") == ("on",)
    state = json.loads((home / "server.json").read_text())
    assert (state["port"], state["pid"], state["dsn"]) == (server.port, server.pid, server.dsn)

    assert ensure_server() == server
    assert server_status() == server


def test_another_process_finds_the_running_server(home: Path) -> None:
    server = ensure_server()

    [answer] = ensure_in_subprocesses(home, 1)

    assert answer == {"port": server.port, "pid": server.pid}
    assert live_postmasters(server.data_dir) == [server.pid]


def test_processes_racing_on_a_fresh_home_end_with_one_server(home: Path) -> None:
    answers = ensure_in_subprocesses(home, 3)

    assert len({(a["port"], a["pid"]) for a in answers}) == 1
    # The server outlives the process that started it.
    server = server_status()
    assert server is not None
    assert (server.port, server.pid) == (answers[0]["port"], answers[0]["pid"])
    assert live_postmasters(server.data_dir) == [server.pid]


def test_stop_then_restart_keeps_the_data(home: Path) -> None:
    server = ensure_server()
    with psycopg.connect(server.dsn) as conn:
        conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")

    assert stop_server() is True

    assert server_status() is None
    assert live_postmasters(server.data_dir) == []
    assert stop_server() is False

    restarted = ensure_server()
    assert restarted.pid != server.pid
    # Same port: workers holding the old DSN reconnect to the restarted server.
    assert restarted.port == server.port
    assert fetch_one(restarted, "SELECT x FROM kept") == (42,)


def test_a_killed_postmaster_is_detected_and_replaced(home: Path) -> None:
    server = ensure_server()
    with psycopg.connect(server.dsn) as conn:
        conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")

    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while live_postmasters(server.data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert server_status() is None  # postmaster.pid and server.json are now stale
    assert json.loads((home / "server.json").read_text())["pid"] == server.pid

    recovered = ensure_server()
    assert recovered.pid != server.pid
    # The port is kept, so the dead server's socket lock file had to go too.
    assert recovered.port == server.port
    assert fetch_one(recovered, "SELECT x FROM kept") == (42,)  # committed means durable
    assert json.loads((home / "server.json").read_text())["pid"] == recovered.pid
    assert live_postmasters(server.data_dir) == [recovered.pid]


def test_files_left_by_a_server_before_a_reboot_do_not_block_a_start(home: Path) -> None:
    server = ensure_server()
    pid_file = (server.data_dir / "postmaster.pid").read_text().splitlines()
    state = (home / "server.json").read_text()
    stop_server()

    # After a reboot the recorded pid may belong to an unrelated live process.
    with subprocess.Popen(["sleep", "60"]) as unrelated:
        try:
            pid_file[0] = str(unrelated.pid)
            (server.data_dir / "postmaster.pid").write_text("\n".join(pid_file) + "\n")
            (home / "server.json").write_text(state)

            assert server_status() is None
            started = ensure_server()
        finally:
            unrelated.kill()

    assert started.pid not in (server.pid, unrelated.pid)
    assert fetch_one(started, "SELECT 1") == (1,)
