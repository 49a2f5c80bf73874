"""Stop a process together with everything it started: its whole process group.

`dagster dev`, dagster-webserver and dagster-daemon start code servers (`dagster api grpc
--lazy-load-user-code ...`) and runs in their own process group. Stopping only the leader can
leave those running for hours once it is gone (a fresh-clone CI run left one 90 minutes after
the suite ended), so each leader is started with ``start_new_session=True`` and stopped here:
SIGTERM to the leader first (its orderly shutdown stops what it can), then SIGTERM to whatever of
its group is still alive, then SIGKILL to the group after `grace` seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable

import psutil


def group_members(pgid: int) -> list[psutil.Process]:
    """The live (non-zombie) processes of process group `pgid`."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def stop_process_groups(leaders: Iterable[subprocess.Popen[bytes]], grace: float = 30.0) -> list[int | None]:
    """Stop each leader (started with ``start_new_session=True``) and every process of its group.

    Returns the leaders' exit codes in order (negative: the signal that ended one).
    """
    leaders = list(leaders)
    deadline = time.monotonic() + grace
    for leader in leaders:
        if leader.poll() is None:
            leader.send_signal(signal.SIGTERM)
    for leader in leaders:
        try:
            leader.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for leader in leaders:
        # Not the leader itself: only Popen may reap it, or its exit code is lost.
        left = [member for member in group_members(leader.pid) if member.pid != leader.pid]
        for member in left:
            try:
                member.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(left, timeout=max(0.0, deadline - time.monotonic()))
        if alive or leader.poll() is None:
            try:
                os.killpg(leader.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            psutil.wait_procs(alive, timeout=10)
        leader.wait()
    return [leader.returncode for leader in leaders]
