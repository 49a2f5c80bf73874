"""Job events: `NOTIFY batchdb_events` with a JSON payload on every job status change.

`Job.wait()` listens so it returns the moment a job finishes; `batchdb watch`
prints the stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg

from batchdb.queries import query

def listen(conn: psycopg.Connection) -> None:
    conn.execute(query("listen_events"))


def poll(conn: psycopg.Connection, timeout: float) -> list[dict[str, Any]]:
    """Events that arrive within `timeout` seconds (returns early on the first batch)."""
    events = []
    for notify in conn.notifies(timeout=timeout, stop_after=1):
        events.append(json.loads(notify.payload))
    return events


def stream(conn: psycopg.Connection) -> Iterator[dict[str, Any]]:
    listen(conn)
    for notify in conn.notifies():
        yield json.loads(notify.payload)
