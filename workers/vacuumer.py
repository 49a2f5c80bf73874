"""Vacuumer: keeps the running jobs' partitions free of dead row versions.

Every claim and completion leaves a dead row version and dead index entries
behind. Autovacuum would clean them, but it may be off (it is on some managed
and CI servers) or slow to come round (naptime defaults to a minute, long
enough for a million claims), and until it does the claim's index scans wade
through dead entries. So workers vacuum the partitions of unfinished jobs
themselves once they carry `min_dead` dead versions: one worker per partition
at a time (VACUUM's own SKIP_LOCKED: no session lock, which a shared pool or PgBouncer
could not keep), on a `slow` handle of the worker's pool, so claims always have a
connection VACUUM cannot take.
A role that may not vacuum (not the tables' owner) logs it once and stops.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import psycopg
from psycopg import sql
from psycopg.rows import DictRow

from batchdb.queries import query
from batchdb.workers.connection import Reconnecting

log = logging.getLogger(__name__)

# The WARNING a VACUUM (SKIP_LOCKED) gives for a table whose lock another session holds.
LOCK_NOT_AVAILABLE = "55P03"


class Vacuumer:
    def __init__(
        self, db: Reconnecting, *, interval: float = 15.0, min_dead: int = 50_000, min_interval: float = 30.0
    ) -> None:
        self._db = db
        self._interval = interval
        self._min_dead = min_dead
        self._min_interval = min_interval
        self.vacuumed: list[str] = []

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.vacuum_once()
            except psycopg.errors.InsufficientPrivilege as exc:
                log.warning("this role may not VACUUM batchdb's partitions (%s); leaving it to autovacuum", exc)
                return

    async def vacuum_once(self) -> list[str]:
        """Vacuum every partition that needs it now; returns their names."""
        done: list[str] = []

        async def candidates(conn: psycopg.AsyncConnection[DictRow]) -> list[DictRow]:
            cur = await conn.execute(
                query("partitions_to_vacuum"), {"min_dead": self._min_dead, "min_interval": self._min_interval}
            )
            return await cur.fetchall()

        for row in await self._db.run(candidates, what="partitions_to_vacuum"):
            if await self._db.run(functools.partial(self._vacuum, row=row), what="vacuum_partition"):
                done.append(row["partition"])
        self.vacuumed.extend(done)
        return done

    async def _vacuum(self, conn: psycopg.AsyncConnection[DictRow], row: DictRow) -> bool:
        """VACUUM the partition unless another VACUUM holds it (SKIP_LOCKED); whether it ran."""
        skipped: list[str] = []

        def on_notice(notice: psycopg.errors.Diagnostic) -> None:
            if notice.sqlstate == LOCK_NOT_AVAILABLE:
                skipped.append(notice.message_primary or "")

        statement = sql.SQL(query("vacuum_partition")).format(partition=sql.Identifier(row["partition"]))
        conn.add_notice_handler(on_notice)
        try:
            await conn.execute(statement)
        finally:
            conn.remove_notice_handler(on_notice)
        if skipped:
            log.debug("%s: another VACUUM is at it (%s)", row["partition"], skipped[0])
            return False
        log.info("vacuumed %s (%d dead row versions)", row["partition"], row["n_dead_tup"])
        return True

    async def close(self) -> None:
        await self._db.close()
