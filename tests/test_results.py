"""`batchdb results` / `Job.to_file`: the file's extension picks its format, nothing else is guessed."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import batchdb
from batchdb import results
from batchdb.cli import cli


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _submit(dsn: str, n: int = 3) -> batchdb.Job:
    frame = pd.DataFrame({"id": [f"x{i}" for i in range(n)], "headline": [f"h{i}" for i in range(n)]})
    return batchdb.submit(
        frame, prompt="Rate: {headline}", id_column="id", model="gpt-4o-mini", provider="instant", dsn=dsn
    )


def test_the_extension_picks_the_format_and_files_get_the_umask_mode(
    dsn: str,
    tmp_path: Path,
    drain,
    umask_022: None,
) -> None:
    job = _submit(dsn)
    drain()
    runner = CliRunner()
    for name in ("out.parquet", "out.csv", "out.jsonl"):
        result = runner.invoke(cli, ["results", str(job.id), "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"wrote 3 rows to {tmp_path / name}"
        assert result.stderr == ""  # a finished job: no warning
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    parquet = pq.read_table(tmp_path / "out.parquet").to_pandas()
    csv = pd.read_csv(tmp_path / "out.csv")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = ["echo: Rate: h0", "echo: Rate: h1", "echo: Rate: h2"]
    assert list(parquet["response"]) == list(csv["response"]) == [r["response"] for r in lines] == expected
    assert list(csv.columns) == list(parquet.columns) == list(lines[0])
    assert [r["custom_id"] for r in lines] == ["x0", "x1", "x2"] and lines[0]["status"] == "succeeded"
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_unknown_extension_is_refused_and_nothing_is_written(dsn: str, tmp_path: Path, drain) -> None:
    job = _submit(dsn)
    drain()
    result = CliRunner().invoke(cli, ["results", str(job.id), "-o", str(tmp_path / "x.json")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: cannot write x.json: unknown extension '.json'; "
        "name the file with one of .parquet, .pq, .csv, .jsonl, .ndjson"
    )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(results.UnsupportedFormat):
        job.to_file(tmp_path / "x")


def test_exporting_an_unfinished_job_warns(dsn: str, tmp_path: Path) -> None:
    job = _submit(dsn)  # no worker: the rows are queued
    target = tmp_path / "partial.csv"
    result = CliRunner().invoke(cli, ["results", str(job.id), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (
        f"warning: job {job.id} is running (0/3 rows done): the file holds only the rows finished so far"
    )
    assert list(pd.read_csv(target)["status"]) == ["queued"] * 3
