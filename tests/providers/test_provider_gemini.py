"""The Gemini adapter through google-genai against the simulator: requests, responses, every error class."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from google.genai import errors, types
from provider_calls import call as call_provider

from batchdb.providers import build_provider
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.gemini import GeminiProvider, classify_gemini_error, normalise_response
from batchdb.simulator import Distribution, ErrorRates, Limits, Outage, SimulatorProcess
from batchdb.tokens import count_text

T = TypeVar("T")
ConfigureSimulator = Callable[..., SimulatorProcess]
MODEL = "gemini-2.0-flash"
KEY = "g-test-key-0123456789"
SYSTEM = "You label headlines."
USER = "Acme beats third-quarter earnings estimates"
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number"},
    },
    "required": ["sentiment", "confidence"],
    "additionalProperties": False,
}


def request(text: str = USER, **fields: Any) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}], model=MODEL, **fields
    )


def call(sim: SimulatorProcess, *requests: ChatRequest, key: str = KEY) -> list[ChatResponse | ProviderError]:
    """Send `requests` in order through one provider; each answer or classified error."""
    return call_provider(GeminiProvider(api_key=key, base_url=sim.gemini_base_url, timeout=10), *requests)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_completion_with_system_and_max_tokens(simulator: ConfigureSimulator) -> None:
    sim = simulator(output_tokens=Distribution(kind="fixed", value=40))
    cut, full = call(sim, request(max_tokens=10, temperature=0.2, seed=7), request(max_tokens=1000))
    assert isinstance(cut, ChatResponse) and isinstance(full, ChatResponse)
    assert cut.text and cut.finish_reason == "length" and cut.completion_tokens == 10
    assert full.finish_reason == "stop" and full.completion_tokens == count_text(full.text) == 40
    assert cut.prompt_tokens == full.prompt_tokens == count_text(SYSTEM) + count_text(USER)
    assert cut.model == MODEL and cut.rate_limit_headers == {}  # Gemini sends no rate-limit headers


def test_cached_prompt_tokens_are_read_from_the_usage_metadata(simulator: ConfigureSimulator) -> None:
    """Gemini 2.5's implicit cache (prompts from 2,048 tokens): usageMetadata.cachedContentTokenCount."""
    sim = simulator()
    shared = "Background for every headline. " * 500  # about 3,000 tokens
    requests = [
        ChatRequest(
            messages=[{"role": "system", "content": shared}, {"role": "user", "content": text}],
            model="gemini-2.5-flash",
        )
        for text in ("first headline", "second headline")
    ]
    first, second = call(sim, *requests)
    assert isinstance(first, ChatResponse) and isinstance(second, ChatResponse)
    assert first.cached_tokens == 0
    assert 2048 <= second.cached_tokens < second.prompt_tokens


def test_json_schema_answer_parses_and_has_the_required_keys(sim_default: SimulatorProcess) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "sentiment", "schema": SCHEMA, "strict": True}}
    answers = call(sim_default, *(request(f"headline {i}", response_format=response_format) for i in range(3)))
    for answer in answers:
        assert isinstance(answer, ChatResponse)
        data = json.loads(answer.text)
        assert set(data) >= {"sentiment", "confidence"} and data["sentiment"] in ("positive", "negative", "neutral")


def test_json_object_answer_parses(sim_default: SimulatorProcess) -> None:
    [answer] = call(sim_default, request(response_format={"type": "json_object"}))
    assert isinstance(answer, ChatResponse) and isinstance(json.loads(answer.text), dict)


def test_per_minute_429_is_rate_limited_with_retry_after(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpm=10))  # one now, then one every 6 s
    ok, limited = call(sim, request(), request())
    assert isinstance(ok, ChatResponse)
    assert isinstance(limited, ProviderError) and limited.kind is ErrorKind.RATE_LIMITED
    assert limited.status_code == 429 and limited.retry_after == 6.0 and limited.retryable


def test_per_day_quota_is_quota_exhausted(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpd=2))
    *ok, exhausted = call(sim, request(), request(), request())
    assert all(isinstance(r, ChatResponse) for r in ok)
    assert isinstance(exhausted, ProviderError) and exhausted.kind is ErrorKind.QUOTA_EXHAUSTED
    assert "daily quota" in exhausted.message and "GenerateRequestsPerDayPerProjectPerModel" in exhausted.message
    assert not exhausted.retryable


def test_out_of_quota_key_is_quota_exhausted(simulator: ConfigureSimulator) -> None:
    sim = simulator(quota_exhausted_keys=(KEY,))
    [error] = call(sim, request())
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.QUOTA_EXHAUSTED


def test_bad_key_is_unavailable_names_the_endpoint_and_is_never_echoed(simulator: ConfigureSimulator) -> None:
    """Gemini refuses a key with 400 API_KEY_INVALID: the lane's circuit opens (no pause)."""
    sim = simulator(api_keys=("good",))
    [error] = call(sim, request(), key="bad-key-secret-value")
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.UNAVAILABLE and error.status_code == 400
    assert error.lane_level
    assert error.message.startswith("Gemini refused the API key (400 API_KEY_INVALID). "), error.message
    assert f"(at {sim.gemini_base_url}/" in error.message and f"/models/{MODEL}:generateContent)" in error.message
    assert "bad-key-secret-value" not in str(error)


def test_outage_503_is_transient(simulator: ConfigureSimulator) -> None:
    sim = simulator(outage=Outage())
    [error] = call(sim, request())
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.TRANSIENT and error.status_code == 503


def test_connection_reset_is_transient_after_exactly_one_attempt(simulator: ConfigureSimulator) -> None:
    sim = simulator(error_rates=ErrorRates(connection_reset=1.0))
    [error] = call(sim, request())
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.TRANSIENT
    assert sim.stats(series=False)["totals"]["requests"] == 1  # the SDK did not retry behind batchdb's back


def test_context_too_long_is_permanent(simulator: ConfigureSimulator) -> None:
    sim = simulator(context_window=50)
    [error] = call(sim, request("word " * 200))
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.PERMANENT and error.status_code == 400
    assert "exceeds the maximum number of tokens" in error.message


def test_unmappable_request_is_permanent_without_a_call(sim_default: SimulatorProcess) -> None:
    tool = ChatRequest(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}], model=MODEL)
    [error] = call(sim_default, tool)
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.PERMANENT and "role 'tool'" in error.message
    assert sim_default.stats(series=False)["totals"]["requests"] == 0


def test_build_provider_reads_gemini_key_and_endpoint(
    sim_default: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    monkeypatch.setenv("GEMINI_BASE_URL", sim_default.gemini_base_url)

    async def main() -> ChatResponse:
        provider = build_provider("gemini", timeout=5)
        try:
            return await provider.complete(request())
        finally:
            await provider.aclose()

    assert run(main()).text
    assert sim_default.stats(series=False)["by_key_model"][0]["key"] == KEY


# -- classification of bodies the simulator does not produce ------------------------------------


def api_error(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> errors.APIError:
    body = {"error": {"code": code, "status": status, "message": message, "details": details or []}}
    return errors.ClientError(code, body) if code < 500 else errors.ServerError(code, body)


def quota(quota_id: str, value: str = "15") -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaId": quota_id, "quotaValue": value}],
    }


@pytest.mark.parametrize(
    ("error", "kind", "retry_after"),
    [
        (
            api_error(
                429,
                "RESOURCE_EXHAUSTED",
                "quota",
                [
                    quota("GenerateContentInputTokensPerModelPerMinute-FreeTier"),
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "26s"},
                ],
            ),
            ErrorKind.RATE_LIMITED,
            26.0,
        ),
        (api_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded. Please retry in 1.5s."), ErrorKind.RATE_LIMITED, 1.5),
        (
            api_error(429, "RESOURCE_EXHAUSTED", "quota", [quota("GenerateRequestsPerMinutePerProjectPerModel", "0")]),
            ErrorKind.QUOTA_EXHAUSTED,
            None,
        ),
        (
            api_error(
                400,
                "INVALID_ARGUMENT",
                "bad",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_EXPIRED"}],
            ),
            ErrorKind.UNAVAILABLE,
            None,
        ),
        (
            api_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."),
            ErrorKind.UNAVAILABLE,
            None,
        ),
        (api_error(400, "FAILED_PRECONDITION", "User location is not supported"), ErrorKind.QUOTA_EXHAUSTED, None),
        (api_error(400, "INVALID_ARGUMENT", "Invalid JSON payload"), ErrorKind.PERMANENT, None),
        (
            api_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
            ErrorKind.UNAVAILABLE,
            None,
        ),
        (api_error(403, "PERMISSION_DENIED", "denied"), ErrorKind.UNAVAILABLE, None),
        (
            api_error(
                403,
                "PERMISSION_DENIED",
                "Generative Language API has not been used in project 1",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVICE_DISABLED"}],
            ),
            ErrorKind.UNAVAILABLE,
            None,
        ),
        (api_error(404, "NOT_FOUND", "models/x is not found"), ErrorKind.UNAVAILABLE, None),
        (api_error(500, "INTERNAL", "internal"), ErrorKind.TRANSIENT, None),
        (api_error(504, "DEADLINE_EXCEEDED", "deadline"), ErrorKind.TRANSIENT, None),
    ],
)
def test_error_classification(error: errors.APIError, kind: ErrorKind, retry_after: float | None) -> None:
    classified = classify_gemini_error(error, secret="k-secret")
    assert classified.kind is kind and classified.retry_after == retry_after
    assert classified.status_code == error.code


def test_a_key_inside_an_error_body_is_masked() -> None:
    error = api_error(400, "INVALID_ARGUMENT", "key AIza-secret-key-1 is malformed")
    assert "AIza-secret-key-1" not in classify_gemini_error(error, secret="AIza-secret-key-1").message


def test_blocked_prompt_and_safety_finish_are_permanent() -> None:
    blocked = types.GenerateContentResponse(
        candidates=[], prompt_feedback=types.GenerateContentResponsePromptFeedback(block_reason="SAFETY")
    )
    with pytest.raises(ProviderError) as prompt_error:
        normalise_response(blocked, model=MODEL)
    assert prompt_error.value.kind is ErrorKind.PERMANENT
    assert "blocked the prompt (SAFETY)" in prompt_error.value.message

    unsafe = types.GenerateContentResponse(candidates=[types.Candidate(finish_reason="SAFETY")])
    with pytest.raises(ProviderError) as answer_error:
        normalise_response(unsafe, model=MODEL)
    assert answer_error.value.kind is ErrorKind.PERMANENT and "finish reason SAFETY" in answer_error.value.message

    partial = types.GenerateContentResponse(
        candidates=[
            types.Candidate(
                content=types.Content(
                    role="model", parts=[types.Part(text="thinking", thought=True), types.Part(text="ok")]
                ),
                finish_reason="RECITATION",
            )
        ],
        usage_metadata=types.GenerateContentResponseUsageMetadata(
            prompt_token_count=5, candidates_token_count=1, thoughts_token_count=3
        ),
    )
    response = normalise_response(partial, model=MODEL)
    assert (response.text, response.finish_reason) == ("ok", "content_filter")
    assert (response.prompt_tokens, response.completion_tokens) == (5, 4)  # thinking is billed as output


@pytest.fixture
def sim_default(simulator: ConfigureSimulator) -> SimulatorProcess:
    return simulator()


def test_errors_name_the_endpoint_without_the_key(simulator: ConfigureSimulator) -> None:
    sim = simulator(outage=Outage())
    [error] = call(sim, request())
    assert isinstance(error, ProviderError) and error.lane_level
    assert f"(at {sim.gemini_base_url.rstrip('/')}/v1/models/{MODEL}:generateContent)" in error.message, error.message
    assert KEY not in error.message


def test_an_unknown_host_is_unavailable() -> None:
    async def main() -> ProviderError:
        provider = GeminiProvider(api_key=KEY, base_url="http://no-such-host.invalid", timeout=10)
        try:
            await provider.complete(request())
        except ProviderError as exc:
            return exc
        finally:
            await provider.aclose()
        raise AssertionError("no error")

    error = run(main())
    assert error.kind is ErrorKind.UNAVAILABLE, error.message
    assert "http://no-such-host.invalid/v1/models/" in error.message and KEY not in error.message
