"""SendGuard: a call is sent only while its row is still this worker's and its job still runs.

A claimed row can wait a long time between its claim and its call: in the pacer behind a
slow key (10 RPM: one call every 6 s), or in a process that was stopped (SIGSTOP, a frozen
VM) for longer than its lease. Meanwhile the job may be cancelled or paused, or the lease
may run out and another worker reclaim the row. The completion is fenced either way, but
the call would still be sent and paid for, and it would take a slot of the key's rate
limit from the jobs that still run. So before each send the worker asks, cheaply:

- the lease deadline, kept locally: the monotonic time taken *before* the claim (or the
  last extension that returned the row) plus the lease. It is never later than the
  database's own expiry, so a worker that was stopped past it drops the call;
- the job's status, kept per job: set by every job read and by ``batchdb_events``
  (``cancel``, pause, resume). The payload is only a hint: the status is re-read from
  the database, so a forged NOTIFY changes nothing.

Calls waiting in the pacer when their job stops are woken at once and dropped (`hold`):
`cancel` stops the sends of a job within a round trip, not when the pacer gets to them.
The worker then hands the row back (fenced: only if still its own) without spending an
attempt. This service listens on a connection of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Collection, Iterable, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg.rows import DictRow, dict_row

from batchdb import pooler
from batchdb.db import SESSION_OPTIONS, with_options
from batchdb.models import ClaimedRequest
from batchdb.queries import query

log = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[int, int]

RUNNING = "running"
# Through a pooler that loses LISTEN: how often the statuses of held jobs are re-read instead.
STATUS_POLL_S = 2.0


class CallDropped(Exception):
    """The call must not be sent: the row is no longer this worker's, or its job stopped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SendGuard:
    def __init__(self, dsn: str, *, lease_seconds: float) -> None:
        self._dsn = dsn
        self._lease_seconds = lease_seconds
        # Send only with at least this much lease left: the answer must be able to come back.
        self._margin = min(1.0, lease_seconds / 10)
        self._deadlines: dict[Key, tuple[int, float]] = {}
        # Known job statuses; None: not read yet (sending is allowed).
        self._status: dict[int, str | None] = {}
        self._waiting: dict[int, dict[Key, asyncio.Task[object]]] = {}
        self._dropping: dict[Key, str] = {}
        self._lease_drops = 0
        self.listening = asyncio.Event()

    # -- bookkeeping hooks (the worker calls these) -------------------------------------------

    def leased(self, rows: Iterable[ClaimedRequest], *, since: float) -> None:
        """Rows claimed by a statement sent at monotonic time `since`."""
        deadline = since + self._lease_seconds
        for row in rows:
            self._deadlines[row.key] = (row.lease_token, deadline)
            self._status.setdefault(row.job_id, None)

    def extended(self, keys: Collection[Key], *, since: float, held: Mapping[Key, ClaimedRequest]) -> None:
        """Leases the database extended (statement sent at `since`); forget rows no longer `held`."""
        deadline = since + self._lease_seconds
        for key in keys:
            row = held.get(key)
            if row is not None:
                self._deadlines[key] = (row.lease_token, deadline)
        for key in [k for k in self._deadlines if k not in held]:
            del self._deadlines[key]
        jobs = {key[0] for key in held}
        for job_id in [j for j in self._status if j not in jobs]:
            del self._status[job_id]
        if self._lease_drops:
            log.warning(
                "dropped %d unsent call(s) whose lease had run out (was this worker stalled?)", self._lease_drops
            )
            self._lease_drops = 0

    def job_status(self, job_id: int, status: str | None) -> None:
        """The job's status as just read; a job that stopped running drops its waiting calls."""
        self._status[job_id] = status
        if status == RUNNING or status is None:
            return
        waiting = self._waiting.get(job_id, {})
        pending = [(key, task) for key, task in waiting.items() if key not in self._dropping]
        for key, task in pending:
            self._dropping[key] = f"job {job_id} is {status}"
            task.cancel()
        if pending:
            log.info("job %s is %s: %d unsent call(s) dropped", job_id, status, len(pending))

    # -- before a send ----------------------------------------------------------------------

    def check(self, row: ClaimedRequest) -> None:
        """Raise CallDropped unless `row` is still leased to us and its job still runs."""
        status = self._status.get(row.job_id)
        if status is not None and status != RUNNING:
            raise CallDropped(f"job {row.job_id} is {status}")
        lease = self._deadlines.get(row.key)
        if lease is not None and lease[0] == row.lease_token and time.monotonic() >= lease[1] - self._margin:
            self._lease_drops += 1
            raise CallDropped(f"the lease of job {row.job_id} request {row.id} ran out before it was sent")

    async def hold(self, row: ClaimedRequest, waiting: Awaitable[T]) -> T:
        """Await `waiting` (the pacer) for `row`, then check again. If the job stops meanwhile,
        `waiting` is cancelled (the pacer drops a cancelled waiter) and CallDropped raised."""
        self.check(row)
        task = asyncio.current_task()
        assert task is not None
        self._waiting.setdefault(row.job_id, {})[row.key] = task
        try:
            result = await waiting
        except asyncio.CancelledError:
            reason = self._dropping.pop(row.key, None)
            if reason is None:
                raise  # shutdown, not us
            task.uncancel()
            raise CallDropped(reason) from None
        finally:
            jobs = self._waiting.get(row.job_id)
            if jobs is not None:
                jobs.pop(row.key, None)
                if not jobs:
                    del self._waiting[row.job_id]
        if self._dropping.pop(row.key, None) is not None:
            # Cancelled after the wait had already finished: take the cancellation back.
            task.uncancel()
        self.check(row)
        return result

    # -- the service: job events ------------------------------------------------------------

    async def run(self) -> None:
        """LISTEN batchdb_events; re-read the status of jobs we hold rows of when one is named.
        Through a transaction pooler without a LISTEN DSN, re-read them every STATUS_POLL_S."""
        while True:
            try:
                conninfo = with_options(self._dsn, SESSION_OPTIONS)
                kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
                listening = await pooler.listen_connect_async(conninfo, application_name="batchdb-send-guard", **kwargs)
                if listening is None:
                    async with await pooler.connect_async(conninfo, **kwargs) as polled:
                        await self._poll(polled)
                    continue
                async with listening as conn:
                    await conn.execute(query("listen_events"))
                    # Whatever changed while we were not listening.
                    await self._reread(conn, list(self._status))
                    self.listening.set()
                    while True:
                        named: set[int] = set()
                        async for notify in conn.notifies(stop_after=1):
                            job_id = _job_id(notify.payload)
                            if job_id is not None and job_id in self._status:
                                named.add(job_id)
                        if named:
                            await self._reread(conn, named)
            except psycopg.Error as exc:
                self.listening.clear()
                log.warning("job events: LISTEN connection lost (%s); reconnecting", exc)
                await asyncio.sleep(1.0)

    async def _poll(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        """Re-read the statuses of the jobs we hold rows of every STATUS_POLL_S, forever."""
        log.info(
            "job events: no LISTEN through a transaction pooler; re-reading job statuses every %.0fs", STATUS_POLL_S
        )
        self.listening.set()
        while True:
            await self._reread(conn, list(self._status))
            await asyncio.sleep(STATUS_POLL_S)

    async def _reread(self, conn: psycopg.AsyncConnection[DictRow], job_ids: Collection[int]) -> None:
        if not job_ids:
            return
        cur = await conn.execute(query("job_statuses"), {"job_ids": list(job_ids)})
        found = {row["id"]: row["status"] for row in await cur.fetchall()}
        for job_id in job_ids:
            if job_id in self._status:
                self.job_status(job_id, found.get(job_id, "deleted"))


def _job_id(payload: str) -> int | None:
    """The job an event names; anything else (any role may NOTIFY this channel) is ignored."""
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    job_id = event.get("job_id") if isinstance(event, dict) else None
    return job_id if isinstance(job_id, int) and not isinstance(job_id, bool) else None
