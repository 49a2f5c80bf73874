"""The one seam between batchdb and an LLM provider.

A provider takes a provider-neutral `ChatRequest` and returns a normalised
`ChatResponse`, or raises `ProviderError` carrying an `ErrorKind`. Everything
above this seam (queue, worker, retries, ledger) is provider-agnostic.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class ErrorKind(enum.StrEnum):
    """How the worker must react to a failed call."""

    RATE_LIMITED = "rate_limited"  # retry after the provider's delay
    QUOTA_EXHAUSTED = "quota_exhausted"  # pause the job's key; do not burn retries
    TRANSIENT = "transient"  # 5xx, timeout, connection error: back off and retry
    PERMANENT = "permanent"  # bad request, context too long, content filter: fail the row


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatResponse:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str | None = None
    # Rate-limit headers as sent by the provider (lower-cased names); empty when none.
    rate_limit_headers: dict[str, str] = field(default_factory=dict)


class ProviderError(Exception):
    """A classified provider failure. The message never contains an API key."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        rate_limit_headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after
        self.rate_limit_headers = rate_limit_headers or {}

    @property
    def retryable(self) -> bool:
        return self.kind in (ErrorKind.RATE_LIMITED, ErrorKind.TRANSIENT)


class Provider(Protocol):
    """What a worker needs from a provider."""

    name: str

    async def complete(self, request: ChatRequest) -> ChatResponse: ...

    async def aclose(self) -> None: ...
