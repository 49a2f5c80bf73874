"""Google Gemini (Gemini API, API key) through the official `google-genai` SDK.

The neutral `ChatRequest` becomes `contents` + `GenerateContentConfig` through
`compat.to_gemini`, the same conversion the submit-time check runs. SDK retries
are off (`HttpRetryOptions(attempts=1)`, which also stops the SDK's silent
one-off retry of aiohttp connection errors): batchdb owns retries, so one
attempt is one HTTP request. Gemini sends no rate-limit headers; a 429 names the
quota it hit in `google.rpc.QuotaFailure` and when to come back in
`google.rpc.RetryInfo`, and `classify_gemini_error` reads both.
"""

from __future__ import annotations

import abc
import importlib
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from google import genai
from google.genai import errors, types

from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError, endpoint_of, is_dns_failure
from batchdb.providers.compat import UnsupportedRequest, to_gemini
from batchdb.secrets import redact

if TYPE_CHECKING:
    from batchdb.providers.gemini_batch import GeminiBatchAPI

_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
# ErrorInfo reasons that refuse the key itself: every row of the lane would fail alike, so the
# lane's circuit opens (ErrorKind.UNAVAILABLE) and its probe finds out when the key works again.
_KEY_REFUSED = frozenset(
    {
        "API_KEY_INVALID",
        "API_KEY_EXPIRED",
        "API_KEY_SERVICE_BLOCKED",
        "API_KEY_HTTP_REFERRER_BLOCKED",
        "API_KEY_IP_ADDRESS_BLOCKED",
        "SERVICE_DISABLED",
        "CONSUMER_SUSPENDED",
    }
)
_CONTENT_FILTER = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", **{name: "content_filter" for name in _CONTENT_FILTER}}
_RETRY_IN_MESSAGE = re.compile(r"retry in ([0-9.]+)\s*(ms|s)\b", re.IGNORECASE)
_MAX_MESSAGE = 600


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level exceptions the SDK lets through (aiohttp when installed, else httpx/httpx2)."""
    found: list[type[BaseException]] = [aiohttp.ClientError, TimeoutError, ConnectionError]
    for module in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()
# A call that failed below the API: no HTTP answer, or one the SDK could not read.
_CALL_FAILURES: tuple[type[BaseException], ...] = (
    *_TRANSPORT_ERRORS,
    errors.UnknownApiResponseError,
    json.JSONDecodeError,
)


class GenAIProvider(abc.ABC):
    """One generateContent call through a google-genai client: what the Gemini API and Vertex AI
    (providers/vertex.py) share. Subclasses build the client and name the model's URL path."""

    name: str
    vendor: str  # in error messages: "Gemini", "Vertex AI"
    credential: str  # what a 401/403 refused: "API key", "credentials"

    def __init__(self, client: genai.Client, *, base_url: str, secret: str | None) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._secret = secret  # masked in every message (None: the client holds no secret of ours)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        try:
            call = to_gemini(request)
        except UnsupportedRequest as exc:
            raise ProviderError(ErrorKind.PERMANENT, str(exc)) from None
        try:
            response = await self._client.aio.models.generate_content(
                # compat builds plain dicts of ContentDict's shape without importing the SDK.
                model=request.model,
                contents=cast("list[types.ContentDict]", call.contents),
                config=types.GenerateContentConfig(**call.config),
            )
        except errors.APIError as exc:
            raise classify_gemini_error(
                exc,
                secret=self._secret,
                endpoint=self._endpoint(request, exc),
                vendor=self.vendor,
                credential=self.credential,
            ) from None
        except _CALL_FAILURES as exc:
            at = f" (at {self._endpoint(request, None)})"
            if is_dns_failure(exc):
                raise ProviderError(
                    ErrorKind.UNAVAILABLE, f"{self.vendor} request failed: host name not found{at}"
                ) from None
            message = redact(f"{type(exc).__name__}: {exc}", self._secret)[:_MAX_MESSAGE]
            raise ProviderError(
                ErrorKind.TRANSIENT, f"{self.vendor} request failed: {message}{at}", timed_out=_is_timeout(exc)
            ) from None
        return normalise_response(response, model=request.model, vendor=self.vendor)

    @abc.abstractmethod
    def _model_path(self, model: str) -> str:
        """The model's resource path in the URL (``models/gemini-2.5-flash``)."""

    def _endpoint(self, request: ChatRequest, exc: errors.APIError | None) -> str:
        """The URL called (scheme://host/path, no key): from the response when the SDK kept it."""
        url = getattr(getattr(exc, "response", None), "url", None)
        found = endpoint_of(url)
        if found:
            return found
        options = getattr(getattr(self._client, "_api_client", None), "_http_options", None)
        version = getattr(options, "api_version", None) or "v1beta"
        base = endpoint_of(self._base_url) or self._base_url
        return f"{base}/{version}/{self._model_path(request.model)}:generateContent"

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        self._client.close()


def http_options(base_url: str | None, timeout: float, api_version: str | None = None) -> types.HttpOptions:
    """The client options every batchdb google-genai client uses: SDK retries off, `timeout` seconds."""
    return types.HttpOptions(
        base_url=base_url,
        api_version=api_version,
        timeout=int(timeout * 1000),
        retry_options=types.HttpRetryOptions(attempts=1),
    )


class GeminiProvider(GenAIProvider):
    name = "gemini"
    vendor = "Gemini"
    credential = "API key"

    def __init__(self, *, api_key: str, base_url: str | None = None, timeout: float = 120.0) -> None:
        self._api_key = api_key
        client = genai.Client(api_key=api_key, http_options=http_options(base_url, timeout))
        super().__init__(client, base_url=base_url or "https://generativelanguage.googleapis.com", secret=api_key)

    def _model_path(self, model: str) -> str:
        return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"

    def batch_api(self, *, timeout: float = 60.0) -> GeminiBatchAPI:
        """Gemini Batch Mode on this client (workers/batch_driver.py, batch-mode jobs)."""
        from batchdb.providers.gemini_batch import GeminiBatchAPI

        return GeminiBatchAPI(self._client, secret=self._api_key, timeout=timeout)


def _is_timeout(exc: BaseException) -> bool:
    """A read that waited too long (the request was sent), as opposed to a refused or reset connection."""
    return isinstance(exc, TimeoutError) or type(exc).__name__ in ("ReadTimeout", "WriteTimeout")


def normalise_response(response: types.GenerateContentResponse, *, model: str, vendor: str = "Gemini") -> ChatResponse:
    """Text, finish reason and token counts; a blocked prompt or answer is a PERMANENT error."""
    candidate = response.candidates[0] if response.candidates else None
    if candidate is None:
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            reason = _enum_name(feedback.block_reason)
            detail = f": {feedback.block_reason_message}" if feedback.block_reason_message else ""
            raise ProviderError(ErrorKind.PERMANENT, f"{vendor} blocked the prompt ({reason}){detail}")
        raise ProviderError(ErrorKind.TRANSIENT, f"{vendor} answered without a candidate")
    parts = candidate.content.parts if candidate.content and candidate.content.parts else []
    text = "".join(part.text for part in parts if part.text and not part.thought)
    reason = _enum_name(candidate.finish_reason)
    if reason in _CONTENT_FILTER and not text:
        detail = f": {candidate.finish_message}" if candidate.finish_message else ""
        raise ProviderError(ErrorKind.PERMANENT, f"{vendor} blocked the answer (finish reason {reason}){detail}")
    usage = response.usage_metadata
    return ChatResponse(
        text=text,
        finish_reason=_FINISH_REASONS.get(reason, reason.lower()) if reason else None,
        prompt_tokens=(usage.prompt_token_count or 0) if usage else 0,
        # Thinking tokens are billed as output, as OpenAI counts reasoning tokens in completion_tokens.
        completion_tokens=((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)) if usage else 0,
        model=response.model_version or model,
        cached_tokens=(usage.cached_content_token_count or 0) if usage else 0,
    )


def classify_gemini_error(
    exc: errors.APIError,
    *,
    secret: str | None = None,
    endpoint: str | None = None,
    vendor: str = "Gemini",
    credential: str = "API key",
) -> ProviderError:
    """Map a google-genai `APIError` to the worker's reactions; the message names `endpoint`.

    Vertex AI (`vendor`) answers in the same google.rpc error JSON; its 429 RESOURCE_EXHAUSTED
    ("Resource exhausted. Please try again later.") carries no quota and no RetryInfo, so it is
    RATE_LIMITED with no retry_after and the lane's pacer decides when to try again."""
    status = exc.code
    grpc_status = exc.status or ""
    details = _details(exc)
    message = redact(f"{vendor} {status} {grpc_status}: {exc.message or ''}".strip(), secret)[:_MAX_MESSAGE]
    if endpoint:
        message += f" (at {redact(endpoint, secret)})"
    if status == 429:
        quota_ids, zero_limit = _quota_violations(details)
        retry_after = _retry_delay(details, exc.message)
        daily = [q for q in quota_ids if "PerDay" in q]
        if daily:
            return ProviderError(
                ErrorKind.QUOTA_EXHAUSTED,
                f"{vendor} daily quota exhausted ({', '.join(daily)}); it resets at midnight Pacific time. {message}",
                status_code=status,
                retry_after=retry_after,
            )
        if zero_limit:
            # A per-minute limit of 0: this key's tier has no access to the model; waiting will not help.
            return ProviderError(
                ErrorKind.QUOTA_EXHAUSTED,
                f"{vendor} quota is 0 for this key ({', '.join(quota_ids)}). {message}",
                status_code=status,
            )
        return ProviderError(ErrorKind.RATE_LIMITED, message, status_code=status, retry_after=retry_after)
    if status == 400:
        reasons = _error_reasons(details)
        if reasons & _KEY_REFUSED or "API key not valid" in (exc.message or ""):
            return _key_refused(status, sorted(reasons & _KEY_REFUSED), message, f"{vendor} refused the {credential}")
        if grpc_status == "FAILED_PRECONDITION":
            # e.g. "free tier not available in your country; enable billing": an account problem, not a row's.
            return ProviderError(ErrorKind.QUOTA_EXHAUSTED, message, status_code=status)
        return ProviderError(ErrorKind.PERMANENT, message, status_code=status)
    if status in (401, 403):
        refused = f"{vendor} refused the {credential}"
        return _key_refused(status, sorted(_error_reasons(details) & _KEY_REFUSED), message, refused)
    if status == 404:
        # No such model (or route) behind this endpoint: every row of the lane would fail alike.
        return ProviderError(ErrorKind.UNAVAILABLE, message, status_code=status)
    if status in (408, 409, 499) or status >= 500 or grpc_status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"):
        return ProviderError(ErrorKind.TRANSIENT, message, status_code=status, retry_after=_retry_delay(details, None))
    return ProviderError(ErrorKind.PERMANENT, message, status_code=status)


def _key_refused(status: int, reasons: list[str], message: str, refused: str) -> ProviderError:
    """A refused key (wrong, expired, blocked, its project suspended): an endpoint-level fault that
    opens the lane's circuit rather than pausing the job, so a worker restarted with a good key
    resumes it by itself. `message` is already redacted and names the endpoint, never the key."""
    why = f"{status}{' ' + ', '.join(reasons) if reasons else ''}"
    return ProviderError(ErrorKind.UNAVAILABLE, f"{refused} ({why}). {message}", status_code=status)


def _error_reasons(details: list[Mapping[str, Any]]) -> set[str]:
    """The `google.rpc.ErrorInfo` reasons of an error ("API_KEY_INVALID" ...)."""
    return {str(d.get("reason")) for d in details if d.get("@type") == _ERROR_INFO}


def _details(exc: errors.APIError) -> list[Mapping[str, Any]]:
    body = exc.details
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("details"), list):
            return [d for d in inner["details"] if isinstance(d, Mapping)]
    return []


def _quota_violations(details: list[Mapping[str, Any]]) -> tuple[list[str], bool]:
    """(quota ids, whether any violated quota has a limit of 0)."""
    ids: list[str] = []
    zero = False
    for detail in details:
        if detail.get("@type") != _QUOTA_FAILURE:
            continue
        for violation in detail.get("violations") or []:
            if not isinstance(violation, Mapping):
                continue
            quota_id = violation.get("quotaId") or violation.get("quotaMetric")
            if quota_id:
                ids.append(str(quota_id))
            if str(violation.get("quotaValue", "")) == "0":
                zero = True
    return ids, zero


def _retry_delay(details: list[Mapping[str, Any]], message: str | None) -> float | None:
    """Seconds from RetryInfo.retryDelay ("26s", "0.5s"), else from "Please retry in 26.2s." in the message."""
    for detail in details:
        if detail.get("@type") != _RETRY_INFO:
            continue
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                pass
        if isinstance(delay, Mapping):
            return max(0.0, float(delay.get("seconds", 0)) + float(delay.get("nanos", 0)) / 1e9)
    match = _RETRY_IN_MESSAGE.search(message or "")
    if match:
        return float(match.group(1)) * (0.001 if match.group(2).lower() == "ms" else 1.0)
    return None


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    name = getattr(value, "name", None) or str(value)
    return None if name.endswith("_UNSPECIFIED") else name
