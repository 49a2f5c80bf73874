"""The queue: claim, complete, extend, release and reclaim request rows.

Each operation is one statement from `sql/queries.sql`. Correctness rests on
three things there: SKIP LOCKED claims under a lease in database time, a
fencing token checked by every completion, and statement triggers that keep
job counters exact.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row, tuple_row
from psycopg.types.json import Jsonb

from batchdb.models import ClaimedRequest, Outcome
from batchdb.queries import query

Key = tuple[int, int]


async def claim_batch(
    conn: psycopg.AsyncConnection[Any],
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    max_jobs: int = 16,
    lanes: Collection[tuple[str, str]] | None = None,
) -> list[ClaimedRequest]:
    """Claim up to `limit` due rows. `lanes`: only jobs on these (provider, key alias) pairs
    (the ones this worker can call); None: any."""
    if limit <= 0 or (lanes is not None and not lanes):
        return []
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        query("claim_batch"),
        {
            "worker_id": worker_id,
            "limit": limit,
            "lease_seconds": lease_seconds,
            "max_jobs": max_jobs,
            "lane_providers": None if lanes is None else [provider for provider, _ in lanes],
            "lane_key_aliases": None if lanes is None else [alias for _, alias in lanes],
        },
    )
    return [ClaimedRequest(**row) for row in await cur.fetchall()]


async def complete_batch(
    conn: psycopg.AsyncConnection[Any], outcomes: Sequence[Outcome], *, batch: bool = False
) -> set[Key]:
    """Record outcomes; returns the keys actually recorded (the rest were fenced out). `batch`: the
    outcomes are lines of a provider batch, whose tokens cost the batch price (workers/batch_driver.py)."""
    if not outcomes:
        return set()
    params = {
        "batch": batch,
        "job_id": [o.job_id for o in outcomes],
        "id": [o.id for o in outcomes],
        "lease_token": [o.lease_token for o in outcomes],
        "status": [str(o.status) for o in outcomes],
        "retry_in": [float(o.retry_in) for o in outcomes],
        "prompt_tokens": [int(o.prompt_tokens) for o in outcomes],
        "cached_tokens": [int(o.cached_tokens) for o in outcomes],
        "completion_tokens": [int(o.completion_tokens) for o in outcomes],
        "error_class": [o.error_class for o in outcomes],
        "error": [_clean_text(o.error) for o in outcomes],
        "latency_ms": [o.latency_ms for o in outcomes],
        "response_text": [_clean_text(o.response_text) for o in outcomes],
        "response_json": [None if o.response_json is None else Jsonb(o.response_json) for o in outcomes],
        "finish_reason": [o.finish_reason for o in outcomes],
        "model": [o.model for o in outcomes],
    }
    return await _execute_keys(conn, "complete_batch", params)


async def record_unrecorded_calls(
    conn: psycopg.AsyncConnection[Any], outcomes: Sequence[Outcome], *, batch: bool = False
) -> None:
    """Count the usage of calls whose completion was fenced out (paid, recorded on no row); `batch`:
    lines of a provider batch, at the batch price."""
    paid = [o for o in outcomes if o.prompt_tokens or o.completion_tokens]
    if not paid:
        return
    params = {
        "batch": batch,
        "job_id": [o.job_id for o in paid],
        "id": [o.id for o in paid],
        "lease_token": [o.lease_token for o in paid],
        "status": [str(o.status) for o in paid],
        "error_class": [o.error_class for o in paid],
        "prompt_tokens": [int(o.prompt_tokens) for o in paid],
        "cached_tokens": [int(o.cached_tokens) for o in paid],
        "completion_tokens": [int(o.completion_tokens) for o in paid],
    }
    await conn.execute(query("record_unrecorded_calls"), params)


async def extend_leases(
    conn: psycopg.AsyncConnection[Any], held: Sequence[ClaimedRequest], *, lease_seconds: float
) -> set[Key]:
    if not held:
        return set()
    return await _keys(conn, "extend_leases", held, lease_seconds=lease_seconds)


async def release_leases(
    conn: psycopg.AsyncConnection[Any], held: Sequence[ClaimedRequest], *, delay_s: float = 0.0
) -> set[Key]:
    """Hand rows back unsent (no attempt spent), due again in `delay_s` seconds; returns the keys
    still ours (the rest were fenced out)."""
    if not held:
        return set()
    return await _keys(conn, "release_leases", held, delay_s=float(delay_s))


async def reclaim_expired(conn: psycopg.AsyncConnection[Any], *, limit: int = 10_000) -> int:
    cur = await conn.execute(query("reclaim_expired"), {"limit": limit})
    return cur.rowcount


async def resume_due_jobs(conn: psycopg.AsyncConnection[DictRow]) -> int:
    """Jobs paused by a user quota run again once the day or month has turned over."""
    cur = await conn.execute(query("resume_due_jobs"))
    row = await cur.fetchone()
    return int(row["n"]) if row else 0


async def _keys(
    conn: psycopg.AsyncConnection[Any], name: str, held: Sequence[ClaimedRequest], **extra: float
) -> set[Key]:
    params = {
        "job_id": [r.job_id for r in held],
        "id": [r.id for r in held],
        "lease_token": [r.lease_token for r in held],
        **extra,
    }
    return await _execute_keys(conn, name, params)


async def _execute_keys(conn: psycopg.AsyncConnection[Any], name: str, params: dict[str, Any]) -> set[Key]:
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(query(name), params)
    return {(job_id, request_id) for job_id, request_id, *_ in await cur.fetchall()}


def _clean_text(text: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; a provider could still send one.
    return None if text is None else text.replace("\x00", "\ufffd")
