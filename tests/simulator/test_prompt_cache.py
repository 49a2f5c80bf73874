"""Cached prompt tokens, reported as OpenAI / Azure OpenAI and Gemini 2.5+ report them.

The wire behaviour goes through the official SDKs (openai, google-genai) against the shared
simulator; the cache's exact time-to-live and eviction rules are checked in-process on a fake
clock, where they cannot depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import openai
import pytest
from google import genai
from google.genai import types
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from batchdb.simulator import SimulatorConfig, SimulatorProcess, content
from batchdb.simulator.prompt_cache import (
    PromptCache,
    gemini_caches_implicitly,
    gemini_prompt_ids,
    openai_prompt_ids,
)
from batchdb.tokens import REPLY_PRIMING_TOKENS, count_gemini_contents, count_openai_messages, count_text

from .conftest import ConfigureSimulator

T = TypeVar("T")
MODEL = "gpt-4o-mini"
GEMINI_MODEL = "gemini-2.5-flash"
STEP = 128


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def text_of(n_tokens: int, seed: int = 0) -> str:
    text = content.text_of_tokens(random.Random(seed), n_tokens)
    assert count_text(text) == n_tokens
    return text


def expected_hit(shared_prefix: int, minimum: int) -> int:
    """What the providers report for a prompt whose first ``shared_prefix`` tokens were seen:
    the longest of minimum, minimum + 128, ... that fits in the shared prefix (0 if none does)."""
    if shared_prefix < minimum:
        return 0
    return minimum + (shared_prefix - minimum) // STEP * STEP


SYSTEM_PROMPT = text_of(1500)


def chat(user: str, system: str = SYSTEM_PROMPT) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def cached(completion: ChatCompletion) -> int:
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    return completion.usage.prompt_tokens_details.cached_tokens or 0


def client(sim: SimulatorProcess, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key=key, max_retries=0)


# -- OpenAI / Azure OpenAI, through the openai SDK -----------------------------------------------


def test_a_repeated_system_prompt_is_cached_in_128_token_steps(simulator: ConfigureSimulator) -> None:
    sim = simulator()
    first_messages = chat("Alpha: is this review positive?")
    second_messages = chat("Bravo: summarise the complaint.")

    async def main() -> tuple[ChatCompletion, ChatCompletion, ChatCompletion]:
        async with client(sim) as c:
            first = await c.chat.completions.create(model=MODEL, messages=first_messages, max_tokens=5)
            second = await c.chat.completions.create(model=MODEL, messages=second_messages, max_tokens=5)
            again = await c.chat.completions.create(model=MODEL, messages=second_messages, max_tokens=5)
            return first, second, again

    first, second, again = run(main())
    # The system message with its framing tokens is shared; the user message (and the reply
    # priming) is not, beyond its own framing, which adds less than one more 128-token step.
    system_tokens = count_openai_messages(first_messages[:1])[0] - REPLY_PRIMING_TOKENS
    assert system_tokens == 1500 + 4  # content, role and three framing tokens
    assert cached(first) == 0
    assert cached(second) == expected_hit(system_tokens, 1024) == 1408
    # An identical prompt hits up to its last whole step, never more than the prompt.
    prompt_tokens = count_openai_messages(second_messages)[0]
    assert cached(again) == expected_hit(prompt_tokens, 1024) <= prompt_tokens
    # prompt_tokens still counts every prompt token, cached ones included.
    assert second.usage is not None and second.usage.prompt_tokens == prompt_tokens
    assert second.usage.total_tokens == prompt_tokens + second.usage.completion_tokens
    assert sim.stats(series=False)["totals"]["cached_tokens"] == cached(second) + cached(again)


def test_a_prompt_under_1024_tokens_never_hits(simulator: ConfigureSimulator) -> None:
    sim = simulator()
    messages = chat("Alpha", system=text_of(1000))
    assert count_openai_messages(messages)[0] < 1024

    async def main() -> list[ChatCompletion]:
        async with client(sim) as c:
            return [await c.chat.completions.create(model=MODEL, messages=messages) for _ in range(3)]

    assert [cached(c) for c in run(main())] == [0, 0, 0]


def test_the_cache_is_per_key_and_model(simulator: ConfigureSimulator) -> None:
    sim = simulator()
    messages = chat("Alpha")

    async def main() -> dict[str, int]:
        async with client(sim, "sk-a") as a, client(sim, "sk-b") as b:
            await a.chat.completions.create(model=MODEL, messages=messages)
            other_key = await b.chat.completions.create(model=MODEL, messages=messages)
            other_model = await a.chat.completions.create(model="gpt-4o", messages=messages)
            same = await a.chat.completions.create(model=MODEL, messages=messages)
            return {"other key": cached(other_key), "other model": cached(other_model), "same": cached(same)}

    hits = run(main())
    assert hits == {"other key": 0, "other model": 0, "same": expected_hit(count_openai_messages(messages)[0], 1024)}
    assert hits["same"] >= 1408


def test_azure_deployments_cache_too(simulator: ConfigureSimulator) -> None:
    sim = simulator()

    async def main() -> list[ChatCompletion]:
        async with openai.AsyncAzureOpenAI(
            azure_endpoint=sim.azure_endpoint, api_key="azure-key", api_version="2024-10-21", max_retries=0
        ) as az:
            return [
                await az.chat.completions.create(model="prod-gpt4o", messages=chat(user)) for user in ("Alpha", "Bravo")
            ]

    assert [cached(c) for c in run(main())] == [0, 1408]


def test_a_prefix_unused_for_the_ttl_misses_again(simulator: ConfigureSimulator) -> None:
    """The wait is a lower bound on the gap the simulator sees (it stamps the first prompt before
    answering it, and the second arrives after the answer plus the wait), so a slow machine can only
    widen the gap: the miss cannot be flaky. That a prefix used within the TTL hits is checked above
    (the default TTL is 300 s) and, at the exact boundary, on a fake clock below."""
    ttl_s = 0.2
    sim = simulator(prompt_cache_ttl_s=ttl_s)

    async def main() -> tuple[ChatCompletion, ChatCompletion]:
        async with client(sim) as c:
            first = await c.chat.completions.create(model=MODEL, messages=chat("Alpha"))
            await asyncio.sleep(ttl_s * 1.5)
            later = await c.chat.completions.create(model=MODEL, messages=chat("Bravo"))
            return first, later

    first, later = run(main())
    assert (cached(first), cached(later)) == (0, 0)


def test_prompt_cache_off_reports_nothing_cached(simulator: ConfigureSimulator) -> None:
    sim = simulator(prompt_cache=False)

    async def main() -> list[ChatCompletion]:
        async with client(sim) as c:
            return [await c.chat.completions.create(model=MODEL, messages=chat("Alpha")) for _ in range(2)]

    assert [cached(c) for c in run(main())] == [0, 0]
    assert sim.stats(series=False)["totals"]["cached_tokens"] == 0


def test_raw_usage_field(simulator: ConfigureSimulator) -> None:
    """The wire field batchdb's own provider code reads, without the SDK in between."""
    sim = simulator()

    async def main() -> list[dict[str, Any]]:
        async with client(sim) as c:
            bodies = []
            for user in ("Alpha", "Bravo"):
                raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=chat(user))
                bodies.append(json.loads(raw.content)["usage"])
            return bodies

    first, second = run(main())
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": 1408}


# -- Gemini, through google-genai ------------------------------------------------------------------


def gemini(sim: SimulatorProcess, key: str = "g-test") -> genai.client.AsyncClient:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=sim.base_url)).aio


GEMINI_SYSTEM = text_of(2500, seed=1)


async def generate(client: genai.client.AsyncClient, user: str, model: str = GEMINI_MODEL, system: str = "") -> Any:
    return await client.models.generate_content(
        model=model,
        contents=user,
        config=types.GenerateContentConfig(system_instruction=system or GEMINI_SYSTEM, max_output_tokens=5),
    )


def test_gemini_implicit_cache_hit_from_2048_tokens(simulator: ConfigureSimulator) -> None:
    sim = simulator()

    async def main() -> list[Any]:
        async with gemini(sim) as g:
            # The user texts differ in their first token, so exactly the system instruction is shared.
            return [await generate(g, user) for user in ("Alpha: classify.", "Bravo: summarise.")]

    first, second = run(main())
    assert first.usage_metadata.cached_content_token_count is None  # absent when 0, as Gemini sends it
    assert second.usage_metadata.cached_content_token_count == expected_hit(2500, 2048) == 2432
    prompt_tokens = count_gemini_contents("Bravo: summarise.", GEMINI_SYSTEM)[0]
    assert second.usage_metadata.prompt_token_count == prompt_tokens  # cached tokens included
    assert second.usage_metadata.total_token_count == prompt_tokens + second.usage_metadata.candidates_token_count


def test_gemini_minimum_is_2048_and_per_key_and_model(simulator: ConfigureSimulator) -> None:
    sim = simulator()
    short_system = text_of(2000, seed=2)  # enough for OpenAI, not for Gemini 2.5

    async def main() -> dict[str, int | None]:
        async with gemini(sim, "g-a") as a, gemini(sim, "g-b") as b:
            await generate(a, "Alpha", system=short_system)
            short = await generate(a, "Alpha", system=short_system)
            await generate(a, "Alpha")
            other_key = await generate(b, "Alpha")
            other_model = await generate(a, "Alpha", model="gemini-2.5-pro")
            same = await generate(a, "Alpha")
            return {
                name: response.usage_metadata.cached_content_token_count
                for name, response in [("short", short), ("key", other_key), ("model", other_model), ("same", same)]
            }

    hits = run(main())
    assert hits == {"short": None, "key": None, "model": None, "same": expected_hit(2500 + 1, 2048)}


def test_gemini_2_0_has_no_implicit_cache_and_the_minimum_is_configurable(simulator: ConfigureSimulator) -> None:
    sim = simulator(prompt_cache_min_tokens_gemini=1024)
    short_system = text_of(2000, seed=2)

    async def main() -> list[int | None]:
        async with gemini(sim) as g:
            old = [await generate(g, user, model="gemini-2.0-flash") for user in ("Alpha", "Bravo")]
            new = [await generate(g, user, system=short_system) for user in ("Alpha", "Bravo")]
            return [r.usage_metadata.cached_content_token_count for r in old + new]

    assert run(main()) == [None, None, None, expected_hit(2000, 1024)]


# -- In-process: ids, boundaries, time to live, eviction ----------------------------------------


def test_prompt_ids_are_as_many_as_the_counted_prompt_tokens() -> None:
    """The cache's boundaries are counted in the same tokens as the usage it reports."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    messages: list[Any] = [
        {"role": "system", "content": text_of(300)},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "lookup"}}]},
        "not a message",
    ]
    assert len(openai_prompt_ids(messages, tools)) == count_openai_messages(messages, tools)[0]
    assert len(openai_prompt_ids(messages)) == count_openai_messages(messages)[0]
    contents = [
        {"role": "user", "parts": [{"text": "caption"}, {"inlineData": {"mimeType": "image/png", "data": "AA=="}}]},
        "plain text",
        {"role": "model", "parts": [{"text": text_of(50)}, "junk"]},
    ]
    for system in (None, "Be brief.", {"parts": [{"text": "Be brief."}]}):
        assert len(gemini_prompt_ids(contents, system)) == count_gemini_contents(contents, system)[0]


def test_different_images_do_not_share_a_prefix() -> None:
    def message(url: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    a, b = openai_prompt_ids(message("https://a")), openai_prompt_ids(message("https://b"))
    assert len(a) == len(b) and a != b


def serve(cache: PromptCache, ids: list[int], now: float, scope: str = "k", ttl_s: float = 300.0) -> int:
    return cache.serve(("openai", scope, MODEL), ids, n_tokens=len(ids), minimum=1024, step=STEP, ttl_s=ttl_s, now=now)


def test_time_to_live_counts_from_the_last_use() -> None:
    cache = PromptCache()
    ids = list(range(1500))
    assert serve(cache, ids, now=0.0) == 0
    assert serve(cache, ids, now=299.5) == 1408  # used again: the 300 s start over
    assert serve(cache, ids, now=599.0) == 1408
    assert serve(cache, ids, now=899.0) == 0  # exactly the TTL of disuse: gone
    assert serve(cache, ids, now=900.0) == 1408  # the miss stored it afresh


def test_the_longest_matching_step_wins_and_short_prompts_store_nothing() -> None:
    cache = PromptCache()
    base = list(range(3000))
    assert serve(cache, base[:1023], now=0.0) == 0 and len(cache) == 0  # under the minimum: no work at all
    assert serve(cache, base[:1100], now=1.0) == 0  # stores the 1024 prefix
    assert serve(cache, [*base[:2000], 7], now=2.0) == 1024
    assert serve(cache, base[:1700] + [-1 % 2**32] * 300, now=3.0) == 1664  # diverges at 1700
    assert serve(cache, base, now=4.0) == 1920  # the 2001-token prompt stored up to 1920
    ids_called = []

    def ids() -> list[int]:
        ids_called.append(True)
        return base

    assert cache.serve(("openai", "k", MODEL), ids, n_tokens=1000, minimum=1024, step=STEP, ttl_s=1, now=5) == 0
    assert ids_called == []  # a prompt under the minimum is never tokenized


def test_expired_and_least_recently_used_prefixes_are_evicted() -> None:
    cache = PromptCache(max_entries=10)
    a, b = list(range(2048)), list(range(10_000, 12_048))  # 9 boundaries each
    serve(cache, a, now=0.0)
    serve(cache, b, now=1.0)
    assert len(cache) == 10  # a's oldest boundaries made room for b's
    assert serve(cache, a, now=2.0) == 2048  # a's longest boundaries were used last, so they survived
    assert serve(cache, b, now=500.0, ttl_s=300.0) == 0  # expired
    assert len(cache) == 9  # only b's fresh boundaries remain: a's expired ones went from the front


def test_config_fields_round_trip_and_validate() -> None:
    config = SimulatorConfig(prompt_cache=False, prompt_cache_ttl_s=60, prompt_cache_min_tokens_gemini=4096)
    assert SimulatorConfig.from_dict(json.loads(config.to_json())) == config
    defaults = SimulatorConfig()
    assert (defaults.prompt_cache, defaults.prompt_cache_ttl_s, defaults.prompt_cache_step_tokens) == (True, 300.0, 128)
    assert (defaults.prompt_cache_min_tokens_openai, defaults.prompt_cache_min_tokens_gemini) == (1024, 2048)
    with pytest.raises(ValueError):
        SimulatorConfig(prompt_cache_ttl_s=-1)
    with pytest.raises(ValueError):
        SimulatorConfig(prompt_cache_step_tokens=0)


def test_which_gemini_models_cache_implicitly() -> None:
    assert gemini_caches_implicitly("gemini-2.5-flash") and gemini_caches_implicitly("gemini-3-pro-preview")
    assert not gemini_caches_implicitly("gemini-2.0-flash") and not gemini_caches_implicitly("gemini-1.5-pro")
