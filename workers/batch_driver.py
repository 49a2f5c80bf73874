"""BatchDriver: sends batch-mode jobs through the providers' Batch APIs, one chunk at a time.

A batch-mode job's rows are never claimed one by one (claim_batch skips the job). Instead this
service, one per worker on a connection of its own, gathers due rows into chunks
(batchdb.provider_batches, migration 0020) and drives each chunk through its life:

    planned -> file_uploaded -> submitted -> in_progress -> completed | failed | expired | cancelled -> collected

Any worker may drive any chunk: a chunk is leased for one step at a time (a lease in database time,
fenced by a token that every state change presents), then let go until its next step is due. A
worker killed mid-step leaves its chunk leased; once the lease runs out another worker takes it.

Exactly once, whatever dies when. Each provider call that must not happen twice is preceded by a
record of the intent and followed by a record of its result, both fenced:

- upload: `upload_started_at` is written, then the file (named ``batchdb-<chunk uid>.jsonl``) is
  uploaded, then its id is written. A successor that finds the intent but no id lists the files
  (newest first, back to the intent) and takes the one with that name before uploading another.
- create: `provider_batch_reserve` takes the lane's batch queue room and writes
  `create_started_at`; then the batch is created with metadata ``{batchdb_chunk: uid, batchdb_try:
  n}``; then its id is written. A successor that finds the intent but no id lists the batches back
  to the intent and takes the one carrying that metadata before creating another. The create call
  is sent only while the lease has more left than the call's timeout, so no successor can be
  listing while it is still under way.
- collect: every row's outcome, the usage of answers to rows no longer the chunk's (the job was
  cancelled), the rows that never ran going back to the queue, and the chunk turning 'collected'
  are one transaction; completions are fenced per row as on the online path, so a repeat records
  nothing twice.

Results are mapped back by custom_id (the row's id) and priced at the batch price. Error-file lines
are retried in a later chunk until max_attempts (then dead, with the provider's reason), or fail at
once when the request itself was refused. Lines that never ran (the batch expired, or was cancelled
by someone else) go back to the queue the same way: the attempt is spent, so rows a provider keeps
failing to reach end dead after max_attempts windows rather than circling forever. A batch that
failed validation fails its rows with the provider's reason, except a refusal for the enqueued-token
limit, which puts the chunk back to wait for room. A cancelled job's open batches are cancelled at
the provider, and the answers that still come back for its rows are counted as paid waste.

Auto-mode jobs (0022) are chunked like batch-mode ones while a batch can make their deadline: no
chunk is formed, uploaded or created past the job's cutoff (deadline - window - margin), nor while
the lane's batch queue is full (a chunk is cut to the room left; a chunk refused room hands its
rows back, so they wait in the queue, where the online path may take them). An open batch still
running at deadline - margin is cancelled, and its lines that never ran (cancelled or expired) go
back to the queue unspent and due at once: the online path answers them before the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg.rows import DictRow

from batchdb import queue
from batchdb.context_window import ModelLimits
from batchdb.models import ClaimedRequest, Outcome, RequestStatus
from batchdb.prompts import PromptError, build_request
from batchdb.providers.base import ChatRequest, ErrorKind, ProviderError
from batchdb.providers.batch_api import AZURE_MAX_REQUESTS, OPENAI_MAX_REQUESTS, LineResult, QueueFull, RemoteBatch
from batchdb.providers.compat import UnsupportedRequest
from batchdb.queries import query
from batchdb.tokens import estimate_prompt_tokens
from batchdb.validation import ResponseValidator
from batchdb.workers.connection import Reconnecting
from batchdb.workers.outcomes import RetryPolicy, failure, invalid_response, success
from batchdb.workers.shutdown import DatabaseUnreachable

log = logging.getLogger(__name__)

# The providers with a Batch API in batchdb (batchdb.submission refuses batch mode for others).
BATCH_PROVIDERS = ("openai", "azure", "gemini")
# States of a chunk (0020). A chunk in one of OPEN holds its lane's batch queue room.
OPEN = ("submitted", "in_progress")
ENDED = ("completed", "failed", "expired", "cancelled")
# How far back, before a recorded intent, a file or batch made for it may be dated (clock skew
# between the database and the provider).
CLOCK_MARGIN_S = 600.0
# A create is sent only with the call's timeout plus this share of the lease left on the lease.
CREATE_MARGIN = 0.1
# Outcomes written per statement inside a collection's transaction.
WRITE_SLICE = 1000


class BatchAPI(Protocol):
    """What the driver needs from a provider's Batch API (batchdb/providers/batch_api.py)."""

    provider: str
    max_requests: int
    max_file_bytes: int
    timeout: float

    def line(self, custom_id: str, request: ChatRequest) -> bytes: ...

    async def find_file(self, filename: str, *, created_after: float) -> str | None: ...

    async def upload(self, filename: str, data: bytes) -> str: ...

    async def find_batch(self, metadata: dict[str, str], *, created_after: float) -> RemoteBatch | None: ...

    async def create(self, input_file_id: str, metadata: dict[str, str], *, model: str) -> RemoteBatch: ...

    async def retrieve(self, batch_id: str) -> RemoteBatch: ...

    async def cancel(self, batch_id: str) -> RemoteBatch | None: ...

    async def results(self, batch: RemoteBatch) -> dict[str, LineResult]: ...

    async def delete_file(self, file_id: str) -> None: ...


@dataclass
class BatchDriverConfig:
    # Off: this worker leaves batch-mode jobs to others.
    enabled: bool = True
    # How often the driver looks for work: rows to chunk, chunks due for their next step.
    interval: float = 5.0
    # How often an open batch is asked how it is doing.
    poll_interval: float = 30.0
    # Rows per chunk; None: the provider's limit (OpenAI 50,000, Azure 100,000 requests per file).
    chunk_rows: int | None = None
    # Bytes per input file; None: the provider's limit (200 MB).
    chunk_bytes: int | None = None
    # A chunk is leased for one step at a time; a killed worker's chunk is taken over after this.
    lease_seconds: float = 300.0
    # One Batch API call; a create is sent only with more than this (plus a margin) left on the lease.
    request_timeout: float = 60.0
    # The lane's batch queue is full (by the configured limit or the provider's refusal): look again after.
    queue_wait: float = 60.0
    # A Batch API call failed (5xx, timeout, refused key): try the step again after this.
    error_wait: float = 30.0
    # Chunks driven at once.
    take: int = 8
    # Chunks formed per pass, at most.
    form: int = 16
    # Rows of the error file go back to the queue for a later chunk after this backoff.
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(base_seconds=30.0, max_seconds=600.0))
    # Delete a chunk's input, output and error files at the provider once its outcomes are recorded:
    # every answer is in the database by then, and the files count against the key's storage quota.
    delete_files: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.request_timeout < self.lease_seconds / 2:
            raise ValueError(
                f"request_timeout ({self.request_timeout} s) must be above 0 and below half of lease_seconds "
                f"({self.lease_seconds} s): a create call must end well inside the lease it was sent under"
            )


@dataclass(frozen=True)
class Chunk:
    """A provider_batches row as this driver leased it; `deadline` is time.monotonic() by which
    its lease has surely run out (taken before the statement that leased it)."""

    id: int
    uid: str
    job_id: int
    provider: str
    key_alias: str
    model: str
    state: str
    lease_token: int
    deadline: float
    n_requests: int = 0
    enqueued_tokens: int = 0
    input_file_id: str | None = None
    batch_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    provider_status: str | None = None
    create_try: int = 1
    upload_started_at: datetime | None = None
    create_started_at: datetime | None = None
    last_error: str | None = None

    @classmethod
    def of(cls, row: dict[str, Any], deadline: float) -> Chunk:
        return cls(
            id=row["id"],
            uid=str(row["uid"]),
            job_id=row["job_id"],
            provider=row["provider"],
            key_alias=row["key_alias"],
            model=row["model"],
            state=row["state"],
            lease_token=row["lease_token"],
            deadline=deadline,
            n_requests=row["n_requests"],
            enqueued_tokens=row["enqueued_tokens"],
            input_file_id=row["input_file_id"],
            batch_id=row["batch_id"],
            output_file_id=row["output_file_id"],
            error_file_id=row["error_file_id"],
            provider_status=row["provider_status"],
            create_try=row["create_try"],
            upload_started_at=row["upload_started_at"],
            create_started_at=row["create_started_at"],
            last_error=row["last_error"],
        )

    @property
    def filename(self) -> str:
        """The input file's name at the provider: how a successor finds an upload it did not record."""
        return f"batchdb-{self.uid}.jsonl"

    @property
    def metadata(self) -> dict[str, str]:
        """The batch's metadata: how a successor finds a batch whose creation it did not record."""
        return {"batchdb_chunk": self.uid, "batchdb_try": str(self.create_try), "batchdb_job": str(self.job_id)}


@dataclass(frozen=True)
class _Job:
    provider: str
    model: str
    params: dict[str, Any]
    status: str
    limits: ModelLimits
    validator: ResponseValidator | None
    mode: str = "batch"


@dataclass(frozen=True)
class _Clock:
    """An auto job against its deadline, in database time (0022)."""

    past_cutoff: bool  # no batch may be created for it any more
    past_cancel: bool  # its open batches are cancelled


@dataclass
class _Rendered:
    """A chunk's rows as an input file, and what could not go in."""

    data: list[bytes] = field(default_factory=list)
    sent: list[ClaimedRequest] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)  # the provider would refuse them: failed now
    spilled: list[ClaimedRequest] = field(default_factory=list)  # over the file's limits: back to the queue
    tokens: int = 0
    size: int = 0


class LeaseLost(Exception):
    """The chunk is no longer this driver's (its lease ran out and another worker took it)."""


Checkpoint = Callable[[str, Chunk], Awaitable[None] | None]


class BatchDriver:
    def __init__(
        self,
        db: Reconnecting,
        config: BatchDriverConfig | None = None,
        *,
        worker_id: str,
        api_for: Callable[[str, str], BatchAPI],
        lanes: Callable[[], Collection[tuple[str, str]] | None] = lambda: None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        """`api_for(provider, key_alias)`: the Batch API of a lane this worker can call (raises when it
        cannot); `lanes()`: the (provider, key alias) pairs to work on, None for any. `checkpoint` is
        called after each step that a crash could interrupt (tests: raise to play a killed worker)."""
        self._db = db
        self.config = config or BatchDriverConfig()
        self._worker_id = worker_id
        self._api_for = api_for
        self._lanes = lanes
        self._checkpoint = checkpoint
        self._stop = asyncio.Event()
        # No batch work left on this worker's lanes, as of the last pass (the worker's exit-when-idle).
        self.idle = not self.config.enabled
        self.passes = 0

    # -- the service -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Pass after pass until `stop()`; a pass under way when asked to stop is finished first."""
        if not self.config.enabled:
            return
        while not self._stop.is_set():
            try:
                self.idle = not await self.run_once()
            except DatabaseUnreachable:
                return  # the worker is stopping and the database is gone: chunks wait for their leases
            except psycopg.Error as exc:
                log.error("batch driver pass failed: %s; trying again", exc)
                self.idle = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.interval)

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        await self._db.close()

    async def run_once(self) -> bool:
        """Form chunks of due rows, drive every due chunk one or more steps; returns whether batch
        work remains on this worker's lanes."""
        self.passes += 1
        lanes = self._lanes()
        if lanes is not None and not lanes:
            return False
        if not await self._pending(lanes):
            return False  # one cheap statement per pass for a worker whose lanes have no batch-mode work
        await self._form(lanes)
        chunks = await self._take(lanes)
        if chunks:
            # Every chunk's step runs to its end before the pass does; the first error is raised after.
            ended = await asyncio.gather(*(self._drive(chunk) for chunk in chunks), return_exceptions=True)
            for error in ended:
                if isinstance(error, BaseException):
                    raise error
        return await self._pending(lanes)

    # -- forming and taking chunks ---------------------------------------------------------------

    def _lane_params(self, lanes: Collection[tuple[str, str]] | None) -> dict[str, Any]:
        ordered = None if lanes is None else sorted(lanes)
        return {
            "providers": None if ordered is None else [p for p, _ in ordered],
            "key_aliases": None if ordered is None else [a for _, a in ordered],
        }

    async def _form(self, lanes: Collection[tuple[str, str]] | None) -> int:
        """New chunks of due rows (each job gets one while none of its chunks waits to be created),
        provider by provider: each has its own file limits."""
        formed = 0
        for provider in BATCH_PROVIDERS:
            served = None if lanes is None else [lane for lane in lanes if lane[0] == provider]
            if served is not None and not served:
                continue
            params = {
                "provider": provider,
                "key_aliases": None if served is None else [alias for _, alias in served],
                "max_rows": self._max_rows(provider),
            }
            while formed < self.config.form:
                row = await self._db.run(lambda c: self._form_one(c, params), what="form chunk")  # noqa: B023
                if row is None:
                    break
                formed += 1
                log.info("job %s: %d row(s) in batch chunk %s", row["chunk_job_id"], row["chunk_rows"], row["chunk_id"])
        return formed

    async def _form_one(self, conn: psycopg.AsyncConnection[DictRow], params: dict[str, Any]) -> DictRow | None:
        row = await self._one(conn, "provider_batch_form", params)
        return None if row is None or row["chunk_id"] is None else row

    def _max_rows(self, provider: str) -> int:
        # Gemini publishes no per-file request count: its chunks are cut like OpenAI's.
        limit = AZURE_MAX_REQUESTS if provider == "azure" else OPENAI_MAX_REQUESTS
        return min(limit, self.config.chunk_rows or limit)

    async def _take(self, lanes: Collection[tuple[str, str]] | None) -> list[Chunk]:
        taken_at = time.monotonic()

        async def take(conn: psycopg.AsyncConnection[DictRow]) -> list[DictRow]:
            nonlocal taken_at
            taken_at = time.monotonic()
            cur = await conn.execute(
                query("provider_batch_take"),
                {
                    **self._lane_params(lanes),
                    "worker_id": self._worker_id,
                    "limit": self.config.take,
                    "lease_seconds": self.config.lease_seconds,
                },
            )
            return await cur.fetchall()

        rows = await self._db.run(take, what="take chunks")
        return [Chunk.of(row, taken_at + self.config.lease_seconds) for row in rows]

    async def _pending(self, lanes: Collection[tuple[str, str]] | None) -> bool:
        row = await self._db.run(
            lambda c: self._one(c, "provider_batch_work", self._lane_params(lanes)), what="batch work"
        )
        return bool(row and row["pending"])

    # -- one chunk ------------------------------------------------------------------------------

    async def _drive(self, chunk: Chunk) -> None:
        """Take the chunk as far as it can go now, then let go of it until its next step is due."""
        current: Chunk | None = chunk
        try:
            api = self._api_for(chunk.provider, chunk.key_alias)
            while current is not None:
                if current.state == "planned":
                    current = await self._upload(api, current)
                elif current.state == "file_uploaded":
                    current = await self._create(api, current)
                elif current.state in OPEN:
                    current = await self._poll(api, current)
                elif current.state in ENDED:
                    await self._collect(api, current)
                    await self._delete_files(api, current)
                    current = None
                else:
                    current = None
        except LeaseLost:
            log.info("batch chunk %s: taken over by another worker", chunk.id)
        except ProviderError as exc:
            log.warning(
                "batch chunk %s (%s): %s; trying again in %.0fs", chunk.id, chunk.state, exc, self.config.error_wait
            )
            await self._release(current or chunk, self.config.error_wait, error=exc.message)
        except (psycopg.Error, asyncio.CancelledError, DatabaseUnreachable):
            raise
        except Exception as exc:
            log.exception("batch chunk %s (%s) failed", chunk.id, chunk.state)
            await self._release(current or chunk, self.config.error_wait, error=f"{type(exc).__name__}: {exc}")

    async def _upload(self, api: BatchAPI, chunk: Chunk) -> Chunk | None:
        """planned -> file_uploaded: render the rows, fail those the provider would refuse, hand back
        those over the file's limits, upload the file (or find the one uploaded before)."""
        job = await self._job(chunk.job_id)
        if job is None or job.status != "running":
            await self._abandon(chunk, job)
            return None
        if await self._too_late(chunk, job):
            return None
        rows = [row for row in await self._rows(chunk, content=True) if row.status == "running"]
        limit, used = await self._queue_limit(chunk)
        if job.mode == "auto" and limit is not None:
            limit = max(limit - used, 0)  # the room left: rows do not wait in an auto job's chunk
        rendered = self._render(api, job, chunk, [row.claimed for row in rows], limit)
        if rendered.failed or rendered.spilled:
            await self._db.run(lambda c: self._set_aside(c, chunk, rendered), what="set rows aside")
        if not rendered.sent:
            await self._collected(chunk, "no row left to send")
            return None
        if job.mode == "auto" and limit is not None and used > 0 and rendered.tokens > limit:
            # Even its first row is more than the room left: no file is uploaded for a create that would wait.
            await self._abandon(chunk, job, reason="no room in the lane's batch queue; rows back to the queue")
            return None
        file_id = None
        if chunk.upload_started_at is not None:
            file_id = await api.find_file(
                chunk.filename, created_after=chunk.upload_started_at.timestamp() - CLOCK_MARGIN_S
            )
        else:
            chunk = await self._step(chunk, "provider_batch_upload_intent")
        await self._at("upload_intent", chunk)
        if file_id is None:
            file_id = await api.upload(chunk.filename, b"".join(rendered.data))
            await self._at("uploaded", chunk)
        return await self._step(
            chunk,
            "provider_batch_uploaded",
            input_file_id=file_id,
            input_bytes=rendered.size,
            enqueued_tokens=rendered.tokens,
            n_requests=len(rendered.sent),
        )

    async def _create(self, api: BatchAPI, chunk: Chunk) -> Chunk | None:
        """file_uploaded -> submitted: take the lane's queue room, then create the batch (or find the
        one an earlier try created)."""
        job = await self._job(chunk.job_id)
        if job is None or job.status != "running":
            await self._abandon(chunk, job)
            return None
        # Once a create may have been sent (its intent recorded), the batch is looked up, never dropped.
        if chunk.create_started_at is None and await self._too_late(chunk, job):
            return None
        row = await self._db.run(
            lambda c: self._one(c, "provider_batch_reserve", {"id": chunk.id, "lease_token": chunk.lease_token}),
            what="reserve batch queue",
        )
        result = row["result"] if row else "lost"
        if result == "lost":
            raise LeaseLost
        if result == "wait":
            if job.mode == "auto":
                # Its rows wait in the queue instead, where the online path may take them (0022).
                await self._abandon(chunk, job, reason="no room in the lane's batch queue; rows back to the queue")
                return None
            await self._release(chunk, self.config.queue_wait, error="waiting for room in the lane's batch queue")
            return None
        remote = None
        if result == "resumed":
            assert chunk.create_started_at is not None
            remote = await api.find_batch(
                chunk.metadata, created_after=chunk.create_started_at.timestamp() - CLOCK_MARGIN_S
            )
        await self._at("create_intent", chunk)
        if remote is None:
            if chunk.deadline - time.monotonic() < api.timeout + self.config.lease_seconds * CREATE_MARGIN:
                # Too little lease left for the call to surely end inside it: next pass, with a fresh one.
                await self._release(chunk, 0.0)
                return None
            assert chunk.input_file_id is not None
            try:
                remote = await api.create(chunk.input_file_id, chunk.metadata, model=chunk.model)
            except QueueFull as exc:
                # No batch was made (Gemini refuses at create): give the room back, wait, create again.
                chunk = await self._step(chunk, "provider_batch_unreserve", error=exc.message)
                await self._release(chunk, self.config.queue_wait)
                return None
            except ProviderError as exc:
                if exc.kind is ErrorKind.PERMANENT:
                    await self._refused(chunk, exc)
                    return None
                if exc.kind is ErrorKind.QUOTA_EXHAUSTED:
                    await self._pause(chunk, f"provider refused: {exc.message}")
                    await self._abandon(chunk, None, reason=exc.message)
                    return None
                raise
            await self._at("created", chunk)
        log.info("batch chunk %s: batch %s created (%d rows)", chunk.id, remote.id, chunk.n_requests)
        return await self._step(chunk, "provider_batch_submitted", batch_id=remote.id, provider_status=remote.status)

    async def _poll(self, api: BatchAPI, chunk: Chunk) -> Chunk | None:
        """submitted/in_progress -> an ended state: ask the provider; cancel the batch of a cancelled job."""
        assert chunk.batch_id is not None
        remote = await api.retrieve(chunk.batch_id)
        if not remote.ended and remote.status != "cancelling":
            job = await self._job(chunk.job_id)
            if job is None or job.status == "cancelled":
                log.info("batch chunk %s: job %s cancelled, cancelling batch %s", chunk.id, chunk.job_id, remote.id)
                remote = await api.cancel(remote.id) or await api.retrieve(remote.id)
            elif job.mode == "auto" and (clock := await self._clock(chunk.job_id)) and clock.past_cancel:
                log.info(
                    "batch chunk %s: batch %s still open at job %s's deadline minus its margin: cancelled, "
                    "its unanswered rows go online",
                    chunk.id,
                    remote.id,
                    chunk.job_id,
                )
                remote = await api.cancel(remote.id) or await api.retrieve(remote.id)
        if remote.queue_full:
            log.info("batch chunk %s: %s; waiting for room", chunk.id, remote.error_text())
            chunk = await self._step(chunk, "provider_batch_requeue", error=remote.error_text())
            await self._release(chunk, self.config.queue_wait)
            return None
        state = remote.status if remote.ended else ("submitted" if remote.status == "validating" else "in_progress")
        chunk = await self._step(
            chunk,
            "provider_batch_polled",
            state=state,
            provider_status=remote.status,
            output_file_id=remote.output_file_id,
            error_file_id=remote.error_file_id,
            n_completed=remote.completed,
            n_failed=remote.failed,
            error=remote.error_text() if remote.status == "failed" else None,
        )
        if not remote.ended:
            await self._release(chunk, self.config.poll_interval)
            return None
        await self._at("ended", chunk)
        return chunk

    async def _collect(self, api: BatchAPI, chunk: Chunk) -> None:
        """An ended batch -> collected: every row's outcome, in one transaction with the state change."""
        job = await self._job(chunk.job_id)
        rows = await self._rows(chunk)
        outcomes: list[Outcome] = []
        back: list[ClaimedRequest] = []
        # An auto job's lines that never ran go back unspent and due now: the online path answers them.
        auto = job is not None and job.mode == "auto"
        if chunk.state == "failed":
            reason = f"{api.provider} batch {chunk.batch_id} failed validation: {chunk.last_error or 'no reason given'}"
            for row in rows:
                if row.status == "running":
                    outcomes.append(
                        Outcome(
                            row.job_id,
                            row.id,
                            row.lease_token,
                            RequestStatus.FAILED,
                            error_class="batch_failed",
                            error=reason,
                        )
                    )
        else:
            remote = RemoteBatch(
                chunk.batch_id or "",
                chunk.state,
                0,
                output_file_id=chunk.output_file_id,
                error_file_id=chunk.error_file_id,
                model=chunk.model,
            )
            lines = await api.results(remote)
            # An expired or cancelled Gemini batch has no results at all: its lines never ran.
            never_ran = ProviderError(ErrorKind.TRANSIENT, f"{api.provider} batch {chunk.batch_id} {chunk.state}")
            for row in rows:
                line = lines.get(str(row.id))
                never = (line is None or line.never_ran) and chunk.state in ("expired", "cancelled")
                if never and auto:
                    if row.status == "running":
                        back.append(row.claimed)
                elif line is None and chunk.state in ("expired", "cancelled"):
                    outcomes.append(failure(row.claimed, never_ran, None, self.config.retry))
                elif line is None:
                    # In no file of a completed batch (the provider lost it): back, unspent.
                    if row.status == "running":
                        back.append(row.claimed)
                elif line.response is not None:
                    outcomes.append(self._answered(job, row.claimed, line))
                elif line.error is not None:
                    outcomes.append(failure(row.claimed, line.error, None, self.config.retry))
        await self._db.run(lambda c: self._record(c, chunk, outcomes, back), what="collect batch")
        log.info(
            "batch chunk %s (%s): %d outcome(s) recorded, %d row(s) back to the queue",
            chunk.id,
            chunk.state,
            len(outcomes),
            len(back),
        )

    def _answered(self, job: _Job | None, row: ClaimedRequest, line: LineResult) -> Outcome:
        """A line answered 200: succeeded, or, when the job asks for a schema and the answer does not
        follow it, sent again in a later chunk (failed after the last attempt, keeping the answer)."""
        assert line.response is not None
        outcome = success(row, line.response, None)
        validator = job.validator if job is not None else None
        if validator is None:
            return outcome
        verdict = validator.check(line.response.text)
        if verdict.ok:
            outcome.response_json = verdict.value
            return outcome
        error = f"{verdict.error} (batch mode sends the row again rather than re-asking)"
        if row.attempts < row.max_attempts:
            retry = failure(row, ProviderError(ErrorKind.TRANSIENT, error), None, self.config.retry)
            paid = retry
        else:
            paid = invalid_response(row, line.response, None, error)
        paid.error_class = "invalid_response"
        paid.prompt_tokens, paid.cached_tokens = line.response.prompt_tokens, line.response.cached_tokens
        paid.completion_tokens = line.response.completion_tokens
        return paid

    # -- database writes ------------------------------------------------------------------------

    async def _record(
        self, conn: psycopg.AsyncConnection[DictRow], chunk: Chunk, outcomes: list[Outcome], back: list[ClaimedRequest]
    ) -> None:
        async with conn.transaction():
            for start in range(0, len(outcomes), WRITE_SLICE):
                part = outcomes[start : start + WRITE_SLICE]
                recorded = await queue.complete_batch(conn, part, batch=True)
                fenced = [o for o in part if o.key not in recorded]
                # Answers to rows no longer the chunk's (cancelled, or recorded by an earlier try) were
                # paid: counted as waste unless this very outcome is already on the row.
                await queue.record_unrecorded_calls(conn, fenced, batch=True)
            for start in range(0, len(back), WRITE_SLICE):
                await queue.release_leases(conn, back[start : start + WRITE_SLICE])
            cur = await conn.execute(
                query("provider_batch_collected"), {"id": chunk.id, "lease_token": chunk.lease_token, "error": None}
            )
            if await cur.fetchone() is None:
                raise LeaseLost  # rolls the whole collection back

    async def _set_aside(self, conn: psycopg.AsyncConnection[DictRow], chunk: Chunk, rendered: _Rendered) -> None:
        async with conn.transaction():
            await self._hold(conn, chunk)
            if rendered.failed:
                await queue.complete_batch(conn, rendered.failed, batch=True)
            if rendered.spilled:
                await queue.release_leases(conn, rendered.spilled)

    @staticmethod
    async def _hold(conn: psycopg.AsyncConnection[DictRow], chunk: Chunk) -> None:
        """Inside a transaction: lock the chunk's row if it is still this lease's, else LeaseLost."""
        cur = await conn.execute(query("provider_batch_hold"), {"id": chunk.id, "lease_token": chunk.lease_token})
        if await cur.fetchone() is None:
            raise LeaseLost

    async def _abandon(self, chunk: Chunk, job: _Job | None, *, reason: str | None = None) -> None:
        """Before its batch exists, the chunk's job stopped running (cancelled, paused, deleted): its
        rows still held go back to the queue unspent (a cancelled job's are cancelled already)."""
        rows = [row.claimed for row in await self._rows(chunk) if row.status == "running"]

        async def abandon(conn: psycopg.AsyncConnection[DictRow]) -> None:
            async with conn.transaction():
                if rows:
                    await queue.release_leases(conn, rows)
                why = reason or f"job {'gone' if job is None else job.status} before its batch was created"
                cur = await conn.execute(
                    query("provider_batch_collected"), {"id": chunk.id, "lease_token": chunk.lease_token, "error": why}
                )
                if await cur.fetchone() is None:
                    raise LeaseLost

        await self._db.run(abandon, what="abandon chunk")
        log.info("batch chunk %s: not sent (%s)", chunk.id, reason or (job.status if job else "job gone"))
        await self._delete_files(self._api_for(chunk.provider, chunk.key_alias), chunk)

    async def _delete_files(self, api: BatchAPI, chunk: Chunk) -> None:
        """After the chunk is collected: its files at the provider are no longer needed. Best effort (a
        worker killed before this leaves them to the provider's own expiry, OpenAI's 30 days)."""
        if not self.config.delete_files:
            return
        for file_id in (chunk.input_file_id, chunk.output_file_id, chunk.error_file_id):
            if file_id:
                try:
                    await api.delete_file(file_id)
                except ProviderError as exc:
                    log.info("batch chunk %s: could not delete file %s (%s)", chunk.id, file_id, exc.message)

    async def _refused(self, chunk: Chunk, exc: ProviderError) -> None:
        """The provider refused to create the batch (a 400): its rows fail with the reason."""
        rows = [row for row in await self._rows(chunk) if row.status == "running"]
        outcomes = [
            Outcome(
                row.job_id,
                row.id,
                row.lease_token,
                RequestStatus.FAILED,
                error_class="batch_refused",
                error=exc.message,
            )
            for row in rows
        ]
        await self._db.run(lambda c: self._record(c, chunk, outcomes, []), what="refused batch")
        log.warning("batch chunk %s: provider refused the batch: %s", chunk.id, exc.message)

    async def _pause(self, chunk: Chunk, reason: str) -> None:
        await self._db.run(
            lambda c: c.execute(query("pause_job"), {"job_id": chunk.job_id, "reason": reason}), what="pause_job"
        )
        log.warning("job %s paused: %s", chunk.job_id, reason)

    async def _collected(self, chunk: Chunk, error: str) -> None:
        await self._step(chunk, "provider_batch_collected", error=error)

    async def _release(self, chunk: Chunk, delay_s: float, *, error: str | None = None) -> None:
        with contextlib.suppress(psycopg.Error):
            await self._db.run(
                lambda c: c.execute(
                    query("provider_batch_release"),
                    {"id": chunk.id, "lease_token": chunk.lease_token, "delay_s": delay_s, "error": error},
                ),
                what="release chunk",
            )

    async def _step(self, chunk: Chunk, name: str, **params: Any) -> Chunk:
        """A state change fenced by the chunk's lease token; the chunk as it is now."""
        row = await self._db.run(
            lambda c: self._one(c, name, {"id": chunk.id, "lease_token": chunk.lease_token, **params}), what=name
        )
        if row is None:
            raise LeaseLost
        return Chunk.of(row, chunk.deadline)

    async def _at(self, step: str, chunk: Chunk) -> None:
        if self._checkpoint is not None:
            result = self._checkpoint(step, chunk)
            if result is not None:
                await result

    # -- reading --------------------------------------------------------------------------------

    @staticmethod
    async def _one(conn: psycopg.AsyncConnection[DictRow], name: str, params: dict[str, Any]) -> DictRow | None:
        cur = await conn.execute(query(name), params)
        return await cur.fetchone()

    async def _job(self, job_id: int) -> _Job | None:
        row = await self._db.run(lambda c: self._one(c, "job_for_worker", {"job_id": job_id}), what="job_for_worker")
        if row is None:
            return None
        params = row["params"] or {}
        return _Job(
            provider=row["provider"],
            model=row["model"],
            params=params,
            status=row["status"],
            limits=ModelLimits.from_row(row["model"], row),
            validator=ResponseValidator.for_params(params),
            mode=row["mode"],
        )

    async def _clock(self, job_id: int) -> _Clock | None:
        """An auto job's cutoff and cancel moments as of now (None: not an auto job, or gone)."""
        row = await self._db.run(lambda c: self._one(c, "auto_job_clock", {"job_id": job_id}), what="auto job clock")
        return None if row is None else _Clock(past_cutoff=row["past_cutoff"], past_cancel=row["past_cancel"])

    async def _too_late(self, chunk: Chunk, job: _Job) -> bool:
        """Before its batch exists, an auto job's chunk past the cutoff hands its rows back: a batch
        created now might end after the deadline, so the online path takes them (0022)."""
        if job.mode != "auto":
            return False
        clock = await self._clock(chunk.job_id)
        if clock is None or not clock.past_cutoff:
            return False
        await self._abandon(
            chunk, job, reason="past the job's batch cutoff (deadline - window - margin); rows go online"
        )
        return True

    async def _rows(self, chunk: Chunk, *, content: bool = False) -> list[_Row]:
        """The chunk's rows; with `content`, their payload and input too (only rendering needs them)."""

        async def fetch(conn: psycopg.AsyncConnection[DictRow]) -> list[DictRow]:
            name = "provider_batch_rows" if content else "provider_batch_row_keys"
            cur = await conn.execute(query(name), {"job_id": chunk.job_id, "chunk_id": chunk.id})
            return await cur.fetchall()

        return [_Row.of(row) for row in await self._db.run(fetch, what="chunk rows")]

    async def _queue_limit(self, chunk: Chunk) -> tuple[int | None, int]:
        """The lane's batch queue limit (None: none known) and the tokens other chunks hold in it."""
        row = await self._db.run(
            lambda c: self._one(
                c,
                "provider_batch_queue_limit",
                {"provider": chunk.provider, "key_alias": chunk.key_alias, "model": chunk.model, "id": chunk.id},
            ),
            what="batch queue limit",
        )
        if row is None or row["batch_queue_tokens"] is None:
            return None, 0
        return int(row["batch_queue_tokens"]), int(row["used_tokens"])

    def _render(
        self, api: BatchAPI, job: _Job, chunk: Chunk, rows: Sequence[ClaimedRequest], queue_limit: int | None
    ) -> _Rendered:
        """The input file: one line per row, custom_id = the row's id. A row the provider would refuse
        fails now, as the online path fails it before sending; once the file is as large as a file (or
        the lane's batch queue) may be, the remaining rows go back to the queue for a later chunk."""
        out = _Rendered()
        max_rows = min(api.max_requests, self.config.chunk_rows or api.max_requests)
        max_bytes = min(api.max_file_bytes, self.config.chunk_bytes or api.max_file_bytes)
        max_tokens = queue_limit if queue_limit is not None else math.inf
        full = False
        for row in rows:
            if full:
                out.spilled.append(row)
                continue
            try:
                request = build_request(model=job.model, params=job.params, payload=row.payload, input=row.input)
                if request.model != job.model:
                    raise PromptError(
                        f"asks for model {request.model!r}, but a batch file holds one model ({job.model!r}); "
                        "submit it as a job of its own"
                    )
                prompt_tokens = estimate_prompt_tokens(job.provider, request.messages)
                problem = job.limits.problem(prompt_tokens, request.max_tokens)
                if problem:
                    raise PromptError(problem)
                line = api.line(str(row.id), request)
            except (PromptError, UnsupportedRequest) as exc:
                error = ProviderError(ErrorKind.PERMANENT, f"row {row.custom_id!r} not sent: {exc}")
                out.failed.append(failure(row, error, None, self.config.retry))
                continue
            if out.sent and (
                len(out.sent) >= max_rows or out.size + len(line) > max_bytes or out.tokens + prompt_tokens > max_tokens
            ):
                full = True
                out.spilled.append(row)
                continue
            out.data.append(line)
            out.sent.append(row)
            out.size += len(line)
            out.tokens += prompt_tokens
        if out.spilled:
            log.info("batch chunk %s: %d row(s) over the file's limits go to a later chunk", chunk.id, len(out.spilled))
        return out


@dataclass(frozen=True)
class _Row:
    """A row of a chunk: as claimed (for its outcome), and its status now."""

    claimed: ClaimedRequest
    status: str

    @property
    def job_id(self) -> int:
        return self.claimed.job_id

    @property
    def id(self) -> int:
        return self.claimed.id

    @property
    def lease_token(self) -> int:
        return self.claimed.lease_token

    @classmethod
    def of(cls, row: dict[str, Any]) -> _Row:
        return cls(
            ClaimedRequest(
                job_id=row["job_id"],
                id=row["id"],
                custom_id=row["custom_id"],
                payload=row.get("payload"),
                input=row.get("input"),
                attempts=row["attempts"],
                max_attempts=row["max_attempts"],
                lease_token=row["lease_token"],
            ),
            row["status"],
        )
