"""Start worker processes (`python -m batchdb.workers`) and stop them gracefully.

For the tests, the fault drills, `batchdb demo` and `batchdb dagster`:

    workers = start_workers(2, dsn, env={"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": "sk-test"},
                            args=("--concurrency", "32"), log_dir=tmp_path)
    try:
        job.wait()
    finally:
        codes = workers.stop()      # SIGTERM, up to `grace` seconds each, then SIGKILL; [0, 0] when graceful

or as a context manager (`with start_workers(...) as workers:`), which stops them on exit.

Each child gets this process's environment plus ``BATCHDB_DSN`` and the caller's ``env`` (but no
``BATCHDB_METRICS_PORT`` unless ``env`` gives one: several workers cannot share a port), with the
directory that holds the `batchdb` package first on ``PYTHONPATH`` (as `start_simulator` does), so
the children run this very code whatever their working directory. Their output goes to one file a
process, ``<log_dir>/worker-<i>.log`` (stdout and stderr together), or nowhere: never to a pipe,
which would stall a worker once it is full.

`stop_processes` is the stop on its own, for any child process (dagster-webserver, `dagster dev`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from batchdb import settings
from batchdb._source_root import SOURCE_ROOT

WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "batchdb.workers")
DEFAULT_GRACE_S = 30.0


def stop_processes(
    processes: Iterable[subprocess.Popen[bytes]], grace: float = DEFAULT_GRACE_S, *, kill_group: bool = False
) -> list[int | None]:
    """SIGTERM every process still running, wait up to `grace` seconds for each, SIGKILL the ones left.

    Returns the exit codes in order (0 for a graceful worker; ``-9`` for one that had to be killed).
    With `kill_group`, the SIGKILL goes to the process group each process leads (one started with
    ``start_new_session=True``), so its children die with it.
    """
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            if kill_group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()
    return [process.returncode for process in processes]


class WorkerProcesses:
    """Worker processes started with one environment and argument list, stopped together.

    `processes` holds every process started, in order (killed and exited ones included);
    `log_paths` their log files when there is a `log_dir`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        append_logs: bool = False,
        command: Sequence[str] = WORKER_COMMAND,
        grace: float = DEFAULT_GRACE_S,
    ) -> None:
        """`env` is added to this process's environment and ``BATCHDB_DSN=dsn``; `args` follow
        `command` (default ``python -m batchdb.workers``); logs are truncated unless `append_logs`;
        `grace` is how long `stop` waits for each process before SIGKILL."""
        full_env = {**os.environ, settings.DSN: dsn, **(env or {})}
        if settings.METRICS_PORT not in (env or {}):
            full_env.pop(settings.METRICS_PORT, None)  # one port cannot serve several workers: only when asked
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), full_env.get("PYTHONPATH")) if p)
        self.env = full_env
        self.args = tuple(args)
        self.command = tuple(command)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.append_logs = append_logs
        self.grace = grace
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log_paths: list[Path] = []

    def start(self, n: int = 1, *, command: Sequence[str] | None = None) -> list[subprocess.Popen[bytes]]:
        """Start `n` more processes (with `command` instead of the default one, if given); returns them."""
        argv = [*(command or self.command), *self.args]
        started = []
        for _ in range(n):
            if self.log_dir is None:
                process = subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                path = self.log_dir / f"worker-{len(self.processes)}.log"
                with path.open("ab" if self.append_logs else "wb") as log:
                    process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
                self.log_paths.append(path)
            self.processes.append(process)
            started.append(process)
        return started

    def alive(self) -> list[subprocess.Popen[bytes]]:
        """The processes still running."""
        return [p for p in self.processes if p.poll() is None]

    def kill(self, process: subprocess.Popen[bytes] | None = None) -> subprocess.Popen[bytes]:
        """SIGKILL `process` (default: a random running one) and wait for it; returns it."""
        victim = process or random.choice(self.alive())
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        return victim

    def stop(self) -> list[int | None]:
        """Stop every process (see `stop_processes`); returns all their exit codes, in start order."""
        return stop_processes(self.processes, self.grace)

    def log_text(self) -> str:
        """All the log files' text, one after another."""
        return "\n".join(path.read_text(errors="replace") for path in self.log_paths)

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"WorkerProcesses(pids={[p.pid for p in self.processes]}, alive={len(self.alive())})"


def start_workers(
    n: int,
    dsn: str,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    log_dir: str | os.PathLike[str] | None = None,
    append_logs: bool = False,
    command: Sequence[str] = WORKER_COMMAND,
    grace: float = DEFAULT_GRACE_S,
) -> WorkerProcesses:
    """`n` worker processes (see `WorkerProcesses`); if one fails to start, those started are stopped."""
    workers = WorkerProcesses(
        dsn, env=env, args=args, log_dir=log_dir, append_logs=append_logs, command=command, grace=grace
    )
    try:
        workers.start(n)
    except BaseException:
        workers.stop()
        raise
    return workers
