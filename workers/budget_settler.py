"""BudgetSettler: gives budget reservations back and books what calls cost, on its own connection.

Before a call, the worker reserves its worst-case cost against the job's budget and,
when the owner has one, the owner's day (`reserve_budget`, keyed by the call). Once the
call's outcome is recorded, or the row is handed back unsent, the reservation must be
replaced by what the call really cost. That bookkeeping waits on users' and jobs' rows
that other workers' reservations lock, so it runs here, batched, on a connection of its
own: the completer's hot statement and the claim loop never wait behind it.

Every settlement is keyed by the call (job, request, lease token), and `settle_budget`
deletes the call's reservations as it books them: when the connection drops after the
commit and `Reconnecting` runs the statement again, the repeat finds nothing to settle.

A worker killed between reserving and settling (SIGKILL, OOM, a lost machine) leaves
its reservations behind; its rows come back through the reclaimer, its reservations
through `settle_abandoned`, which every worker runs now and then: a reservation whose
row is no longer leased to it, older than `abandoned_after` seconds, is settled at its
reserved (worst-case) cost, since the killed worker may have sent the call
(sql/migrations/0013_waiting_events_and_abandoned_budget.sql).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal

import psycopg
from psycopg.rows import DictRow

from batchdb.queries import query
from batchdb.workers.batching import batches
from batchdb.workers.connection import Reconnecting

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settlement:
    """One row's calls under one lease: what they cost (0 when handed back unsent)."""

    job_id: int
    request_id: int
    lease_token: int
    spent_usd: Decimal = Decimal(0)


class BudgetSettler:
    def __init__(
        self,
        db: Reconnecting,
        *,
        flush_interval: float = 0.05,
        max_batch: int = 500,
        abandoned_after: float = 120.0,
        sweep_interval: float = 30.0,
    ) -> None:
        self._db = db
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._abandoned_after = abandoned_after
        self._sweep_interval = sweep_interval
        self._pending: asyncio.Queue[Settlement | None] = asyncio.Queue()
        self.settled = 0

    def submit(self, settlement: Settlement) -> None:
        self._pending.put_nowait(settlement)

    @property
    def backlog(self) -> int:
        return self._pending.qsize()

    async def run(self) -> None:
        """Settle batches until `close()`; then settle what is left and return."""
        async for batch in batches(self._pending, flush_interval=self._flush_interval, max_batch=self._max_batch):
            await self.settle(batch)

    async def sweep_forever(self) -> None:
        """Settle abandoned reservations every `sweep_interval` seconds (cancel to stop)."""
        while True:
            await asyncio.sleep(self._sweep_interval)
            await self.settle_abandoned()

    async def settle_abandoned(self) -> int:
        """Settle, at their reserved cost, the reservations no live lease will settle; returns calls settled."""

        async def sweep(conn: psycopg.AsyncConnection[DictRow]) -> int:
            cur = await conn.execute(
                query("settle_abandoned_budget"), {"older_than_s": self._abandoned_after, "limit": self._max_batch * 20}
            )
            row = await cur.fetchone()
            return int(row["settled"]) if row else 0

        try:
            settled = await self._db.run(sweep, what="settle_abandoned_budget")
        except psycopg.Error as exc:  # never stop the worker over bookkeeping
            log.error("could not settle abandoned budget reservations: %s", exc)
            return 0
        if settled:
            log.warning(
                "settled the budget reservations of %d call(s) left by a stopped worker, at their reserved cost",
                settled,
            )
        return settled

    async def close(self) -> None:
        """Ask `run()` to finish: everything submitted before this call gets settled."""
        self._pending.put_nowait(None)

    async def disconnect(self) -> None:
        await self._db.close()

    async def settle(self, batch: list[Settlement]) -> int:
        """Settle `batch` now; returns how many calls still had a reservation to settle."""
        params = {
            "job_id": [s.job_id for s in batch],
            "request_id": [s.request_id for s in batch],
            "lease_token": [s.lease_token for s in batch],
            "spent": [s.spent_usd for s in batch],
        }

        async def settle(conn: psycopg.AsyncConnection[DictRow]) -> int:
            cur = await conn.execute(query("settle_budget"), params)
            row = await cur.fetchone()
            return int(row["settled"]) if row else 0

        try:
            settled = await self._db.run(settle, what="settle_budget")
        except psycopg.Error as exc:  # never stop the worker over bookkeeping
            log.error("could not settle the budgets of %d call(s): %s", len(batch), exc)
            return 0
        self.settled += settled
        return settled
