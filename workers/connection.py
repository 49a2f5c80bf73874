"""A database connection that survives server restarts.

Workers run for days; PostgreSQL may restart under them. `Reconnecting.run`
retries an operation on a fresh connection with capped backoff instead of
letting a connection error kill the worker.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg.rows import dict_row

from batchdb.db import SESSION_OPTIONS, with_options

log = logging.getLogger(__name__)
T = TypeVar("T")

# invalid_catalog_name (database dropped), invalid_authorization_specification, invalid_password
_FATAL_SQLSTATES = {"3D000", "28000", "28P01"}
# Worth retrying on a connection that still works: shutdown in progress, too many
# connections, serialization failure, deadlock.
_RETRY_ON_LIVE_CONNECTION = {"57P01", "57P02", "57P03", "53300", "40001", "40P01"}
# libpq reports a refused connection without an SQLSTATE; these server messages are final too.
_FATAL_CONNECT_MESSAGES = ("does not exist", "password authentication failed", "no pg_hba.conf entry")


def _is_fatal(exc: psycopg.Error) -> bool:
    if exc.sqlstate in _FATAL_SQLSTATES:
        return True
    message = str(exc)
    return "FATAL" in message and any(text in message for text in _FATAL_CONNECT_MESSAGES)


class Reconnecting:
    def __init__(self, dsn: str, *, name: str, max_backoff: float = 10.0) -> None:
        self._dsn = dsn
        self._name = name
        self._max_backoff = max_backoff
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()

    async def connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                # The hot statements must be planned with their real parameters: a generic plan
                # cannot see the claim's LIMIT and, with stale statistics, drags in JIT (see bench/README.md).
                with_options(self._dsn, f"-c plan_cache_mode=force_custom_plan {SESSION_OPTIONS}"),
                autocommit=True, row_factory=dict_row, application_name=f"batchdb-{self._name}",
            )
        return self._conn

    async def run(self, operation: Callable[[psycopg.AsyncConnection], Awaitable[T]], *, what: str) -> T:
        delay = 0.1
        while True:
            try:
                async with self._lock:
                    conn = await self.connection()
                    return await operation(conn)
            except (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.errors.CannotConnectNow) as exc:
                if _is_fatal(exc):
                    # The database is gone or refuses us for good: waiting will not bring it back.
                    raise
                if not self._lost(exc):
                    # The connection is fine but the statement failed (e.g. disk full, 53100):
                    # let the caller decide what to do with it rather than retry it forever.
                    raise
                log.warning("%s on %s connection failed (%s); retrying in %.1fs", what, self._name, exc, delay)
                await self._discard()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(self._max_backoff, delay * 2)

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
    callers also poll, so a notification lost in a reconnect only delays them."""
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, application_name=f"batchdb-{name}"
            ) as conn:
                await conn.execute(listen_statement)
                wake.set()
                async for _ in conn.notifies():
                    wake.set()
        except psycopg.Error as exc:
            log.warning("%s: LISTEN connection lost (%s); reconnecting", name, exc)
            await asyncio.sleep(1.0)
