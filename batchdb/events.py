"""Job events: `NOTIFY batchdb_events` with a JSON payload on every job status change.

`Job.wait()` listens so it returns the moment a job finishes; `batchdb watch`
prints the stream. PostgreSQL has no per-channel permissions: every role hears
every job's events, so readers that show them to a user keep only the jobs that
user can see (`visible`, which row-level security answers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.rows import DictRow

from batchdb.queries import query


def listen(conn: psycopg.Connection[DictRow]) -> None:
    conn.execute(query("listen_events"))


def poll(conn: psycopg.Connection[DictRow], timeout: float) -> list[dict[str, Any]]:
    """Events that arrive within `timeout` seconds (returns early on the first batch)."""
    events = []
    for notify in conn.notifies(timeout=timeout, stop_after=1):
        event = _decode(notify.payload)
        if event is not None:
            events.append(event)
    return events


def stream(conn: psycopg.Connection[DictRow]) -> Iterator[dict[str, Any]]:
    listen(conn)
    for notify in conn.notifies():
        event = _decode(notify.payload)
        if event is not None:
            yield event


def _decode(payload: str) -> dict[str, Any] | None:
    """Any role may NOTIFY this channel: a payload that is not one of ours is ignored."""
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("job_id"), int):
        return None
    return event


def visible(conn: psycopg.Connection[DictRow], job_id: int) -> bool:
    """Whether this role may see the job (row-level security hides other users' jobs)."""
    row = conn.execute(query("job_visible"), {"job_id": job_id}).fetchone()
    return bool(row and row["visible"])
