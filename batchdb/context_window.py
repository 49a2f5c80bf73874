"""Will a call fit its model? Checked before it is sent, never learnt from a 400.

A row whose prompt exceeds the model's context window is refused by the
provider without running, but only after the ledger reserved its tokens (a 2 MB
row: ~400,000) and the call waited its turn. The model's limits live next to its
price (`batchdb.prices.context_window`, `max_input_tokens`, `max_output_tokens`,
sql/migrations/0006_ledger_settlement.sql), so the SDK refuses such a row at
submit, the database at INSERT (when it clearly cannot fit) and the worker fails
it at claim time without a call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import DictRow

from batchdb.queries import query

# Tokens a chat request adds around its texts: 3 per message plus the role, 3 to prime the reply.
_OVERHEAD_PER_MESSAGE = 8
_OVERHEAD = 3
# o200k tokens are at least one UTF-8 byte each; a template can render a value
# (a float, a date) longer than its JSON, hence the factor on the row's JSON bytes.
_RENDER_FACTOR = 2


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """A model's size limits; None where unknown (nothing is checked against it)."""

    model: str
    context_window: int | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None

    @property
    def known(self) -> bool:
        return any(v is not None for v in (self.context_window, self.max_input_tokens, self.max_output_tokens))

    @property
    def smallest_prompt_limit(self) -> int | None:
        limits = [v for v in (self.context_window, self.max_input_tokens) if v is not None]
        return min(limits) if limits else None

    @classmethod
    def from_row(cls, model: str, row: Mapping[str, Any] | None) -> ModelLimits:
        if row is None:
            return cls(model)
        return cls(model, row.get("context_window"), row.get("max_input_tokens"), row.get("max_output_tokens"))

    def max_tokens_problem(self, max_tokens: int | None) -> str | None:
        """Why this max_tokens can never be accepted by the model, or None."""
        if max_tokens is not None and self.max_output_tokens is not None and max_tokens > self.max_output_tokens:
            return (
                f"max_tokens {max_tokens:,} is more than {self.model} can answer "
                f"(at most {self.max_output_tokens:,} output tokens)"
            )
        return None

    def problem(self, prompt_tokens: int, max_tokens: int | None) -> str | None:
        """Why a call with this prompt and max_tokens cannot run on the model, or None when it fits."""
        too_many = self.max_tokens_problem(max_tokens)
        if too_many:
            return too_many
        if self.max_input_tokens is not None and prompt_tokens > self.max_input_tokens:
            return (
                f"the prompt is {prompt_tokens:,} tokens; {self.model} takes at most "
                f"{self.max_input_tokens:,} input tokens"
            )
        if self.context_window is not None and prompt_tokens + (max_tokens or 0) > self.context_window:
            with_output = f" + max_tokens {max_tokens:,}" if max_tokens else ""
            return (
                f"the prompt is {prompt_tokens:,} tokens{with_output}, more than {self.model}'s context window "
                f"of {self.context_window:,} tokens"
            )
        return None

    def surely_fits(self, text_bytes: int, messages: int, max_tokens: int | None) -> bool:
        """True when a prompt of this many bytes fits whatever it tokenizes to: no need to count it."""
        sure = self.max_sure_bytes(messages, max_tokens)
        return sure is None or text_bytes <= sure

    def max_sure_bytes(self, messages: int, max_tokens: int | None) -> int | None:
        """The longest prompt text (UTF-8 bytes) that fits without counting; None: no limit known."""
        limit = self.smallest_prompt_limit
        if limit is None:
            return None
        if self.context_window is not None:
            limit = min(limit, self.context_window - (max_tokens or 0))
        return (limit - messages * _OVERHEAD_PER_MESSAGE - _OVERHEAD) // _RENDER_FACTOR


def load(conn: psycopg.Connection[DictRow], provider: str, model: str) -> ModelLimits:
    row = conn.execute(query("model_limits"), {"provider": provider, "model": model}).fetchone()
    return ModelLimits.from_row(model, row)
