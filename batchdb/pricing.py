"""What a call costs: the one rule every part of batchdb prices tokens with.

Recorded costs are computed in PostgreSQL by `batchdb.call_cost_usd` (completions,
sql/migrations/0014_one_cost_rule.sql); the worker's budget reservation and the
dashboard's estimate of what queued rows will cost are computed here, before any
row is written. `tests/test_pricing.py` holds the two to the same answers.

- cost: prompt tokens at the input price plus completion tokens at the output price,
  per million tokens, in USD, exact (Decimal, as `numeric` in the database);
- ceiling: the most a call can cost, what a budget reserves before sending it: the
  prompt plus every output token it may generate, `max_tokens`, or, for a call
  without one, the 4,096 tokens the ledger also charges (`DEFAULT_MAX_TOKENS_CHARGE`);
- a model without a price has no cost (None), never $0: callers show it as unknown.

Example:

    >>> from decimal import Decimal, InvalidOperation
    >>> from batchdb.pricing import Price
    >>> price = Price(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
    >>> price.cost_usd(1_000, 200)
    Decimal('0.00027')
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

    @classmethod
    def of(cls, input_per_mtok: Any, output_per_mtok: Any) -> Price | None:
        """The price from two database values, or None when either is missing (NULL, NaN)."""
        try:
            values = (Decimal(str(input_per_mtok)), Decimal(str(output_per_mtok)))
        except InvalidOperation:  # None, pandas' NA and the like
            return None
        if any(not v.is_finite() for v in values):  # NaN, infinity
            return None
        return cls(*values)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """What a call that used these tokens costs (as `batchdb.call_cost_usd` records it)."""
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / _PER_MTOK

    def ceiling_usd(self, prompt_tokens: int, max_tokens: int | None) -> Decimal:
        """The most a call with this prompt can cost: what a budget reserves before it is sent."""
        return self.cost_usd(max(prompt_tokens, 0), output_charge(max_tokens))
