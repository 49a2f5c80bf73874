"""A worker's log (workers/logs.py): no line per request, JSON lines on request."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

import batchdb
from batchdb.simulator import SimulatorProcess
from batchdb.workers.logs import JsonFormatter, configure_worker_logging
from batchdb.workers.processes import WorkerProcesses

ROWS = 40  # per provider


def run_worker_through_the_sdks(dsn: str, sim: SimulatorProcess, tmp_path: Path, *args: str) -> list[str]:
    """Drain one OpenAI and one Gemini job (real SDKs, simulator over HTTP) with one worker; its log lines."""
    frame = pd.DataFrame({"text": [f"headline {i}" for i in range(ROWS)]})
    jobs = [
        batchdb.submit(
            frame, prompt="Sentiment: {text}", model="gpt-4o-mini", provider="openai", max_tokens=8, dsn=dsn
        ),
        batchdb.submit(
            frame, prompt="Sentiment: {text}", model="gemini-2.5-flash", provider="gemini", max_tokens=8, dsn=dsn
        ),
    ]
    env = {
        "OPENAI_BASE_URL": sim.openai_base_url,
        "OPENAI_API_KEY": "sk-test",
        "GEMINI_BASE_URL": sim.gemini_base_url,
        "GEMINI_API_KEY": "gemini-test",
    }
    with WorkerProcesses(
        dsn, env=env, args=("--exit-when-idle", "--poll-interval", "0.5", *args), log_dir=tmp_path, grace=10
    ) as workers:
        workers.start()
        assert workers.processes[0].wait(timeout=120) == 0, workers.log_text()
    for job in jobs:
        status = job.status()
        assert (status.status, status.n_succeeded) == ("completed", ROWS), workers.log_text()
    return [line for line in workers.log_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_worker_logs_no_line_per_request(dsn: str, simulator: Callable[..., SimulatorProcess], tmp_path: Path) -> None:
    lines = run_worker_through_the_sdks(dsn, simulator(), tmp_path)
    # Start, stop and a few state lines for 2 x 40 requests; the SDKs' HTTP clients said nothing.
    assert len(lines) < 10, "\n".join(lines)
    assert not any(
        "HTTP Request" in line or "/chat/completions" in line or "generateContent" in line for line in lines
    ), "\n".join(lines)


@pytest.mark.slow
def test_log_format_json_writes_one_object_per_line(
    dsn: str, simulator: Callable[..., SimulatorProcess], tmp_path: Path
) -> None:
    lines = run_worker_through_the_sdks(dsn, simulator(), tmp_path, "--log-format", "json")
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(e, dict) and {"ts", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e["logger"] == "batchdb.workers.worker" and "started" in e["message"] for e in entries)
    assert len(entries) < 10


def test_library_info_is_quiet_by_default_whatever_the_client_is_called() -> None:
    root = logging.getLogger()
    saved = (root.level, {n: logging.getLogger(n).level for n in ("batchdb", "httpx2", "some_new_client")})
    try:
        root.setLevel(logging.WARNING)  # `batchdb worker` without -v
        configure_worker_logging()
        assert logging.getLogger("batchdb.workers.worker").isEnabledFor(logging.INFO)
        assert logging.getLogger("batchdb.queue").isEnabledFor(logging.INFO)
        for client in ("httpx", "httpx2", "google_genai._api_client", "some_new_client"):
            assert not logging.getLogger(client).isEnabledFor(logging.INFO), client
    finally:
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


def test_json_formatter_keeps_exceptions_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "batchdb.workers.worker",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            ("x",),
            exc_info=__import__("sys").exc_info(),
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed x" and "ValueError: boom" in entry["exception"]


def test_progress_is_one_line_per_interval_not_per_request(
    dsn: str,
    drain,
    caplog: pytest.LogCaptureFixture,
) -> None:
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(300)]})
    batchdb.submit(frame, prompt="{text}", model="m", provider="instant", dsn=dsn)
    caplog.set_level(logging.INFO, logger="batchdb.workers")
    drain()  # the default interval (60 s) is longer than this drain: no progress line
    assert not [r for r in caplog.records if "row(s) done" in r.getMessage()]
    batchdb.submit(frame, prompt="{text}", model="m", provider="instant", dsn=dsn)
    drain(progress_interval=0.0)  # every completed batch may report, never every row
    progress = [r.getMessage() for r in caplog.records if "row(s) done" in r.getMessage()]
    assert 1 <= len(progress) < 300
    assert sum(int(line.split()[0]) for line in progress) == 300  # every row counted once


def test_a_worker_started_from_python_quiets_the_http_clients_and_masks_keys(drain) -> None:
    """Not only `batchdb worker`: `Worker(...).run()` in an embedding application protects its logs too."""
    from batchdb.secrets import RedactingFilter

    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    saved = {name: logging.getLogger(name).level for name in ("httpx", "openai")}
    try:
        for name in saved:
            logging.getLogger(name).setLevel(logging.NOTSET)
        drain()
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
        assert logging.getLogger("httpx").level == logging.WARNING
        assert logging.getLogger("openai").level == logging.WARNING
        drain()  # a second worker in the same process adds no second filter
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
