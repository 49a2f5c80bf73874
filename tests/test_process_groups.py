"""workers/process_groups.py: a leader and everything it started stop together."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

from batchdb.workers.process_groups import group_members, stop_process_groups

# A leader that starts a grandchild ignoring SIGTERM for a moment (as `dagster api grpc` did for 2 s),
# then exits on SIGTERM without stopping it.
LEADER = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1), exit(0))); time.sleep(600)"])
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # before saying it is up: the test signals at once
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stopping_a_leader_stops_the_processes_it_started() -> None:
    leader = subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE, start_new_session=True)
    assert leader.stdout is not None
    with leader.stdout:
        grandchild = psutil.Process(int(leader.stdout.readline()))
        assert {p.pid for p in group_members(leader.pid)} == {leader.pid, grandchild.pid}
        started = time.monotonic()
        assert stop_process_groups([leader], grace=30) == [0]
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
        assert group_members(leader.pid) == []
        assert time.monotonic() - started < 30  # it stopped on SIGTERM; nothing waited out the grace period


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert stubborn.stdout is not None
    with stubborn.stdout:
        assert stubborn.stdout.readline()
        assert stop_process_groups([stubborn], grace=1) == [-signal.SIGKILL]
