"""`BatchDBResource`: one batchdb job per asset partition, waited for, its results written to Parquet.

The resource owns what a Dagster asset needs from batchdb: the idempotency key that ties a
partition to its job (asset key + partition key + a digest of everything that changes the
answers), submitting or reattaching, polling until the job is done while cancelling it if the
Dagster run is terminated, the Parquet path of a partition, and the materialization metadata.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import dagster as dg
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

import batchdb
from batchdb import BatchDBError, DatabaseUnavailable, DataSource, JobNotFound, JobProgress, JobStatus

ROWS_ANSWERED_CHECK = "all_rows_answered"

# Options of `batchdb.submit` that change how a job runs but not what it answers: changing them
# does not start a new job for a partition that already has one.
# A deadline (mode="auto") says when, not what: a run re-launched later reattaches to its job.
_OPERATIONAL_OPTIONS = frozenset(
    {"priority", "budget_usd", "max_attempts", "key_alias", "name", "owner", "dsn", "deadline"}
)
_RUN_STATUS_CHECK_SECONDS = 5.0
_PROGRESS_LOG_SECONDS = 15.0
_PREVIEW_CELL_CHARS = 200


class BatchDBResource(dg.ConfigurableResource["BatchDBResource"]):
    """Run LLM batches through batchdb from Dagster assets: one batchdb job per asset partition.

    `run` submits the partition's rows (or reattaches to the job already submitted for them),
    blocks until the workers have drained the job, writes the results to Parquet and returns a
    `MaterializeResult` with row counts, tokens, cost and a preview. Terminating the Dagster run
    cancels the job. The workers (`batchdb worker`) run outside Dagster and share the provider's
    rate limits through the database.

    Examples:
        .. code-block:: python

            import dagster as dg
            import pandas as pd

            from batchdb.dagster import BatchDBResource, rows_answered_check

            daily = dg.DailyPartitionsDefinition(start_date="2024-01-01")


            @dg.asset(partitions_def=daily)
            def headlines(context: dg.AssetExecutionContext) -> pd.DataFrame:
                return pd.read_parquet(f"s3://news/headlines/{context.partition_key}.parquet")


            @dg.asset(partitions_def=daily, pool="batchdb", check_specs=[rows_answered_check("sentiment")])
            def sentiment(
                context: dg.AssetExecutionContext, headlines: pd.DataFrame, batchdb: BatchDBResource
            ) -> dg.MaterializeResult[None]:
                return batchdb.run(
                    context,
                    headlines,
                    prompt="Classify the sentiment of this headline: {headline}",
                    id_column="headline_id",
                    model="gpt-4o-mini",
                    response_schema={"type": "object", "properties": {"sentiment": {"type": "string"}}},
                )


            defs = dg.Definitions(
                assets=[headlines, sentiment],
                resources={"batchdb": BatchDBResource(dsn=dg.EnvVar("BATCHDB_DSN"), output_root="/data/llm")},
            )
    """

    dsn: str | None = Field(
        default=None,
        description="PostgreSQL connection string of the batchdb database (any libpq DSN or URI). "
        "Unset: $BATCHDB_DSN in the run's environment, else batchdb's embedded server.",
    )
    output_root: str = Field(
        default="batchdb-output",
        description="Folder the results go under: <output_root>/<asset key path>/<partition>.parquet "
        "(layout 'files') or <output_root>/<asset key path>/date=<partition>/part-0.parquet (layout 'hive').",
    )
    layout: Literal["files", "hive"] = Field(
        default="files",
        description="'files': one <partition>.parquet per partition. 'hive': one <dimension>=<partition>/ "
        "folder per partition, so pyarrow, DuckDB and Spark read the asset's folder as one dataset.",
    )
    poll_interval: float = Field(default=2.0, description="Seconds between two looks at the job's progress.")
    timeout: float | None = Field(
        default=None,
        description="Give up waiting after this many seconds (the job keeps running, and materializing the "
        "partition again reattaches to it). None: wait as long as the job takes.",
    )

    # -- submitting ---------------------------------------------------------------------------

    def idempotency_key(self, context: dg.AssetExecutionContext, data: DataSource, **options: Any) -> str:
        """The job's key: asset key, partition key, and a digest of the data and the answer-changing options.

        The same partition with the same rows, prompt, model and request parameters always gets the same
        key, so a retried or re-launched run reattaches to its job; changing any of them starts a new job.
        Budget, priority, attempts and key alias are left out: they change how a job runs, not its answers.
        """
        answer_options = {k: _canonical(v) for k, v in options.items() if k not in _OPERATIONAL_OPTIONS}
        digest = hashlib.sha256()
        digest.update(json.dumps(answer_options, sort_keys=True, default=str).encode())
        digest.update(_data_fingerprint(data))
        partition = context.partition_key if context.has_partition_key else "unpartitioned"
        return f"dagster:{context.asset_key.to_user_string()}:{partition}:{digest.hexdigest()[:24]}"

    def submit(
        self,
        context: dg.AssetExecutionContext,
        data: DataSource,
        *,
        model: str,
        prompt: str | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> batchdb.Job:
        """Submit `data` as one batchdb job for this asset partition, or reattach to the one already submitted.

        `options` are `batchdb.submit`'s (system, id_column, provider, response_schema, max_tokens, ...).
        A job found cancelled (its Dagster run was terminated) is resumed: its cancelled rows are queued
        again and the rows already answered are kept.
        """
        if context.has_partition_key_range and len(context.partition_keys) > 1:
            raise dg.Failure(
                f"{context.asset_key.to_user_string()}: one batchdb job per partition, but this run targets "
                f"{len(context.partition_keys)} partitions; launch one partition per run (the default backfill policy)."
            )
        key = idempotency_key or self.idempotency_key(context, data, model=model, prompt=prompt, **options)
        partition = context.partition_key if context.has_partition_key else None
        options.setdefault("name", context.asset_key.to_user_string() + (f" [{partition}]" if partition else ""))
        options.setdefault("owner", "dagster")
        job = batchdb.submit(data, model=model, prompt=prompt, idempotency_key=key, dsn=self.dsn, **options)
        progress = job.status()
        if progress.status == JobStatus.CANCELLED and progress.n_cancelled > 0:
            requeued = job.retry(failed=False, dead=False, cancelled=True)
            context.log.info(f"batchdb job {job.id} had been cancelled: {requeued} cancelled rows queued again")
            progress = job.status()
        context.log.info(f"batchdb job {job.id} (idempotency key {key}): {progress.summary()}")
        try:
            context.instance.add_run_tags(context.run.run_id, {"batchdb/job_id": str(job.id)})
        except Exception as exc:  # noqa: BLE001 - a tag is a convenience; never fail the asset over it
            context.log.debug(f"could not tag the run with the batchdb job id: {exc}")
        return job

    # -- waiting and cancelling ---------------------------------------------------------------

    def wait(
        self,
        context: dg.AssetExecutionContext,
        job: batchdb.Job,
        *,
        poll_interval: float | None = None,
        timeout: float | None = None,
    ) -> JobProgress:
        """Block until the job is completed, logging progress; cancel the job if the Dagster run is terminated.

        Raises `dagster.Failure` if the job is cancelled from outside, paused (budget or quota: it
        needs a person, `batchdb resume`), deleted, or still unfinished after `timeout` seconds (the job
        keeps running then, and the next materialization of the partition reattaches to it).

        A job waiting for its provider (its lane's circuit is open: an outage, a refused key, a wrong
        endpoint) needs nobody: it resumes by itself once a probe call gets through (a worker restarted
        with a rotated key, say). So the wait goes on; the run's log says why, once per outage, and a
        `timeout` reached meanwhile fails with that reason.
        """
        interval = self.poll_interval if poll_interval is None else poll_interval
        limit = self.timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        next_run_check = time.monotonic() + _RUN_STATUS_CHECK_SECONDS
        last_logged: tuple[int, float] = (-1, time.monotonic())
        waiting = False  # told the log that the job waits for its provider (once per outage)
        try:
            while True:
                progress = _progress_or_none(job)
                if progress is not None:
                    if progress.status == JobStatus.COMPLETED:
                        return progress
                    if progress.status in (JobStatus.CANCELLED, JobStatus.PAUSED):
                        raise _stopped_job_failure(job, progress)
                    if progress.waiting_for_provider != waiting:
                        waiting = progress.waiting_for_provider
                        _log_provider_wait(context, job, progress)
                    now = time.monotonic()
                    if progress.n_done != last_logged[0] and now - last_logged[1] >= _PROGRESS_LOG_SECONDS:
                        context.log.info(progress.summary())
                        last_logged = (progress.n_done, now)
                now = time.monotonic()
                if now >= next_run_check:
                    next_run_check = now + _RUN_STATUS_CHECK_SECONDS
                    if _run_is_stopping(context):
                        # The interrupt normally arrives by itself; this covers runs it cannot reach.
                        raise dg.DagsterExecutionInterruptedError()
                if deadline is not None and now >= deadline:
                    summary = progress.summary() if progress else "database unreachable"
                    if progress is not None and progress.waiting_for_provider:
                        summary += f"; {progress.status_reason}"
                    raise dg.Failure(
                        f"batchdb job {job.id} not finished after {limit}s ({summary}); it keeps running, and "
                        "materializing this partition again reattaches to it."
                    )
                time.sleep(interval)
        except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError):
            self._cancel_for_interrupt(context, job)
            raise

    def cancel(self, job: batchdb.Job | int) -> int:
        """Cancel a job: its queued rows never run, in-flight answers are not recorded. Returns rows cancelled."""
        job_id = job.id if isinstance(job, batchdb.Job) else int(job)
        return batchdb.Job(job_id, dsn=self.dsn).cancel()

    def _cancel_for_interrupt(self, context: dg.AssetExecutionContext, job: batchdb.Job) -> None:
        try:
            cancelled = self.cancel(job)
        except (psycopg.Error, BatchDBError) as exc:
            context.log.error(f"the Dagster run was terminated but batchdb job {job.id} could not be cancelled: {exc}")
            return
        context.log.warning(
            f"the Dagster run was terminated: cancelled batchdb job {job.id} ({cancelled} rows not run)"
        )

    # -- output -------------------------------------------------------------------------------

    def output_path(self, context: dg.AssetExecutionContext) -> Path:
        """Where this asset partition's Parquet file goes (see `output_root` and `layout`)."""
        folder = Path(self.output_root).joinpath(*context.asset_key.path)
        if not context.has_partition_key:
            return folder.with_suffix(".parquet") if self.layout == "files" else folder / "part-0.parquet"
        key = context.partition_key
        if self.layout == "files":
            return folder / f"{_path_segment(str(key))}.parquet"
        for dimension, value in _partition_dimensions(context, key):
            folder = folder / f"{dimension}={_path_segment(value)}"
        return folder / "part-0.parquet"

    # -- all of it ----------------------------------------------------------------------------

    def run(
        self,
        context: dg.AssetExecutionContext,
        data: DataSource,
        *,
        model: str,
        prompt: str | None = None,
        failures_fatal: bool = False,
        preview_rows: int = 10,
        **options: Any,
    ) -> dg.MaterializeResult[None]:
        """Submit (or reattach), wait, write the partition's Parquet file and describe it.

        Rows that failed, died or were cancelled are counted, written with their error, and reported by
        the `all_rows_answered` check (when the asset declares it, see `rows_answered_check`); with
        `failures_fatal=True` any such row fails the asset instead and nothing is written.
        """
        started = time.monotonic()
        job = self.submit(context, data, model=model, prompt=prompt, **options)
        final = self.wait(context, job)
        unanswered = final.n_total - final.n_succeeded
        if failures_fatal and unanswered:
            raise dg.Failure(
                f"batchdb job {job.id}: {unanswered} of {final.n_total} rows have no answer "
                f"({final.n_failed} failed, {final.n_dead} dead, {final.n_cancelled} cancelled); "
                f"`batchdb retry {job.id}` queues them again.",
                metadata=_counts(final),
            )
        path = self.output_path(context)
        written = job.to_parquet(path)
        elapsed = time.monotonic() - started
        context.log.info(f"{final.summary()}; {written} rows written to {path}")
        return dg.MaterializeResult(
            metadata=_materialization_metadata(job, final, path, written, elapsed, preview_rows),
            check_results=_check_results(context, final, path),
        )


def rows_answered_check(asset: dg.AssetKey | str | list[str]) -> dg.AssetCheckSpec:
    """The check `BatchDBResource.run` reports on: every row of the partition has an answer.

    Declare it on an asset that calls `run` (``check_specs=[rows_answered_check("sentiment")]``). It
    warns, without failing the asset, when rows failed, died or were cancelled, with the count of each
    and of their error classes.
    """
    return dg.AssetCheckSpec(
        ROWS_ANSWERED_CHECK,
        asset=dg.AssetKey.from_coercible(asset),
        description="Every row of the partition has an answer (warns on failed, dead or cancelled rows).",
    )


# -- helpers -----------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return value.model_json_schema()
    return value


def _data_fingerprint(data: DataSource) -> bytes:
    """A digest of the rows themselves, so new upstream data for a partition means a new job."""
    digest = hashlib.sha256()
    if isinstance(data, pd.DataFrame):
        digest.update(json.dumps([[str(c), str(t)] for c, t in data.dtypes.items()]).encode())
        digest.update(pd.util.hash_pandas_object(data, index=False).to_numpy().tobytes())
    elif isinstance(data, pa.Table):
        digest.update(data.schema.to_string().encode())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, data.schema) as writer:
            writer.write_table(data)
        digest.update(sink.getvalue())
    else:
        digest.update(str(Path(data).resolve()).encode())
        with open(data, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.digest()


def _progress_or_none(job: batchdb.Job) -> JobProgress | None:
    try:
        return job.status()
    except JobNotFound:
        raise dg.Failure(f"batchdb job {job.id} was deleted while Dagster waited for it") from None
    except (psycopg.OperationalError, DatabaseUnavailable):
        return None  # the database is restarting or unreachable: keep waiting, as Job.wait does


def _stopped_job_failure(job: batchdb.Job, progress: JobProgress) -> dg.Failure:
    if progress.status == JobStatus.PAUSED:
        hint = f"`batchdb resume {job.id}` (with --budget to raise it) continues it; materialize again to wait"
    else:
        hint = "materializing the partition again resumes it"
    return dg.Failure(
        f"batchdb job {job.id} is {progress.status}: {progress.status_reason or 'no reason given'}. {hint}.",
        metadata=_counts(progress),
    )


def _log_provider_wait(context: dg.AssetExecutionContext, job: batchdb.Job, progress: JobProgress) -> None:
    if progress.waiting_for_provider:
        context.log.warning(
            f"batchdb job {job.id} is {progress.status_reason}. Its rows wait in the queue without spending "
            "attempts and resume by themselves once the provider answers (fix the key or endpoint and restart "
            "the workers, or wait out the outage); still waiting."
        )
    else:
        context.log.info(f"batchdb job {job.id}: the provider answers again; its rows resume")


def _run_is_stopping(context: dg.AssetExecutionContext) -> bool:
    try:
        run = context.instance.get_run_by_id(context.run.run_id)
    except Exception:  # noqa: BLE001 - Dagster's storage being briefly unavailable is no reason to stop
        return False
    return run is not None and run.status in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)


def _path_segment(value: str) -> str:
    return quote(value, safe="-_.,+@ ")


def _partition_dimensions(context: dg.AssetExecutionContext, key: str) -> list[tuple[str, str]]:
    partition_key = context.partition_key
    if isinstance(partition_key, dg.MultiPartitionKey):
        return sorted(partition_key.keys_by_dimension.items())
    if isinstance(context.assets_def.partitions_def, dg.TimeWindowPartitionsDefinition):
        return [("date", key)]
    return [("partition", key)]


def _counts(progress: JobProgress) -> dict[str, Any]:
    return {
        "rows_total": progress.n_total,
        "rows_succeeded": progress.n_succeeded,
        "rows_failed": progress.n_failed,
        "rows_dead": progress.n_dead,
        "rows_cancelled": progress.n_cancelled,
    }


def _materialization_metadata(
    job: batchdb.Job, final: JobProgress, path: Path, written: int, elapsed: float, preview_rows: int
) -> dict[str, Any]:
    table_schema = pq.read_schema(path)
    return {
        "dagster/partition_row_count": written,
        "dagster/uri": path.resolve().as_uri(),
        "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in table_schema]),
        "batchdb/job_id": job.id,
        **_counts(final),
        "retries": final.n_retries,
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "cost_usd": float(final.cost_usd),
        # Rows answered from stored answers of earlier jobs (submit option reuse="exact"), and what they saved.
        "rows_reused": final.n_reused,
        "saved_by_reuse_usd": float(final.reused_usd),
        "provider": final.provider,
        "model": final.model,
        "wait_seconds": round(elapsed, 2),
        "preview": _preview(path, preview_rows),
    }


def _preview(path: Path, rows: int) -> dg.MetadataValue:
    parquet = pq.ParquetFile(path)
    batch = next(parquet.iter_batches(batch_size=max(rows, 1)), None)
    records = [] if batch is None or rows <= 0 else batch.slice(0, rows).to_pylist()
    columns = [dg.TableColumn(f.name, _column_type(f.type)) for f in parquet.schema_arrow]
    return dg.MetadataValue.table(
        records=[dg.TableRecord({k: _cell(v) for k, v in record.items()}) for record in records],
        schema=dg.TableSchema(columns=columns),
    )


def _column_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_floating(arrow_type):
        return "float"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    return "string"


def _cell(value: Any) -> str | int | float | bool | None:
    if value is None or isinstance(value, bool | int | float):
        return value
    text = str(value)
    return text if len(text) <= _PREVIEW_CELL_CHARS else text[: _PREVIEW_CELL_CHARS - 1] + "…"


def _check_results(context: dg.AssetExecutionContext, final: JobProgress, path: Path) -> list[dg.AssetCheckResult]:
    if dg.AssetCheckKey(context.asset_key, ROWS_ANSWERED_CHECK) not in context.selected_asset_check_keys:
        return []
    unanswered = final.n_total - final.n_succeeded
    metadata: dict[str, Any] = {"rows_without_response": unanswered, **_counts(final)}
    if unanswered:
        outcome = pq.read_table(path, columns=["status", "error_class"]).to_pylist()
        classes = Counter(r["error_class"] or "none" for r in outcome if r["status"] != "succeeded")
        metadata["error_classes"] = dg.MetadataValue.json(dict(classes.most_common()))
    return [
        dg.AssetCheckResult(
            check_name=ROWS_ANSWERED_CHECK,
            passed=unanswered == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=metadata,
            description=None if not unanswered else f"{unanswered} of {final.n_total} rows have no answer",
        )
    ]
