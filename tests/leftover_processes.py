"""Session-end check: the suite stops every process it starts.

A fresh-clone CI run left a `dagster api grpc` code server running 90 minutes after the suite ended.
Every process the suite starts carries `BATCHDB_TEST_SESSION=<this session's id>` in its
environment (set at configure time, so children, grandchildren and daemons that left the tree all
inherit it). After the session ends — every fixture torn down, the shared simulator included — any
such process still alive gets `GRACE_S` seconds (10) to finish exiting (one that is being stopped is no
leak), then is killed, and the run fails naming it.

Processes the suite starts on purpose to outlive it (the embedded PostgreSQL server used when
BATCHDB_TEST_DSN is unset) are registered with `keep_running(pid)`; their descendants are kept too.
"""

from __future__ import annotations

import os
import uuid

import psutil
import pytest

SESSION_VARIABLE = "BATCHDB_TEST_SESSION"
GRACE_S = float(os.environ.get("BATCHDB_TEST_LEFTOVER_GRACE_S", "10"))
_kept: set[int] = set()


def keep_running(pid: int) -> None:
    """`pid` (and what it starts) may outlive the session."""
    _kept.add(pid)


def pytest_configure(config: pytest.Config) -> None:
    os.environ[SESSION_VARIABLE] = uuid.uuid4().hex


def leftover_processes(session_id: str) -> list[psutil.Process]:
    """Live processes other than this one that carry `session_id`, or descend from this process."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for process in psutil.process_iter():
        if process.pid == me.pid or process.pid in found:
            continue
        try:
            if process.environ().get(SESSION_VARIABLE) == session_id:
                found[process.pid] = process
        except psutil.Error:
            continue  # gone, or not ours to read
    return [p for p in found.values() if _alive(p) and not _kept_ancestor(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kept_ancestor(process: psutil.Process) -> bool:
    try:
        return any(p.pid in _kept for p in (process, *process.parents()))
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {process.pid}"


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int):  # noqa: ANN201
    """After every other sessionfinish hook: pytest tears the last fixtures down in its own."""
    result = yield
    session_id = os.environ.get(SESSION_VARIABLE)
    if session_id is None:
        return result
    left = leftover_processes(session_id)
    if left:
        _, left = psutil.wait_procs(left, timeout=GRACE_S)
        left = [p for p in left if _alive(p)]
    if left:
        described = [_describe(p) for p in left]
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        message = (
            f"{len(left)} process(es) started by the tests were still running after the session "
            f"(killed now); stop every process a test starts:\n  " + "\n  ".join(described)
        )
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "leftover processes", red=True)
            reporter.write_line(message)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
