"""`Job`: a handle on one submitted batch — progress, waiting, control, results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg

from batchdb import events
from batchdb import results as results_module
from batchdb.db import connect
from batchdb.models import JobStatus
from batchdb.queries import query


class JobNotFound(LookupError):
    """No such job, or it belongs to another user (row-level security hides it)."""


@contextmanager
def _visible(job_id: int) -> Iterator[None]:
    """The database functions say 'does not exist' (no_data_found) for jobs the role cannot see."""
    try:
        yield
    except psycopg.errors.NoDataFound:
        raise JobNotFound(f"job {job_id} does not exist") from None


@dataclass(frozen=True, slots=True)
class JobProgress:
    """One row of the `batchdb.job_progress` view."""

    job_id: int
    name: str | None
    owner: str
    provider: str
    model: str
    status: str
    status_reason: str | None
    priority: int
    n_total: int
    n_queued: int
    n_running: int
    n_succeeded: int
    n_failed: int
    n_dead: int
    n_cancelled: int
    n_done: int
    pct_done: Decimal
    n_retries: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    budget_usd: Decimal | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rows_per_second: Decimal | None
    eta: timedelta | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> JobProgress:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    @property
    def finished(self) -> bool:
        return JobStatus(self.status).final

    def summary(self) -> str:
        return (
            f"job {self.job_id} {self.status}: {self.n_done}/{self.n_total} done "
            f"({self.n_succeeded} succeeded, {self.n_failed} failed, {self.n_dead} dead, {self.n_cancelled} cancelled), "
            f"{self.prompt_tokens + self.completion_tokens:,} tokens, ${self.cost_usd:.4f}"
        )


class Job:
    def __init__(self, job_id: int, *, dsn: str | None = None) -> None:
        self.id = int(job_id)
        self._dsn = dsn

    def __repr__(self) -> str:
        return f"Job({self.id})"

    def status(self) -> JobProgress:
        with connect(self._dsn) as conn:
            return self._progress(conn)

    def wait(self, *, progress: bool = False, poll_interval: float = 0.5, timeout: float | None = None) -> JobProgress:
        """Block until the job is completed or cancelled (or paused, which needs a person).

        It LISTENs on batchdb_events, so it returns as soon as the job finishes, and
        polls every `poll_interval` for the progress bar. Survives a database
        restart: the connection is re-opened.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        conn: psycopg.Connection | None = None
        try:
            while True:
                current = None
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = connect(self._dsn)
                        events.listen(conn)
                    current = self._progress(conn)
                    if progress:
                        bar = _update_bar(bar, current)
                    if current.finished or current.status == JobStatus.PAUSED:
                        return current
                    # Sleep until a job event arrives (LISTEN) or the poll interval passes.
                    events.poll(conn, poll_interval)
                except psycopg.OperationalError:
                    conn = None
                    time.sleep(max(poll_interval, 1.0))
                if deadline is not None and time.monotonic() >= deadline:
                    summary = current.summary() if current else "database unreachable"
                    raise TimeoutError(f"job {self.id} not finished after {timeout}s: {summary}")
        finally:
            if bar is not None:
                bar.close()
            if conn is not None:
                conn.close()

    def cancel(self) -> int:
        """Stop the job: queued rows never run; in-flight results are not recorded. Returns rows cancelled."""
        with connect(self._dsn) as conn, _visible(self.id):
            return int(conn.execute(query("cancel_job"), {"job_id": self.id}).fetchone()["n"])

    def retry(self, *, failed: bool = True, dead: bool = True, cancelled: bool = False) -> int:
        """Queue final rows again (all attempts afresh). Returns rows requeued."""
        statuses = [s for s, on in (("failed", failed), ("dead", dead), ("cancelled", cancelled)) if on]
        if not statuses:
            return 0
        with connect(self._dsn) as conn, _visible(self.id):
            return int(conn.execute(query("retry_job"), {"job_id": self.id, "statuses": statuses}).fetchone()["n"])

    def resume(self, *, budget_usd: float | None = None) -> bool:
        with connect(self._dsn) as conn:
            row = conn.execute(query("resume_job"), {"job_id": self.id, "budget_usd": budget_usd}).fetchone()
        if row is None:
            self.status()  # raises JobNotFound for a job this role cannot see
        return row is not None

    def results(self) -> pd.DataFrame:
        """Input columns + response, status, usage and error for every row, in input order."""
        self.status()  # raises JobNotFound for a job this role cannot see
        return results_module.read_dataframe(self.id, dsn=self._dsn)

    def to_parquet(self, path: str | Path) -> int:
        """Stream the results to Parquet in Arrow batches; returns rows written."""
        self.status()
        return results_module.write_parquet(self.id, Path(path), dsn=self._dsn)

    def to_file(self, path: str | Path) -> int:
        """Write the results as Parquet (.parquet, .pq), CSV (.csv) or JSON lines (.jsonl, .ndjson),
        chosen by the extension (another extension raises `results.UnsupportedFormat`); returns rows written."""
        path = Path(path)
        results_module.writer_for(path)
        self.status()
        return results_module.write_file(self.id, path, dsn=self._dsn)

    def _progress(self, conn: psycopg.Connection) -> JobProgress:
        row = conn.execute(query("job_progress"), {"job_id": self.id}).fetchone()
        if row is None:
            raise JobNotFound(f"job {self.id} does not exist")
        return JobProgress.from_row(row)


def get_job(job_id: int, *, dsn: str | None = None) -> Job:
    job = Job(job_id, dsn=dsn)
    job.status()  # raises JobNotFound
    return job


def list_jobs(*, limit: int = 50, dsn: str | None = None) -> list[JobProgress]:
    with connect(dsn) as conn:
        return [JobProgress.from_row(r) for r in conn.execute(query("list_jobs"), {"limit": limit}).fetchall()]


def _update_bar(bar: Any, current: JobProgress) -> Any:
    from tqdm import tqdm

    if bar is None:
        bar = tqdm(total=current.n_total, desc=f"job {current.job_id}", unit="row", dynamic_ncols=True)
    bar.total = current.n_total
    bar.n = current.n_done
    bar.set_postfix(
        ok=current.n_succeeded,
        failed=current.n_failed + current.n_dead,
        tokens=f"{current.prompt_tokens + current.completion_tokens:,}",
        cost=f"${current.cost_usd:.4f}",
        refresh=False,
    )
    bar.refresh()
    return bar
