"""Vacuumer: keeps the running jobs' partitions free of dead row versions.

Every claim and completion leaves a dead row version and dead index entries
behind. Autovacuum would clean them, but it may be off (it is on some managed
and CI servers) or slow to come round (naptime defaults to a minute, long
enough for a million claims), and until it does the claim's index scans wade
through dead entries. So workers vacuum the partitions of unfinished jobs
themselves once they carry `min_dead` dead versions: one worker per partition
at a time (an advisory lock), on a connection of its own so claims never wait.
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
        cur = await conn.execute(query("try_vacuum_lock"), {"job_id": row["job_id"]})
        locked = await cur.fetchone()
        if not (locked and locked["locked"]):
            return False
        try:
            statement = sql.SQL(query("vacuum_partition")).format(partition=sql.Identifier(row["partition"]))
            await conn.execute(statement)
            log.info("vacuumed %s (%d dead row versions)", row["partition"], row["n_dead_tup"])
            return True
        finally:
            await conn.execute(query("vacuum_unlock"), {"job_id": row["job_id"]})

    async def close(self) -> None:
        await self._db.close()
