"""Rate limits enforced over real sockets: clients hammer, the simulator holds the line.

Each test fires requests as fast as a few concurrent SDK clients can for a couple
of seconds, then checks three things: what got through fits the smoothed limit,
everything else was a 429, and `/_sim/stats` agrees with what the clients saw.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from batchdb.simulator import Limits, SimulatorConfig, SimulatorProcess

from .conftest import ConfigureSimulator, sliding_maximum

MODEL = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Classify: great product, arrived late."}]


async def hammer(
    sim: SimulatorProcess, seconds: float, *, concurrency: int = 16, **params: Any
) -> tuple[Counter[str], float]:
    """Send requests back to back from ``concurrency`` tasks; count outcomes by type."""
    seen: Counter[str] = Counter()
    async with openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-load", max_retries=0) as client:
        started = time.monotonic()
        deadline = started + seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    await client.chat.completions.create(model=MODEL, messages=MESSAGES, **params)
                    seen["ok"] += 1
                except openai.RateLimitError as exc:
                    assert exc.code == "rate_limit_exceeded"
                    assert int(exc.response.headers["retry-after-ms"]) > 0
                    seen[f"429 {exc.type}"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return seen, time.monotonic() - started


def assert_stats_match(sim: SimulatorProcess, seen: Counter[str]) -> dict[str, Any]:
    stats = sim.stats()
    totals = stats["totals"]
    rejected = sum(n for outcome, n in seen.items() if outcome.startswith("429"))
    assert totals["accepted"] == seen["ok"] == totals["admitted"]
    assert totals["rate_limited"] == rejected
    assert totals["requests"] == seen["ok"] + rejected
    return stats


def test_rpm_is_smoothed_over_one_second_windows(simulator: ConfigureSimulator) -> None:
    sim = simulator(SimulatorConfig(default_limits=Limits(rpm=120), count_rejected=False))
    seen, elapsed = asyncio.run(hammer(sim, 3.0, max_tokens=16))

    # 120 RPM = burst of 2, then 2 per second: about 8 in 3 s, not 120. How many the client got depends
    # on how steadily it could send (a busy machine sends in fits), so the count is bounded from above
    # only; that the bucket refilled shows as admissions in more than one second.
    assert 3 <= seen["ok"] <= 2 + 2 * elapsed + 1
    assert seen["429 requests"] > 50
    stats = assert_stats_match(sim, seen)
    assert sliding_maximum(stats["series"], "admitted") <= 120
    assert max(entry["admitted"] for entry in stats["series"]) <= 4  # never more than burst + rate in a second
    assert len([entry for entry in stats["series"] if entry["admitted"]]) >= 2


def test_hammering_clients_stay_locked_out_when_rejections_count(simulator: ConfigureSimulator) -> None:
    sim = simulator(SimulatorConfig(default_limits=Limits(rpm=120)))  # count_rejected defaults to True
    seen, _ = asyncio.run(hammer(sim, 2.0, max_tokens=16))

    assert seen["ok"] <= 3  # the burst, then every 429 drains what refilled
    assert_stats_match(sim, seen)


def test_tpm_charges_prompt_plus_max_tokens_on_arrival(simulator: ConfigureSimulator) -> None:
    sim = simulator(SimulatorConfig(default_limits=Limits(rpm=10_000, tpm=240_000), count_rejected=False))
    seen, elapsed = asyncio.run(hammer(sim, 3.0, max_tokens=4_000))

    # Each request charges ~4,015 tokens against 4,000 tokens/s: about one per second (at most; a client
    # that could not send steadily gets fewer).
    assert 2 <= seen["ok"] <= 1 + elapsed + 1
    assert seen["429 tokens"] > 50 and seen["429 requests"] == 0
    stats = assert_stats_match(sim, seen)
    assert sliding_maximum(stats["series"], "charged_tokens") <= 240_000
    assert stats["totals"]["completion_tokens"] <= seen["ok"] * 4_000


def test_no_sixty_second_window_exceeds_rpm_even_with_a_minute_long_burst(simulator: ConfigureSimulator) -> None:
    """With a 60 s burst window the bucket alone would allow RPM + refill; the window caps it at RPM."""
    sim = simulator(SimulatorConfig(default_limits=Limits(rpm=30), burst_window_s=60.0, count_rejected=False))
    seen, _ = asyncio.run(hammer(sim, 2.5, concurrency=8, max_tokens=16))

    assert seen["ok"] == 30
    stats = assert_stats_match(sim, seen)
    assert sliding_maximum(stats["series"], "admitted") == 30


def test_keys_and_models_have_separate_limits(simulator: ConfigureSimulator) -> None:
    sim = simulator(SimulatorConfig(default_limits=Limits(rpm=60)))

    async def main() -> list[bool]:
        results = []
        for key, model in [("sk-a", "m1"), ("sk-a", "m1"), ("sk-b", "m1"), ("sk-a", "m2")]:
            async with openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key=key, max_retries=0) as client:
                try:
                    await client.chat.completions.create(model=model, messages=MESSAGES)
                    results.append(True)
                except openai.RateLimitError:
                    results.append(False)
        return results

    assert asyncio.run(main()) == [True, False, True, True]
    rows = {(row["key"], row["model"]): row for row in sim.stats()["by_key_model"]}
    assert rows[("sk-a", "m1")]["rate_limited"] == 1 and rows[("sk-b", "m1")]["accepted"] == 1
