"""Helpers for the Dagster integration tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from batchdb.workers.process_groups import stop_process_groups

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout: float = 30) -> list[int | None]:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit codes. Each process leads its own group
    (`start_new_session=True`) and the whole group stops: dagster-webserver and dagster-daemon start
    `dagster api grpc` code servers that outlive them otherwise."""
    return stop_process_groups(processes, grace=timeout)


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def assert_parquet_matches_input(path: Path, expected: pd.DataFrame) -> pd.DataFrame:
    """The partition's Parquet file holds every input row, in order, with its answer."""
    assert path.exists(), path
    assert not list(path.parent.glob(".*.tmp")), "a temporary file was left behind"
    output = pq.read_table(path).to_pandas()
    assert len(output) == len(expected)
    for column in expected.columns:
        assert output[column].astype(str).tolist() == expected[column].astype(str).tolist(), column
    assert output["custom_id"].tolist() == expected["headline_id"].tolist()
    assert set(output["status"]) == {"succeeded"}
    for response in output["response"]:
        assert json.loads(response)["sentiment"] in {"positive", "negative", "neutral"}
    assert (output["cost_usd"] > 0).all()
    return output
