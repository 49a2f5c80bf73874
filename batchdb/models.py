"""Values that cross module boundaries: statuses, claimed rows, outcomes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # final: the provider refused the request or the answer never validated
    DEAD = "dead"  # final: retries exhausted (dead-lettered)
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (RequestStatus.QUEUED, RequestStatus.RUNNING)


class JobStatus(enum.StrEnum):
    LOADING = "loading"  # rows are being copied in; not claimable yet
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    COMPLETED = "completed"

    @property
    def final(self) -> bool:
        return self in (JobStatus.CANCELLED, JobStatus.COMPLETED)


@dataclass(frozen=True, slots=True)
class ClaimedRequest:
    """A row this worker holds under lease `lease_token`."""

    job_id: int
    id: int
    custom_id: str
    payload: dict[str, Any] | None
    input: dict[str, Any] | None
    attempts: int
    max_attempts: int
    lease_token: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.job_id, self.id)


@dataclass(slots=True)
class Outcome:
    """What happened to one claimed row; recorded by `queue.complete_batch`."""

    job_id: int
    id: int
    lease_token: int
    status: RequestStatus
    retry_in: float = 0.0  # seconds until the next attempt, when status is QUEUED
    prompt_tokens: int = 0
    # Of prompt_tokens, those the provider served from its prompt cache (billed at the cached-input price).
    cached_tokens: int = 0
    completion_tokens: int = 0
    error_class: str | None = None
    error: str | None = None
    latency_ms: int | None = None
    response_text: str | None = None
    response_json: Any = None
    finish_reason: str | None = None
    model: str | None = None
    # Budget held for this row's calls; the worker's Settler gives it back once the outcome is recorded.
    reserved_usd: Decimal = Decimal(0)

    @property
    def key(self) -> tuple[int, int]:
        return (self.job_id, self.id)
