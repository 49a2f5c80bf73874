"""BatchCompleter: folds many row outcomes into one `complete_batch` statement.

Outcomes are queued by the request tasks and written every `flush_interval`
seconds or every `max_batch` outcomes, whichever comes first. A failed write
is retried (the rows stay leased and their leases keep being extended), so a
database hiccup loses no result; a write that committed but whose reply was
lost is harmless to repeat because completion is fenced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import psycopg

from batchdb import queue
from batchdb.models import Outcome, RequestStatus
from batchdb.workers.batching import batches
from batchdb.workers.connection import Reconnecting

log = logging.getLogger(__name__)


class BatchCompleter:
    def __init__(
        self,
        db: Reconnecting,
        *,
        flush_interval: float = 0.05,
        max_batch: int = 500,
        on_recorded: Callable[[list[Outcome], set[tuple[int, int]]], Awaitable[None] | None] | None = None,
    ) -> None:
        self._db = db
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._pending: asyncio.Queue[Outcome | None] = asyncio.Queue()
        self._on_recorded = on_recorded
        self.recorded = 0
        self.fenced = 0

    def submit(self, outcome: Outcome) -> None:
        self._pending.put_nowait(outcome)

    @property
    def backlog(self) -> int:
        return self._pending.qsize()

    async def run(self) -> None:
        """Write batches until `close()`; then write what is left and return."""
        async for batch in batches(self._pending, flush_interval=self._flush_interval, max_batch=self._max_batch):
            await self._write(batch)

    async def close(self) -> None:
        """Ask `run()` to finish: everything submitted before this call gets written."""
        self._pending.put_nowait(None)

    async def _write(self, batch: list[Outcome]) -> None:
        try:
            recorded = await self._db.run(lambda conn: queue.complete_batch(conn, batch), what="complete_batch")
        except psycopg.Error as exc:
            # Not a connection problem: some outcome is unwritable (or a trigger refused it).
            # Write one by one so one bad row cannot hold up the others.
            log.error("complete_batch failed (%s); writing %d outcome(s) one by one", exc, len(batch))
            recorded = set()
            for outcome in batch:
                recorded |= await self._write_one(outcome)
        self.recorded += len(recorded)
        self.fenced += len(batch) - len(recorded)
        if len(recorded) < len(batch):
            log.info("%d completion(s) fenced out (lease lost or job cancelled)", len(batch) - len(recorded))
            fenced = [o for o in batch if o.key not in recorded]
            try:
                await self._db.run(lambda conn: queue.record_unrecorded_calls(conn, fenced), what="unrecorded_calls")
            except psycopg.Error:
                log.exception("could not count the usage of %d fenced-out call(s)", len(fenced))
        if self._on_recorded is not None:
            result = self._on_recorded(batch, recorded)
            if result is not None:
                await result

    async def _write_one(self, outcome: Outcome) -> set[tuple[int, int]]:
        try:
            return await self._db.run(lambda conn: queue.complete_batch(conn, [outcome]), what="complete_one")
        except psycopg.Error as exc:
            # Keep the row: send it back for another attempt with the reason; if even that
            # cannot be written its lease runs out and the reclaimer requeues it.
            # The calls were paid: their usage stays on the row even though the answer could not be stored.
            retry = Outcome(
                job_id=outcome.job_id,
                id=outcome.id,
                lease_token=outcome.lease_token,
                status=RequestStatus.QUEUED,
                retry_in=5.0,
                prompt_tokens=outcome.prompt_tokens,
                cached_tokens=outcome.cached_tokens,
                completion_tokens=outcome.completion_tokens,
                error_class="record_failed",
                error=f"could not record the result: {type(exc).__name__}: {exc}"[:2000],
            )
            try:
                return await self._db.run(lambda conn: queue.complete_batch(conn, [retry]), what="requeue_one")
            except psycopg.Error:
                log.exception("could not record or requeue job %s request %s", outcome.job_id, outcome.id)
                return set()
