"""A worker's database connections: a small shared pool that survives server restarts, and one
LISTEN connection.

A worker used to open a connection per service (claim, complete, ledger, lanes, breaker,
budget, vacuum, send guard, request LISTEN, notifier, notifier LISTEN): ~10 server
connections each, 500 for 50 workers. Now every service runs its statements on a `Database`:
a `psycopg_pool.AsyncConnectionPool` of 2 connections, plus one `Listener` connection for
every channel the worker follows. A worker costs the server 3 connections whatever its
concurrency (docs/design.md, "Connections").

Each service holds a `Reconnecting` handle on the pool: its own name (in the outage reports)
and its own lock, so one service never runs two statements at once. Its statements
therefore take at most one connection at a time, and a handle marked `slow` (VACUUM, the
batch driver's big transactions) shares a single slot with the other slow ones: at most
`size - 1` connections can be held by long statements, so claims, completions and the
ledger always have one left. Every statement runs in autocommit on whichever connection
is free, so no session state (advisory locks, prepared transactions) may span two calls.

`Reconnecting.run` retries an operation with capped backoff when the connection was lost
or the server is down, instead of letting a connection error kill the worker. The outage is
reported once per database, not per service: one line when it starts, one every
OUTAGE_REPORT_INTERVAL while it lasts, one when it heals. Given the worker's `Shutdown`, it
stops retrying once the worker is stopping and the database stays gone (`DatabaseUnreachable`),
so a worker whose database is unreachable still exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from batchdb import pooler
from batchdb.db import SESSION_OPTIONS, is_fatal_connect_error, with_options
from batchdb.workers.shutdown import DatabaseUnreachable, Shutdown

log = logging.getLogger(__name__)
T = TypeVar("T")

# While the database stays down, say so again this often (not once per retry of every caller).
OUTAGE_REPORT_INTERVAL = 30.0
# A worker's pool: one connection for the hot statements whatever else runs, one more to share.
POOL_SIZE = 2
# A caller waits for a free connection this long at a time, then checks whether the server is
# down (the pool connects in the background and only says "timed out").
_WAIT_STEP = 1.0
# The hot statements must be planned with their real parameters: a generic plan cannot see the
# claim's LIMIT and, with stale statistics, drags in JIT (see bench/README.md).
_OPTIONS = f"-c plan_cache_mode=force_custom_plan {SESSION_OPTIONS}"

# Worth retrying on a connection that still works: shutdown in progress, too many
# connections, serialization failure, deadlock.
_RETRY_ON_LIVE_CONNECTION = {"57P01", "57P02", "57P03", "53300", "40001", "40P01"}
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.errors.CannotConnectNow)


class RoundTrips(Protocol):
    """Told of each statement's time on the database and of each lost connection (workers/metrics.py)."""

    def round_trip(self, connection: str, statement: str, seconds: float) -> None: ...

    def lost(self, connection: str, statement: str, error: BaseException) -> None: ...


class DatabaseDown(psycopg.OperationalError):
    """No connection could be made: the server is down or not answering (the last connect error)."""


class _PoolLogFilter(logging.Filter):
    """psycopg_pool logs every failed connect attempt of its background reconnects, and every
    broken connection it discards: for our pools the outage is reported once by `Database`
    instead (with the same reason). A connection closed because a cancelled statement (a stop)
    left it mid-protocol is expected too."""

    _BY_POOL = ("error connecting in %r: %s", "reconnection attempt in pool %r failed after %s sec")
    _BY_CONNECTION = ("discarding closed connection: %s", "closing returned connection: %s")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if not args:
            return True
        if record.msg in self._BY_POOL:
            return not (isinstance(args[0], str) and args[0].startswith("batchdb-"))
        if record.msg in self._BY_CONNECTION:
            return not isinstance(args[0], _PooledConnection)
        return True


class _PooledConnection(psycopg.AsyncConnection[DictRow]):
    """Tells its `Database` how each connect the pool makes in the background went: the pool
    itself only says a caller timed out, and the caller needs the reason (down, or refused)."""

    @classmethod
    async def connect(  # type: ignore[override]
        cls, conninfo: str = "", *, batchdb_database: Database | None = None, **kwargs: Any
    ) -> _PooledConnection:
        try:
            conn = await super().connect(conninfo, **kwargs)
        except psycopg.Error as exc:
            if batchdb_database is not None:
                batchdb_database.connect_failed(exc)
            raise
        if batchdb_database is not None:
            batchdb_database.connected()
        return conn


logging.getLogger("psycopg.pool").addFilter(_PoolLogFilter())


class Database:
    """At most `size` server connections, shared by every `Reconnecting` handle made from it.

    Connections are made in the background by psycopg_pool (autocommit, dict rows, the session
    options, application_name `batchdb-<name>`), replaced when one breaks, and recycled hourly.
    `reconnect_timeout` is the backoff cap: the pool's own backoff doubles without a cap, so each
    of its attempts gives up after `max_backoff` seconds and the next caller starts a fresh one.
    """

    def __init__(self, dsn: str, *, name: str, size: int = POOL_SIZE, max_backoff: float = 10.0) -> None:
        self.name = name
        self.max_backoff = max_backoff
        self._dsn = dsn
        self._size = size
        self._pool: AsyncConnectionPool[_PooledConnection] | None = None
        # Long statements share `size - 1` slots (at least one): the rest is always free for the others.
        self._slow = asyncio.Semaphore(max(1, size - 1))
        self._failure: psycopg.Error | None = None  # the last connect error, until a connect succeeds
        self._down_since: float | None = None
        self._reported_at = 0.0
        # Told of every statement's time and every lost connection of the handles (workers/metrics.py).
        self.observer: RoundTrips | None = None
        # Finding the connect arguments awaits (a probe connection in auto mode): one opener at a time.
        self._opening = asyncio.Lock()

    def handle(self, name: str, *, shutdown: Shutdown | None = None, slow: bool = False) -> Reconnecting:
        """A service's handle: statements run one at a time, retried through outages."""
        return Reconnecting(name=name, shutdown=shutdown, database=self, slow=slow)

    # -- what the pool's connects report ----------------------------------------------------

    def connect_failed(self, exc: psycopg.Error) -> None:
        self._failure = exc

    def connected(self) -> None:
        self._failure = None

    # -- connections ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self, *, slow: bool = False) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        """A connection for one operation. Raises DatabaseDown while no connection can be made,
        and the connect error itself when the server refuses us for good (a missing database)."""
        async with self._slow if slow else contextlib.nullcontext():
            pool = await self._open()
            while True:
                try:
                    conn = await pool.getconn(timeout=_WAIT_STEP)
                    break
                except PoolTimeout:
                    failure = self._failure
                    if failure is None:
                        continue  # every connection is busy: keep waiting
                    if is_fatal_connect_error(failure):
                        raise failure from None
                    raise DatabaseDown(" ".join(str(failure).split())) from None
            try:
                yield conn
            finally:
                # A broken connection (or one cut off mid-statement) is discarded and replaced.
                await pool.putconn(conn)

    async def _open(self) -> AsyncConnectionPool[_PooledConnection]:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            return await self._open_once()

    async def _open_once(self) -> AsyncConnectionPool[_PooledConnection]:
        if self._pool is None:
            # Through PgBouncer without the startup options and prepared statements (batchdb/pooler.py);
            # in auto mode one connection is made first to find out, since the pool cannot retry a refusal.
            try:
                connect = await pooler.pool_kwargs_async(with_options(self._dsn, _OPTIONS))
            except psycopg.OperationalError as exc:
                if is_fatal_connect_error(exc):
                    raise
                raise DatabaseDown(" ".join(str(exc).split())) from None
            conninfo = connect.pop("conninfo")
            self._pool = AsyncConnectionPool(
                conninfo,
                connection_class=_PooledConnection,
                kwargs={
                    "autocommit": True,
                    "row_factory": dict_row,
                    "application_name": f"batchdb-{self.name}",
                    "batchdb_database": self,
                    **connect,
                },
                min_size=self._size,
                max_size=self._size,
                open=False,
                name=f"batchdb-{self.name}",
                reconnect_timeout=self.max_backoff,
            )
            await self._pool.open(wait=False)
        return self._pool

    async def close(self) -> None:
        """Close every connection (a later statement opens the pool again)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- outage reports ---------------------------------------------------------------------

    def report_outage(self, who: str, what: str, exc: BaseException) -> None:
        """One line when the database goes down, one every OUTAGE_REPORT_INTERVAL while it stays down."""
        now = time.monotonic()
        reason = " ".join(str(exc).split())
        if self._down_since is None:
            self._down_since = self._reported_at = now
            log.warning(
                "%s on %s connection failed (%s); retrying with backoff up to %.0fs",
                what,
                who,
                reason,
                self.max_backoff,
            )
        elif now - self._reported_at >= OUTAGE_REPORT_INTERVAL:
            self._reported_at = now
            log.warning(
                "%s connection still failing after %.0fs (%s); retrying", self.name, now - self._down_since, reason
            )

    def report_success(self) -> None:
        if self._down_since is not None:
            log.info("%s connection is back after %.0fs", self.name, time.monotonic() - self._down_since)
            self._down_since = None


class Reconnecting:
    """One service's statements on a `Database`, one at a time, retried through outages.

    `Reconnecting(dsn, name=...)` makes a one-connection database of its own (tests, tools);
    a worker's services get theirs from `Database.handle`, sharing its pool.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        name: str,
        max_backoff: float = 10.0,
        shutdown: Shutdown | None = None,
        database: Database | None = None,
        slow: bool = False,
    ) -> None:
        if database is None:
            if dsn is None:
                raise ValueError("Reconnecting needs a dsn or a database")
            database = Database(dsn, name=name, size=1, max_backoff=max_backoff)
            self._owns_database = True
        else:
            self._owns_database = False
        self._database = database
        self._name = name
        self._max_backoff = max_backoff
        self._shutdown = shutdown
        self._slow = slow
        self._lock = asyncio.Lock()

    async def run(self, operation: Callable[[psycopg.AsyncConnection[DictRow]], Awaitable[T]], *, what: str) -> T:
        """Run `operation` on a pooled connection; on a lost connection or a down server, wait
        (capped backoff) and run it again. Only what is safe to repeat may be passed: a statement
        whose connection broke after it committed runs twice (every caller's statements are fenced
        or idempotent; see docs/design.md)."""
        delay = 0.1
        while True:
            error: psycopg.Error | None = None
            try:
                async with self._lock, self._database.connection(slow=self._slow) as conn:
                    started = time.perf_counter()
                    try:
                        result = await operation(conn)
                    except _CONNECTION_ERRORS as exc:
                        if is_fatal_connect_error(exc) or not _lost(conn, exc):
                            # Refused for good, or the statement itself failed on a live connection
                            # (e.g. disk full, 53100): the caller decides rather than retry forever.
                            raise
                        error = exc
            except DatabaseDown as exc:
                error = exc
            observer = self._database.observer
            if error is None:
                if observer is not None:
                    observer.round_trip(self._name, what, time.perf_counter() - started)
                self._database.report_success()
                return result
            if observer is not None:
                observer.lost(self._name, what, error)
            if self._shutdown is not None and not self._shutdown.may_retry_database():
                raise DatabaseUnreachable(f"{what}: {' '.join(str(error).split())}") from None
            self._database.report_outage(self._name, what, error)
            await self._sleep(delay * random.uniform(0.8, 1.2))
            delay = min(self._max_backoff, delay * 2)

    async def _sleep(self, seconds: float) -> None:
        if self._shutdown is None:
            await asyncio.sleep(seconds)
        else:
            await self._shutdown.sleep(seconds)

    async def close(self) -> None:
        """Close the connection of a handle that owns its database; a shared pool is closed by its owner."""
        if self._owns_database:
            await self._database.close()


def _lost(conn: psycopg.AsyncConnection[DictRow], exc: psycopg.Error) -> bool:
    """Whether the error means the connection (or server) went away, so a retry may succeed."""
    if conn.closed or conn.broken:
        return True
    return exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate in _RETRY_ON_LIVE_CONNECTION


# Through a transaction pooler with no BATCHDB_LISTEN_DSN, subscribers are woken this often instead.
LISTEN_POLL_S = 2.0


class Listener:
    """One LISTEN connection for every channel a worker follows (new requests, notifications,
    job events), instead of one per service.

    Subscribers are called with each NOTIFY's payload on their channel, and with None on each
    (re)connect: anything sent while nobody listened is unknown. NOTIFY is only a hint to look
    now: the subscribers also poll (or re-read on None), so a notification lost in a reconnect
    only delays them. A lost connection is reported once, then every OUTAGE_REPORT_INTERVAL
    while it lasts; the caller cancels `run` to stop.
    """

    def __init__(self, dsn: str, *, name: str) -> None:
        self._dsn = dsn
        self._name = name
        self._statements: dict[str, str] = {}
        self._subscribers: dict[str, list[Callable[[str | None], None]]] = {}
        self.connected = asyncio.Event()

    def subscribe(self, listen_statement: str, on_notify: Callable[[str | None], None]) -> None:
        """Follow the channel `listen_statement` (a `LISTEN <channel>` block of sql/queries.sql)
        listens on. Subscribe before `run` starts: a running listener picks it up at its next connect."""
        found = re.search(r"^\s*LISTEN\s+(\w+)", listen_statement, re.IGNORECASE | re.MULTILINE)
        if found is None:
            raise ValueError(f"not a LISTEN statement: {listen_statement!r}")
        channel = found.group(1).lower()
        self._statements[channel] = listen_statement
        self._subscribers.setdefault(channel, []).append(on_notify)

    async def run(self) -> None:
        down_since: float | None = None
        reported_at = 0.0
        while True:
            try:
                listening = await pooler.listen_connect_async(
                    with_options(self._dsn, SESSION_OPTIONS), autocommit=True, application_name=f"batchdb-{self._name}"
                )
                if listening is None:
                    await self._poll_forever()
                    return
                async with listening as conn:
                    for statement in self._statements.values():
                        await conn.execute(statement)
                    if down_since is not None:
                        log.info("%s: LISTEN connection is back after %.0fs", self._name, time.monotonic() - down_since)
                        down_since = None
                    self.connected.set()
                    self._look_again()
                    async for notify in conn.notifies():
                        for subscriber in self._subscribers.get(notify.channel, ()):
                            subscriber(notify.payload)
            except psycopg.Error as exc:
                self.connected.clear()
                now = time.monotonic()
                reason = " ".join(str(exc).split())
                if down_since is None:
                    down_since = reported_at = now
                    log.warning("%s: LISTEN connection lost (%s); reconnecting", self._name, reason)
                elif now - reported_at >= OUTAGE_REPORT_INTERVAL:
                    reported_at = now
                    log.warning(
                        "%s: LISTEN connection still down after %.0fs (%s)", self._name, now - down_since, reason
                    )
                await asyncio.sleep(1.0)

    async def _poll_forever(self) -> None:
        """Through a transaction pooler without BATCHDB_LISTEN_DSN: no LISTEN (the notifications
        would go to whichever client gets that server connection next). Every LISTEN_POLL_S the
        subscribers are told "anything may have changed" (None), as after a reconnect."""
        log.info(
            "%s: no LISTEN through a transaction pooler (set BATCHDB_LISTEN_DSN for one); polling every %.0fs",
            self._name,
            LISTEN_POLL_S,
        )
        self.connected.set()
        while True:
            self._look_again()
            await asyncio.sleep(LISTEN_POLL_S)

    def _look_again(self) -> None:
        """Tell every subscriber "anything may have changed" (None): after each (re)connect, and
        each poll when there is no LISTEN."""
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber(None)
