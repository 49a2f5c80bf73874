"""One cost rule: batchdb/pricing.py (estimates) and batchdb.call_cost_usd (recorded costs) agree."""

from __future__ import annotations

import math
from decimal import Decimal

import pandas as pd
import psycopg
import pytest

from batchdb.ledger import DEFAULT_MAX_TOKENS_CHARGE
from batchdb.pricing import Price, output_charge

PRICES = [("0.15", "0.60"), ("2.50", "10.00"), ("0.075", "0.30"), ("0", "0"), ("1.234567", "7.654321")]
TOKENS = [(0, 0), (1, 0), (0, 1), (1_000, 200), (123_457, 4_096), (1_000_000, 1_000_000), (2_000_000_000, 7)]


def test_python_and_sql_price_a_call_the_same(conn: psycopg.Connection) -> None:
    checked = 0
    for input_price, output_price in PRICES:
        price = Price(Decimal(input_price), Decimal(output_price))
        for prompt, completion in TOKENS:
            in_sql = conn.execute(
                "SELECT batchdb.call_cost_usd(%s::numeric, %s::numeric, %s, %s) AS usd",
                (input_price, output_price, prompt, completion),
            ).fetchone()["usd"]
            assert price.cost_usd(prompt, completion) == in_sql, (input_price, output_price, prompt, completion)
            checked += 1
    assert checked == len(PRICES) * len(TOKENS)


def test_an_unknown_price_is_no_cost_not_zero(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT batchdb.call_cost_usd(NULL, 0.6, 10, 10) AS usd").fetchone()["usd"] is None
    for missing in (None, math.nan, pd.NA, float("inf")):
        assert Price.of(missing, "0.60") is None
        assert Price.of("0.15", missing) is None
    assert Price.of(0.15, Decimal("0.6")) == Price(Decimal("0.15"), Decimal("0.6"))


def test_the_ceiling_charges_max_tokens_or_the_ledgers_default() -> None:
    price = Price(Decimal("1"), Decimal("2"))
    assert price.ceiling_usd(1_000, 50) == price.cost_usd(1_000, 50)
    assert price.ceiling_usd(1_000, None) == price.cost_usd(1_000, DEFAULT_MAX_TOKENS_CHARGE)
    assert price.ceiling_usd(1_000, 0) == price.cost_usd(1_000, DEFAULT_MAX_TOKENS_CHARGE)
    assert price.ceiling_usd(-5, 10) == price.cost_usd(0, 10)
    assert output_charge(None) == DEFAULT_MAX_TOKENS_CHARGE == 4096


@pytest.mark.parametrize("max_tokens", [20, None])
def test_the_recorded_cost_of_a_completion_is_the_functions(
    conn: psycopg.Connection, max_tokens: int | None, drain
) -> None:
    """A row run by a worker records exactly what `Price.cost_usd` says for its tokens."""
    import batchdb

    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) "
        "VALUES ('instant', 'priced', 1.25, 3.5)"
    )
    frame = pd.DataFrame({"id": ["a", "b"], "text": ["one", "two words"]})
    job = batchdb.submit(
        frame,
        prompt="Say: {text}",
        model="priced",
        provider="instant",
        id_column="id",
        max_tokens=max_tokens,
        dsn=conn.info.dsn,
    )
    drain()
    price = Price(Decimal("1.25"), Decimal("3.5"))
    rows = conn.execute(
        "SELECT prompt_tokens, completion_tokens, cost_usd FROM batchdb.requests WHERE job_id = %s", (job.id,)
    ).fetchall()
    assert len(rows) == 2 and all(r["prompt_tokens"] > 0 for r in rows)
    for r in rows:
        assert r["cost_usd"] == price.cost_usd(r["prompt_tokens"], r["completion_tokens"])


def test_the_modules_example_runs() -> None:
    import doctest

    import batchdb.pricing

    result = doctest.testmod(batchdb.pricing)
    assert result.attempted >= 3 and result.failed == 0
