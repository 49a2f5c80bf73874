"""The official google-genai SDK against the simulator: text, usage, JSON, quota errors."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pydantic
import pytest
from google import genai
from google.genai import errors, types

from batchdb.simulator import Distribution, Limits, SimulatorProcess
from batchdb.tokens import count_text

from .conftest import ConfigureSimulator
from .schema_check import violations

T = TypeVar("T")
MODEL = "gemini-2.0-flash"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def gemini(sim: SimulatorProcess, key: str = "g-test", api_version: str | None = None) -> genai.client.AsyncClient:
    options = types.HttpOptions(base_url=sim.base_url, api_version=api_version)
    return genai.Client(api_key=key, http_options=options).aio


def test_generate_content_with_usage_metadata(simulator: ConfigureSimulator) -> None:
    sim = simulator(output_tokens=Distribution(kind="fixed", value=40))

    async def main() -> Any:
        async with gemini(sim) as client:
            return await client.models.generate_content(
                model=MODEL,
                contents="Summarise the review: the blender broke after two days.",
                config=types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.2),
            )

    response = run(main())
    assert response.text and count_text(response.text) == 40
    usage = response.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == count_text("Be brief.") + count_text(
        "Summarise the review: the blender broke after two days."
    )
    assert usage.candidates_token_count == 40
    assert usage.total_token_count == usage.prompt_token_count + 40
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.model_version == MODEL


def test_max_output_tokens_and_v1beta(simulator: ConfigureSimulator) -> None:
    sim = simulator(output_tokens=Distribution(kind="fixed", value=100))

    async def main() -> Any:
        async with gemini(sim, api_version="v1beta") as client:
            return await client.models.generate_content(
                model=MODEL, contents="hi", config=types.GenerateContentConfig(max_output_tokens=8)
            )

    response = run(main())
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.usage_metadata.candidates_token_count == 8


class Label(pydantic.BaseModel):
    label: str
    score: int
    tags: list[str]


def test_json_response_schema(sim: SimulatorProcess) -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["spam", "ham"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 10},
        },
        "required": ["label", "score"],
    }

    async def main() -> tuple[Any, Any]:
        async with gemini(sim) as client:
            raw_schema = await client.models.generate_content(
                model=MODEL,
                contents="classify",
                config=types.GenerateContentConfig(response_mime_type="application/json", response_schema=schema),
            )
            typed = await client.models.generate_content(
                model=MODEL,
                contents="classify",
                config=types.GenerateContentConfig(response_mime_type="application/json", response_schema=Label),
            )
            return raw_schema, typed

    raw_schema, typed = run(main())
    assert violations(schema, raw_schema.parsed) == []
    assert isinstance(typed.parsed, Label)


def quota_violation(error: errors.APIError) -> tuple[str, str | None]:
    """(quotaId, retryDelay) from a RESOURCE_EXHAUSTED error's details."""
    details = error.details["error"]["details"]
    [failure] = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.QuotaFailure"]
    retry = [d["retryDelay"] for d in details if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"]
    return failure["violations"][0]["quotaId"], retry[0] if retry else None


def test_requests_per_minute_429_carries_quota_failure(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpm=10))  # burst 1, then one per 6 s

    async def main() -> errors.ClientError:
        async with gemini(sim) as client:
            await client.models.generate_content(model=MODEL, contents="one")
            with pytest.raises(errors.ClientError) as caught:
                await client.models.generate_content(model=MODEL, contents="two")
            return caught.value

    error = run(main())
    assert error.code == 429 and error.status == "RESOURCE_EXHAUSTED"
    assert quota_violation(error) == ("GenerateRequestsPerMinutePerProjectPerModel", "6s")
    failure = error.details["error"]["details"][0]["violations"][0]
    assert failure["quotaDimensions"] == {"location": "global", "model": MODEL} and failure["quotaValue"] == "10"


def test_input_tokens_per_minute_count_prompt_tokens_only(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(tpm=6_000))  # burst 100 input tokens

    async def main() -> errors.ClientError:
        async with gemini(sim) as client:
            # max_output_tokens is not charged (unlike OpenAI): many small prompts pass.
            config = types.GenerateContentConfig(max_output_tokens=50_000)
            for _ in range(3):
                await client.models.generate_content(model=MODEL, contents="short prompt", config=config)
            with pytest.raises(errors.ClientError) as caught:
                await client.models.generate_content(model=MODEL, contents="word " * 500)
            return caught.value

    error = run(main())
    assert quota_violation(error)[0] == "GenerateContentInputTokensPerModelPerMinute"


def test_requests_per_day_429(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpd=2))

    async def main() -> errors.ClientError:
        async with gemini(sim) as client:
            for _ in range(2):
                await client.models.generate_content(model=MODEL, contents="hi")
            with pytest.raises(errors.ClientError) as caught:
                await client.models.generate_content(model=MODEL, contents="hi")
            return caught.value

    error = run(main())
    quota_id, retry = quota_violation(error)
    assert quota_id == "GenerateRequestsPerDayPerProjectPerModel"
    assert retry is not None and 0 < int(retry.rstrip("s")) <= 25 * 3600


def test_out_of_quota_key_and_bad_key(simulator: ConfigureSimulator) -> None:
    sim = simulator(api_keys=("g-good", "g-broke"), quota_exhausted_keys=("g-broke",))

    async def main() -> tuple[errors.ClientError, errors.ClientError]:
        async with gemini(sim, key="g-broke") as broke:
            with pytest.raises(errors.ClientError) as exhausted:
                await broke.models.generate_content(model=MODEL, contents="hi")
        async with gemini(sim, key="g-unknown") as unknown:
            with pytest.raises(errors.ClientError) as invalid:
                await unknown.models.generate_content(model=MODEL, contents="hi")
        return exhausted.value, invalid.value

    exhausted, invalid = run(main())
    assert exhausted.code == 429 and quota_violation(exhausted)[0] == "GenerateRequestsPerDayPerProjectPerModel"
    assert invalid.code == 400 and invalid.status == "INVALID_ARGUMENT"  # Gemini's answer to a bad key
    assert "API key not valid" in (invalid.message or "")
