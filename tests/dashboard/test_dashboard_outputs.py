"""Job detail's "Output file": the job's own file, found by the job id batchdb writes into it, never another's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import batchdb
from batchdb.dashboard import queries
from batchdb.dashboard.run import APP as dashboard_app
from batchdb.dashboard.settings import OUTPUTS_ENV
from batchdb.results import JOB_ID_METADATA

APP = str(dashboard_app)  # batchdb/dashboard/app.py, as `batchdb dashboard` runs it


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    st.cache_data.clear()
    yield
    st.cache_data.clear()


def job_page(job_id: int) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.query_params["job"] = str(job_id)
    at.switch_page("views/job_detail.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_dagster_partition_file_is_matched_to_its_own_job(
    seeded,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As BatchDBResource writes them: <output_root>/<asset>/<partition>.parquet, no job id in the name.
    folder = tmp_path / "headline_sentiment"
    batchdb.Job(seeded.beta, dsn=seeded.dsn).to_parquet(folder / "2024-04-01.parquet")
    batchdb.Job(seeded.alpha, dsn=seeded.dsn).to_parquet(folder / "2024-04-02.parquet")
    assert pq.read_schema(folder / "2024-04-02.parquet").metadata[JOB_ID_METADATA] == str(seeded.alpha).encode()
    monkeypatch.setenv(OUTPUTS_ENV, str(tmp_path))

    at = job_page(seeded.alpha)
    (picker,) = [s for s in at.selectbox if s.label == "File"]
    assert picker.value == str(folder / "2024-04-02.parquet")
    assert at.dataframe[-1].value["custom_id"].str.startswith("a-").all()  # the sample is alpha's rows

    at = job_page(seeded.gamma)  # no file of its own: nothing is preselected, and the page says so
    (picker,) = [s for s in at.selectbox if s.label == "File"]
    assert picker.value is None
    assert any(f"No output file of job {seeded.gamma}" in i.value for i in at.info)


def test_a_file_named_after_another_job_is_not_taken_for_this_one(seeded, tmp_path: Path) -> None:
    legacy = tmp_path / f"job-{seeded.alpha}.parquet"
    batchdb.Job(seeded.beta, dsn=seeded.dsn).to_parquet(legacy)  # misnamed: it holds beta's rows
    assert queries.output_for_job([legacy], seeded.alpha) is None
    assert queries.output_for_job([legacy], seeded.beta) == legacy
