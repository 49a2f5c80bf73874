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
attempt. It listens on the worker's one LISTEN connection and re-reads on its pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Collection, Iterable, Mapping
from typing import TypeVar

import psycopg
from psycopg.rows import DictRow

from batchdb.models import ClaimedRequest
from batchdb.queries import query
from batchdb.workers.connection import Listener, Reconnecting

log = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[int, int]

RUNNING = "running"


class CallDropped(Exception):
    """The call must not be sent: the row is no longer this worker's, or its job stopped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SendGuard:
    def __init__(
        self,
        dsn: str | None = None,
        *,
        lease_seconds: float,
        db: Reconnecting | None = None,
        listener: Listener | None = None,
    ) -> None:
        """In a worker: `db` and `listener` are the worker's (its pool and its one LISTEN
        connection). Without them (tests), the guard makes its own from `dsn` when it runs."""
        if (db is None or listener is None) and dsn is None:
            raise ValueError("SendGuard needs a dsn, or both a db and a listener")
        self._own_listener = listener is None
        self._listener = listener if listener is not None else Listener(str(dsn), name="send-guard")
        self._db = db if db is not None else Reconnecting(dsn, name="send-guard")
        self._listener.subscribe(query("listen_events"), self._on_event)
        self._events = asyncio.Event()
        self._named: set[int] = set()
        self._reread_all = False
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

    def _on_event(self, payload: str | None) -> None:
        """A NOTIFY on batchdb_events (None: the listener (re)connected, anything may have changed)."""
        if payload is None:
            self._reread_all = True
        else:
            job_id = _job_id(payload)
            if job_id is None or job_id not in self._status:
                return
            self._named.add(job_id)
        self._events.set()

    async def run(self) -> None:
        """Re-read the status of jobs we hold rows of when batchdb_events names one (all of them
        after each (re)connect of the LISTEN connection). Standalone, it runs its own listener."""
        listener = asyncio.create_task(self._listener.run(), name="send guard listen") if self._own_listener else None
        try:
            while True:
                await self._events.wait()
                self._events.clear()
                if not self._listener.connected.is_set():
                    self.listening.clear()
                if self._reread_all:
                    self._reread_all = False
                    self._named.clear()
                    await self._reread(list(self._status))
                    self.listening.set()
                elif self._named:
                    named, self._named = self._named, set()
                    await self._reread(named)
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
                await self._db.close()

    async def _reread(self, job_ids: Collection[int]) -> None:
        if not job_ids:
            return

        async def statuses(conn: psycopg.AsyncConnection[DictRow]) -> dict[int, str]:
            cur = await conn.execute(query("job_statuses"), {"job_ids": list(job_ids)})
            return {row["id"]: row["status"] for row in await cur.fetchall()}

        try:
            found = await self._db.run(statuses, what="job_statuses")
        except psycopg.Error as exc:
            log.warning("job events: re-reading job statuses failed (%s); the next event retries", exc)
            self._reread_all = True
            return
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
