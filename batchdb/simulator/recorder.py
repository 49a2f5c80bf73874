"""What the simulator served, per second and per (api key, model), for `/_sim/stats`.

Seconds are the rate limiter's seconds (whole seconds since start, by arrival
time), so a sliding sum over 60 consecutive entries of ``admitted`` or
``charged_tokens`` can be compared directly with the RPM/TPM limits.
Recording is O(1) per request; the JSON is built only when asked for.

`bill_usd` prices those counters the way a provider's invoice does, from its published
per-token prices (`TokenPrices`, read from a LiteLLM-format price map such as
batchdb/price_list.json). It uses nothing of batchdb's: no row, total or pricing rule, so a
benchmark can hold batchdb's recorded cost against it (bench/cost.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"  # 200
    RATE_LIMITED = "rate_limited"  # 429 from the limiter
    QUOTA_EXCEEDED = "quota_exceeded"  # 429 insufficient_quota / out-of-quota Gemini key
    SERVER_ERROR = "server_error"  # injected 500/503
    CONNECTION_RESET = "connection_reset"  # injected: transport aborted, no response
    OUTAGE = "outage"  # 503 during an outage window
    CLIENT_ERROR = "client_error"  # 400/401/404: bad key, bad body, context too long


# Counter positions in a bucket.
COUNTERS = (
    "requests",  # everything that reached a provider route
    "admitted",  # passed the rate limiter (and was charged)
    "accepted",  # answered 200
    "rate_limited",  # answered 429 (limits or quota)
    "errors",  # anything else: 4xx, 5xx, resets
    "prompt_tokens",  # of accepted requests
    "completion_tokens",  # of accepted requests
    "charged_tokens",  # what admitted requests cost against TPM
    "cached_tokens",  # of accepted requests: prompt tokens reported as cached (included in prompt_tokens)
    # Lines of batches (Batch APIs), counted apart: they bill at the batch price and use no online quota.
    # A line counts in the second it was answered; the online counters above never include it.
    "batch_requests",  # lines answered (succeeded or failed; not expired or cancelled lines)
    "batch_failed",  # of those, answered with an error (injected server error, 400 for the line)
    "batch_prompt_tokens",  # of succeeded lines
    "batch_completion_tokens",  # of succeeded lines
    "batch_cached_tokens",  # of succeeded lines (included in batch_prompt_tokens)
)
(
    _REQUESTS, _ADMITTED, _ACCEPTED, _RATE_LIMITED, _ERRORS, _PROMPT, _COMPLETION, _CHARGED, _CACHED,
    _BATCH_REQUESTS, _BATCH_FAILED, _BATCH_PROMPT, _BATCH_COMPLETION, _BATCH_CACHED,
) = range(len(COUNTERS))  # fmt: skip
_COLUMN = {
    Outcome.ACCEPTED: _ACCEPTED,
    Outcome.RATE_LIMITED: _RATE_LIMITED,
    Outcome.QUOTA_EXCEEDED: _RATE_LIMITED,
}


class Recorder:
    def __init__(self) -> None:
        self._buckets: dict[tuple[int, str, str], list[int]] = {}
        self._outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)

    def record(
        self,
        second: int,
        key: str,
        model: str,
        outcome: Outcome,
        *,
        admitted: bool = False,
        charged_tokens: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> None:
        bucket = self._bucket(second, key, model)
        bucket[_REQUESTS] += 1
        bucket[_COLUMN.get(outcome, _ERRORS)] += 1
        if admitted:
            bucket[_ADMITTED] += 1
            bucket[_CHARGED] += charged_tokens
        if outcome is Outcome.ACCEPTED:
            bucket[_PROMPT] += prompt_tokens
            bucket[_COMPLETION] += completion_tokens
            bucket[_CACHED] += cached_tokens
        self._outcomes[outcome] += 1

    def record_batch_line(
        self,
        second: int,
        key: str,
        model: str,
        *,
        ok: bool,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> None:
        """One answered line of a batch; tokens count for succeeded lines only (what is billed)."""
        bucket = self._bucket(second, key, model)
        bucket[_BATCH_REQUESTS] += 1
        if ok:
            bucket[_BATCH_PROMPT] += prompt_tokens
            bucket[_BATCH_COMPLETION] += completion_tokens
            bucket[_BATCH_CACHED] += cached_tokens
        else:
            bucket[_BATCH_FAILED] += 1

    def _bucket(self, second: int, key: str, model: str) -> list[int]:
        bucket = self._buckets.get((second, key, model))
        if bucket is None:
            bucket = self._buckets[(second, key, model)] = [0] * len(COUNTERS)
        return bucket

    def stats(self, *, include_series: bool = True) -> dict[str, Any]:
        """``totals``, ``outcomes``, ``by_key_model`` and (optionally) the per-second ``series``."""
        totals = [0] * len(COUNTERS)
        per_key_model: dict[tuple[str, str], list[int]] = {}
        series: list[dict[str, Any]] = []
        for (second, key, model), bucket in sorted(self._buckets.items()):
            group = per_key_model.setdefault((key, model), [0] * len(COUNTERS))
            for i, value in enumerate(bucket):
                totals[i] += value
                group[i] += value
            if include_series:
                series.append({"t": second, "key": key, "model": model, **dict(zip(COUNTERS, bucket, strict=True))})
        result: dict[str, Any] = {
            "totals": dict(zip(COUNTERS, totals, strict=True)),
            "outcomes": {outcome.value: n for outcome, n in self._outcomes.items()},
            "by_key_model": [
                {"key": key, "model": model, **dict(zip(COUNTERS, values, strict=True))}
                for (key, model), values in sorted(per_key_model.items())
            ],
        }
        if include_series:
            result["series"] = series
        return result


# -- the bill ---------------------------------------------------------------------------------------------


def _per_token(entry: Mapping[str, Any], name: str) -> Decimal | None:
    value = entry.get(name)
    return None if value is None else Decimal(str(value))


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """One model's published prices, USD per token, as a provider's price page lists them."""

    input: Decimal
    output: Decimal
    # Prompt tokens served from the prompt cache; None: billed as input.
    cached_input: Decimal | None = None
    # Batch API lines; None: billed at the online prices.
    batch_input: Decimal | None = None
    batch_output: Decimal | None = None

    @classmethod
    def from_price_map(cls, entry: Mapping[str, Any]) -> TokenPrices:
        """From one model's entry of a LiteLLM-format price map (``input_cost_per_token``,
        ``output_cost_per_token``, ``cache_read_input_token_cost``, ``input_cost_per_token_batches``,
        ``output_cost_per_token_batches``).

            >>> TokenPrices.from_price_map({"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07}).input
            Decimal('1.5E-7')
        """
        return cls(
            input=Decimal(str(entry["input_cost_per_token"])),
            output=Decimal(str(entry["output_cost_per_token"])),
            cached_input=_per_token(entry, "cache_read_input_token_cost"),
            batch_input=_per_token(entry, "input_cost_per_token_batches"),
            batch_output=_per_token(entry, "output_cost_per_token_batches"),
        )


def bill_usd(counters: Mapping[str, int], prices: TokenPrices) -> Decimal:
    """What these counters (``totals`` or one ``by_key_model`` entry of `Recorder.stats`) are billed, exactly.

    Online: uncached prompt tokens at the input price, cached ones at the cached-input price,
    completion tokens at the output price, for accepted requests (a 429, 4xx or 5xx is not billed).
    Batch lines that succeeded: the same at the batch prices; a cached prompt token in a batch is
    billed at the cached-input price scaled as the batch input price is (OpenAI halves both).

        >>> p = TokenPrices(Decimal("1.5E-7"), Decimal("6E-7"), Decimal("7.5E-8"), Decimal("7.5E-8"), Decimal("3E-7"))
        >>> bill_usd({"prompt_tokens": 1_000, "cached_tokens": 0, "completion_tokens": 200}, p)
        Decimal('0.0002700000')
        >>> bill_usd({"batch_prompt_tokens": 1_000, "batch_completion_tokens": 200}, p)
        Decimal('0.0001350000')
    """
    cached_input = prices.input if prices.cached_input is None else prices.cached_input
    batch_input = prices.input if prices.batch_input is None else prices.batch_input
    batch_output = prices.output if prices.batch_output is None else prices.batch_output
    batch_cached = cached_input * batch_input / prices.input if prices.input else batch_input

    def part(prompt: int, cached: int, completion: int, input_: Decimal, cached_: Decimal, output: Decimal) -> Decimal:
        return (prompt - cached) * input_ + cached * cached_ + completion * output

    online = part(
        counters.get("prompt_tokens", 0),
        counters.get("cached_tokens", 0),
        counters.get("completion_tokens", 0),
        prices.input,
        cached_input,
        prices.output,
    )
    batch = part(
        counters.get("batch_prompt_tokens", 0),
        counters.get("batch_cached_tokens", 0),
        counters.get("batch_completion_tokens", 0),
        batch_input,
        batch_cached,
        batch_output,
    )
    return online + batch
