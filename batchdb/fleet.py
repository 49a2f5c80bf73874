"""The live worker processes (`batchdb workers`), as Celery's `inspect` and RQ's `info` show them.

A worker is live while it heartbeats (the `batchdb.live_workers` view: within 30 s) and has
not stopped. Its lanes are those it advertised (workers/lanes.py): the provider/key alias pairs
it resolved a key for, with the endpoint, never the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from batchdb.queries import query


@dataclass(frozen=True)
class LiveWorker:
    id: str
    hostname: str
    pid: int
    concurrency: int
    in_flight: int
    n_completed: int
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float
    lanes: list[str]


def live_workers(conn: psycopg.Connection[Any]) -> list[LiveWorker]:
    """Every live worker, by host and pid."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("list_live_workers")).fetchall()
    return [LiveWorker(**{**row, "lanes": sorted(row["lanes"])}) for row in rows]
