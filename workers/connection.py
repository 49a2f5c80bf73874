"""A database connection that survives server restarts.

Workers run for days; PostgreSQL may restart under them. `Reconnecting.run`
retries an operation on a fresh connection with capped backoff instead of
letting a connection error kill the worker. Given the worker's `Shutdown`, it stops
retrying once the worker is stopping and the database stays gone (`DatabaseUnreachable`),
so a worker whose database is unreachable still exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, Protocol, TypeVar

import psycopg
from psycopg.rows import DictRow, dict_row

from batchdb import pooler
from batchdb.db import SESSION_OPTIONS, is_fatal_connect_error, with_options
from batchdb.workers.shutdown import DatabaseUnreachable, Shutdown

log = logging.getLogger(__name__)
T = TypeVar("T")

# While a connection stays down, say so again this often (not once per retry of every caller).
OUTAGE_REPORT_INTERVAL = 30.0

# Worth retrying on a connection that still works: shutdown in progress, too many
# connections, serialization failure, deadlock.
_RETRY_ON_LIVE_CONNECTION = {"57P01", "57P02", "57P03", "53300", "40001", "40P01"}


class RoundTrips(Protocol):
    """Told of each statement's time on the database and of each lost connection (workers/metrics.py)."""

    def round_trip(self, connection: str, statement: str, seconds: float) -> None: ...

    def lost(self, connection: str, statement: str, error: BaseException) -> None: ...


class Reconnecting:
    observer: RoundTrips | None = None

    def __init__(self, dsn: str, *, name: str, max_backoff: float = 10.0, shutdown: Shutdown | None = None) -> None:
        self._dsn = dsn
        self._name = name
        self._max_backoff = max_backoff
        self._shutdown = shutdown
        self._conn: psycopg.AsyncConnection[DictRow] | None = None
        self._down_since: float | None = None
        self._reported_at = 0.0
        self._lock = asyncio.Lock()

    async def connection(self) -> psycopg.AsyncConnection[DictRow]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            # Through PgBouncer without the options and prepared statements (batchdb/pooler.py).
            self._conn = await pooler.connect_async(
                # The hot statements must be planned with their real parameters: a generic plan
                # cannot see the claim's LIMIT and, with stale statistics, drags in JIT (see bench/README.md).
                with_options(self._dsn, f"-c plan_cache_mode=force_custom_plan {SESSION_OPTIONS}"),
                autocommit=True,
                row_factory=dict_row,
                application_name=f"batchdb-{self._name}",
            )
        return self._conn

    async def run(self, operation: Callable[[psycopg.AsyncConnection[DictRow]], Awaitable[T]], *, what: str) -> T:
        delay = 0.1
        while True:
            try:
                async with self._lock:
                    conn = await self.connection()
                    started = time.perf_counter()
                    result = await operation(conn)
                    if self.observer is not None:
                        self.observer.round_trip(self._name, what, time.perf_counter() - started)
                if self._down_since is not None:
                    log.info("%s connection is back after %.0fs", self._name, time.monotonic() - self._down_since)
                    self._down_since = None
                return result
            except (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.errors.CannotConnectNow) as exc:
                if is_fatal_connect_error(exc):
                    # The database is gone or refuses us for good: waiting will not bring it back.
                    raise
                if not self._lost(exc):
                    # The connection is fine but the statement failed (e.g. disk full, 53100):
                    # let the caller decide what to do with it rather than retry it forever.
                    raise
                if self.observer is not None:
                    self.observer.lost(self._name, what, exc)
                await self._discard()
                if self._shutdown is not None and not self._shutdown.may_retry_database():
                    raise DatabaseUnreachable(f"{what}: {' '.join(str(exc).split())}") from None
                self._report_outage(what, exc)
                await self._sleep(delay * random.uniform(0.8, 1.2))
                delay = min(self._max_backoff, delay * 2)

    def _report_outage(self, what: str, exc: psycopg.Error) -> None:
        """One line when the connection goes down, one every OUTAGE_REPORT_INTERVAL while it stays down."""
        now = time.monotonic()
        reason = " ".join(str(exc).split())
        if self._down_since is None:
            self._down_since = self._reported_at = now
            log.warning(
                "%s on %s connection failed (%s); retrying with backoff up to %.0fs",
                what,
                self._name,
                reason,
                self._max_backoff,
            )
        elif now - self._reported_at >= OUTAGE_REPORT_INTERVAL:
            self._reported_at = now
            log.warning(
                "%s connection still failing after %.0fs (%s); retrying", self._name, now - self._down_since, reason
            )

    async def _sleep(self, seconds: float) -> None:
        if self._shutdown is None:
            await asyncio.sleep(seconds)
        else:
            await self._shutdown.sleep(seconds)

    def _lost(self, exc: psycopg.Error) -> bool:
        """Whether the error means the connection (or server) went away, so a retry may succeed."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            return True
        return exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate in _RETRY_ON_LIVE_CONNECTION

    async def _discard(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            except Exception:  # noqa: BLE001 - already broken; nothing to save
                pass
            self._conn = None

    async def close(self) -> None:
        await self._discard()


async def listen_forever(dsn: str, listen_statement: str, wake: asyncio.Event, *, name: str) -> None:
    """Set `wake` on every NOTIFY (and on each (re)connect: anything sent while we were not
    listening); reconnect after a lost connection. NOTIFY is only a hint to look now: the
    callers also poll, so a notification lost in a reconnect only delays them. The loss is
    logged once, then every OUTAGE_REPORT_INTERVAL while it lasts; the caller cancels it to stop."""
    down_since: float | None = None
    reported_at = 0.0
    while True:
        try:
            listening = await pooler.listen_connect_async(
                with_options(dsn, SESSION_OPTIONS), autocommit=True, application_name=f"batchdb-{name}"
            )
            if listening is None:
                await _poll_only(name)
            async with listening as conn:
                await conn.execute(listen_statement)
                if down_since is not None:
                    log.info("%s: LISTEN connection is back after %.0fs", name, time.monotonic() - down_since)
                    down_since = None
                wake.set()
                async for _ in conn.notifies():
                    wake.set()
        except psycopg.Error as exc:
            now = time.monotonic()
            reason = " ".join(str(exc).split())
            if down_since is None:
                down_since = reported_at = now
                log.warning("%s: LISTEN connection lost (%s); reconnecting", name, reason)
            elif now - reported_at >= OUTAGE_REPORT_INTERVAL:
                reported_at = now
                log.warning("%s: LISTEN connection still down after %.0fs (%s)", name, now - down_since, reason)
            await asyncio.sleep(1.0)


async def _poll_only(name: str) -> NoReturn:
    """Through a transaction pooler without BATCHDB_LISTEN_DSN: no LISTEN (it would be lost with
    the server connection); the caller's polling is the only wake-up. Waits to be cancelled."""
    log.info("%s: no LISTEN through a transaction pooler (set BATCHDB_LISTEN_DSN for one); polling", name)
    await asyncio.Event().wait()
    raise AssertionError("unreachable: the event is never set")
