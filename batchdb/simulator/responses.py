"""Response bodies, error bodies and headers in the providers' wire formats.

Only shapes live here: which numbers go in is decided by the server and the
limiter. Messages copy the real providers' wording closely enough that code
matching on them (and humans reading logs) behave as they would in production.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from batchdb.simulator.limits import Dimension, RateLimitState, Verdict


@dataclass(slots=True)
class Reply:
    """A finished HTTP answer: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()


def format_duration(seconds: float) -> str:
    """Go-style durations as OpenAI sends them: ``120ms``, ``1s``, ``17.5s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    millis = math.ceil(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_limit_headers(state: RateLimitState) -> dict[str, str]:
    headers: dict[str, str] = {}
    if state.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(state.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(state.remaining_requests)
        headers["x-ratelimit-reset-requests"] = format_duration(state.reset_requests_s or 0.0)
    if state.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(state.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(state.remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = format_duration(state.reset_tokens_s or 0.0)
    return headers


# -- OpenAI / Azure OpenAI ------------------------------------------------------


def openai_chat(
    *,
    response_id: str,
    model: str,
    created: int,
    choices: list[tuple[str, str]],
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """A chat.completion body; ``choices`` is a list of (text, finish_reason).

    ``cached_tokens`` (a prompt-cache hit) is part of ``prompt_tokens``, as OpenAI reports it.
    """
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            for i, (text, finish_reason) in enumerate(choices)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_batchdb_sim",
    }


def openai_embeddings(*, model: str, embeddings: list[Any], prompt_tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def openai_error(status: int, message: str, *, type: str, code: str | None = None, param: str | None = None) -> Reply:
    return Reply(status, {"error": {"message": message, "type": type, "param": param, "code": code}})


_OPENAI_DIMENSION_NAMES = {
    Dimension.REQUESTS: "requests per min (RPM)",
    Dimension.TOKENS: "tokens per min (TPM)",
    Dimension.REQUESTS_PER_DAY: "requests per day (RPD)",
}


def openai_rate_limited(verdict: Verdict, model: str) -> Reply:
    """429 rate_limit_exceeded; ``retry-after``/``retry-after-ms`` unless the request can never fit."""
    assert verdict.dimension is not None
    what = _OPENAI_DIMENSION_NAMES[verdict.dimension]
    kind = "tokens" if verdict.dimension is Dimension.TOKENS else "requests"
    if verdict.too_large:
        message = (
            f"Request too large for {model} in organization org-simulator on {what}: "
            f"Limit {verdict.limit}, Requested {verdict.requested}. "
            "The input or output tokens must be reduced in order to run successfully."
        )
        return openai_error(429, message, type=kind, code="rate_limit_exceeded")
    retry = verdict.retry_after_s or 0.0
    message = (
        f"Rate limit reached for {model} in organization org-simulator on {what}: "
        f"Limit {verdict.limit}, Used {verdict.used}, Requested {verdict.requested}. "
        f"Please try again in {format_duration(retry)}."
    )
    reply = openai_error(429, message, type=kind, code="rate_limit_exceeded")
    reply.headers["retry-after"] = str(max(1, math.ceil(retry)))
    reply.headers["retry-after-ms"] = str(max(1, math.ceil(retry * 1000)))
    return reply


def openai_insufficient_quota() -> Reply:
    return openai_error(
        429,
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
        type="insufficient_quota",
        code="insufficient_quota",
    )


def openai_server_error(status: int) -> Reply:
    if status == 503:
        return openai_error(
            503, "The server is overloaded or not ready yet.", type="server_error", code="server_is_overloaded"
        )
    return openai_error(
        status,
        "The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


def openai_context_length(window: int, prompt_tokens: int, max_tokens: int) -> Reply:
    return openai_error(
        400,
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
        "completion). Please reduce the length of the messages or completion.",
        type="invalid_request_error",
        code="context_length_exceeded",
        param="messages",
    )


def openai_invalid_key(key: str | None) -> Reply:
    if not key:
        message = "You didn't provide an API key. You need to provide your API key in an Authorization header."
    else:
        shown = f"{key[:3]}*****{key[-4:]}" if len(key) > 8 else "*****"
        message = f"Incorrect API key provided: {shown}. You can find your API key in the simulator config."
    return openai_error(401, message, type="invalid_request_error", code="invalid_api_key")


def openai_model_not_found(model: str) -> Reply:
    return openai_error(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        type="invalid_request_error",
        code="model_not_found",
    )


def openai_bad_request(message: str, param: str | None = None) -> Reply:
    return openai_error(400, message, type="invalid_request_error", param=param)


# -- Google Gemini ----------------------------------------------------------------


def gemini_generate(
    *,
    model: str,
    response_id: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """A generateContent body; ``cachedContentTokenCount`` (part of ``promptTokenCount``, as
    Gemini counts it) is present only for a cache hit, as Gemini leaves it out when it is 0."""
    usage: dict[str, Any] = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": completion_tokens,
        "totalTokenCount": prompt_tokens + completion_tokens,
    }
    if cached_tokens > 0:
        usage["cachedContentTokenCount"] = cached_tokens
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": finish_reason,
                "index": 0,
            }
        ],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": response_id,
    }


_GRPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def gemini_error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> Reply:
    error: dict[str, Any] = {"code": status, "message": message, "status": _GRPC_STATUS.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return Reply(status, {"error": error})


_GEMINI_QUOTAS = {
    Dimension.REQUESTS: (
        "generativelanguage.googleapis.com/generate_content_requests",
        "GenerateRequestsPerMinutePerProjectPerModel",
    ),
    Dimension.TOKENS: (
        "generativelanguage.googleapis.com/generate_content_input_token_count",
        "GenerateContentInputTokensPerModelPerMinute",
    ),
    Dimension.REQUESTS_PER_DAY: (
        "generativelanguage.googleapis.com/generate_content_requests",
        "GenerateRequestsPerDayPerProjectPerModel",
    ),
}


def _gemini_quota_failure(dimension: Dimension, model: str, limit: int | None) -> dict[str, Any]:
    metric, quota_id = _GEMINI_QUOTAS[dimension]
    violation: dict[str, Any] = {
        "quotaMetric": metric,
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": model},
    }
    if limit is not None:
        violation["quotaValue"] = str(limit)
    return {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]}


def gemini_rate_limited(verdict: Verdict, model: str) -> Reply:
    """429 RESOURCE_EXHAUSTED with QuotaFailure (which quota) and RetryInfo (when to retry)."""
    assert verdict.dimension is not None
    metric, _ = _GEMINI_QUOTAS[verdict.dimension]
    details = [_gemini_quota_failure(verdict.dimension, model, verdict.limit)]
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more information "
        "on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n"
        f"* Quota exceeded for metric: {metric}, limit: {verdict.limit}, model: {model}"
    )
    if verdict.too_large:
        message += f"\nThe request ({verdict.requested} input tokens) exceeds the per-minute limit."
    else:
        retry = max(1, math.ceil(verdict.retry_after_s or 0.0))
        message += f"\nPlease retry in {retry}s."
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry}s"})
    return gemini_error(429, message, details)


def gemini_quota_exhausted(model: str, seconds_to_reset: float) -> Reply:
    """An out-of-quota (billing) key: per-day quota at zero until Pacific midnight."""
    retry = max(1, math.ceil(seconds_to_reset))
    return gemini_error(
        429,
        "You exceeded your current quota, please check your plan and billing details. For more information "
        "on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
        [
            _gemini_quota_failure(Dimension.REQUESTS_PER_DAY, model, 0),
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry}s"},
        ],
    )


def gemini_batch_quota_exceeded() -> Reply:
    """A batch whose tokens would pass the enqueued-token quota: 429 at creation, as Gemini answers it."""
    return gemini_error(
        429,
        "You exceeded your current quota, please check your plan and billing details. For more information on "
        "this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, "
        "head to: https://ai.dev/rate-limit. ",
        [
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }
                ],
            }
        ],
    )


def gemini_server_error(status: int) -> Reply:
    if status == 503:
        return gemini_error(503, "The model is overloaded. Please try again later.")
    return gemini_error(
        status,
        "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    )


def gemini_invalid_key(key: str | None) -> Reply:
    """Gemini answers a bad key with 400 INVALID_ARGUMENT / API_KEY_INVALID, not 401."""
    if not key:
        return gemini_error(
            403,
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API.",
        )
    return gemini_error(
        400,
        "API key not valid. Please pass a valid API key.",
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ],
    )


def gemini_context_length(window: int, prompt_tokens: int) -> Reply:
    return gemini_error(
        400, f"The input token count ({prompt_tokens}) exceeds the maximum number of tokens allowed ({window})."
    )


# -- Google Vertex AI ---------------------------------------------------------------
# Vertex answers in the same google.rpc error JSON as the Gemini API, with its own sentences.

VERTEX_RATE_LIMITED_MESSAGE = (
    "Resource exhausted. Please try again later. Please refer to "
    "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details."
)


def vertex_rate_limited() -> Reply:
    """429 RESOURCE_EXHAUSTED as Vertex's pay-as-you-go (Dynamic Shared Quota) sends it: no
    QuotaFailure naming a limit and no RetryInfo saying when to come back, so a client learns
    nothing but "not now"."""
    return gemini_error(429, VERTEX_RATE_LIMITED_MESSAGE)


def vertex_unauthenticated(token: str | None) -> Reply:
    """401 UNAUTHENTICATED for a missing, unknown or expired OAuth access token."""
    reason = "CREDENTIALS_MISSING" if not token else "ACCESS_TOKEN_EXPIRED"
    return gemini_error(
        401,
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other "
        "valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "aiplatform.googleapis.com", "method": "GenerateContent"},
            }
        ],
    )


def vertex_model_not_found(project: str, location: str, model: str) -> Reply:
    return gemini_error(
        404,
        f"Publisher Model `projects/{project}/locations/{location}/publishers/google/models/{model}` was not "
        "found or your project does not have access to it. Please ensure you are using a valid model version.",
    )
