"""The OpenAI and Azure OpenAI adapters through the openai SDK against the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from provider_calls import call

from batchdb.providers import build_provider
from batchdb.providers.azure import AzureOpenAIProvider
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.openai import OpenAIProvider
from batchdb.simulator import Limits, Outage, SimulatorProcess

T = TypeVar("T")
ConfigureSimulator = Callable[..., SimulatorProcess]
KEY = "sk-test-0123456789abcdef"
REQUEST = ChatRequest(
    messages=[
        {"role": "system", "content": "You label headlines."},
        {"role": "user", "content": "Acme beats estimates"},
    ],
    model="gpt-4o-mini",
    max_tokens=20,
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def openai_provider(sim: SimulatorProcess, key: str = KEY) -> OpenAIProvider:
    return OpenAIProvider(api_key=key, base_url=sim.openai_base_url, timeout=10)


# -- OpenAI ---------------------------------------------------------------------------------------


def test_completion_carries_rate_limit_headers(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpm=600, tpm=100_000))
    [response] = call(openai_provider(sim), REQUEST)
    assert isinstance(response, ChatResponse) and response.text and response.prompt_tokens > 0
    assert response.rate_limit_headers["x-ratelimit-limit-requests"] == "600"


def test_cached_prompt_tokens_are_read_from_the_usage(simulator: ConfigureSimulator) -> None:
    """A long shared prefix is served from the prompt cache on the second call: OpenAI reports it in
    usage.prompt_tokens_details.cached_tokens (in 128-token steps from 1,024), part of prompt_tokens."""
    sim = simulator()
    shared = "Background for every headline. " * 250  # about 1,500 tokens
    first, second = call(
        openai_provider(sim),
        *(
            ChatRequest(messages=[{"role": "system", "content": shared}, {"role": "user", "content": text}], model="m")
            for text in ("first headline", "second headline")
        ),
    )
    assert isinstance(first, ChatResponse) and isinstance(second, ChatResponse)
    assert first.cached_tokens == 0
    assert 1024 <= second.cached_tokens < second.prompt_tokens and second.cached_tokens % 128 == 0


def test_insufficient_quota_is_quota_exhausted(simulator: ConfigureSimulator) -> None:
    sim = simulator(quota_exhausted_keys=(KEY,))
    [error] = call(openai_provider(sim), REQUEST)
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.QUOTA_EXHAUSTED and error.status_code == 429


def test_429_is_rate_limited_with_retry_after_from_headers(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpm=60))
    ok, limited = call(openai_provider(sim), REQUEST, REQUEST)
    assert isinstance(ok, ChatResponse)
    assert isinstance(limited, ProviderError) and limited.kind is ErrorKind.RATE_LIMITED
    assert limited.retry_after is not None and 0.5 <= limited.retry_after <= 1.0  # retry-after-ms wins
    assert limited.rate_limit_headers["x-ratelimit-remaining-requests"] == "0"


def test_context_length_is_permanent(simulator: ConfigureSimulator) -> None:
    sim = simulator(context_window=100)
    [error] = call(openai_provider(sim), ChatRequest(messages=REQUEST.messages, model="gpt-4o-mini", max_tokens=500))
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.PERMANENT and error.status_code == 400
    assert "context length" in error.message


def test_503_is_transient(simulator: ConfigureSimulator) -> None:
    sim = simulator(outage=Outage())
    [error] = call(openai_provider(sim), REQUEST)
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.TRANSIENT and error.status_code == 503


def test_refused_key_is_unavailable_names_the_endpoint_and_is_never_echoed(simulator: ConfigureSimulator) -> None:
    """A refused key is the lane's fault, not an account state: the circuit opens (no pause), and
    its probe resumes the lane once the key works."""
    sim = simulator(api_keys=("sk-good",))
    [error] = call(openai_provider(sim, key="sk-wrong-secret-key"), REQUEST)
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.UNAVAILABLE and error.status_code == 401
    assert error.lane_level and error.retryable
    assert error.message.startswith(
        f"OpenAI refused the API key (401 invalid_api_key) at {sim.openai_base_url}/chat/completions: "
        "Incorrect API key provided"
    ), error.message
    assert "Error code" not in error.message  # the provider's sentence, not the SDK's dump of the body
    assert "sk-wrong-secret-key" not in str(error) and "wrong-secret" not in str(error)


def test_azure_refused_key_says_azure(simulator: ConfigureSimulator) -> None:
    sim = simulator(api_keys=("azure-good",))
    provider = AzureOpenAIProvider(api_key="azure-wrong-secret", endpoint=sim.azure_endpoint, timeout=5)
    [error] = call(provider, azure_request())
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.UNAVAILABLE and error.status_code == 401
    assert error.message.startswith("Azure OpenAI refused the API key (401"), error.message
    assert "/openai/deployments/prod-gpt4o/chat/completions" in error.message and "wrong-secret" not in str(error)


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (401, "invalid_api_key", ErrorKind.UNAVAILABLE),
        (403, "unsupported_country_region_territory", ErrorKind.UNAVAILABLE),
        (403, None, ErrorKind.UNAVAILABLE),
        (429, "insufficient_quota", ErrorKind.QUOTA_EXHAUSTED),  # an account state: the job pauses
    ],
)
def test_key_refusals_open_the_circuit_and_quota_pauses(status: int, code: str | None, kind: ErrorKind) -> None:
    """Statuses the simulator does not produce (a 403), classified from the SDK's own exception."""
    import httpx2 as httpx  # the HTTP client this openai SDK is built on
    import openai

    from batchdb.providers.openai import classify_openai_error

    url = "https://api.example.test/v1/chat/completions?api-key=sk-in-the-query"
    body = {"error": {"message": "the provider's sentence", "type": "x", "code": code}}
    response = httpx.Response(status, json=body, request=httpx.Request("POST", url))
    kinds = {401: openai.AuthenticationError, 403: openai.PermissionDeniedError, 429: openai.RateLimitError}
    exc = kinds[status](f"Error code: {status} - {body}", response=response, body=body["error"])
    classified = classify_openai_error(exc, secret="sk-secret-value")
    assert classified.kind is kind and classified.status_code == status, classified.message
    assert "sk-in-the-query" not in classified.message and "sk-secret-value" not in classified.message
    if kind is ErrorKind.UNAVAILABLE:
        assert classified.message == (
            f"OpenAI refused the API key ({status}{' ' + code if code else ''}) at "
            "https://api.example.test/v1/chat/completions: the provider's sentence"
        )


def test_unmappable_request_is_permanent_without_a_call(simulator: ConfigureSimulator) -> None:
    sim = simulator()
    [error] = call(openai_provider(sim), ChatRequest(messages=REQUEST.messages, model="gpt-4o-mini", extra={"n": 3}))
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.PERMANENT and "n must be 1" in error.message
    assert sim.stats(series=False)["totals"]["requests"] == 0


def test_build_provider_uses_the_alias_key_and_endpoint(
    simulator: ConfigureSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(api_keys=("sk-team-b",))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default-is-refused")
    monkeypatch.setenv("BATCHDB_KEY_OPENAI_TEAM_B", "sk-team-b")
    monkeypatch.setenv("BATCHDB_ENDPOINT_OPENAI_TEAM_B", sim.openai_base_url)
    [response] = call(build_provider("openai", key_alias="team-b", timeout=5), REQUEST)
    assert isinstance(response, ChatResponse)


def test_build_provider_without_a_key_raises_quota_exhausted() -> None:
    with pytest.raises(ProviderError) as caught:
        build_provider("openai", key_alias="team-c")
    assert caught.value.kind is ErrorKind.QUOTA_EXHAUSTED
    assert "BATCHDB_KEY_OPENAI_TEAM_C" in caught.value.message


def test_unknown_provider_is_permanent() -> None:
    with pytest.raises(ProviderError) as caught:
        build_provider("no-such-provider")
    assert caught.value.kind is ErrorKind.PERMANENT
    assert "openai, azure, gemini, vertex, instant" in caught.value.message


# -- Azure ----------------------------------------------------------------------------------------


def azure_request() -> ChatRequest:
    return ChatRequest(messages=REQUEST.messages, model="prod-gpt4o", max_tokens=20)


def test_azure_completion_through_the_deployment_path(
    simulator: ConfigureSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(default_limits=Limits(rpm=300))
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key-0123")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", sim.azure_endpoint)
    monkeypatch.setenv("BATCHDB_AZURE_API_VERSION", "2024-06-01")
    provider = build_provider("azure", timeout=5)
    assert isinstance(provider, AzureOpenAIProvider) and provider.name == "azure"
    [response] = call(provider, azure_request())
    assert isinstance(response, ChatResponse) and response.model == "prod-gpt4o" and response.text
    assert response.rate_limit_headers["x-ratelimit-limit-requests"] == "300"
    [row] = sim.stats(series=False)["by_key_model"]
    assert (row["key"], row["model"]) == ("azure-key-0123", "prod-gpt4o")


def test_azure_429_is_rate_limited_with_headers(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpm=60))
    provider = AzureOpenAIProvider(api_key="azure-key-0123", endpoint=sim.azure_endpoint, timeout=5)
    ok, limited = call(provider, azure_request(), azure_request())
    assert isinstance(ok, ChatResponse)
    assert isinstance(limited, ProviderError) and limited.kind is ErrorKind.RATE_LIMITED
    assert limited.retry_after is not None and limited.retry_after > 0
    assert limited.rate_limit_headers["x-ratelimit-limit-requests"] == "60"


def test_azure_without_an_endpoint_names_what_was_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key-0123")
    with pytest.raises(ProviderError) as caught:
        build_provider("azure")
    assert caught.value.kind is ErrorKind.QUOTA_EXHAUSTED
    assert "AZURE_OPENAI_ENDPOINT" in caught.value.message and "azure-key-0123" not in caught.value.message


# -- the endpoint is named; a wrong endpoint is the lane's problem, not the row's -----------------------


def test_errors_name_the_endpoint_without_the_key(simulator: ConfigureSimulator) -> None:
    sim = simulator(outage=Outage())
    [error] = call(openai_provider(sim), REQUEST)
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.TRANSIENT and error.lane_level
    assert f"(at {sim.openai_base_url}/chat/completions)" in error.message, error.message
    assert KEY not in error.message


def test_a_base_url_without_v1_is_unavailable_and_says_so(simulator: ConfigureSimulator) -> None:
    sim = simulator()
    [error] = call(OpenAIProvider(api_key=KEY, base_url=sim.base_url, timeout=10), REQUEST)
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.UNAVAILABLE and error.status_code == 404
    assert f"{sim.base_url}/chat/completions" in error.message and "/v1" in error.message, error.message


def test_an_unknown_host_is_unavailable() -> None:
    provider = OpenAIProvider(api_key=KEY, base_url="http://no-such-host.invalid/v1", timeout=10)
    [error] = call(provider, REQUEST)
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.UNAVAILABLE, error.message
    assert "http://no-such-host.invalid/v1/chat/completions" in error.message and KEY not in error.message


def test_connection_refused_is_transient_and_names_the_endpoint() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    [error] = call(OpenAIProvider(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1", timeout=10), REQUEST)
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.TRANSIENT and error.lane_level
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in error.message
