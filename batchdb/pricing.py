"""What a call costs: the one rule every part of batchdb prices tokens with.

Recorded costs are computed in PostgreSQL by `batchdb.call_cost_usd` (completions,
sql/migrations/0016_cached_and_batch_pricing.sql); the worker's budget reservation and
the dashboard's estimate of what queued rows will cost are computed here, before any
row is written. `tests/test_pricing.py` holds the two to the same answers.

- cost: uncached prompt tokens at the input price, the prompt tokens the provider served
  from its prompt cache at the cached-input price (the input price when none is listed),
  completion tokens at the output price, per million tokens, in USD, exact (Decimal, as
  `numeric` in the database); a call through a provider's Batch API takes `batch_discount`
  off the whole;
- ceiling: the most a call can cost, what a budget reserves before sending it: the
  prompt (none of it cached) plus every output token it may generate, `max_tokens`, or,
  for a call without one, the 4,096 tokens the ledger also charges (`DEFAULT_MAX_TOKENS_CHARGE`);
- a model without a price has no cost (None), never $0: callers show it as unknown.

Example:

    >>> from decimal import Decimal
    >>> from batchdb.pricing import Price
    >>> price = Price(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"),
    ...               cached_input_per_mtok=Decimal("0.075"), batch_discount=Decimal("0.5"))
    >>> price.cost_usd(1_000, 200)
    Decimal('0.00027')
    >>> price.cost_usd(1_000, 200, cached_tokens=768)  # 232 at 0.15, 768 at 0.075
    Decimal('0.0002124')
    >>> price.cost_usd(1_000, 200, batch=True)
    Decimal('0.000135')
    >>> price.ceiling_usd(1_000, None)  # no max_tokens: 4,096 output tokens
    Decimal('0.0026076')
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from batchdb.ledger import DEFAULT_MAX_TOKENS_CHARGE

_PER_MTOK = Decimal(1_000_000)


def output_charge(max_tokens: int | None) -> int:
    """Output tokens a call may generate: its max_tokens, or what the ledger charges without one."""
    return max_tokens if max_tokens is not None and max_tokens > 0 else DEFAULT_MAX_TOKENS_CHARGE


@dataclass(frozen=True, slots=True)
class Price:
    """A model's list price, USD per million tokens (a row of batchdb.prices)."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    # None: cached prompt tokens are charged at the input price.
    cached_input_per_mtok: Decimal | None = None
    # Share taken off a Batch API call (0.5: half price); None: no discount.
    batch_discount: Decimal | None = None

    @classmethod
    def of(
        cls, input_per_mtok: Any, output_per_mtok: Any, *, cached_input_per_mtok: Any = None, batch_discount: Any = None
    ) -> Price | None:
        """The price from database values, or None when the input or output price is missing
        (NULL, NaN); a missing cached-input price or batch discount is just not applied."""
        values = (_decimal(input_per_mtok), _decimal(output_per_mtok))
        if values[0] is None or values[1] is None:
            return None
        return cls(values[0], values[1], _decimal(cached_input_per_mtok), _decimal(batch_discount))

    def cost_usd(
        self, prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0, batch: bool = False
    ) -> Decimal:
        """What a call that used these tokens costs (as `batchdb.call_cost_usd` records it)."""
        cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
        cached_price = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        cost = (
            (prompt_tokens - cached) * self.input_per_mtok
            + cached * cached_price
            + completion_tokens * self.output_per_mtok
        ) / _PER_MTOK
        if batch:
            cost *= 1 - (self.batch_discount or 0)
        return cost

    def ceiling_usd(self, prompt_tokens: int, max_tokens: int | None) -> Decimal:
        """The most a call with this prompt can cost: what a budget reserves before it is sent."""
        return self.cost_usd(max(prompt_tokens, 0), output_charge(max_tokens))


def _decimal(value: Any) -> Decimal | None:
    """A database value as a finite Decimal, or None (NULL, pandas' NA, NaN, infinity)."""
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None
