"""The worker: keeps up to `concurrency` provider calls in flight.

Three loops share one asyncio process:
- the claimer takes batches of due rows sized to the free slots, woken by
  NOTIFY batchdb_requests with a polling fallback;
- each claimed row runs as its own task: render, call the provider, decide
  the outcome, hand it to the BatchCompleter;
- maintenance extends the leases of rows still held, heartbeats the
  `workers` row and reclaims rows whose lease expired (any worker's);
- the lane advertiser (workers/lanes.py) tells which jobs this worker can call
  and pauses/resumes jobs no live worker can serve; the send guard
  (workers/send_guard.py) drops calls whose row or job is no longer ours to send.
Services run beside them, each with its own handle on the worker's pool of 2
connections (workers/connection.py; one more connection LISTENs for all): the completer, the
vacuumer, the settler (workers/settler.py: every ledger reservation is settled,
whatever the outcome), the notifier and the breaker (workers/breaker.py:
per-lane circuits; a lane-level failure goes to it, and while a lane is open its
rows go back to the queue without spending an attempt).

SIGTERM/SIGINT (workers/shutdown.py): stop claiming, hand back at once the rows
whose call was not sent yet (waiting for ledger capacity or budget), let sent calls
finish for `shutdown_grace` seconds, release the rest, write every outcome, exit 0.
A second signal is a cold shutdown: every held row goes back at once. A database
that stays unreachable while stopping is given up on: its rows return to the
queue when their lease runs out.
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
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import DictRow

from batchdb import queue, settings
from batchdb.context_window import ModelLimits
from batchdb.db import resolve_dsn
from batchdb.errors import BatchDBError
from batchdb.ledger import Lane, charged_tokens, read_headers
from batchdb.models import ClaimedRequest, Outcome, RequestStatus
from batchdb.pricing import Price
from batchdb.prompts import PromptError, build_request
from batchdb.providers import Provider, build_provider, lane_endpoint
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.queries import query
from batchdb.secrets import redact, resolved_secrets
from batchdb.tokens import estimate_prompt_tokens
from batchdb.validation import DEFAULT_VALIDATION_RETRIES, ResponseValidator, reask
from batchdb.workers.batch_driver import BatchAPI, BatchDriver, BatchDriverConfig
from batchdb.workers.breaker import Breaker, BreakerConfig
from batchdb.workers.budget_settler import BudgetSettler, Settlement
from batchdb.workers.completer import BatchCompleter
from batchdb.workers.connection import Database, Listener
from batchdb.workers.lanes import LaneAdvertiser, LaneUnavailable
from batchdb.workers.logs import protect_logging
from batchdb.workers.metrics import MetricsConfig, WorkerMetrics
from batchdb.workers.notifier import Notifier, NotifierConfig
from batchdb.workers.outcomes import RetryPolicy, failure, invalid_response, success
from batchdb.workers.pacer import DailyQuotaExhausted, LaneWaiting, Pacer, Withdrawn
from batchdb.workers.send_guard import CallDropped, SendGuard
from batchdb.workers.settler import Settler
from batchdb.workers.shutdown import DatabaseUnreachable, Shutdown
from batchdb.workers.vacuumer import Vacuumer

log = logging.getLogger(__name__)


@dataclass
class _Spent:
    """Usage of every call made for one row (re-asks included)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    # Calls that were sent and timed out: their prompt tokens are in prompt_tokens (counted offline),
    # their output, which nobody received, is unknown (docs/design.md, "Paid but unrecorded").
    timed_out: int = 0

    def count_timed_out(self, prompt_tokens: int) -> None:
        """A provider bills a call it accepted whether or not its answer arrived: the prompt counts."""
        self.prompt_tokens += prompt_tokens
        self.timed_out += 1


class _NoSettlement:
    """The settler's interface for calls on a lane without limits: nothing was reserved."""

    def give_back(self, lane: Lane, tokens: int) -> None:
        return None

    def settle_failure(self, lane: Lane, reserved_tokens: int, error: BaseException) -> int:
        return 0


_NO_SETTLEMENT = _NoSettlement()


class _Defer(Exception):
    """The row's lane is waiting: return the row, due again in `retry_in` seconds, without spending an attempt."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"lane waiting; row due again in {retry_in:.1f}s")
        self.retry_in = retry_in


class _LaneOpen(Exception):
    """The row's lane has its circuit open: back to the queue, no attempt spent, job untouched."""


class _HandBack(Exception):
    """This row cannot run now through no fault of its own: pause its job, return the row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NotSent(Exception):
    """The worker is stopping and this row's call was never sent: the row goes back to the queue."""


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
    # How often held leases are extended. Derived from the lease when not given (a third of it,
    # between 0.5 and 10 s), so a short lease is never outlived by its own extension's interval.
    heartbeat_interval: float | None = None
    reclaim_interval: float = 5.0
    poll_interval: float = 2.0
    request_timeout: float = 120.0
    shutdown_grace: float = 30.0
    max_claim: int = 500
    flush_interval: float = 0.05
    # A budget reservation whose row is no longer leased to it (its worker was killed) is
    # settled at its reserved cost once this old (workers/budget_settler.py), checked this often.
    abandoned_budget_after: float = 120.0
    abandoned_budget_interval: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    job_cache_seconds: float = 5.0
    # How long a call waits before asking again when only calls in flight hold its budget.
    budget_wait: float = 0.5
    # A call that waits this long for its lane (tokens, a 429's delay) hands its row back, so a
    # stalled lane never holds slots that rows of other lanes could use. None: wait as long as it takes.
    lane_wait_seconds: float | None = 5.0
    # Stop by itself once nothing is claimable and nothing is in flight (tests, demo, bench).
    exit_when_idle: bool = False
    # How often the lanes of unfinished jobs are checked against this worker's keys (workers/lanes.py).
    lane_refresh_interval: float = 2.0
    # At most one progress line this often (INFO) while rows complete: never a line per request.
    progress_interval: float = 60.0
    # Job webhooks and emails, sent on connections of their own (workers/notifier.py); None: off.
    notifier: NotifierConfig | None = field(default_factory=NotifierConfig)
    # Per-lane circuit breaker (workers/breaker.py).
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    # Batch-mode jobs through the providers' Batch APIs (workers/batch_driver.py).
    batch: BatchDriverConfig = field(default_factory=BatchDriverConfig)
    # /metrics and /healthz on a port of their own (workers/metrics.py); None: off.
    metrics: MetricsConfig | None = None

    def __post_init__(self) -> None:
        if self.heartbeat_interval is None:
            self.heartbeat_interval = max(0.5, min(10.0, self.lease_seconds / 3))
        if not 0 < self.heartbeat_interval < self.lease_seconds:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval} s) must be above 0 and below "
                f"lease_seconds ({self.lease_seconds} s), or leases run out between extensions"
            )

    @property
    def heartbeat_seconds(self) -> float:
        """The interval in effect (derived in __post_init__ when not given)."""
        assert self.heartbeat_interval is not None
        return self.heartbeat_interval


@dataclass
class _Job:
    provider: str
    key_alias: str
    model: str
    params: dict[str, Any]
    budget_usd: Decimal | None
    # The model's list price (batchdb/pricing.py); None when batchdb.prices has no row for it.
    price: Price | None
    fetched_at: float
    validator: ResponseValidator | None = None
    validation_retries: int = DEFAULT_VALIDATION_RETRIES
    owner: str = ""
    # The owner has a daily/monthly budget: every call reserves against it too.
    owner_has_budget: bool = False
    # The model's context window and output limit (batchdb.prices); unknown limits check nothing.
    limits: ModelLimits | None = None

    @property
    def reserves_budget(self) -> bool:
        return self.budget_usd is not None or self.owner_has_budget


class Worker:
    def __init__(self, config: WorkerConfig | None = None, *, providers: dict[str, Provider] | None = None) -> None:
        self.config = config or WorkerConfig()
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._providers: dict[str, Provider] = dict(providers or {})
        self._jobs: dict[int, _Job] = {}
        # One job read at a time per job: the rows of a claim all ask for their job at once.
        self._job_reads: dict[int, asyncio.Future[_Job]] = {}
        self._held: dict[tuple[int, int], ClaimedRequest] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Per held row: its task, whether a provider call went out for it, and the rows
        # whose call was never sent once the worker stopped (handed back together).
        self._row_tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._sent: set[tuple[int, int]] = set()
        self._not_sent: list[ClaimedRequest] = []
        self._shutdown = Shutdown()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._reserved: dict[tuple[int, int], _Reserved] = {}
        self._deferred_until = 0.0  # monotonic time the last row handed back by a waiting lane is due
        # time.monotonic() of each held row's claim and of its last send (for the breaker: a stale
        # cache, an answer to a call sent before the circuit opened).
        self._claimed_at: dict[tuple[int, int], float] = {}
        self._sent_at: dict[tuple[int, int], float] = {}
        self.completed = 0
        self._progress_at = time.monotonic()
        self._progress_rows = 0
        self.metrics = WorkerMetrics(self.id, self.config.metrics, self._shutdown)

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, *, cold: bool = False) -> None:
        """Ask the worker to shut down: gracefully (what SIGTERM does), or `cold`: hand back
        every held row at once, calls in flight included (what a second Ctrl-C does)."""
        self._shutdown.request(cold=cold)
        self._wake.set()
        self._slot_freed.set()

    async def run(self) -> None:
        protect_logging()  # also when started from Python, not only by `batchdb worker`
        if problems := settings.environment_problems():
            raise BatchDBError("; ".join(problems))
        dsn = resolve_dsn(self.config.dsn)
        # Every statement of every service runs on one pool of 2 connections, and every channel is
        # followed on one LISTEN connection: 3 server connections a worker, whatever its concurrency
        # (workers/connection.py; docs/design.md, "Connections"). Handles cost nothing: each service
        # has its own, so its statements run one at a time and its outages are named after it.
        tag = f"{os.getpid()}:{self.id.rsplit(':', 1)[-1]}"  # the end of the worker id: unique, short
        self._db = Database(dsn, name=f"worker {tag}")
        self._listener = Listener(dsn, name=f"listen {tag}")
        self._listener.subscribe(query("listen_requests"), lambda _payload: self._wake.set())
        self._claims = self._db.handle("claim", shutdown=self._shutdown)
        self._writes = self._db.handle("complete", shutdown=self._shutdown)
        # Pacer and settler share a handle: both write rate_limits rows in short statements, one at a time.
        ledger_db = self._db.handle("ledger")
        self._settler = Settler(ledger_db)
        self._pacer = Pacer(ledger_db, give_back=self._settler.give_back)
        self._lanes = LaneAdvertiser(
            self._db.handle("lanes", shutdown=self._shutdown),
            self.id,
            self._lane_endpoint,
            interval=self.config.lane_refresh_interval,
            warm=self._warm_lane,
        )
        self._guard = SendGuard(
            lease_seconds=self.config.lease_seconds, db=self._db.handle("send-guard"), listener=self._listener
        )
        self._completer = BatchCompleter(
            self._writes, flush_interval=self.config.flush_interval, on_recorded=self._forget
        )
        self._breaker = Breaker(
            self._db.handle("breaker"),
            self.config.breaker,
            worker_id=self.id,
            lease_seconds=self.config.lease_seconds,
            probe_lease_seconds=self.config.request_timeout + self.config.lease_seconds,
            on_probe=self._start,
        )
        # Budget bookkeeping waits on other workers' locks: its own service.
        self._budget = BudgetSettler(
            self._db.handle("budget"),
            flush_interval=self.config.flush_interval,
            abandoned_after=self.config.abandoned_budget_after,
            sweep_interval=self.config.abandoned_budget_interval,
        )
        await self.metrics.start(
            self._db.handle("metrics"),
            circuits=lambda: self._breaker.open,
            connections=(self._db,),
        )
        notifier = (
            Notifier(
                config=self.config.notifier,
                worker_id=self.id,
                shutdown=self._shutdown,
                db=self._db.handle("notify", shutdown=self._shutdown),
                listener=self._listener,
            )
            if self.config.notifier is not None
            else None
        )
        try:
            await self._claims.run(
                lambda c: c.execute(
                    query("register_worker"),
                    {
                        "worker_id": self.id,
                        "hostname": socket.gethostname(),
                        "pid": os.getpid(),
                        "concurrency": self.config.concurrency,
                    },
                ),
                what="register_worker",
            )
        except DatabaseUnreachable as exc:
            log.warning("worker stopped before it could reach the database (%s)", exc)
            await self.metrics.close()
            await self._pacer.close()
            await self._db.close()
            return
        await self._lanes.refresh()  # before the first claim: it claims only on advertised lanes
        log.info("worker %s started (concurrency %d)", self.id, self.config.concurrency)
        completer = asyncio.create_task(self._completer.run(), name="completer")
        budget = asyncio.create_task(self._budget.run(), name="budget settler")
        # VACUUM and the batch driver's transactions can take seconds: `slow` handles, which never
        # hold both connections, so claims, completions and the ledger always have one.
        self._vacuumer = Vacuumer(self._db.handle("vacuum", slow=True))
        self._batches = BatchDriver(
            self._db.handle("batches", shutdown=self._shutdown, slow=True),
            self.config.batch,
            worker_id=self.id,
            api_for=self._batch_api,
            lanes=self._lanes.claim_filter,
        )
        batches = asyncio.create_task(self._batches.run(), name="batch driver")
        background = [
            asyncio.create_task(self._vacuumer.run(), name="vacuumer"),
            asyncio.create_task(self._settler.run(), name="settler"),
            asyncio.create_task(self._budget.sweep_forever(), name="abandoned budget"),
            asyncio.create_task(self._breaker.run(), name="breaker"),
            asyncio.create_task(self._maintain(), name="maintenance"),
            asyncio.create_task(self._lanes.run(), name="lanes"),
            asyncio.create_task(self._guard.run(), name="send guard"),
            asyncio.create_task(self._listener.run(), name="listen"),
        ]
        if notifier is not None:
            background.append(asyncio.create_task(notifier.run(), name="notifier"))
        try:
            await self.metrics.claim_loop(self._claim_loop())
            await self._finish_in_flight()
        except DatabaseUnreachable as exc:
            # Nothing can be recorded or handed back: stop the rows' tasks and say what is left.
            log.warning("database unreachable while stopping (%s)", exc)
            await self._cancel_tasks(set(self._tasks))
        finally:
            await self._completer.close()
            try:
                await completer
            except DatabaseUnreachable as exc:
                log.warning("could not record the last outcomes: database unreachable (%s)", exc)
            await self._release_unfinished()
            # The batch driver finishes the step it is in (each is short: a provider call or two and a
            # statement), so its chunk's lease is let go rather than left to run out. A cold stop does
            # not wait, and an unreachable database ends the step at once (DatabaseUnreachable).
            self._batches.stop()
            grace = 0.0 if self._shutdown.cold.is_set() else self.config.shutdown_grace
            done, _ = await asyncio.wait({batches}, timeout=grace)
            if not done:
                batches.cancel()
                log.warning("batch driver stopped mid-step; its chunk is taken over when its lease runs out")
            await asyncio.gather(batches, return_exceptions=True)
            await self._budget.close()
            await budget
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await self._claims.run(
                    lambda c: c.execute(query("stop_worker"), {"worker_id": self.id, "n_completed": self.completed}),
                    what="stop_worker",
                )
            except DatabaseUnreachable:
                pass  # said above; the workers row shows this worker dead once its heartbeat ages
            await self._pacer.close()
            await self._settler.close()
            await self._vacuumer.close()
            await self._batches.close()
            await self._lanes.close()
            await self._breaker.close()
            await self._budget.disconnect()
            for provider in self._providers.values():
                await provider.aclose()
            await self._db.close()
            await self.metrics.close()
            log.info("worker %s stopped after %d rows", self.id, self.completed)

    def install_signal_handlers(self) -> None:
        """First SIGTERM/SIGINT: graceful stop; second: cold stop; third: the default action
        (the process ends at once; rows still held return when their lease runs out)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._shutdown.stopping:
            log.info(
                "%s: stopping; rows not sent yet go back now, sent calls get %.0fs to finish (%s again: stop at once)",
                sig.name,
                self.config.shutdown_grace,
                sig.name,
            )
            self.stop()
            return
        log.warning(
            "%s again: cold shutdown, handing back every held row now (%s again: quit without handing them back)",
            sig.name,
            sig.name,
        )
        self.stop(cold=True)
        loop = asyncio.get_running_loop()
        for other in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(other)
            signal.signal(other, signal.SIG_DFL)

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        idle_since: float | None = None
        while not self._shutdown.stopping:
            free = self.config.concurrency - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wake.clear()
            claimed_at = time.monotonic()

            async def claim(c: psycopg.AsyncConnection[DictRow]) -> list[ClaimedRequest]:
                nonlocal claimed_at
                claimed_at = time.monotonic()  # just before the statement: the local lease deadline is never late
                return await queue.claim_batch(
                    c,
                    worker_id=self.id,
                    limit=min(free, self.config.max_claim),  # noqa: B023 - awaited in this turn
                    lease_seconds=self.config.lease_seconds,
                    lanes=self._lanes.claim_filter(),
                )

            try:
                rows = await self._claims.run(claim, what="claim_batch")
            except psycopg.Error as exc:
                # The server refused the statement itself (disk full ...): wait, then try again.
                log.error("claim_batch failed: %s", exc)
                await self._shutdown.sleep(self.config.poll_interval)
                continue
            self._guard.leased(rows, since=claimed_at)
            for row in rows:
                self._start(row, claimed_at)
            if rows:
                idle_since = None
                continue
            if (
                self.config.exit_when_idle
                and not self._tasks
                and not self._held
                and self._completer.backlog == 0
                and time.monotonic() >= self._deferred_until
                and not self._breaker.open
                and self._batches.idle
            ):
                now = time.monotonic()
                idle_since = idle_since or now
                if now - idle_since >= self.config.poll_interval:
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)

    def _start(self, row: ClaimedRequest, claimed_at: float | None = None) -> None:
        """Run one claimed row (from claim_batch, or the breaker's probe) as its own task.
        `claimed_at`: time.monotonic() just before the claim statement (default: now). The breaker
        takes a row claimed after it learned the circuit opened as proof the circuit closed again;
        stamped when the claim returned instead, a claim sent before the circuit opened looked like
        one: the open lane was forgotten and the row sent, spending an attempt."""
        self._held[row.key] = row
        self._claimed_at[row.key] = time.monotonic() if claimed_at is None else claimed_at
        task = asyncio.create_task(self._process(row))
        self._tasks.add(task)
        self._row_tasks[row.key] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("request task crashed", exc_info=task.exception())

    # -- one row -----------------------------------------------------------------------------

    async def _process(self, row: ClaimedRequest) -> None:
        try:
            await self._process_row(row)
        except DatabaseUnreachable:
            pass  # stopping without a database: the row comes back when its lease runs out
        finally:
            self._row_tasks.pop(row.key, None)
            self._sent.discard(row.key)
            self._sent_at.pop(row.key, None)

    async def _process_row(self, row: ClaimedRequest) -> None:
        started = time.monotonic()
        spent = _Spent()
        try:
            outcome = await self._call(row, spent)
        except _LaneOpen:
            await self._return_to_queue(row)
            return
        except _NotSent:
            self._not_sent.append(row)  # handed back with the others by _finish_in_flight
            return
        except _HandBack as back:
            await self._breaker.forget(row)
            await self._hand_back(row, back.reason)
            return
        except _Defer as defer:
            await self._defer(row, defer.retry_in)
            return
        except (CallDropped, LaneUnavailable) as drop:
            await self._drop(row, drop.reason)
            return
        except ProviderError as exc:
            latency = int((time.monotonic() - started) * 1000)
            if exc.kind is ErrorKind.QUOTA_EXHAUSTED:
                await self._breaker.forget(row)
                await self._hand_back(row, f"provider refused: {exc.message}")
                return
            lane = self._lane_of(row)
            sent_at = self._sent_at.pop(row.key, started)
            if lane is None:  # failed before any call (its job is gone): no verdict on a lane
                await self._breaker.forget(row)
            elif await self._breaker.failed(lane, row, exc, sent_at):
                await self._return_to_queue(row)
                return
            outcome = failure(row, exc, latency, self.config.retry)
        except (asyncio.CancelledError, DatabaseUnreachable):
            raise
        except Exception as exc:
            log.exception("unexpected error on job %s request %s", row.job_id, row.id)
            await self._breaker.forget(row)
            # Stored with the row: mask any key the exception text might carry.
            error = ProviderError(
                ErrorKind.TRANSIENT, redact(f"internal error: {type(exc).__name__}: {exc}", *resolved_secrets())
            )
            outcome = failure(row, error, None, self.config.retry)
        # Tokens of every call made for this row count, including answers that did not validate.
        outcome.prompt_tokens, outcome.completion_tokens = spent.prompt_tokens, spent.completion_tokens
        outcome.cached_tokens = spent.cached_tokens
        reserved = self._reserved.get(row.key)
        outcome.reserved_usd = reserved.usd if reserved is not None else Decimal(0)
        self._completer.submit(outcome)

    async def _call(self, row: ClaimedRequest, spent: _Spent) -> Outcome:
        job = await self._job(row.job_id)
        self.metrics.claimed(row.job_id, Lane(job.provider, job.key_alias, job.model))
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
        self._guard.check(row)  # a stopped job reserves no budget
        lane = Lane(job.provider, job.key_alias, request.model)
        prompt_estimate = estimate_prompt_tokens(job.provider, request.messages)
        reserved_tokens = charged_tokens(job.provider, prompt_estimate, request.max_tokens)
        if job.limits is not None and request.model == job.model:
            problem = job.limits.problem(prompt_estimate, request.max_tokens)
            if problem:
                # Fail the row now: the provider would refuse it, after it took the lane's tokens and a slot.
                raise ProviderError(ErrorKind.PERMANENT, f"row {row.custom_id!r} not sent: {problem}")
        if job.reserves_budget:
            if job.price is None:
                # Unpriced calls would cost $0 and slip past every budget: stop and say why.
                raise _HandBack(
                    f"no price for {job.provider}/{job.model} in batchdb.prices, so its budget "
                    "cannot be enforced; add the price, then resume"
                )
            await self._reserve_budget(row, job.price.ceiling_usd(prompt_estimate, request.max_tokens))
        # The client exists before capacity is reserved: building the first one imports the
        # SDK, which blocks the loop; capacity granted before that would go out late, in a burst.
        provider = self._provider(job.provider, job.key_alias)
        # A re-ask (spent already) never gives up its place: its row has paid for a call.
        first_call = spent.calls == 0
        give_up_after = self.config.lane_wait_seconds if first_call else None
        circuit = Lane(job.provider, job.key_alias, job.model)
        claimed_at = self._claimed_at.get(row.key, 0.0)
        if self._breaker.should_hand_back(circuit, row, claimed_at):
            raise _LaneOpen()
        if first_call and self._shutdown.stopping:
            raise _NotSent  # a stopping worker sends no new call (workers/shutdown.py)
        try:
            # Not sent if the row stops being ours or its job stops running meanwhile.
            paced = await self._guard.hold(
                row,
                self.metrics.ledger_wait(lane, self._pacer.acquire(lane, reserved_tokens, give_up_after=give_up_after)),
            )
        except DailyQuotaExhausted as exc:
            raise _HandBack(str(exc)) from None
        except LaneWaiting as exc:
            raise _Defer(exc.retry_in) from None
        except Withdrawn:
            if first_call:
                raise _NotSent from None
            paced = await self._pacer.acquire(lane, reserved_tokens)
        # From here the reservation is settled whatever happens (workers/settler.py); a lane
        # without limits reserved nothing.
        settler = self._settler if paced else _NO_SETTLEMENT
        if first_call and self._shutdown.stopping:
            settler.give_back(lane, reserved_tokens)  # granted but never sent
            raise _NotSent
        if self._breaker.should_hand_back(circuit, row, claimed_at):
            settler.give_back(lane, reserved_tokens)  # granted but never sent
            raise _LaneOpen()  # opened while this call waited for capacity: do not send into it
        sent_at = self._sent_at[row.key] = time.monotonic()
        self._sent.add(row.key)
        spent.calls += 1
        try:
            async with asyncio.timeout(self.config.request_timeout), self.metrics.calling(lane):
                response = await provider.complete(request)
        except TimeoutError as exc:
            self.metrics.provider_error(lane, "timeout")
            settler.settle_failure(lane, reserved_tokens, exc)
            spent.count_timed_out(prompt_estimate)
            raise ProviderError(
                ErrorKind.TRANSIENT,
                f"no answer from {job.provider} within {self.config.request_timeout:.0f}s",
                timed_out=True,
            ) from None
        except ProviderError as exc:
            self.metrics.provider_error(lane, exc.kind)
            settler.settle_failure(lane, reserved_tokens, exc)
            if exc.timed_out:
                spent.count_timed_out(prompt_estimate)
            self._pacer.observe(lane, read_headers(exc.rate_limit_headers))
            if exc.kind is ErrorKind.RATE_LIMITED:
                await self._pacer.rate_limited(lane, exc.retry_after)
            raise
        except Exception as exc:
            settler.settle_failure(lane, reserved_tokens, exc)
            raise
        self._pacer.observe(lane, read_headers(response.rate_limit_headers))
        settler.give_back(
            lane, reserved_tokens - charged_tokens(job.provider, response.prompt_tokens, request.max_tokens)
        )
        await self._breaker.succeeded(circuit, row, sent_at)
        spent.prompt_tokens += response.prompt_tokens
        spent.cached_tokens += response.cached_tokens
        spent.completion_tokens += response.completion_tokens
        return response

    async def _reserve_budget(self, row: ClaimedRequest, usd: Decimal) -> None:
        """Reserve the call's worst-case cost. While only other calls' reservations stand in the
        way ('wait'), hold the row and ask again as they settle; a spent budget pauses the job."""
        held = self._reserved.setdefault(row.key, _Reserved(row.lease_token))
        # The call's key: run again after a lost reply, the statement reserves nothing more.
        key = {
            "job_id": row.job_id,
            "usd": usd,
            "request_id": row.id,
            "lease_token": row.lease_token,
            "seq": held.calls + 1,
        }

        async def reserve(conn: psycopg.AsyncConnection[DictRow]) -> str:
            cur = await conn.execute(query("reserve_budget"), key)
            found = await cur.fetchone()
            return str(found["result"]) if found else "paused"

        while (result := await self._claims.run(reserve, what="reserve_budget")) == "wait":
            if self._shutdown.stopping:
                raise _NotSent  # not the job's fault: return the row without pausing the job
            await self._shutdown.sleep(self.config.budget_wait)
        if result != "ok":
            raise _HandBack("budget reached")
        held.calls += 1
        held.usd += usd

    def _lane_of(self, row: ClaimedRequest) -> Lane | None:
        """The circuit lane of a row whose job is cached (it is once a call was attempted)."""
        job = self._jobs.get(row.job_id)
        return Lane(job.provider, job.key_alias, job.model) if job is not None else None

    async def _return_to_queue(self, row: ClaimedRequest) -> None:
        """The lane's circuit is open: the row goes back, no attempt spent, the job keeps running
        (it shows the circuit's reason); claim_batch skips the lane until a probe closes it."""
        await self._release([row])

    def _warm_lane(self, name: str, key_alias: str) -> None:
        """Build the lane's client (importing its SDK) and load the tokenizer its rows are counted
        with, before any of its rows is claimed. Loaded on the first call instead, they blocked the
        event loop (seen: 15 s on a loaded 2-core machine) while the rows just claimed waited: their
        leases ran out unextended and other workers called them again."""
        self._provider(name, key_alias)
        estimate_prompt_tokens(name, [{"role": "user", "content": "warm-up"}])

    def _provider(self, name: str, key_alias: str) -> Provider:
        cache_key = name if key_alias == "default" else f"{name}:{key_alias}"
        if cache_key not in self._providers:
            try:
                self._providers[cache_key] = build_provider(
                    name, key_alias=key_alias, timeout=self.config.request_timeout
                )
            except ProviderError as exc:
                if exc.kind is ErrorKind.QUOTA_EXHAUSTED:  # no key or endpoint in this process
                    raise self._lanes.lost(name, key_alias, exc.message) from None
                raise
        return self._providers[cache_key]

    def _batch_api(self, name: str, key_alias: str) -> BatchAPI:
        """The Batch API of a lane, on the lane's client (workers/batch_driver.py)."""
        provider = self._provider(name, key_alias)
        batch_api = getattr(provider, "batch_api", None)
        if batch_api is None:
            raise ProviderError(ErrorKind.PERMANENT, f"provider {name} has no Batch API in batchdb")
        api: BatchAPI = batch_api(timeout=self.config.batch.request_timeout)
        return api

    def _lane_endpoint(self, name: str, key_alias: str) -> str | None:
        """Whether this worker can call `name` under `key_alias` (see workers/lanes.py)."""
        if (name if key_alias == "default" else f"{name}:{key_alias}") in self._providers:
            return None  # a provider given to the constructor
        return lane_endpoint(name, key_alias=key_alias)

    async def _job(self, job_id: int) -> _Job:
        """The row's job, cached for `job_cache_seconds`. The rows of one claim (up to `max_claim`) ask
        at once when the cache is empty or stale: they share one read instead of queueing one each on
        the claim connection (at 20 ms to the database, 256 reads held the next claim for 5 s)."""
        cached = self._jobs.get(job_id)
        if cached is not None and time.monotonic() - cached.fetched_at < self.config.job_cache_seconds:
            return cached
        reading = self._job_reads.get(job_id)
        if reading is None:
            reading = self._job_reads[job_id] = asyncio.ensure_future(self._read_job(job_id))

            def done(future: asyncio.Future[_Job]) -> None:
                if self._job_reads.get(job_id) is future:
                    del self._job_reads[job_id]
                if not future.cancelled():
                    future.exception()  # retrieved here too: every waiter may have been cancelled

            reading.add_done_callback(done)
        return await asyncio.shield(reading)  # a cancelled row does not cancel the others' read

    async def _read_job(self, job_id: int) -> _Job:
        now = time.monotonic()

        async def fetch(conn: psycopg.AsyncConnection[DictRow]) -> dict[str, Any] | None:
            cur = await conn.execute(query("job_for_worker"), {"job_id": job_id})
            return await cur.fetchone()

        row = await self._claims.run(fetch, what="job_for_worker")
        if row is None:
            raise ProviderError(ErrorKind.PERMANENT, f"job {job_id} no longer exists")
        self._guard.job_status(job_id, row["status"])
        params = row["params"] or {}
        job = _Job(
            row["provider"],
            row["key_alias"],
            row["model"],
            params,
            row["budget_usd"],
            Price.of(
                row["input_per_mtok"],
                row["output_per_mtok"],
                cached_input_per_mtok=row["cached_input_per_mtok"],
                batch_discount=row["batch_discount"],
            ),
            now,
            ResponseValidator.for_params(params),
            int(params.get("validation_retries", DEFAULT_VALIDATION_RETRIES)),
            owner=row["owner"],
            owner_has_budget=row["owner_has_budget"],
            limits=ModelLimits.from_row(row["model"], row),
        )
        self._jobs[job_id] = job
        return job

    async def _hand_back(self, row: ClaimedRequest, reason: str) -> None:
        """Quota gone or budget reached: pause the job (if not already) and return the row to the
        queue without spending an attempt. (A refused key opens the lane's circuit instead.)"""
        await self._claims.run(
            lambda c: c.execute(query("pause_job"), {"job_id": row.job_id, "reason": reason}), what="pause_job"
        )
        await self._release([row])
        log.warning("job %s paused: %s", row.job_id, reason)

    async def _defer(self, row: ClaimedRequest, retry_in: float) -> None:
        """Its lane is waiting: give the row back (no attempt spent), due when the lane should move again."""
        await self._release([row], delay_s=retry_in)
        await self._breaker.forget(row)
        self._deferred_until = max(self._deferred_until, time.monotonic() + retry_in)

    async def _drop(self, row: ClaimedRequest, reason: str) -> None:
        """The call was not sent: hand the row back (only if it is still ours: fenced) without
        spending an attempt, and without pausing anything."""
        await self._release([row])
        await self._breaker.forget(row)
        log.debug("job %s request %s not sent: %s", row.job_id, row.id, reason)

    async def _release(self, rows: list[ClaimedRequest], *, delay_s: float = 0.0) -> int:
        """Return rows to the queue without spending an attempt, due again in `delay_s` seconds, and
        let go of them here (budget reservations, held and claim times); returns how many were still
        ours (the rest were fenced out). Every hand-back of an unsent row goes through this."""
        released = await self._claims.run(
            lambda c: queue.release_leases(c, rows, delay_s=delay_s), what="release_leases"
        )
        self._release_budget(rows)
        self._let_go(row.key for row in rows)
        return len(released)

    def _let_go(self, keys: Iterable[tuple[int, int]]) -> None:
        """Rows no longer this worker's (handed back or recorded): no lease to extend, no claim time."""
        for key in keys:
            self._held.pop(key, None)
            self._claimed_at.pop(key, None)

    def _release_budget(self, rows: list[ClaimedRequest]) -> None:
        """Rows handed back unsent: their reservations go back (through the Settler)."""
        for row in rows:
            held = self._reserved.pop(row.key, None)
            if held is not None:
                self._budget.submit(Settlement(row.job_id, row.id, held.lease_token))

    async def _forget(self, batch: list[Outcome], recorded: set[tuple[int, int]]) -> None:
        self._let_go(outcome.key for outcome in batch)
        self.metrics.recorded(batch, recorded)
        done = sum(1 for o in batch if o.key in recorded and RequestStatus(o.status).final)
        self.completed += done
        self._report_progress(done)
        # Calls that reserved budget: the reservation is replaced by what they cost. Money was
        # spent whether or not the completion was fenced out: it counts either way.
        for outcome in batch:
            held = self._reserved.pop(outcome.key, None)
            if held is None or held.lease_token != outcome.lease_token:
                continue
            job = self._jobs.get(outcome.job_id)
            price = job.price if job is not None else None
            # A call of a job gone from the cache settles at 0 (the worst case stays reserved only until now).
            cost = (
                price.cost_usd(outcome.prompt_tokens, outcome.completion_tokens, cached_tokens=outcome.cached_tokens)
                if price
                else Decimal(0)
            )
            self._budget.submit(Settlement(outcome.job_id, outcome.id, outcome.lease_token, cost))

    def _report_progress(self, done: int) -> None:
        """One line per `progress_interval` at most, on a completed batch: what an operator tailing
        the log needs, at a rate that does not grow with the request rate."""
        self._progress_rows += done
        now = time.monotonic()
        if self._progress_rows and now - self._progress_at >= self.config.progress_interval:
            log.info(
                "%d row(s) done in the last %.0fs (%d since start), %d in flight",
                self._progress_rows,
                now - self._progress_at,
                self.completed,
                len(self._tasks),
            )
            self._progress_at, self._progress_rows = now, 0

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
            await asyncio.sleep(min(self.config.heartbeat_seconds, self.config.reclaim_interval))
            held = list(self._held.values())
            extended_at = time.monotonic()

            async def extend(c: psycopg.AsyncConnection[DictRow]) -> set[tuple[int, int]]:
                nonlocal extended_at
                extended_at = time.monotonic()  # just before the statement, as for the claim
                return await queue.extend_leases(c, held, lease_seconds=self.config.lease_seconds)  # noqa: B023 - awaited in this turn

            extended = await self._claims.run(extend, what="extend_leases") if held else set()
            self._guard.extended(extended, since=extended_at, held=self._held)
            self.metrics.leases_extended(len(held), len(extended))
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
                self.metrics.reclaimed(reclaimed)
                if reclaimed:
                    log.warning("reclaimed %d row(s) whose lease expired", reclaimed)
                resumed = await self._claims.run(queue.resume_due_jobs, what="resume_due_jobs")
                if resumed:
                    log.info("resumed %d job(s) whose user quota period turned over", resumed)

    async def _finish_in_flight(self) -> None:
        """Hand back the rows whose call was never sent, at once; give the sent ones
        `shutdown_grace` seconds (less if the stop turns cold) to finish."""
        deadline = time.monotonic() + self.config.shutdown_grace
        sent = {task for key, task in self._row_tasks.items() if key in self._sent}
        unsent = set(self._tasks) - sent
        # Rows waiting for ledger capacity or budget (or about to) raise _NotSent now;
        # none of them calls the provider, so they finish within a statement or two.
        self._pacer.withdraw_waiting()
        if unsent:
            _, stuck = await asyncio.wait(unsent, timeout=self.config.shutdown_grace)
            await self._cancel_tasks(stuck)
        if self._not_sent:
            rows, self._not_sent = self._not_sent, []
            released = await self._release(rows)
            log.info("handed back %d row(s) whose call was not sent", released)
        if not sent:
            return
        log.info("waiting up to %.0fs for %d sent request(s)", self.config.shutdown_grace, len(sent))
        cold: asyncio.Task[Any] = asyncio.create_task(self._shutdown.cold.wait())
        try:
            pending = {task for task in sent if not task.done()}
            while pending and not self._shutdown.cold.is_set():
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                _, pending = await asyncio.wait(pending | {cold}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(cold)
        finally:
            cold.cancel()
        if pending:
            log.warning("not waiting for %d sent request(s) any longer: their rows go back to the queue", len(pending))
        await self._cancel_tasks(pending)

    async def _cancel_tasks(self, tasks: set[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _release_unfinished(self) -> None:
        """Rows with no recorded outcome go back to the queue without spending an attempt."""
        unfinished = list(self._held.values())
        if not unfinished:
            return
        try:
            released = await self._release(unfinished)
        except DatabaseUnreachable:
            log.warning(
                "database unreachable: %d held row(s) go back to the queue when their lease runs out (within %.0fs)",
                len(unfinished),
                self.config.lease_seconds,
            )
            return
        log.info("released %d unfinished row(s)", released)


def run_worker(config: WorkerConfig) -> None:
    """Run a worker until SIGTERM/SIGINT (or idle, when configured)."""

    async def main() -> None:
        worker = Worker(config)
        worker.install_signal_handlers()
        await worker.run()

    asyncio.run(main())
