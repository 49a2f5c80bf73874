"""Shutdown: how far a worker process is in stopping, shared by every loop and connection.

A worker stops in two steps, as Celery's warm and cold shutdowns do:

- warm (first SIGTERM/SIGINT): stop claiming, hand back rows whose call was not sent yet,
  let sent calls finish for `shutdown_grace` seconds, record every outcome, exit;
- cold (a second signal): hand back every held row at once, sent calls included, and exit.

Every loop that can wait — a reconnect backoff, a poll, a retry — waits through
`sleep()`, which a stop cuts short, and asks `may_retry_database()` before trying the
database again: once stopping, a database that stays unreachable for `patience`
seconds (at once when cold) is given up on, so a worker whose database is gone still
exits promptly. Rows it could not hand back come back to the queue when their lease runs out.
"""

from __future__ import annotations

import asyncio
import time


class DatabaseUnreachable(Exception):
    """The worker is stopping and the database stayed unreachable: give up instead of retrying.

    Deliberately not a `psycopg.Error`: callers that handle a refused statement (write the
    batch row by row, retry later) must not try that against a database that is gone."""


class Shutdown:
    """Stop state of one worker process (warm, then cold)."""

    def __init__(self, *, patience: float = 5.0) -> None:
        self.patience = patience
        self.requested = asyncio.Event()
        self.cold = asyncio.Event()
        self._requested_at: float | None = None

    @property
    def stopping(self) -> bool:
        return self.requested.is_set()

    def request(self, *, cold: bool = False) -> None:
        """Stop warm (or cold). Cold implies warm; asking again changes nothing."""
        if self._requested_at is None:
            self._requested_at = time.monotonic()
        self.requested.set()
        if cold:
            self.cold.set()

    def may_retry_database(self) -> bool:
        """Whether a lost database connection is still worth waiting for."""
        if self._requested_at is None:
            return True
        if self.cold.is_set():
            return False
        return time.monotonic() - self._requested_at < self.patience

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or less if a stop is asked for (or a warm stop turns cold) meanwhile."""
        event = self.cold if self.requested.is_set() else self.requested
        if seconds <= 0 or event.is_set():
            return
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
