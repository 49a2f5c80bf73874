"""The shared rate-limit ledger: reserve provider capacity in PostgreSQL before a call.

Limits are per (provider, key alias, model). All workers reserve from the same
two token buckets (requests, tokens) in `batchdb.rate_limits`, refilled in
database time, so N processes on M machines together stay inside one limit.
The SQL is in sql/migrations/0002_ledger.sql; docs/ratelimits.md explains it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from batchdb.queries import query
from batchdb.tokens import GEMINI_FORMAT_PROVIDERS

# What OpenAI charges against TPM for a call without max_tokens (the simulator does the same).
DEFAULT_MAX_TOKENS_CHARGE = 4096


@dataclass(frozen=True, slots=True)
class Lane:
    """One rate-limited resource: a key alias of a provider, for one model."""

    provider: str
    key_alias: str
    model: str


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: int
    wait_seconds: float
    daily_exhausted: bool
    limited: bool


@dataclass(frozen=True, slots=True)
class HeaderView:
    """What a provider's x-ratelimit-* headers said when our request arrived."""

    limit_requests: int | None
    limit_tokens: int | None
    remaining_requests: float | None
    remaining_tokens: float | None


def charged_tokens(provider: str, prompt_tokens: int, max_tokens: int | None) -> int:
    """Tokens the provider counts against TPM when the call arrives.

    OpenAI and Azure count prompt + max_tokens; Gemini's (and Vertex AI's) input-token limit
    counts the prompt only.
    """
    if provider in GEMINI_FORMAT_PROVIDERS:
        return prompt_tokens
    return prompt_tokens + (max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS_CHARGE)


def read_headers(headers: Mapping[str, str]) -> HeaderView | None:
    """Parse OpenAI-style rate-limit headers (Azure sends the same; Gemini sends none)."""
    if not headers:
        return None
    return HeaderView(
        limit_requests=_int(headers.get("x-ratelimit-limit-requests")),
        limit_tokens=_int(headers.get("x-ratelimit-limit-tokens")),
        remaining_requests=_float(headers.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_float(headers.get("x-ratelimit-remaining-tokens")),
    )


async def reserve(
    conn: psycopg.AsyncConnection[Any],
    lane: Lane,
    tokens: Sequence[int],
    *,
    refund_tokens: int = 0,
    remaining_requests: float | None = None,
    remaining_tokens: float | None = None,
) -> Reservation:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        query("reserve_capacity"),
        {
            "provider": lane.provider,
            "key_alias": lane.key_alias,
            "model": lane.model,
            "tokens": list(tokens),
            "refund_tokens": refund_tokens,
            "remaining_requests": remaining_requests,
            "remaining_tokens": remaining_tokens,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return Reservation(
        int(row["granted"]), float(row["wait_seconds"]), bool(row["daily_exhausted"]), bool(row["limited"])
    )


@dataclass(frozen=True, slots=True)
class LaneState:
    """Why a lane is (not) moving: 'ready', 'waiting for tokens', 'held by a 429', 'daily quota used up'."""

    state: str
    until: datetime | None
    text: str
    token_credit: float | None


async def lane_state(conn: psycopg.AsyncConnection[Any], lane: Lane) -> LaneState | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        query("lane_state"), {"provider": lane.provider, "key_alias": lane.key_alias, "model": lane.model}
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return LaneState(row["state"], row["until"], row["state_text"], row["token_credit_now"])


async def record_rate_limited(conn: psycopg.AsyncConnection[Any], lane: Lane, retry_after: float | None) -> None:
    await conn.execute(
        query("record_rate_limited"),
        {"provider": lane.provider, "key_alias": lane.key_alias, "model": lane.model, "retry_after": retry_after},
    )


async def learn_limits(conn: psycopg.AsyncConnection[Any], lane: Lane, rpm: int | None, tpm: int | None) -> None:
    await conn.execute(
        query("learn_limits"),
        {"provider": lane.provider, "key_alias": lane.key_alias, "model": lane.model, "rpm": rpm, "tpm": tpm},
    )


LIMIT_NAMES = ("rpm", "tpm", "rpd", "batch_queue_tokens", "batch_window_seconds", "batch_margin_seconds")


def set_limits(
    conn: psycopg.Connection[Any],
    lane: Lane,
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    rpd: int | None = None,
    batch_queue_tokens: int | None = None,
    batch_window_seconds: float | None = None,
    batch_margin_seconds: float | None = None,
    clear: Sequence[str] = (),
) -> dict[str, Any]:
    """Set the given limits of `lane`; those not given keep their value, those in `clear` are removed.
    `batch_queue_tokens` is the lane's Batch API queue limit: prompt tokens in open batches at once.
    `batch_window_seconds` is the longest a batch of the lane may take and `batch_margin_seconds` the
    time auto-mode jobs keep before their deadline (0022; None keeps, clearing returns the default).

    Returns the lane's limits now.
    """
    given = {
        name: value
        for name, value in (("rpm", rpm), ("tpm", tpm), ("rpd", rpd), ("batch_queue_tokens", batch_queue_tokens))
        if value is not None
    }
    spans = {
        name: value
        for name, value in (
            ("batch_window_seconds", batch_window_seconds),
            ("batch_margin_seconds", batch_margin_seconds),
        )
        if value is not None
    }
    unknown = [name for name in clear if name not in LIMIT_NAMES]
    if unknown:
        raise ValueError(f"clear: expected some of {', '.join(LIMIT_NAMES)}, got {', '.join(unknown)}")
    if (set(given) | set(spans)) & set(clear):
        raise ValueError(f"{', '.join(sorted((set(given) | set(spans)) & set(clear)))}: both set and cleared")
    if not given and not spans and not clear:
        raise ValueError(
            f"nothing to set for {lane.provider}/{lane.key_alias}/{lane.model}: "
            "give rpm, tpm, rpd or batch_queue_tokens"
        )
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    for name, span in spans.items():
        low_ok = span > 0 if name == "batch_window_seconds" else span >= 0
        if isinstance(span, bool) or not isinstance(span, (int, float)) or not low_ok:
            raise ValueError(
                f"{name}: expected a number of seconds {'above' if name == 'batch_window_seconds' else 'from'} 0, "
                f"got {span!r}"
            )
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            query("set_limits"),
            {
                "provider": lane.provider,
                "key_alias": lane.key_alias,
                "model": lane.model,
                "rpm": rpm,
                "tpm": tpm,
                "rpd": rpd,
                "batch_queue_tokens": batch_queue_tokens,
                "batch_window_seconds": batch_window_seconds,
                "batch_margin_seconds": batch_margin_seconds,
                "clear": list(clear),
            },
        ).fetchone()
    assert row is not None
    return dict(row)


def list_limits(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("list_limits")).fetchall()


def open_circuits(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Lanes whose circuit is open (workers/breaker.py), each with a `state_text` saying why."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("open_circuits")).fetchall()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
