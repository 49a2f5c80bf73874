"""`dagster.materialize` in this process against real PostgreSQL, worker processes and the provider simulator."""

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pyarrow.parquet as pq
import pytest
from dagster_test_support import assert_parquet_matches_input, wait_until

import batchdb
from batchdb.dagster import ROWS_ANSWERED_CHECK, BatchDBResource, llm_batch_asset
from batchdb.dagster.example import headline_sentiment, headlines, sample_headlines

DAY = "2024-03-01"


def resource(dsn: str, root: Path, **fields: Any) -> BatchDBResource:
    return BatchDBResource(dsn=dsn, output_root=str(root), poll_interval=0.1, **fields)


def materialize(
    dsn: str,
    root: Path,
    *selection: dg.AssetsDefinition,
    partition_key: str = DAY,
    instance: dg.DagsterInstance | None = None,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [headlines, *selection],
        partition_key=partition_key,
        instance=instance,
        resources={"batchdb": resource(dsn, root)},
        raise_on_error=False,
    )


def jobs(dsn: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, idempotency_key, status FROM batchdb.jobs ORDER BY id").fetchall()


@pytest.fixture
def ephemeral_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], dg.DagsterInstance]]:
    """Instances on SQLite files, not `DagsterInstance.ephemeral()`: its in-memory database fails
    with "database table is locked" (no busy wait) when the test's thread reads runs while the
    run's thread writes them; a file database waits for the lock instead."""
    instances: list[dg.DagsterInstance] = []

    def make() -> dg.DagsterInstance:
        instances.append(dg.DagsterInstance.local_temp(str(tmp_path_factory.mktemp("dagster_home"))))
        return instances[-1]

    yield make
    for instance in instances:
        instance.dispose()


@contextmanager
def cancel_jobs_on_error(dsn: str) -> Iterator[None]:
    """A failed assertion must not leave runs waiting forever on jobs no worker drains."""
    try:
        yield
    except BaseException:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT batchdb.cancel_job(id) FROM batchdb.jobs WHERE status <> 'cancelled'")
        raise


def metadata_of(result: dg.ExecuteInProcessResult, asset: str = "headline_sentiment") -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node(asset)
    return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}


def test_one_partition_materializes_row_for_row_with_its_metadata(dsn, simulator, start_workers, tmp_path) -> None:
    start_workers(dsn, simulator, 1)
    result = materialize(dsn, tmp_path, headline_sentiment)
    assert result.success

    path = tmp_path / "headline_sentiment" / f"{DAY}.parquet"
    output = assert_parquet_matches_input(path, sample_headlines(DAY))
    meta = metadata_of(result)
    ((job_id, key, status),) = jobs(dsn)
    assert status == "completed" and key.startswith(f"dagster:headline_sentiment:{DAY}:")
    progress = batchdb.get_job(job_id, dsn=dsn).status()
    assert meta["batchdb/job_id"] == job_id
    assert meta["dagster/partition_row_count"] == 15
    assert meta["dagster/uri"] == path.resolve().as_uri()
    assert (meta["rows_succeeded"], meta["rows_failed"], meta["rows_dead"]) == (15, 0, 0)
    assert meta["prompt_tokens"] == progress.prompt_tokens == output["prompt_tokens"].sum() > 0
    assert meta["completion_tokens"] == progress.completion_tokens == output["completion_tokens"].sum() > 0
    assert meta["cost_usd"] == pytest.approx(float(progress.cost_usd)) and meta["cost_usd"] > 0
    assert [record.data["headline_id"] for record in meta["preview"].records] == output["headline_id"][:10].tolist()
    (check,) = result.get_asset_check_evaluations()
    assert (check.check_name, check.passed) == (ROWS_ANSWERED_CHECK, True)
    assert simulator.stats(series=False)["totals"]["accepted"] == 15


def test_same_partition_twice_while_its_job_runs_attaches_to_one_job(
    dsn,
    simulator,
    start_workers,
    tmp_path,
    ephemeral_instance,
) -> None:
    instances = [ephemeral_instance(), ephemeral_instance()]

    def job_tag(instance: dg.DagsterInstance) -> str | None:
        runs = instance.get_runs()
        return runs[0].tags.get("batchdb/job_id") if runs else None

    # No worker yet: the first run's job stays queued while the second run is launched.
    with ThreadPoolExecutor(2) as pool, cancel_jobs_on_error(dsn):
        first = pool.submit(materialize, dsn, tmp_path, headline_sentiment, instance=instances[0])
        wait_until(lambda: job_tag(instances[0]), 60, "the first run to submit its job")
        second = pool.submit(materialize, dsn, tmp_path, headline_sentiment, instance=instances[1])
        wait_until(lambda: job_tag(instances[1]), 60, "the second run to attach")
        assert len(jobs(dsn)) == 1
        start_workers(dsn, simulator, 1)
        results = [first.result(timeout=120), second.result(timeout=120)]

    assert all(r.success for r in results)
    ((job_id, _, status),) = jobs(dsn)
    assert status == "completed"
    assert [metadata_of(r)["batchdb/job_id"] for r in results] == [job_id, job_id]
    assert simulator.stats(series=False)["totals"]["accepted"] == 15  # every row was called once

    # Materializing it again after the job finished reattaches too: no new provider calls.
    again = materialize(dsn, tmp_path, headline_sentiment)
    assert again.success and metadata_of(again)["batchdb/job_id"] == job_id
    assert simulator.stats(series=False)["totals"]["accepted"] == 15

    # A new prompt is a new job.
    reworded = llm_batch_asset(
        name="headline_sentiment",
        source=headlines,
        model="gpt-4o-mini",
        prompt="What is the market mood of: {headline}",
        id_column="headline_id",
        max_tokens=20,
    )
    changed = materialize(dsn, tmp_path, reworded)
    assert changed.success and metadata_of(changed)["batchdb/job_id"] != job_id
    assert len(jobs(dsn)) == 2


def test_dead_rows_are_counted_and_checked_unless_failures_are_fatal(dsn, simulator, start_workers, tmp_path) -> None:
    simulator.set_config(error_rates={"http_500": 0.5})
    start_workers(dsn, simulator, 1)
    tolerant = llm_batch_asset(
        name="flaky",
        source=headlines,
        model="gpt-4o-mini",
        prompt="Mood: {headline}",
        id_column="headline_id",
        max_tokens=10,
        max_attempts=1,
    )
    result = materialize(dsn, tmp_path, tolerant)
    assert result.success
    meta = metadata_of(result, "flaky")
    assert meta["rows_dead"] > 0 and meta["rows_succeeded"] + meta["rows_dead"] == 15
    output = pq.read_table(tmp_path / "flaky" / f"{DAY}.parquet").to_pandas()
    assert len(output) == 15 and (output["status"] == "dead").sum() == meta["rows_dead"]
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["rows_without_response"].value == meta["rows_dead"]

    fatal = llm_batch_asset(
        name="strict",
        source=headlines,
        model="gpt-4o-mini",
        prompt="Mood: {headline}",
        id_column="headline_id",
        max_tokens=10,
        max_attempts=1,
        failures_fatal=True,
    )
    failed = materialize(dsn, tmp_path, fatal)
    assert not failed.success
    assert not (tmp_path / "strict").exists()
    (failure,) = [e for e in failed.all_events if e.is_step_failure]
    assert "rows have no answer" in failure.step_failure_data.error.message


def test_a_cancelled_run_cancels_its_job_and_a_relaunch_resumes_it(
    dsn,
    simulator,
    start_workers,
    tmp_path,
    ephemeral_instance,
) -> None:
    instance = ephemeral_instance()
    outcome: dict[str, dg.ExecuteInProcessResult] = {}
    # No worker: the job stays queued until the run is cancelled.
    thread = threading.Thread(
        target=lambda: outcome.update(result=materialize(dsn, tmp_path, headline_sentiment, instance=instance))
    )
    thread.start()
    with cancel_jobs_on_error(dsn):
        run = wait_until(
            lambda: next((r for r in instance.get_runs() if "batchdb/job_id" in r.tags), None),
            60,
            "the run to submit its job",
        )
        job_id = int(run.tags["batchdb/job_id"])
        instance.report_run_canceling(run)
        wait_until(lambda: jobs(dsn)[0][2] == "cancelled", 30, "the job to be cancelled")
    thread.join(timeout=60)
    assert not outcome["result"].success
    assert batchdb.get_job(job_id, dsn=dsn).status().n_cancelled == 15
    assert not (tmp_path / "headline_sentiment").exists()

    start_workers(dsn, simulator, 1)
    started = time.monotonic()
    relaunched = materialize(dsn, tmp_path, headline_sentiment)
    assert relaunched.success and time.monotonic() - started < 60
    assert metadata_of(relaunched)["batchdb/job_id"] == job_id
    assert metadata_of(relaunched)["rows_succeeded"] == 15
    assert_parquet_matches_input(tmp_path / "headline_sentiment" / f"{DAY}.parquet", sample_headlines(DAY))


# -- a job waiting for its provider (the lane's circuit is open) needs nobody ----------------------------


def provider_waits(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if "waiting: provider unavailable" in e.user_message]


def test_a_refused_key_keeps_the_asset_waiting_says_why_once_and_it_finishes_by_itself(
    dsn, simulator, start_workers, tmp_path, ephemeral_instance
) -> None:
    """The workers' key is refused (401): the job is not paused, so the asset neither fails nor needs
    `batchdb resume`; the run's log says why once, and when the provider accepts the key again the
    breaker's probe gets through and the asset materializes."""
    simulator.set_config(api_keys=("sk-some-other-key",))  # the workers' sk-test is refused
    start_workers(dsn, simulator, 1, args=("--circuit-max-backoff", "1"))
    instance = ephemeral_instance()
    outcome: dict[str, dg.ExecuteInProcessResult] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=materialize(dsn, tmp_path, headline_sentiment, instance=instance))
    )
    thread.start()
    with cancel_jobs_on_error(dsn):
        run = wait_until(
            lambda: next((r for r in instance.get_runs() if "batchdb/job_id" in r.tags), None),
            60,
            "the run to submit its job",
        )
        wait_until(lambda: provider_waits(instance, run.run_id), 60, "the asset to say its job waits")
        job = batchdb.get_job(int(run.tags["batchdb/job_id"]), dsn=dsn).status()
        assert job.status == "running" and job.waiting_for_provider, job
        simulator.set_config(api_keys=("sk-some-other-key", "sk-test"))  # the provider takes the key back
        thread.join(timeout=120)
    assert not thread.is_alive()
    result = outcome["result"]
    assert result.success and metadata_of(result)["rows_succeeded"] == 15
    (warning,) = provider_waits(instance, result.run_id)  # once, however many polls saw it waiting
    assert "OpenAI refused the API key (401 invalid_api_key)" in warning and "sk-test" not in warning, warning
    assert any("the provider answers again" in e.user_message for e in instance.all_logs(result.run_id))


def test_a_timeout_while_the_provider_is_unavailable_fails_with_the_reason(dsn, tmp_path) -> None:
    job = batchdb.submit(
        sample_headlines(DAY),
        prompt="Mood: {headline}",
        id_column="headline_id",
        model="gpt-4o-mini",
        provider="openai",
        max_tokens=10,
        dsn=dsn,
    )
    error = "OpenAI refused the API key (401 invalid_api_key) at http://sim/v1/chat/completions"
    with psycopg.connect(dsn, autocommit=True) as conn:  # what a worker does on a 401
        conn.execute("SELECT * FROM batchdb.circuit_open('openai', 'default', 'gpt-4o-mini', %s, 3600)", (error,))
    assert job.status().waiting_for_provider
    with dg.build_asset_context() as context, pytest.raises(dg.Failure) as caught:
        resource(dsn, tmp_path, timeout=0.2).wait(context, job)
    message = str(caught.value)
    assert f"batchdb job {job.id} not finished after 0.2s" in message, message
    assert "waiting: provider unavailable since" in message and error in message, message
    assert job.status().status == "running"  # not paused: it resumes by itself when the provider answers


def test_an_asset_with_reuse_takes_the_answers_another_asset_already_paid_for(
    dsn, simulator, start_workers, tmp_path
) -> None:
    """llm_batch_asset(..., reuse="exact"): the same requests, asked by another asset, cost nothing and
    reach no provider; the metadata says how many rows were reused and what that saved."""
    from batchdb.dagster.example import SENTIMENT_SCHEMA

    start_workers(dsn, simulator, 1)
    assert materialize(dsn, tmp_path, headline_sentiment).success
    again = llm_batch_asset(
        name="headline_sentiment_again",
        source=headlines,
        prompt="Classify the market sentiment of this headline: {headline}",
        system="You are a financial analyst. Answer in JSON.",
        id_column="headline_id",
        model="gpt-4o-mini",
        provider="openai",
        response_format=SENTIMENT_SCHEMA,
        max_tokens=20,
        temperature=0,
        reuse="exact",
    )
    result = materialize(dsn, tmp_path, again)
    assert result.success
    meta = metadata_of(result, "headline_sentiment_again")
    assert (meta["rows_succeeded"], meta["rows_reused"], meta["cost_usd"]) == (15, 15, 0)
    assert meta["saved_by_reuse_usd"] > 0
    assert simulator.stats(series=False)["totals"]["accepted"] == 15  # the first asset's calls only
    first = pq.read_table(tmp_path / "headline_sentiment" / f"{DAY}.parquet").to_pandas()
    second = pq.read_table(tmp_path / "headline_sentiment_again" / f"{DAY}.parquet").to_pandas()
    assert second["response"].tolist() == first["response"].tolist()
