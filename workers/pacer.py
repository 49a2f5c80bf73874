"""Pacer: a worker's calls wait here for ledger capacity before they are sent.

One lane per (provider, key alias, model). Calls queue FIFO in their lane; a
single task per lane asks the ledger for the whole queue at once (one round
trip grants the longest prefix that fits) and sleeps for the wait the ledger
names. What the worker learns from responses — the provider's remaining-capacity
headers, limits it announces — rides along on the next reservation, so pacing
costs about one statement per grant batch; tokens to give back go through the
settler (workers/settler.py). A call that waits longer than `give_up_after`
leaves the queue (LaneWaiting) so its worker slot can serve another lane, and a
lane that stops moving is logged once with the ledger's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from batchdb import ledger
from batchdb.ledger import HeaderView, Lane
from batchdb.workers.connection import Reconnecting

log = logging.getLogger(__name__)

MAX_GRANT_BATCH = 256
MIN_SLEEP = 0.002
MAX_SLEEP = 1.0
UNLIMITED_RECHECK = 5.0  # a lane with no configured limit is asked again this often


# A lane whose calls have waited this long without a grant is logged once, with the ledger's reason
# (workers sharing a busy key routinely wait a second or two between grants: that is moving).
LOG_WAITING_AFTER = 5.0


class LaneWaiting(Exception):
    """A call waited `give_up_after` seconds for its lane: hand its row back so the slot serves other lanes."""

    def __init__(self, lane: Lane, waited: float, retry_in: float) -> None:
        super().__init__(f"{lane.provider}/{lane.key_alias}/{lane.model} gave no capacity for {waited:.1f}s")
        self.lane = lane
        self.retry_in = retry_in


class DailyQuotaExhausted(Exception):
    """The key's requests-per-day are spent; the job must pause until the quota resets."""

    def __init__(self, lane: Lane, resets_in: float) -> None:
        super().__init__(
            f"daily request quota of {lane.provider} key {lane.key_alias!r} for {lane.model} is used up; "
            f"it resets in {resets_in / 3600:.1f} h"
        )
        self.resets_in = resets_in


class Withdrawn(Exception):
    """The call was taken out of its lane's queue before it got capacity (the worker is stopping)."""


@dataclass
class _Waiter:
    tokens: int
    future: asyncio.Future[None]


@dataclass
class _LaneState:
    waiters: deque[_Waiter] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    headers: HeaderView | None = None
    headers_at: float = 0.0
    learnt: tuple[int | None, int | None] | None = None
    unlimited_until: float = 0.0
    task: asyncio.Task[None] | None = None
    # The ledger's last estimate of when the head of the queue can go (seconds from then).
    wait_seconds: float = 0.0
    # Since when the queue has waited without a grant (None: moving), and whether that was logged.
    waiting_since: float | None = None
    logged_waiting: bool = False


class Pacer:
    def __init__(self, db: Reconnecting, *, give_back: Callable[[Lane, int], None] | None = None) -> None:
        """`give_back(lane, tokens)` returns capacity granted to a call that had already left (workers/settler.py)."""
        self._db = db
        self._give_back = give_back
        self._lanes: dict[Lane, _LaneState] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def acquire(self, lane: Lane, tokens: int, *, give_up_after: float | None = None) -> bool:
        """Return once the ledger has granted this call; raises DailyQuotaExhausted, or LaneWaiting
        after `give_up_after` seconds without a grant (the call then holds no capacity).
        False: the lane has no limits, nothing was reserved (and nothing needs settling)."""
        state = self._lane(lane)
        if time.monotonic() < state.unlimited_until:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append(_Waiter(tokens, future))
        state.wake.set()
        if give_up_after is None:
            await future
            return True
        try:
            await asyncio.wait_for(asyncio.shield(future), give_up_after)
        except TimeoutError:
            if future.done() and not future.cancelled():
                future.result()  # granted (or failed) just as the wait ran out
                return True
            future.cancel()  # the lane task skips it; nothing was reserved for it
            position = sum(1 for w in state.waiters if not w.future.done())
            raise LaneWaiting(lane, give_up_after, max(give_up_after, state.wait_seconds) + 0.1 * position) from None
        except asyncio.CancelledError:
            future.cancel()
            raise
        return True

    def withdraw_waiting(self) -> int:
        """Fail every call still waiting for capacity with `Withdrawn`; returns how many.

        For a stopping worker: those rows go back to the queue unsent instead of holding the
        shutdown. The waiters stay in their queues, done, and are skipped like cancelled ones."""
        withdrawn = 0
        for state in self._lanes.values():
            for waiter in state.waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(Withdrawn())
                    withdrawn += 1
        return withdrawn

    def observe(self, lane: Lane, headers: HeaderView | None) -> None:
        if headers is None:
            return
        state = self._lane(lane)
        state.headers = headers
        state.headers_at = time.monotonic()
        if headers.limit_requests or headers.limit_tokens:
            announced = (headers.limit_requests, headers.limit_tokens)
            if state.learnt != announced:
                state.learnt = announced
                state.unlimited_until = 0.0
                task = asyncio.create_task(self._learn(lane, announced))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def rate_limited(self, lane: Lane, retry_after: float | None) -> None:
        """A 429 got through: slow the key down for every worker."""
        await self._db.run(lambda c: ledger.record_rate_limited(c, lane, retry_after), what="record_rate_limited")

    async def close(self) -> None:
        for state in self._lanes.values():
            if state.task is not None:
                state.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await state.task
            for waiter in state.waiters:
                if not waiter.future.done():
                    waiter.future.cancel()
        await self._db.close()

    async def _note_waiting(self, lane: Lane, state: _LaneState, *, granted: bool) -> None:
        """Log a lane that stops moving (once, with the ledger's reason) and when it moves again."""
        now = time.monotonic()
        if granted or not state.waiters:
            if state.logged_waiting and state.waiting_since is not None:
                log.info(
                    "lane %s/%s/%s moving again after %.0fs",
                    lane.provider,
                    lane.key_alias,
                    lane.model,
                    now - state.waiting_since,
                )
            state.waiting_since = now if state.waiters else None
            state.logged_waiting = False
            return
        if state.waiting_since is None:
            state.waiting_since = now
        if state.logged_waiting or now - state.waiting_since < LOG_WAITING_AFTER:
            return
        state.logged_waiting = True
        try:
            found = await self._db.run(lambda c: ledger.lane_state(c, lane), what="lane_state")
        except Exception as exc:  # noqa: BLE001 - the log line is a courtesy
            found = None
            log.debug("could not read the state of %s: %s", lane, exc)
        reason = (
            found.text
            if found is not None and found.state != "ready"
            else f"waiting for capacity (next grant in {state.wait_seconds:.1f}s)"
        )
        log.warning(
            "lane %s/%s/%s not moving: %s; %d call(s) waiting",
            lane.provider,
            lane.key_alias,
            lane.model,
            reason,
            sum(1 for w in state.waiters if not w.future.done()),
        )

    def _lane(self, lane: Lane) -> _LaneState:
        state = self._lanes.get(lane)
        if state is None:
            state = self._lanes[lane] = _LaneState()
        if state.task is None or state.task.done():
            if state.task is not None and not state.task.cancelled() and state.task.exception() is not None:
                log.error("pacer task of %s died; restarting it", lane, exc_info=state.task.exception())
            state.task = asyncio.create_task(self._run(lane, state), name=f"pacer {lane}")
        return state

    async def _learn(self, lane: Lane, announced: tuple[int | None, int | None]) -> None:
        try:
            await self._db.run(lambda c: ledger.learn_limits(c, lane, *announced), what="learn_limits")
        except Exception:
            log.exception("could not record limits announced for %s", lane)

    async def _run(self, lane: Lane, state: _LaneState) -> None:
        while True:
            while not state.waiters:
                state.wake.clear()
                await state.wake.wait()
            # Drop waiters whose call gave up or was cancelled (shutdown) before asking for them:
            # a grant for one would spend a request nobody sends.
            if any(w.future.done() for w in state.waiters):
                state.waiters = deque(w for w in state.waiters if not w.future.done())
            if not state.waiters:
                continue
            batch = [w.tokens for w in list(state.waiters)[:MAX_GRANT_BATCH]]
            headers = state.headers if time.monotonic() - state.headers_at < 2.0 else None
            state.headers = None
            try:
                result = await self._db.run(
                    functools.partial(
                        ledger.reserve,
                        lane=lane,
                        tokens=batch,
                        remaining_requests=headers.remaining_requests if headers else None,
                        remaining_tokens=headers.remaining_tokens if headers else None,
                    ),
                    what="reserve_capacity",
                )
            except Exception as exc:  # noqa: BLE001 - a dead lane task would strand every call of the lane
                log.error(
                    "reserving capacity for %s/%s/%s failed: %s; retrying in 1s",
                    lane.provider,
                    lane.key_alias,
                    lane.model,
                    exc,
                )
                await asyncio.sleep(1.0)
                continue
            unused = 0
            for _ in range(result.granted):
                waiter = state.waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(None)
                else:
                    unused += waiter.tokens  # its call gave up (or shut down) while the grant was on its way
            if unused and self._give_back is not None:
                self._give_back(lane, unused)
            state.wait_seconds = result.wait_seconds
            await self._note_waiting(lane, state, granted=result.granted > 0)
            if result.daily_exhausted:
                error = DailyQuotaExhausted(lane, result.wait_seconds)
                while state.waiters:
                    waiter = state.waiters.popleft()
                    if not waiter.future.done():
                        waiter.future.set_exception(error)
                continue
            if not result.limited:
                state.unlimited_until = time.monotonic() + UNLIMITED_RECHECK
                continue
            if state.waiters:
                await asyncio.sleep(min(MAX_SLEEP, max(MIN_SLEEP, result.wait_seconds)))
