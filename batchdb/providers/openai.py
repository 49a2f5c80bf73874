"""OpenAI and OpenAI-compatible servers through the official `openai` SDK.

SDK retries are off (`max_retries=0`): batchdb owns retries, so one attempt
here is exactly one HTTP request and every failure is classified once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion

from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError, endpoint_of, is_dns_failure
from batchdb.providers.compat import UnsupportedRequest, to_openai
from batchdb.secrets import redact

if TYPE_CHECKING:
    from batchdb.providers.batch_api import OpenAIBatchAPI

_RATE_LIMIT_PREFIX = "x-ratelimit-"
_DISPLAY_NAMES = {"openai": "OpenAI", "azure": "Azure OpenAI"}


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 120.0,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        """`client` replaces the default `AsyncOpenAI` (the Azure adapter passes an `AsyncAzureOpenAI`)."""
        self._api_key = api_key
        self._client = client or openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        try:
            kwargs: dict[str, Any] = to_openai(request, provider=self.name)
        except UnsupportedRequest as exc:
            raise ProviderError(ErrorKind.PERMANENT, str(exc)) from None
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**kwargs)
        except openai.APIError as exc:
            raise classify_openai_error(exc, secret=self._api_key, provider=self.name) from None
        return response_of(raw.parse(), _rate_limit_headers(raw.headers))

    def batch_api(self, *, timeout: float = 60.0) -> OpenAIBatchAPI:
        """The provider's Batch API on this client (workers/batch_driver.py, batch-mode jobs); `timeout`:
        seconds one of its calls may take."""
        from batchdb.providers.batch_api import OpenAIBatchAPI

        return OpenAIBatchAPI(self._client, provider=self.name, secret=self._api_key, timeout=timeout)

    async def aclose(self) -> None:
        await self._client.close()


def response_of(completion: ChatCompletion, rate_limit_headers: dict[str, str] | None = None) -> ChatResponse:
    """A chat completion as batchdb keeps it: from an online call, or a line of a batch's output file."""
    choice = completion.choices[0] if completion.choices else None
    usage = completion.usage
    return ChatResponse(
        text=(choice.message.content or "") if choice else "",
        finish_reason=choice.finish_reason if choice else None,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        model=completion.model,
        cached_tokens=_cached_tokens(usage),
        rate_limit_headers=rate_limit_headers or {},
    )


def classify_openai_error(
    exc: openai.APIError, *, secret: str | None = None, provider: str = "openai"
) -> ProviderError:
    """Map an SDK exception to the worker's reactions; the message names the endpoint called
    (and `provider`, ``openai`` or ``azure``, when the key is refused)."""
    endpoint = _endpoint(exc)
    at = f" (at {endpoint})" if endpoint else ""
    message = redact(f"{type(exc).__name__}: {exc.message}{at}", secret)
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(ErrorKind.TRANSIENT, message, timed_out=True)
    if isinstance(exc, openai.APIConnectionError):
        if is_dns_failure(exc):
            return ProviderError(
                ErrorKind.UNAVAILABLE, redact(f"{type(exc).__name__}: host name not found{at}", secret)
            )
        return ProviderError(ErrorKind.TRANSIENT, message)
    if not isinstance(exc, openai.APIStatusError):
        return ProviderError(ErrorKind.TRANSIENT, message)
    status = exc.status_code
    headers = exc.response.headers
    limit_headers = _rate_limit_headers(headers)
    code = _error_code(exc)
    if code:
        # The provider's error code is what people search for ("insufficient_quota").
        message = redact(f"{type(exc).__name__} ({code}): {exc.message}{at}", secret)
    if status == 429:
        if code == "insufficient_quota":
            return ProviderError(
                ErrorKind.QUOTA_EXHAUSTED, message, status_code=status, rate_limit_headers=limit_headers
            )
        return ProviderError(
            ErrorKind.RATE_LIMITED,
            message,
            status_code=status,
            retry_after=_retry_after(headers),
            rate_limit_headers=limit_headers,
        )
    if status in (401, 403):
        # A wrong, revoked or not-yet-rotated key fails every row of the lane alike: the lane's
        # circuit opens and its probe finds the key accepted again (a worker restarted with the
        # new key) with nobody typing `batchdb resume`. The message names the endpoint, never the key.
        vendor = _DISPLAY_NAMES.get(provider, provider)
        refused = redact(
            f"{vendor} refused the API key ({status}{f' {code}' if code else ''})"
            f"{f' at {endpoint}' if endpoint else ''}: {_error_text(exc)}",
            secret,
        )
        return ProviderError(ErrorKind.UNAVAILABLE, refused, status_code=status)
    if status == 404:
        # The route (a base URL without /v1), the model or the Azure deployment is not there:
        # every row of the lane would fail alike.
        hint = ""
        if endpoint and "/v1" not in endpoint and "/openai/deployments/" not in endpoint:
            hint = "; an OpenAI-compatible base URL usually ends in /v1 (OPENAI_BASE_URL)"
        return ProviderError(ErrorKind.UNAVAILABLE, message + hint, status_code=status)
    if status in (408, 409) or status >= 500:
        return ProviderError(ErrorKind.TRANSIENT, message, status_code=status, retry_after=_retry_after(headers))
    return ProviderError(ErrorKind.PERMANENT, message, status_code=status)


def _endpoint(exc: openai.APIError) -> str | None:
    request = getattr(exc, "request", None)
    if request is None and isinstance(exc, openai.APIStatusError):
        request = exc.response.request
    try:
        return endpoint_of(request.url) if request is not None else None
    except RuntimeError:  # an httpx Request without a URL
        return None


def _error_code(exc: openai.APIStatusError) -> str | None:
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("code"):
            return str(inner["code"])
    return None


def _error_text(exc: openai.APIStatusError) -> str:
    """The provider's own sentence ("Incorrect API key provided: sk-abc*****wxyz. ..."), not the
    SDK's "Error code: 401 - {...}" dump of the whole body."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str) and inner["message"]:
            return str(inner["message"])
    return exc.message


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


def _rate_limit_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(_RATE_LIMIT_PREFIX)}


def _cached_tokens(usage: CompletionUsage | None) -> int:
    """Prompt tokens OpenAI served from its prompt cache (absent on servers without caching)."""
    details = usage.prompt_tokens_details if usage else None
    return (details.cached_tokens or 0) if details else 0
