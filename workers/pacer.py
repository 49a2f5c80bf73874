"""Pacer: a worker's calls wait here for ledger capacity before they are sent.

One lane per (provider, key alias, model). Calls queue FIFO in their lane; a
single task per lane asks the ledger for the whole queue at once (one round
trip grants the longest prefix that fits) and sleeps for the wait the ledger
names. What the worker learns from responses — tokens to give back, the
provider's remaining-capacity headers, limits it announces — rides along on
the next reservation, so pacing costs about one statement per grant batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from batchdb import ledger
from batchdb.ledger import HeaderView, Lane
from workers.connection import Reconnecting

log = logging.getLogger(__name__)

MAX_GRANT_BATCH = 256
MIN_SLEEP = 0.002
MAX_SLEEP = 1.0
UNLIMITED_RECHECK = 5.0  # a lane with no configured limit is asked again this often


class DailyQuotaExhausted(Exception):
    """The key's requests-per-day are spent; the job must pause until the quota resets."""

    def __init__(self, lane: Lane, resets_in: float) -> None:
        super().__init__(f"daily request quota of {lane.provider} key {lane.key_alias!r} for {lane.model} is used up; "
                         f"it resets in {resets_in / 3600:.1f} h")
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
    refund_tokens: int = 0
    headers: HeaderView | None = None
    headers_at: float = 0.0
    learnt: tuple[int | None, int | None] | None = None
    unlimited_until: float = 0.0
    task: asyncio.Task[None] | None = None


class Pacer:
    def __init__(self, db: Reconnecting) -> None:
        self._db = db
        self._lanes: dict[Lane, _LaneState] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def acquire(self, lane: Lane, tokens: int) -> None:
        """Return once the ledger has granted this call; raises DailyQuotaExhausted."""
        state = self._lane(lane)
        if time.monotonic() < state.unlimited_until:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append(_Waiter(tokens, future))
        state.wake.set()
        await future

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

    def settle(self, lane: Lane, *, reserved_tokens: int, charged_tokens: int) -> None:
        """Give back (or take) the difference between the estimate and what the provider counted."""
        self._lane(lane).refund_tokens += reserved_tokens - charged_tokens

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

    def _lane(self, lane: Lane) -> _LaneState:
        state = self._lanes.get(lane)
        if state is None:
            state = self._lanes[lane] = _LaneState()
            state.task = asyncio.create_task(self._run(lane, state), name=f"pacer {lane}")
        return state

    async def _learn(self, lane: Lane, announced: tuple[int | None, int | None]) -> None:
        try:
            await self._db.run(lambda c: ledger.learn_limits(c, lane, *announced), what="learn_limits")
        except Exception:  # noqa: BLE001 - learning limits is an optimisation
            log.exception("could not record limits announced for %s", lane)

    async def _run(self, lane: Lane, state: _LaneState) -> None:
        while True:
            while not state.waiters:
                state.wake.clear()
                await state.wake.wait()
            # Drop waiters whose call was cancelled (shutdown) before asking for them.
            while state.waiters and state.waiters[0].future.done():
                state.waiters.popleft()
            if not state.waiters:
                continue
            batch = [w.tokens for w in list(state.waiters)[:MAX_GRANT_BATCH]]
            refund, state.refund_tokens = state.refund_tokens, 0
            headers = state.headers if time.monotonic() - state.headers_at < 2.0 else None
            state.headers = None
            result = await self._db.run(
                lambda c: ledger.reserve(
                    c, lane, batch, refund_tokens=refund,
                    remaining_requests=headers.remaining_requests if headers else None,
                    remaining_tokens=headers.remaining_tokens if headers else None,
                ),
                what="reserve_capacity",
            )
            for _ in range(result.granted):
                waiter = state.waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(None)
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
