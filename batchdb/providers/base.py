"""The one seam between batchdb and an LLM provider.

A provider takes a provider-neutral `ChatRequest` and returns a normalised
`ChatResponse`, or raises `ProviderError` carrying an `ErrorKind`. Everything
above this seam (queue, worker, retries, ledger) is provider-agnostic.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit


class ErrorKind(enum.StrEnum):
    """How the worker must react to a failed call."""

    RATE_LIMITED = "rate_limited"  # retry after the provider's delay
    # An account state that waiting on the endpoint will not change (429 insufficient_quota, Gemini's
    # daily or zero quota, FAILED_PRECONDITION, no key in this worker): pause the job, burn no retries.
    QUOTA_EXHAUSTED = "quota_exhausted"
    TRANSIENT = "transient"  # 5xx, timeout, connection error: back off and retry
    PERMANENT = "permanent"  # bad request, context too long, content filter: fail the row
    # The endpoint itself is wrong, unreachable or refuses the key (404 on the route, DNS failure,
    # 401/403, Gemini's API_KEY_INVALID): every row of the lane would fail alike, so the lane's
    # circuit opens (workers/breaker.py) and rows wait; its probe resumes them once the endpoint
    # answers again (a worker restarted with the rotated key), with no `batchdb resume`.
    UNAVAILABLE = "unavailable"


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
    # Of prompt_tokens, those served from the provider's prompt cache (OpenAI's
    # prompt_tokens_details.cached_tokens, Gemini's cachedContentTokenCount).
    cached_tokens: int = 0
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
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after
        self.rate_limit_headers = rate_limit_headers or {}
        # The call was sent and no answer came in time: the provider most likely accepted it and
        # bills it, though nobody received the answer (the worker counts its prompt as spent).
        self.timed_out = timed_out

    @property
    def retryable(self) -> bool:
        return self.kind in (ErrorKind.RATE_LIMITED, ErrorKind.TRANSIENT, ErrorKind.UNAVAILABLE)

    @property
    def lane_level(self) -> bool:
        """Whether the failure says something about the endpoint rather than the row: a
        connection error, a timeout, a 5xx or an unavailable endpoint, refused key included
        (the circuit counts these)."""
        if self.kind is ErrorKind.UNAVAILABLE:
            return True
        return self.kind is ErrorKind.TRANSIENT and (self.status_code is None or self.status_code >= 500)


def endpoint_of(url: Any) -> str | None:
    """scheme://host[:port]/path of a request URL: what an error names, never its query
    (where a key may travel) nor any user:password part."""
    if url is None:
        return None
    parts = urlsplit(str(url))
    if not parts.scheme or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


_DNS_FAILURE_TEXT = (
    "name or service not known",
    "nodename nor servname",
    "temporary failure in name resolution",
    "no address associated with hostname",
    "getaddrinfo failed",
    "name resolution",
)


def is_dns_failure(exc: BaseException) -> bool:
    """Whether a connection error (or anything in its cause chain) is a failed host-name lookup."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return True
        if any(text in str(current).lower() for text in _DNS_FAILURE_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


class Provider(Protocol):
    """What a worker needs from a provider."""

    name: str

    async def complete(self, request: ChatRequest) -> ChatResponse: ...

    async def aclose(self) -> None: ...
