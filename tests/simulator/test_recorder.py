"""The simulator's own bill (batchdb/simulator/recorder.py: `TokenPrices`, `bill_usd`).

bench/cost.py holds batchdb's recorded cost against this bill, so the bill must be what the
provider's price page gives for what the simulator served: checked here by hand on the counters,
and end to end through the openai SDK (online calls with a cached prefix, and a batch) against
each response's own usage.
"""

from __future__ import annotations

import io
import json
import time
from decimal import Decimal
from importlib import resources
from typing import Any

import openai

from batchdb.simulator import Distribution
from batchdb.simulator.recorder import Outcome, Recorder, TokenPrices, bill_usd

from .conftest import ConfigureSimulator

MODEL = "gpt-4o-mini"
# USD per token, as OpenAI lists gpt-4o-mini: $0.15 / $0.60 per million, cached input $0.075, batch half.
PRICES = TokenPrices(
    input=Decimal("0.00000015"),
    output=Decimal("0.0000006"),
    cached_input=Decimal("0.000000075"),
    batch_input=Decimal("0.000000075"),
    batch_output=Decimal("0.0000003"),
)


def test_prices_come_from_the_packaged_price_map() -> None:
    price_map = json.loads(resources.files("batchdb").joinpath("price_list.json").read_text())
    assert TokenPrices.from_price_map(price_map[MODEL]) == PRICES
    bare = TokenPrices.from_price_map({"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06})
    assert (bare.cached_input, bare.batch_input, bare.batch_output) == (None, None, None)


def test_the_bill_prices_what_was_served_and_nothing_refused() -> None:
    recorder = Recorder()
    recorder.record(0, "k", MODEL, Outcome.ACCEPTED, admitted=True, prompt_tokens=2_000, completion_tokens=100)
    recorder.record(1, "k", MODEL, Outcome.ACCEPTED, admitted=True, prompt_tokens=2_000, completion_tokens=100,
                    cached_tokens=1_024)  # fmt: skip
    recorder.record(1, "k", MODEL, Outcome.RATE_LIMITED, charged_tokens=5_000)  # a 429 is not billed
    recorder.record(1, "k", MODEL, Outcome.SERVER_ERROR, admitted=True, charged_tokens=5_000)  # nor a 500
    recorder.record_batch_line(2, "k", MODEL, ok=True, prompt_tokens=1_500, completion_tokens=40, cached_tokens=1_152)
    recorder.record_batch_line(2, "k", MODEL, ok=False)  # a failed line is not billed
    totals = recorder.stats(include_series=False)["totals"]

    online = (4_000 - 1_024) * Decimal("0.15") + 1_024 * Decimal("0.075") + 200 * Decimal("0.6")
    # In a batch every price is halved, the cached-input price too.
    batch = (1_500 - 1_152) * Decimal("0.075") + 1_152 * Decimal("0.0375") + 40 * Decimal("0.3")
    assert bill_usd(totals, PRICES) == (online + batch) / 1_000_000
    [entry] = recorder.stats(include_series=False)["by_key_model"]
    assert bill_usd(entry, PRICES) == bill_usd(totals, PRICES)
    # Without a cached or batch price listed, those tokens are billed at the plain prices.
    plain = TokenPrices(input=PRICES.input, output=PRICES.output)
    assert bill_usd(totals, plain) == (5_500 * Decimal("0.15") + 240 * Decimal("0.6")) / 1_000_000


def cost_of(usage: dict[str, Any], *, batch: bool) -> Decimal:
    """One response's cost by hand from its own usage (per million tokens)."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    factor = Decimal("0.5") if batch else Decimal(1)
    return (
        factor
        * (
            (usage["prompt_tokens"] - cached) * Decimal("0.15")
            + cached * Decimal("0.075")
            + usage["completion_tokens"] * Decimal("0.6")
        )
        / 1_000_000
    )


def test_the_bill_equals_the_responses_usage_priced_online_and_in_a_batch(simulator: ConfigureSimulator) -> None:
    sim = simulator(
        batch_validation_s=0.05,
        batch_duration_s=Distribution(kind="fixed", value=0.2),
        batch_finalizing_s=0.05,
        output_tokens=Distribution(kind="uniform", low=5, high=30),
    )
    prefix = "Background for every question. " * 300  # about 1,800 tokens: the prompt cache can hit
    texts = [f"{prefix} Question {i}: is this fine?" for i in range(4)]
    expected = Decimal(0)
    with openai.OpenAI(base_url=sim.openai_base_url, api_key="sk-bill", max_retries=0) as client:
        for text in texts:
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
            assert reply.usage is not None
            expected += cost_of(reply.usage.model_dump(), batch=False)
        lines = [
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": text + " Again."}]},
            }
            for i, text in enumerate(texts)
        ]
        data = "\n".join(json.dumps(line) for line in lines).encode()
        file_id = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 30
        while (batch := client.batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline, batch.status
            time.sleep(0.05)
        assert batch.output_file_id is not None
        for raw in client.files.content(batch.output_file_id).text.splitlines():
            expected += cost_of(json.loads(raw)["response"]["body"]["usage"], batch=True)
    totals = sim.stats(series=False)["totals"]
    assert totals["cached_tokens"] > 0 and totals["batch_cached_tokens"] > 0  # both cached prices were used
    assert bill_usd(totals, PRICES) == expected


def test_the_examples_in_the_docstrings_run() -> None:
    import doctest

    from batchdb.simulator import recorder

    result = doctest.testmod(recorder)
    assert result.attempted >= 3 and result.failed == 0
