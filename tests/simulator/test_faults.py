"""Injected trouble: outage windows, seeded error rates, connection resets, latency."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from google import genai
from google.genai import errors, types
from openai.types.chat import ChatCompletionMessageParam

from batchdb.simulator import Distribution, ErrorRates, Outage, SimulatorConfig, SimulatorProcess

from .conftest import ConfigureSimulator

MODEL = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "ping"}]


async def outcome(client: openai.AsyncOpenAI) -> str:
    try:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        return "ok"
    except openai.APIStatusError as exc:
        return f"{exc.status_code} {exc.code}" if exc.code else str(exc.status_code)
    except openai.APIConnectionError:
        return "reset"


def client(sim: SimulatorProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-test", max_retries=0)


def test_configured_outage_returns_503_then_recovers(simulator: ConfigureSimulator) -> None:
    sim = simulator(SimulatorConfig(outage=Outage(start_s=0.0, duration_s=1.0)))

    async def main() -> tuple[str, str]:
        async with client(sim) as c:
            during = await outcome(c)
            await asyncio.sleep(1.1)
            return during, await outcome(c)

    assert asyncio.run(main()) == ("503 server_is_overloaded", "ok")
    outcomes = sim.stats()["outcomes"]
    assert (outcomes["outage"], outcomes["accepted"]) == (1, 1)


def test_outage_toggled_at_runtime_for_both_wire_formats(sim: SimulatorProcess) -> None:
    async def main() -> tuple[str, int, str]:
        async with (
            client(sim) as c,
            genai.Client(api_key="g", http_options=types.HttpOptions(base_url=sim.base_url)).aio as g,
        ):
            sim.set_config(outage=Outage())  # from now until removed
            during = await outcome(c)
            with pytest.raises(errors.ServerError) as gemini_error:
                await g.models.generate_content(model="gemini-2.0-flash", contents="hi")
            sim.set_config(outage=None)
            return during, gemini_error.value.code, await outcome(c)

    during, gemini_code, after = asyncio.run(main())
    assert (during, gemini_code, after) == ("503 server_is_overloaded", 503, "ok")


def test_error_rates_are_deterministic_with_a_seed(simulator: ConfigureSimulator) -> None:
    def pattern(sim: SimulatorProcess) -> list[str]:
        async def main() -> list[str]:
            async with client(sim) as c:
                return [await outcome(c) for _ in range(30)]

        return asyncio.run(main())

    rates = ErrorRates(http_500=0.2, http_503=0.2, connection_reset=0.1)
    first = pattern(simulator(SimulatorConfig(seed=42, error_rates=rates)))
    second = pattern(simulator(SimulatorConfig(seed=42, error_rates=rates)))
    other_seed = pattern(simulator(SimulatorConfig(seed=43, error_rates=rates)))

    assert first == second != other_seed
    assert {"ok", "500", "503 server_is_overloaded", "reset"} <= set(first)


def test_stats_classify_injected_faults(simulator: ConfigureSimulator) -> None:
    sim = simulator(SimulatorConfig(seed=1, error_rates=ErrorRates(http_500=0.3, connection_reset=0.3)))

    async def main() -> list[str]:
        async with client(sim) as c:
            return [await outcome(c) for _ in range(40)]

    seen = asyncio.run(main())
    stats = sim.stats()
    assert stats["outcomes"]["server_error"] == seen.count("500")
    assert stats["outcomes"]["connection_reset"] == seen.count("reset")
    assert stats["totals"]["accepted"] == seen.count("ok")
    assert stats["totals"]["errors"] == seen.count("500") + seen.count("reset")


def test_latency_is_applied_after_admission(simulator: ConfigureSimulator) -> None:
    sim = simulator(SimulatorConfig(latency_s=Distribution(kind="uniform", low=0.3, high=0.4)))

    async def main() -> float:
        async with client(sim) as c:
            started = time.monotonic()
            results = await asyncio.gather(*(outcome(c) for _ in range(5)))
            assert results == ["ok"] * 5
            return time.monotonic() - started

    elapsed = asyncio.run(main())
    assert 0.3 <= elapsed < 1.0  # concurrent requests wait in parallel
