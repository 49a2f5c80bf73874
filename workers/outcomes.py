"""Decide what a finished call means for its row: success, retry later, or final failure."""

from __future__ import annotations

import random
from dataclasses import dataclass

from batchdb.models import ClaimedRequest, Outcome, RequestStatus
from batchdb.providers.base import ChatResponse, ErrorKind, ProviderError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped; a provider's own delay wins when larger."""

    base_seconds: float = 1.0
    max_seconds: float = 300.0

    def delay(self, attempts: int, provider_hint: float | None = None) -> float:
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        jittered = random.uniform(ceiling / 2, ceiling)
        if provider_hint is not None:
            return max(provider_hint, 0.0) + random.uniform(0, min(1.0, ceiling / 4))
        return jittered


def success(row: ClaimedRequest, response: ChatResponse, latency_ms: int | None) -> Outcome:
    return Outcome(
        job_id=row.job_id,
        id=row.id,
        lease_token=row.lease_token,
        status=RequestStatus.SUCCEEDED,
        prompt_tokens=response.prompt_tokens,
        cached_tokens=response.cached_tokens,
        completion_tokens=response.completion_tokens,
        latency_ms=latency_ms,
        response_text=response.text,
        finish_reason=response.finish_reason,
        model=response.model,
    )


def invalid_response(row: ClaimedRequest, response: ChatResponse, latency_ms: int | None, error: str) -> Outcome:
    """The model answered but never in the required shape: fail the row, keep its last answer."""
    return Outcome(
        job_id=row.job_id,
        id=row.id,
        lease_token=row.lease_token,
        status=RequestStatus.FAILED,
        error_class="invalid_response",
        error=error,
        latency_ms=latency_ms,
        response_text=response.text,
        finish_reason=response.finish_reason,
        model=response.model,
    )


def failure(row: ClaimedRequest, error: ProviderError, latency_ms: int | None, policy: RetryPolicy) -> Outcome:
    """Retryable errors go back with backoff until max_attempts, then dead; the rest fail."""
    base = Outcome(
        job_id=row.job_id,
        id=row.id,
        lease_token=row.lease_token,
        status=RequestStatus.FAILED,
        error_class=str(error.kind),
        error=error.message,
        latency_ms=latency_ms,
    )
    if error.kind is ErrorKind.PERMANENT:
        return base
    if error.retryable and row.attempts < row.max_attempts:
        base.status = RequestStatus.QUEUED
        base.retry_in = policy.delay(row.attempts, error.retry_after)
        return base
    base.status = RequestStatus.DEAD
    base.error = f"gave up after {row.attempts} attempt(s): {error.message}"
    return base
