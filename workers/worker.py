"""The worker: keeps up to `concurrency` provider calls in flight.

Three loops share one asyncio process:
- the claimer takes batches of due rows sized to the free slots, woken by
  NOTIFY batchdb_requests with a polling fallback;
- each claimed row runs as its own task: render, call the provider, decide
  the outcome, hand it to the BatchCompleter;
- maintenance extends the leases of rows still held, heartbeats the
  `workers` row and reclaims rows whose lease expired (any worker's).

SIGTERM/SIGINT: stop claiming, let in-flight calls finish for
`shutdown_grace` seconds, release the rest, write every outcome, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from batchdb import queue
from batchdb.db import resolve_dsn
from batchdb.models import ClaimedRequest, Outcome, RequestStatus
from batchdb.prompts import PromptError, build_request
from batchdb.providers import Provider, build_provider
from batchdb.providers.base import ErrorKind, ProviderError
from batchdb.queries import query
from workers.completer import BatchCompleter
from workers.connection import Reconnecting
from workers.outcomes import RetryPolicy, failure, success

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    dsn: str | None = None
    concurrency: int = 64
    lease_seconds: float = 60.0
    heartbeat_interval: float = 10.0
    reclaim_interval: float = 5.0
    poll_interval: float = 2.0
    request_timeout: float = 120.0
    shutdown_grace: float = 30.0
    max_claim: int = 500
    flush_interval: float = 0.05
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    job_cache_seconds: float = 5.0
    # Stop by itself once nothing is claimable and nothing is in flight (tests, demo, bench).
    exit_when_idle: bool = False


@dataclass
class _Job:
    provider: str
    model: str
    params: dict[str, Any]
    status: str
    fetched_at: float


class Worker:
    def __init__(self, config: WorkerConfig | None = None, *, providers: dict[str, Provider] | None = None) -> None:
        self.config = config or WorkerConfig()
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._providers: dict[str, Provider] = dict(providers or {})
        self._jobs: dict[int, _Job] = {}
        self._held: dict[tuple[int, int], ClaimedRequest] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self.completed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to shut down gracefully (what SIGTERM does)."""
        self._stopping.set()
        self._wake.set()
        self._slot_freed.set()

    async def run(self) -> None:
        dsn = resolve_dsn(self.config.dsn)
        self._claims = Reconnecting(dsn, name="claim")
        self._writes = Reconnecting(dsn, name="complete")
        self._completer = BatchCompleter(
            self._writes, flush_interval=self.config.flush_interval, on_recorded=self._forget
        )
        await self._claims.run(
            lambda c: c.execute(
                query("register_worker"),
                {"worker_id": self.id, "hostname": socket.gethostname(), "pid": os.getpid(),
                 "concurrency": self.config.concurrency},
            ),
            what="register_worker",
        )
        log.info("worker %s started (concurrency %d)", self.id, self.config.concurrency)
        completer = asyncio.create_task(self._completer.run(), name="completer")
        background = [
            asyncio.create_task(self._maintain(), name="maintenance"),
            asyncio.create_task(self._listen(dsn), name="listen"),
        ]
        try:
            await self._claim_loop()
            await self._finish_in_flight()
        finally:
            await self._completer.close()
            await completer
            await self._release_unfinished()
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._claims.run(
                lambda c: c.execute(query("stop_worker"), {"worker_id": self.id, "n_completed": self.completed}),
                what="stop_worker",
            )
            for provider in self._providers.values():
                await provider.aclose()
            await self._claims.close()
            await self._writes.close()
            log.info("worker %s stopped after %d rows", self.id, self.completed)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        idle_since: float | None = None
        while not self._stopping.is_set():
            free = self.config.concurrency - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wake.clear()
            rows = await self._claims.run(
                lambda c: queue.claim_batch(
                    c, worker_id=self.id, limit=min(free, self.config.max_claim),
                    lease_seconds=self.config.lease_seconds,
                ),
                what="claim_batch",
            )
            for row in rows:
                self._held[row.key] = row
                task = asyncio.create_task(self._process(row))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
            if rows:
                idle_since = None
                continue
            if self.config.exit_when_idle:
                if not self._tasks and not self._held and self._completer.backlog == 0:
                    now = time.monotonic()
                    idle_since = idle_since or now
                    if now - idle_since >= self.config.poll_interval:
                        return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("request task crashed", exc_info=task.exception())

    async def _listen(self, dsn: str) -> None:
        """NOTIFY is only a hint to claim now; polling covers a lost notification."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    await conn.execute("LISTEN batchdb_requests")
                    async for _ in conn.notifies():
                        self._wake.set()
            except psycopg.Error as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                await asyncio.sleep(1.0)

    # -- one row -----------------------------------------------------------------------------

    async def _process(self, row: ClaimedRequest) -> None:
        started = time.monotonic()
        try:
            outcome = await self._call(row)
        except ProviderError as exc:
            latency = int((time.monotonic() - started) * 1000)
            if exc.kind is ErrorKind.QUOTA_EXHAUSTED:
                await self._pause_job(row, exc)
                return
            outcome = failure(row, exc, latency, self.config.retry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must cost one attempt, never the worker
            log.exception("unexpected error on job %s request %s", row.job_id, row.id)
            error = ProviderError(ErrorKind.TRANSIENT, f"internal error: {type(exc).__name__}: {exc}")
            outcome = failure(row, error, None, self.config.retry)
        self._completer.submit(outcome)

    async def _call(self, row: ClaimedRequest) -> Outcome:
        job = await self._job(row.job_id)
        try:
            request = build_request(model=job.model, params=job.params, payload=row.payload, input=row.input)
        except PromptError as exc:
            raise ProviderError(ErrorKind.PERMANENT, f"bad request row {row.custom_id!r}: {exc}") from None
        provider = self._provider(job.provider)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.config.request_timeout):
                response = await provider.complete(request)
        except TimeoutError:
            raise ProviderError(
                ErrorKind.TRANSIENT, f"no answer from {job.provider} within {self.config.request_timeout:.0f}s"
            ) from None
        return success(row, response, int((time.monotonic() - started) * 1000))

    def _provider(self, name: str) -> Provider:
        if name not in self._providers:
            self._providers[name] = build_provider(name, timeout=self.config.request_timeout)
        return self._providers[name]

    async def _job(self, job_id: int) -> _Job:
        cached = self._jobs.get(job_id)
        now = time.monotonic()
        if cached is not None and now - cached.fetched_at < self.config.job_cache_seconds:
            return cached

        async def fetch(conn: psycopg.AsyncConnection) -> dict[str, Any] | None:
            cur = await conn.execute(query("job_for_worker"), {"job_id": job_id})
            return await cur.fetchone()

        row = await self._claims.run(fetch, what="job_for_worker")
        if row is None:
            raise ProviderError(ErrorKind.PERMANENT, f"job {job_id} no longer exists")
        job = _Job(row["provider"], row["model"], row["params"] or {}, row["status"], now)
        self._jobs[job_id] = job
        return job

    async def _pause_job(self, row: ClaimedRequest, exc: ProviderError) -> None:
        """Quota gone or key refused: pause the job, hand the row back without spending an attempt."""
        reason = f"provider refused: {exc.message}"
        await self._claims.run(
            lambda c: c.execute(query("pause_job"), {"job_id": row.job_id, "reason": reason}), what="pause_job"
        )
        await self._claims.run(lambda c: queue.release_leases(c, [row]), what="release_leases")
        self._held.pop(row.key, None)
        log.warning("job %s paused: %s", row.job_id, reason)

    async def _forget(self, batch: list[Outcome], recorded: set[tuple[int, int]]) -> None:
        for outcome in batch:
            self._held.pop(outcome.key, None)
        self.completed += sum(1 for o in batch if o.key in recorded and RequestStatus(o.status).final)

    # -- maintenance -------------------------------------------------------------------------

    async def _maintain(self) -> None:
        last_reclaim = 0.0
        while True:
            await asyncio.sleep(min(self.config.heartbeat_interval, self.config.reclaim_interval))
            held = list(self._held.values())
            if held:
                await self._claims.run(
                    lambda c: queue.extend_leases(c, held, lease_seconds=self.config.lease_seconds),
                    what="extend_leases",
                )
            await self._claims.run(
                lambda c: c.execute(
                    query("heartbeat_worker"),
                    {"worker_id": self.id, "in_flight": len(self._tasks), "n_completed": self.completed},
                ),
                what="heartbeat_worker",
            )
            now = time.monotonic()
            if now - last_reclaim >= self.config.reclaim_interval:
                last_reclaim = now
                reclaimed = await self._claims.run(queue.reclaim_expired, what="reclaim_expired")
                if reclaimed:
                    log.warning("reclaimed %d row(s) whose lease expired", reclaimed)

    async def _finish_in_flight(self) -> None:
        if not self._tasks:
            return
        log.info("waiting up to %.0fs for %d in-flight request(s)", self.config.shutdown_grace, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.shutdown_grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _release_unfinished(self) -> None:
        """Rows with no recorded outcome go back to the queue without spending an attempt."""
        unfinished = list(self._held.values())
        if unfinished:
            released = await self._claims.run(lambda c: queue.release_leases(c, unfinished), what="release_leases")
            log.info("released %d unfinished row(s)", len(released))
            self._held.clear()


def run_worker(config: WorkerConfig) -> None:
    """Run a worker until SIGTERM/SIGINT (or idle, when configured)."""

    async def main() -> None:
        worker = Worker(config)
        worker.install_signal_handlers()
        await worker.run()

    asyncio.run(main())
