"""`Job`: a handle on one submitted batch — progress, waiting, control, results."""

from __future__ import annotations

import logging
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
from psycopg.rows import DictRow

from batchdb import events, pooler
from batchdb import results as results_module
from batchdb.db import connect, one_row, resolve_dsn
from batchdb.errors import BatchDBError, translates_database_errors
from batchdb.models import JobStatus
from batchdb.queries import query

log = logging.getLogger(__name__)

# How long `Job.wait()` waits with no live worker before it says so.
NO_WORKER_WARNING_S = 30.0
# How a running job's reason starts while its lane's circuit is open (batchdb.circuit_wait_reason, 0007).
WAITING_FOR_PROVIDER = "waiting: provider unavailable"


class JobNotFound(BatchDBError, LookupError):
    """No such job, or it belongs to another user (row-level security hides it)."""


class JobPaused(BatchDBError, RuntimeError):
    """`Job.wait()` found the job paused: it needs a person (or a budget, or a quota turning over).

    `progress` is the job's state when it paused; `reason` is why (its status_reason).
    """

    def __init__(self, progress: JobProgress) -> None:
        self.progress = progress
        self.reason = progress.status_reason
        super().__init__(
            f"job {progress.job_id} paused at {progress.n_done}/{progress.n_total} done: "
            f"{progress.status_reason or 'no reason given'}; continue it with "
            f"`batchdb resume {progress.job_id}`"
        )


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
    # False when batchdb.prices has no row for the model: cost_usd is then unknown, not zero.
    priced: bool = True
    # Of prompt_tokens, those the provider served from its prompt cache (cheaper).
    cached_tokens: int = 0
    # Calls paid for but recorded on no row (fenced out: the lease was lost or the job cancelled
    # while they were in flight); cost_usd + wasted_usd is what the provider billed.
    wasted_calls: int = 0
    wasted_usd: Decimal = Decimal(0)
    # Of n_succeeded, rows answered by an identical earlier row's call (no call of their own).
    n_duplicates: int = 0
    # How the rows are sent: 'online' (a call each), 'batch' (the provider's Batch API, 0020) or
    # 'auto' (batch while a batch can end before `deadline`, online for the rest, 0022).
    mode: str = "online"
    deadline: datetime | None = None
    # Of n_succeeded, rows answered at $0 by a stored answer of an earlier job (reuse, 0021), and
    # what those answers cost when they were paid for: the money reuse saved.
    n_reused: int = 0
    reused_usd: Decimal = Decimal(0)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> JobProgress:
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    @property
    def cost_text(self) -> str:
        if not self.priced:
            return "cost unknown"
        wasted = (
            f" + ${self.wasted_usd:.4f} for {self.wasted_calls} call(s) recorded on no row" if self.wasted_calls else ""
        )
        return f"${self.cost_usd:.4f}{wasted}"

    @property
    def finished(self) -> bool:
        return JobStatus(self.status).final

    @property
    def waiting_for_provider(self) -> bool:
        """Running, but its lane's circuit is open (an outage, a refused key, a wrong endpoint:
        workers/breaker.py): its rows wait and resume by themselves, unlike a paused job's."""
        return self.status == JobStatus.RUNNING and (self.status_reason or "").startswith(WAITING_FOR_PROVIDER)

    @property
    def _mode_text(self) -> str:
        if self.mode == "batch":
            return " (batch mode)"
        if self.mode == "auto":
            deadline = self.deadline.isoformat(timespec="seconds") if self.deadline else "?"
            return f" (auto mode, deadline {deadline})"
        return ""

    def summary(self) -> str:
        return (
            f"job {self.job_id} {self.status}{self._mode_text}: "
            f"{self.n_done}/{self.n_total} done "
            f"({self.n_succeeded} succeeded, {self.n_failed} failed, {self.n_dead} dead, "
            f"{self.n_cancelled} cancelled), "
            f"{self.prompt_tokens + self.completion_tokens:,} tokens, "
            + (self.cost_text if self.priced else f"cost unknown (no price for {self.provider}/{self.model})")
            + (f", {self.n_reused} reused (saved ${self.reused_usd:.4f})" if self.n_reused else "")
        )


class Job:
    def __init__(self, job_id: int, *, dsn: str | None = None) -> None:
        self.id = int(job_id)
        self._dsn = dsn

    def __repr__(self) -> str:
        return f"Job({self.id})"

    @translates_database_errors
    def status(self) -> JobProgress:
        with connect(self._dsn) as conn:
            return self._progress(conn)

    @translates_database_errors
    def wait(
        self,
        *,
        progress: bool = False,
        poll_interval: float = 0.5,
        timeout: float | None = None,
        until: str = "finished",
        no_worker_after: float = NO_WORKER_WARNING_S,
    ) -> JobProgress:
        """Block until the job is completed or cancelled; raise `JobPaused` if it pauses.

        A paused job needs someone (a budget, a quota, a key): returning normally would
        let a script go on with partial results. `until="paused"` returns the paused
        job's progress instead. With no live worker for `no_worker_after` seconds
        while rows wait, it says so (a warning, and on the progress bar) and keeps waiting;
        the same when the job waits for its provider (a lane's circuit is open).

        It LISTENs on batchdb_events, so it returns as soon as the job finishes, and
        polls every `poll_interval` for the progress bar (only polls through a transaction
        pooler, which would lose the LISTEN). Survives a database
        restart: the connection is re-opened.
        """
        if until not in ("finished", "paused"):
            raise ValueError(f"until: expected 'finished' or 'paused', got {until!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        conn: psycopg.Connection[DictRow] | None = None
        watch = _WorkerWatch(no_worker_after, self.id)
        waiting = _WaitingWatch(self.id)
        try:
            while True:
                current = None
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = connect(self._dsn)
                        if not pooler.is_pooled(resolve_dsn(self._dsn)):
                            events.listen(conn)  # through a pooler it would be lost: poll only
                    current = self._progress(conn)
                    notes = {"workers": watch.check(conn, current), "waiting": waiting.check(current)}
                    if progress:
                        bar = _update_bar(bar, current, notes)
                    if current.finished:
                        return current
                    if current.status == JobStatus.PAUSED:
                        if until == "paused":
                            return current
                        raise JobPaused(current)
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

    @translates_database_errors
    def cancel(self) -> int:
        """Stop the job: queued rows never run; in-flight results are not recorded. Returns rows cancelled."""
        with connect(self._dsn) as conn, _visible(self.id):
            return int(one_row(conn.execute(query("cancel_job"), {"job_id": self.id}))["n"])

    @translates_database_errors
    def retry(self, *, failed: bool = True, dead: bool = True, cancelled: bool = False) -> int:
        """Queue final rows again (all attempts afresh). Returns rows requeued."""
        statuses = [s for s, on in (("failed", failed), ("dead", dead), ("cancelled", cancelled)) if on]
        if not statuses:
            return 0
        with connect(self._dsn) as conn, _visible(self.id):
            return int(one_row(conn.execute(query("retry_job"), {"job_id": self.id, "statuses": statuses}))["n"])

    @translates_database_errors
    def resume(self, *, budget_usd: float | None = None) -> bool:
        with connect(self._dsn) as conn:
            row = conn.execute(query("resume_job"), {"job_id": self.id, "budget_usd": budget_usd}).fetchone()
        if row is None:
            self.status()  # raises JobNotFound for a job this role cannot see
        return row is not None

    @translates_database_errors
    def results(self) -> pd.DataFrame:
        """Input columns + response, status, usage and error for every row, in input order."""
        self.status()  # raises JobNotFound for a job this role cannot see
        return results_module.read_dataframe(self.id, dsn=self._dsn)

    @translates_database_errors
    def to_parquet(self, path: str | Path) -> int:
        """Stream the results to Parquet in Arrow batches; returns rows written."""
        self.status()
        return results_module.write_parquet(self.id, Path(path), dsn=self._dsn)

    @translates_database_errors
    def to_file(self, path: str | Path) -> int:
        """Write the results as Parquet (.parquet, .pq), CSV (.csv) or JSON lines (.jsonl, .ndjson),
        chosen by the extension (another extension raises `results.UnsupportedFormat`); returns rows written."""
        path = Path(path)
        results_module.writer_for(path)
        self.status()
        return results_module.write_file(self.id, path, dsn=self._dsn)

    @translates_database_errors
    def batches(self) -> list[dict[str, Any]]:
        """A batch-mode job's chunks (batchdb.provider_batches), oldest first: rows, state, the
        provider's batch id and status, and the last error; empty for an online job."""
        with connect(self._dsn) as conn:
            self._progress(conn)  # raises JobNotFound
            return list(conn.execute(query("job_batches"), {"job_id": self.id}).fetchall())

    @translates_database_errors
    def lanes(self) -> dict[str, Any]:
        """How the job's final rows were answered: `n_by_batch` (through a provider batch, at the batch
        price) and `n_by_online` (a call each); for an auto job also where its rows go now (`lane`:
        'batch' or 'online'), `batch_cutoff` (no batch is created after it) and `cancel_at` (its open
        batches are cancelled then). docs/design.md, "Auto mode", has the rule.

            >>> batchdb.Job(7).lanes()  # doctest: +SKIP
            {'n_by_batch': 900, 'n_by_online': 100, 'lane': 'batch', 'batch_cutoff': ..., 'cancel_at': ...}
        """
        with connect(self._dsn) as conn:
            progress = self._progress(conn)  # raises JobNotFound
            split = dict(one_row(conn.execute(query("job_lane_split"), {"job_id": self.id})))
            if progress.mode == "auto":
                clock = conn.execute(query("auto_job_clock"), {"job_id": self.id}).fetchone()
                if clock is not None:
                    split.update(lane=clock["lane"], batch_cutoff=clock["batch_cutoff"], cancel_at=clock["cancel_at"])
            return split

    def _progress(self, conn: psycopg.Connection[DictRow]) -> JobProgress:
        row = conn.execute(query("job_progress"), {"job_id": self.id}).fetchone()
        if row is None:
            raise JobNotFound(f"job {self.id} does not exist")
        return JobProgress.from_row(row)


@translates_database_errors
def get_job(job_id: int, *, dsn: str | None = None) -> Job:
    job = Job(job_id, dsn=dsn)
    job.status()  # raises JobNotFound
    return job


@translates_database_errors
def list_jobs(*, limit: int = 50, dsn: str | None = None) -> list[JobProgress]:
    with connect(dsn) as conn:
        return [JobProgress.from_row(r) for r in conn.execute(query("list_jobs"), {"limit": limit}).fetchall()]


class _WorkerWatch:
    """Notices, while `wait()` waits, that no worker is alive to run the job's rows (batchdb.live_workers)."""

    def __init__(self, after: float, job_id: int) -> None:
        self._after = after
        self._job_id = job_id
        self._next_check = 0.0
        self._none_since: float | None = None
        self._warned = False
        self.note: str | None = None

    def check(self, conn: psycopg.Connection[DictRow], current: JobProgress) -> str | None:
        """A note for the progress line ('no live worker for 30 s'), or None while workers are alive."""
        if current.status != JobStatus.RUNNING or current.n_queued + current.n_running == 0:
            self._none_since, self.note = None, None
            return None
        now = time.monotonic()
        if now < self._next_check:
            return self.note
        self._next_check = now + min(5.0, max(self._after / 3, 0.2))
        alive = int(one_row(conn.execute(query("live_worker_count")))["n"])
        if alive:
            self._none_since, self.note, self._warned = None, None, False
            return None
        if self._none_since is None:
            self._none_since = now
        waited = now - self._none_since
        if waited >= self._after:
            self.note = f"no live worker for {waited:.0f}s"
            if not self._warned:
                self._warned = True
                log.warning(
                    "job %s: no live worker for %.0f s; its rows wait until one runs (start one with "
                    "`batchdb worker`, see `batchdb workers`)",
                    self._job_id,
                    waited,
                )
        return self.note


class _WaitingWatch:
    """Notices that a running job waits for its provider (`waiting: provider unavailable ...`,
    workers/breaker.py): a warning when it starts, a note on the progress line while it lasts."""

    def __init__(self, job_id: int) -> None:
        self._job_id = job_id
        self._warned: str | None = None

    def check(self, current: JobProgress) -> str | None:
        reason = current.status_reason or ""
        if not current.waiting_for_provider:
            self._warned = None
            return None
        if self._warned is None:
            self._warned = reason
            log.warning(
                "job %s is %s; its rows wait and resume by themselves when the provider answers "
                "(see `batchdb limits show`)",
                self._job_id,
                reason,
            )
        return reason.removeprefix("waiting: ")


def _update_bar(bar: Any, current: JobProgress, notes: dict[str, str | None] | None = None) -> Any:
    from tqdm import tqdm

    if bar is None:
        bar = tqdm(total=current.n_total, desc=f"job {current.job_id}", unit="row", dynamic_ncols=True)
    bar.total = current.n_total
    bar.n = current.n_done
    bar.set_postfix(
        ok=current.n_succeeded,
        failed=current.n_failed + current.n_dead,
        tokens=f"{current.prompt_tokens + current.completion_tokens:,}",
        cost=current.cost_text,
        **{name: note for name, note in (notes or {}).items() if note},
        refresh=False,
    )
    bar.refresh()
    return bar
