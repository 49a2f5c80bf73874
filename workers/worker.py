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
import importlib
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import psycopg

from batchdb import queue
from batchdb.db import resolve_dsn
from batchdb.ledger import DEFAULT_MAX_TOKENS_CHARGE, Lane, charged_tokens, read_headers
from batchdb.models import ClaimedRequest, Outcome, RequestStatus
from batchdb.prompts import PromptError, build_request
from batchdb.providers import Provider, build_provider
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.queries import query
from batchdb.secrets import MissingSecret, redact, resolve_key, resolved_secrets
from batchdb.tokens import estimate_prompt_tokens
from batchdb.validation import DEFAULT_VALIDATION_RETRIES, ResponseValidator, reask
from workers.completer import BatchCompleter
from workers.connection import Reconnecting, listen_forever
from workers.notifier import Notifier, NotifierConfig
from workers.outcomes import RetryPolicy, failure, invalid_response, success
from workers.pacer import DailyQuotaExhausted, Pacer
from workers.settler import Settlement, Settler
from workers.vacuumer import Vacuumer

log = logging.getLogger(__name__)


@dataclass
class _Spent:
    """Usage of every call made for one row (re-asks included)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class _HandBack(Exception):
    """This row cannot run now through no fault of its own: pause its job, return the row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Reserved:
    """Budget reserved for one row under its current lease: `calls` reservations, `usd` in all."""

    lease_token: int
    calls: int = 0
    usd: Decimal = Decimal(0)


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
    # How long a call waits before asking again when only calls in flight hold its budget.
    budget_wait: float = 0.5
    # Stop by itself once nothing is claimable and nothing is in flight (tests, demo, bench).
    exit_when_idle: bool = False
    # Job webhooks and emails, sent on connections of their own (workers/notifier.py); None: off.
    notifier: NotifierConfig | None = field(default_factory=NotifierConfig)


@dataclass
class _Job:
    provider: str
    key_alias: str
    model: str
    params: dict[str, Any]
    budget_usd: Decimal | None
    input_per_mtok: Decimal | None
    output_per_mtok: Decimal | None
    fetched_at: float
    validator: ResponseValidator | None = None
    validation_retries: int = DEFAULT_VALIDATION_RETRIES
    owner: str = ""
    # The owner has a daily/monthly budget: every call reserves against it too.
    owner_has_budget: bool = False

    @property
    def reserves_budget(self) -> bool:
        return self.budget_usd is not None or self.owner_has_budget

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        if self.input_per_mtok is None or self.output_per_mtok is None:
            return Decimal(0)
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / Decimal(1_000_000)

    def estimated_cost(self, prompt_tokens: int, max_tokens: int | None) -> Decimal:
        """The most this call can cost: the prompt plus every token it may generate."""
        if self.input_per_mtok is None or self.output_per_mtok is None:
            return Decimal(0)
        out = max_tokens if max_tokens is not None and max_tokens > 0 else DEFAULT_MAX_TOKENS_CHARGE
        return (max(prompt_tokens, 0) * self.input_per_mtok + out * self.output_per_mtok) / Decimal(1_000_000)


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
        self._reserved: dict[tuple[int, int], _Reserved] = {}
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
        self._pacer = Pacer(Reconnecting(dsn, name="ledger"))
        self._completer = BatchCompleter(
            self._writes, flush_interval=self.config.flush_interval, on_recorded=self._forget
        )
        # Budget bookkeeping waits on other workers' locks: its own service and connection.
        self._settler = Settler(Reconnecting(dsn, name="settle"), flush_interval=self.config.flush_interval)
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
        settler = asyncio.create_task(self._settler.run(), name="settler")
        self._vacuumer = Vacuumer(Reconnecting(dsn, name="vacuum"))
        background = [
            asyncio.create_task(self._vacuumer.run(), name="vacuumer"),
            asyncio.create_task(self._maintain(), name="maintenance"),
            asyncio.create_task(listen_forever(dsn, query("listen_requests"), self._wake, name="listen"),
                                name="listen"),
        ]
        if self.config.notifier is not None:
            notifier = Notifier(dsn, self.config.notifier, worker_id=self.id)
            background.append(asyncio.create_task(notifier.run(), name="notifier"))
        try:
            await self._claim_loop()
            await self._finish_in_flight()
        finally:
            await self._completer.close()
            await completer
            await self._release_unfinished()
            await self._settler.close()
            await settler
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._claims.run(
                lambda c: c.execute(query("stop_worker"), {"worker_id": self.id, "n_completed": self.completed}),
                what="stop_worker",
            )
            await self._pacer.close()
            await self._vacuumer.close()
            await self._settler.disconnect()
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
            try:
                rows = await self._claims.run(
                    lambda c: queue.claim_batch(
                        c, worker_id=self.id, limit=min(free, self.config.max_claim),
                        lease_seconds=self.config.lease_seconds,
                    ),
                    what="claim_batch",
                )
            except psycopg.Error as exc:
                # The server refused the statement itself (disk full ...): wait, then try again.
                log.error("claim_batch failed: %s", exc)
                await asyncio.sleep(self.config.poll_interval)
                continue
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

    # -- one row -----------------------------------------------------------------------------

    async def _process(self, row: ClaimedRequest) -> None:
        started = time.monotonic()
        spent = _Spent()
        try:
            outcome = await self._call(row, spent)
        except _HandBack as back:
            await self._hand_back(row, back.reason)
            return
        except ProviderError as exc:
            latency = int((time.monotonic() - started) * 1000)
            if exc.kind is ErrorKind.QUOTA_EXHAUSTED:
                await self._hand_back(row, f"provider refused: {exc.message}")
                return
            outcome = failure(row, exc, latency, self.config.retry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must cost one attempt, never the worker
            log.exception("unexpected error on job %s request %s", row.job_id, row.id)
            # Stored with the row: mask any key the exception text might carry.
            error = ProviderError(ErrorKind.TRANSIENT,
                                  redact(f"internal error: {type(exc).__name__}: {exc}", *resolved_secrets()))
            outcome = failure(row, error, None, self.config.retry)
        # Tokens of every call made for this row count, including answers that did not validate.
        outcome.prompt_tokens, outcome.completion_tokens = spent.prompt_tokens, spent.completion_tokens
        reserved = self._reserved.get(row.key)
        outcome.reserved_usd = reserved.usd if reserved is not None else Decimal(0)
        self._completer.submit(outcome)

    async def _call(self, row: ClaimedRequest, spent: _Spent) -> Outcome:
        job = await self._job(row.job_id)
        try:
            request = build_request(model=job.model, params=job.params, payload=row.payload, input=row.input)
        except PromptError as exc:
            raise ProviderError(ErrorKind.PERMANENT, f"bad request row {row.custom_id!r}: {exc}") from None
        started = time.monotonic()
        response = await self._send(row, job, request, spent)
        if job.validator is None:
            return success(row, response, int((time.monotonic() - started) * 1000))
        for _ in range(job.validation_retries):
            verdict = job.validator.check(response.text)
            if verdict.ok:
                break
            request = replace(request, messages=reask(request.messages, response.text, verdict.error or ""))
            response = await self._send(row, job, request, spent)
        verdict = job.validator.check(response.text)
        latency = int((time.monotonic() - started) * 1000)
        if verdict.ok:
            outcome = success(row, response, latency)
            outcome.response_json = verdict.value
            return outcome
        return invalid_response(row, response, latency, f"{verdict.error} (after {job.validation_retries} re-ask(s))")

    async def _send(self, row: ClaimedRequest, job: _Job, request: ChatRequest, spent: _Spent) -> ChatResponse:
        """One provider call: budget, then ledger capacity, then the call; usage settles back."""
        lane = Lane(job.provider, job.key_alias, request.model)
        prompt_estimate = estimate_prompt_tokens(job.provider, request.messages)
        reserved_tokens = charged_tokens(job.provider, prompt_estimate, request.max_tokens)
        if job.reserves_budget:
            if job.input_per_mtok is None or job.output_per_mtok is None:
                # Unpriced calls would cost $0 and slip past every budget: stop and say why.
                raise _HandBack(f"no price for {job.provider}/{job.model} in batchdb.prices, so its budget "
                                "cannot be enforced; add the price, then resume")
            await self._reserve_budget(row, job.estimated_cost(prompt_estimate, request.max_tokens))
        # The client exists before capacity is reserved: building the first one imports the
        # SDK, which blocks the loop; capacity granted before that would go out late, in a burst.
        provider = self._provider(job.provider, job.key_alias)
        try:
            await self._pacer.acquire(lane, reserved_tokens)
        except DailyQuotaExhausted as exc:
            raise _HandBack(str(exc)) from None
        try:
            async with asyncio.timeout(self.config.request_timeout):
                response = await provider.complete(request)
        except TimeoutError:
            raise ProviderError(
                ErrorKind.TRANSIENT, f"no answer from {job.provider} within {self.config.request_timeout:.0f}s"
            ) from None
        except ProviderError as exc:
            self._pacer.observe(lane, read_headers(exc.rate_limit_headers))
            if exc.kind is ErrorKind.RATE_LIMITED:
                await self._pacer.rate_limited(lane, exc.retry_after)
            raise
        self._pacer.observe(lane, read_headers(response.rate_limit_headers))
        self._pacer.settle(lane, reserved_tokens=reserved_tokens,
                           charged_tokens=charged_tokens(job.provider, response.prompt_tokens, request.max_tokens))
        spent.prompt_tokens += response.prompt_tokens
        spent.completion_tokens += response.completion_tokens
        return response

    async def _reserve_budget(self, row: ClaimedRequest, usd: Decimal) -> None:
        """Reserve the call's worst-case cost. While only other calls' reservations stand in the
        way ('wait'), hold the row and ask again as they settle; a spent budget pauses the job."""
        held = self._reserved.setdefault(row.key, _Reserved(row.lease_token))
        # The call's key: run again after a lost reply, the statement reserves nothing more.
        key = {"job_id": row.job_id, "usd": usd, "request_id": row.id, "lease_token": row.lease_token,
               "seq": held.calls + 1}

        async def reserve(conn: psycopg.AsyncConnection) -> str:
            cur = await conn.execute(query("reserve_budget"), key)
            found = await cur.fetchone()
            return str(found["result"]) if found else "paused"

        while (result := await self._claims.run(reserve, what="reserve_budget")) == "wait":
            if self._stopping.is_set():
                raise _HandBack("worker stopping while waiting for budget") from None
            await asyncio.sleep(self.config.budget_wait)
        if result != "ok":
            raise _HandBack("budget reached")
        held.calls += 1
        held.usd += usd

    def _provider(self, name: str, key_alias: str) -> Provider:
        cache_key = name if key_alias == "default" else f"{name}:{key_alias}"
        if cache_key not in self._providers:
            self._providers[cache_key] = build_provider(name, key_alias=key_alias, timeout=self.config.request_timeout)
        return self._providers[cache_key]

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
        params = row["params"] or {}
        job = _Job(row["provider"], row["key_alias"], row["model"], params, row["budget_usd"],
                   row["input_per_mtok"], row["output_per_mtok"], now, ResponseValidator.for_params(params),
                   int(params.get("validation_retries", DEFAULT_VALIDATION_RETRIES)),
                   owner=row["owner"], owner_has_budget=row["owner_has_budget"])
        self._jobs[job_id] = job
        return job

    async def _hand_back(self, row: ClaimedRequest, reason: str) -> None:
        """Quota gone, key refused or budget reached: pause the job (if not already) and return
        the row to the queue without spending an attempt."""
        await self._claims.run(
            lambda c: c.execute(query("pause_job"), {"job_id": row.job_id, "reason": reason}), what="pause_job"
        )
        await self._claims.run(lambda c: queue.release_leases(c, [row]), what="release_leases")
        self._release_budget([row])
        self._held.pop(row.key, None)
        log.warning("job %s paused: %s", row.job_id, reason)

    def _release_budget(self, rows: list[ClaimedRequest]) -> None:
        """Rows handed back unsent: their reservations go back (through the Settler)."""
        for row in rows:
            held = self._reserved.pop(row.key, None)
            if held is not None:
                self._settler.submit(Settlement(row.job_id, row.id, held.lease_token))

    async def _forget(self, batch: list[Outcome], recorded: set[tuple[int, int]]) -> None:
        for outcome in batch:
            self._held.pop(outcome.key, None)
        self.completed += sum(1 for o in batch if o.key in recorded and RequestStatus(o.status).final)
        # Calls that reserved budget: the reservation is replaced by what they cost. Money was
        # spent whether or not the completion was fenced out: it counts either way.
        for outcome in batch:
            held = self._reserved.pop(outcome.key, None)
            if held is None or held.lease_token != outcome.lease_token:
                continue
            job = self._jobs.get(outcome.job_id)
            cost = job.cost(outcome.prompt_tokens, outcome.completion_tokens) if job is not None else Decimal(0)
            self._settler.submit(Settlement(outcome.job_id, outcome.id, outcome.lease_token, cost))

    # -- maintenance -------------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            try:
                await self._maintain_forever()
            except psycopg.Error as exc:
                log.error("lease maintenance failed: %s; retrying", exc)
                await asyncio.sleep(1.0)

    async def _maintain_forever(self) -> None:
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
                resumed = await self._claims.run(queue.resume_due_jobs, what="resume_due_jobs")
                if resumed:
                    log.info("resumed %d job(s) whose user quota period turned over", resumed)

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
            self._release_budget(unfinished)
            self._held.clear()


def load_provider_sdks() -> list[str]:
    """Import the SDK and tokenizer of every provider this process has a key for, before any row
    is claimed. Loaded on the first call instead, they blocked the event loop (seen: 15 s on a
    loaded 2-core machine) while the rows just claimed waited: their leases ran out unextended and
    other workers called them again. Returns the providers loaded."""
    loaded = []
    for name in ("openai", "azure", "gemini"):
        try:
            resolve_key(name, "default")
            importlib.import_module(f"batchdb.providers.{name}")
            estimate_prompt_tokens(name, [{"role": "user", "content": "warm-up"}])
        except MissingSecret:
            continue  # no key here: a job for it pauses with the reason, as before
        except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the worker
            log.warning("could not load the %s SDK ahead of time: %s", name, exc)
            continue
        loaded.append(name)
    return loaded


def run_worker(config: WorkerConfig) -> None:
    """Run a worker until SIGTERM/SIGINT (or idle, when configured)."""
    load_provider_sdks()

    async def main() -> None:
        worker = Worker(config)
        worker.install_signal_handlers()
        await worker.run()

    asyncio.run(main())
