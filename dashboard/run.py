"""Start the dashboard: Streamlit in a child process, on 127.0.0.1, against the workers' database.

`run_dashboard(dsn, port)` is what `batchdb dashboard` calls: it resolves the
database exactly as the workers do (explicit DSN, else $BATCHDB_DSN, else the
embedded server, which it starts if needed), passes it to Streamlit in the
environment (never on the command line, where `ps` would show a password),
waits until the server answers, and serves until interrupted.
`start_dashboard` does the same and returns a handle (tests, scripts).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from batchdb._source_root import SOURCE_ROOT
from batchdb.dashboard.settings import OUTPUTS_ENV, REFRESH_ENV
from batchdb.db import DSN_ENV, resolve_dsn

# The app file inside the batchdb package: batchdb/dashboard/app.py (through the symlink in a
# checkout, a plain file in a wheel). It imports its neighbours as batchdb.dashboard.*.
APP = Path(__file__).parent / "app.py"
DEFAULT_PORT = 8501


@dataclass
class DashboardProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path | None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the Streamlit process group; SIGKILL if it has not exited within `timeout`."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        return self.process.returncode


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def streamlit_command(*, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]


def start_dashboard(
    dsn: str | None = None,
    *,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    outputs_dir: str | os.PathLike[str] | None = None,
    refresh_seconds: float | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> DashboardProcess:
    """Start Streamlit and return once `/_stcore/health` answers "ok"."""
    env = dict(os.environ)
    env[DSN_ENV] = resolve_dsn(dsn)
    # So the child imports this very batchdb, as batchdb.workers.processes does.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH")) if p)
    if outputs_dir is not None:
        env[OUTPUTS_ENV] = str(Path(outputs_dir).resolve())
    if refresh_seconds is not None:
        env[REFRESH_ENV] = str(refresh_seconds)
    log = Path(log_path) if log_path is not None else None
    stdout = open(log, "ab") if log is not None else None  # noqa: SIM115 - handed to the child
    try:
        process = subprocess.Popen(
            streamlit_command(host=host, port=port),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout else None,
            start_new_session=True,
        )
    finally:
        if stdout is not None:
            stdout.close()
    handle = DashboardProcess(process, f"http://{host}:{port}", log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"the dashboard exited with code {process.returncode} before answering\n{tail}")
        try:
            with urllib.request.urlopen(f"{handle.url}/_stcore/health", timeout=2) as reply:
                if reply.read().strip() == b"ok":
                    return handle
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            handle.stop()
            raise TimeoutError(f"the dashboard did not answer on {handle.url} within {timeout:.0f}s")
        time.sleep(0.2)


def run_dashboard(
    dsn: str | None = None,
    port: int = DEFAULT_PORT,
    *,
    host: str = "127.0.0.1",
    outputs_dir: str | os.PathLike[str] | None = None,
    refresh_seconds: float | None = None,
) -> int:
    """Serve the dashboard in the foreground until Ctrl-C / SIGTERM; returns Streamlit's exit code, or 0 when
    it was asked to stop.

    SIGTERM only interrupts the wait here: stopping Streamlit from inside the signal handler would wait
    on the process the interrupted `wait()` still holds (its lock), time out twice (22 s) and end in a
    `TimeoutExpired` traceback.
    """
    handle = start_dashboard(dsn, port=port, host=host, outputs_dir=outputs_dir, refresh_seconds=refresh_seconds)
    print(f"batchdb dashboard on {handle.url} (Ctrl-C to stop)", flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return handle.process.wait()
    except KeyboardInterrupt:
        handle.stop()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        handle.stop()
