"""The official openai SDK (retries off) against the simulator: chat, Azure, embeddings, errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletionMessageParam

from batchdb.simulator import Distribution, Limits, SimulatorProcess
from batchdb.tokens import count_openai_messages, count_text

from .conftest import ConfigureSimulator
from .schema_check import REVIEW_SCHEMA, violations

T = TypeVar("T")
MODEL = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You classify product reviews."},
    {"role": "user", "content": "The blender broke after two days and support never answered."},
]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def client(sim: SimulatorProcess, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key=key, max_retries=0)


def test_chat_completion_with_usage_and_rate_limit_headers(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpm=600, tpm=100_000))

    async def main() -> Any:
        async with client(sim) as c:
            raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=500)
            again = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=500)
            return raw.headers, raw.parse(), again

    headers, completion, again = run(main())
    assert completion.object == "chat.completion" and completion.model == MODEL and completion.id
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count_openai_messages(MESSAGES)[0]
    assert completion.usage.completion_tokens == count_text(text)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert again.choices[0].message.content == text  # same request, same answer
    assert headers["x-ratelimit-limit-requests"] == "600"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert headers["x-ratelimit-remaining-requests"] == "9"  # burst of 10, one used
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100_000 / 60
    assert headers["x-ratelimit-reset-requests"] == "100ms"
    assert headers["x-ratelimit-reset-tokens"].endswith(("ms", "s"))


def test_max_tokens_cuts_the_answer_with_finish_reason_length(simulator: ConfigureSimulator) -> None:
    sim = simulator(output_tokens=Distribution(kind="fixed", value=100))

    async def main() -> Any:
        async with client(sim) as c:
            short = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10)
            full = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1000)
            return short, full

    short, full = run(main())
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 10
    assert full.choices[0].finish_reason == "stop" and full.usage.completion_tokens == 100


def test_requests_over_the_limit_raise_rate_limit_error(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpm=60))

    async def main() -> tuple[openai.RateLimitError, float]:
        async with client(sim) as c:
            started = time.monotonic()
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
            with pytest.raises(openai.RateLimitError) as caught:
                await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
            return caught.value, time.monotonic() - started

    error, between_s = run(main())
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert "requests per min (RPM): Limit 60, Used 1, Requested 1" in error.message
    assert error.response.headers["retry-after"] == "1"
    # One call a second: the second fits 1 s after the first was admitted, less the time between them
    # (measured here: on a loaded machine the second call can leave well after the first).
    assert 1000 - between_s * 1000 - 1 <= int(error.response.headers["retry-after-ms"]) <= 1000
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    totals = sim.stats()["totals"]
    assert (totals["accepted"], totals["rate_limited"]) == (1, 1)


def test_tokens_over_the_limit_raise_rate_limit_error(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(tpm=30_000))  # burst 500 tokens, 500 tokens/s

    async def main() -> tuple[openai.RateLimitError, openai.RateLimitError]:
        async with client(sim) as c:
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4000)
            with pytest.raises(openai.RateLimitError) as limited:
                await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4000)
            with pytest.raises(openai.RateLimitError) as too_large:
                await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30_000)
            return limited.value, too_large.value

    limited, too_large = run(main())
    assert limited.type == "tokens" and limited.code == "rate_limit_exceeded"
    assert 8 <= int(limited.response.headers["retry-after"]) <= 9  # repay ~3,500 debt + 500 burst at 500/s
    assert too_large.code == "rate_limit_exceeded" and "Request too large" in too_large.message
    assert "retry-after" not in too_large.response.headers


def test_insufficient_quota_is_a_429_with_its_own_code(simulator: ConfigureSimulator) -> None:
    sim = simulator(quota_exhausted_keys=("sk-broke",), default_limits=Limits(rpm=100))

    async def main() -> openai.RateLimitError:
        async with client(sim, key="sk-broke") as c:
            with pytest.raises(openai.RateLimitError) as caught:
                await c.chat.completions.create(model=MODEL, messages=MESSAGES)
            return caught.value

    error = run(main())
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
    assert "retry-after" not in error.response.headers
    assert error.response.headers["x-ratelimit-limit-requests"] == "100"
    assert sim.stats()["outcomes"]["quota_exceeded"] == 1


def test_unknown_key_is_401_when_keys_are_configured(simulator: ConfigureSimulator) -> None:
    sim = simulator(api_keys=("sk-good",))

    async def main() -> openai.AuthenticationError:
        async with client(sim, key="sk-good") as good:
            await good.chat.completions.create(model=MODEL, messages=MESSAGES)
        async with client(sim, key="sk-wrong-key") as bad:
            with pytest.raises(openai.AuthenticationError) as caught:
                await bad.chat.completions.create(model=MODEL, messages=MESSAGES)
        return caught.value

    error = run(main())
    assert error.status_code == 401 and error.code == "invalid_api_key"
    assert "sk-wrong-key" not in error.message  # keys are masked, as OpenAI does


def test_prompt_plus_max_tokens_over_the_context_window_is_400(simulator: ConfigureSimulator) -> None:
    sim = simulator(context_window=1000, context_windows={"big-model": 200_000})

    async def main() -> openai.BadRequestError:
        async with client(sim) as c:
            await c.chat.completions.create(model="big-model", messages=MESSAGES, max_tokens=5000)
            with pytest.raises(openai.BadRequestError) as caught:
                await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000)
        return caught.value

    error = run(main())
    assert error.code == "context_length_exceeded" and error.param == "messages"
    assert "maximum context length is 1000 tokens" in error.message


def test_azure_openai_deployment_path(simulator: ConfigureSimulator) -> None:
    sim = simulator(default_limits=Limits(rpm=300))

    async def main() -> Any:
        async with openai.AsyncAzureOpenAI(
            azure_endpoint=sim.base_url, api_key="azure-key", api_version="2024-10-21", max_retries=0
        ) as az:
            raw = await az.chat.completions.with_raw_response.create(model="prod-gpt4o", messages=MESSAGES)
            return raw.headers, raw.parse()

    headers, completion = run(main())
    assert completion.model == "prod-gpt4o" and completion.usage.prompt_tokens > 0
    assert headers["x-ratelimit-limit-requests"] == "300"
    [row] = sim.stats()["by_key_model"]
    assert (row["key"], row["model"], row["accepted"]) == ("azure-key", "prod-gpt4o", 1)


def test_embeddings_in_base64_and_float(simulator: ConfigureSimulator) -> None:
    sim = simulator(embedding_dimensions=64)

    async def main() -> Any:
        async with client(sim) as c:
            default = await c.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
            floats = await c.embeddings.create(
                model="text-embedding-3-small", input="hello", encoding_format="float", dimensions=16
            )
            return default, floats

    default, floats = run(main())
    assert [len(d.embedding) for d in default.data] == [64, 64]  # the SDK asked for base64 and decoded it
    assert default.usage.prompt_tokens == 2
    assert len(floats.data[0].embedding) == 16
    assert isinstance(floats.data[0].embedding[0], float)


def test_json_schema_answers_satisfy_the_schema(simulator: ConfigureSimulator) -> None:
    sim = simulator()

    async def main() -> list[str]:
        async with client(sim) as c:
            answers = []
            for i in range(5):
                completion = await c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"review {i}"}],
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "review", "schema": REVIEW_SCHEMA, "strict": True},
                    },
                )
                answers.append(completion.choices[0].message.content or "")
            return answers

    for answer in run(main()):
        assert violations(REVIEW_SCHEMA, json.loads(answer)) == []


class Review(pydantic.BaseModel):
    sentiment: Literal["positive", "neutral", "negative"]
    score: int = pydantic.Field(ge=1, le=5)
    topics: list[str]
    reply: str | None


def test_sdk_structured_output_parsing_with_pydantic(sim: SimulatorProcess) -> None:
    async def main() -> Any:
        async with client(sim) as c:
            return await c.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Review)

    completion = run(main())
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Review) and 1 <= parsed.score <= 5


def test_json_object_mode_and_invalid_json_rate(simulator: ConfigureSimulator) -> None:
    async def ask(sim: SimulatorProcess) -> list[str]:
        async with client(sim) as c:
            out = []
            for i in range(4):
                completion = await c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"question {i}"}],
                    response_format={"type": "json_object"},
                )
                out.append(completion.choices[0].message.content or "")
            return out

    for answer in run(ask(simulator(invalid_json_rate=0.0))):
        assert isinstance(json.loads(answer), dict)
    for answer in run(ask(simulator(invalid_json_rate=1.0))):
        with pytest.raises(json.JSONDecodeError):
            json.loads(answer)


def test_raw_wire_format(sim: SimulatorProcess) -> None:
    """Fields a non-SDK client (or batchdb's own provider code) may read directly."""

    async def main() -> dict[str, Any]:
        async with client(sim) as c:
            raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, n=2, seed=7)
            body: dict[str, Any] = json.loads(raw.content)
            return body

    body = run(main())
    assert body["object"] == "chat.completion" and isinstance(body["created"], int)
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
