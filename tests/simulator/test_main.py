"""`batchdb simulator` / `python -m batchdb.simulator`: its options are listed, and it says where it listens."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from click.testing import CliRunner

from batchdb.cli import cli

SOURCE_ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_the_simulator_options() -> None:
    result = CliRunner().invoke(cli, ["simulator", "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("usage: batchdb simulator")
    for option in ("--port", "--rpm", "--tpm", "--config", "--latency"):
        assert option in result.output


def test_it_prints_its_url_and_the_openai_base_url_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "batchdb", "simulator", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        first, second = _read_lines(process.stdout, 2, timeout=60)
        match = re.fullmatch(r"provider simulator listening on (http://127\.0\.0\.1:\d+) \(Ctrl-C stops it\)\n", first)
        assert match, (first, second)
        url = match.group(1)
        assert f"OPENAI_BASE_URL={url}/v1 " in second
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{url}/_sim/health", timeout=30) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        if process.stdout is not None:
            process.stdout.close()


def _read_lines(stream: IO[bytes], n: int, *, timeout: float) -> list[str]:
    """The first `n` lines, or what came within `timeout` seconds (a silent process must not hang the test)."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < n and (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    lines = [line + "\n" for line in data.decode().split("\n")[:n]]
    return lines + [""] * (n - len(lines))
