"""google-genai with ``vertexai=True`` against the simulator's Vertex AI routes: the URLs the SDK
really calls, bearer-token auth, quotas per project and location, Vertex's 429, cached tokens."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Coroutine
from typing import Any, TypeVar

import google.oauth2.credentials
import pytest
from google import genai
from google.genai import errors, types

from batchdb.simulator import Distribution, LimitRule, SimulatorProcess
from batchdb.simulator.responses import VERTEX_RATE_LIMITED_MESSAGE
from batchdb.tokens import count_text

from .conftest import ConfigureSimulator

T = TypeVar("T")
MODEL = "gemini-2.5-flash"
TOKEN = "ya29.test-access-token"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def vertex(
    sim: SimulatorProcess,
    *,
    project: str = "acme-research",
    location: str = "us-central1",
    token: str = TOKEN,
    api_version: str | None = None,
) -> genai.Client:
    """A Vertex AI client on the simulator, as batchdb builds one: credentials given, no network for them."""
    return genai.Client(
        vertexai=True,
        project=project,
        location=location,
        credentials=google.oauth2.credentials.Credentials(token=token),  # type: ignore[no-untyped-call]
        http_options=types.HttpOptions(
            base_url=sim.base_url, api_version=api_version, retry_options=types.HttpRetryOptions(attempts=1)
        ),
    )


def generate(client: genai.Client, contents: str = "Summarise: the blender broke.", **config: Any) -> Any:
    async def main() -> Any:
        try:
            return await client.aio.models.generate_content(
                model=MODEL, contents=contents, config=types.GenerateContentConfig(**config)
            )
        finally:
            await client.aio.aclose()

    return run(main())


def test_generate_content_on_the_sdks_default_v1beta1_route_and_on_v1(simulator: ConfigureSimulator) -> None:
    sim = simulator(output_tokens=Distribution(kind="fixed", value=30))
    beta = generate(vertex(sim), system_instruction="Be brief.")
    ga = generate(vertex(sim, api_version="v1"), max_output_tokens=8)
    assert beta.text and count_text(beta.text) == 30 and beta.model_version == MODEL
    usage = beta.usage_metadata
    assert usage.prompt_token_count == count_text("Be brief.") + count_text("Summarise: the blender broke.")
    assert usage.candidates_token_count == 30 and usage.total_token_count == usage.prompt_token_count + 30
    assert ga.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert ga.usage_metadata.candidates_token_count == 8
    # The quota key is the project in its location, never the token.
    [row] = sim.stats(series=False)["by_key_model"]
    assert (row["key"], row["model"], row["accepted"]) == ("acme-research/us-central1", MODEL, 2)


def test_cached_tokens_in_the_usage_metadata(simulator: ConfigureSimulator) -> None:
    sim = simulator()
    shared = "Background for every headline. " * 500  # about 3,000 tokens, past Gemini 2.5's 2,048 minimum
    first = generate(vertex(sim), "first headline", system_instruction=shared)
    second = generate(vertex(sim), "second headline", system_instruction=shared)
    assert first.usage_metadata.cached_content_token_count is None
    cached = second.usage_metadata.cached_content_token_count
    assert 2048 <= cached < second.usage_metadata.prompt_token_count


def test_an_unknown_token_is_401_unauthenticated(simulator: ConfigureSimulator) -> None:
    sim = simulator(api_keys=(TOKEN,))
    with pytest.raises(errors.ClientError) as caught:
        generate(vertex(sim, token="ya29.unknown"))
    assert caught.value.code == 401 and caught.value.status == "UNAUTHENTICATED"
    assert "invalid authentication credentials" in (caught.value.message or "")
    assert generate(vertex(sim)).text  # the known token is let in


def test_a_call_without_a_token_is_401_unauthenticated(sim: SimulatorProcess) -> None:
    """The SDK always sends one; a bare HTTP call shows the route refuses none at all."""
    url = f"{sim.base_url}/v1/projects/p/locations/l/publishers/google/models/{MODEL}:generateContent"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=10)
    body = json.loads(caught.value.read())
    assert caught.value.code == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    assert body["error"]["details"][0]["reason"] == "CREDENTIALS_MISSING"


def test_quotas_are_per_project_and_location_and_the_429_is_vertexs(simulator: ConfigureSimulator) -> None:
    sim = simulator(limits=(LimitRule(key="acme-research/us-central1", rpm=2),), burst_window_s=60)
    for _ in range(2):
        generate(vertex(sim))
    with pytest.raises(errors.ClientError) as caught:
        generate(vertex(sim))
    error = caught.value
    assert error.code == 429 and error.status == "RESOURCE_EXHAUSTED"
    assert error.message == VERTEX_RATE_LIMITED_MESSAGE
    assert error.details == {
        "error": {"code": 429, "message": VERTEX_RATE_LIMITED_MESSAGE, "status": "RESOURCE_EXHAUSTED"}
    }
    # Another location of the project, and another project, have quotas of their own.
    assert generate(vertex(sim, location="europe-west4")).text
    assert generate(vertex(sim, project="acme-backfill")).text


def test_an_unknown_model_is_404_naming_the_publisher_model(simulator: ConfigureSimulator) -> None:
    sim = simulator(models=("gemini-2.0-flash",))
    with pytest.raises(errors.ClientError) as caught:
        generate(vertex(sim))
    assert caught.value.code == 404
    assert f"projects/acme-research/locations/us-central1/publishers/google/models/{MODEL}" in caught.value.message


def test_an_outage_is_503_unavailable(simulator: ConfigureSimulator) -> None:
    sim = simulator(outage={"status": 503})
    with pytest.raises(errors.ServerError) as caught:
        generate(vertex(sim))
    assert caught.value.code == 503 and caught.value.status == "UNAVAILABLE"
