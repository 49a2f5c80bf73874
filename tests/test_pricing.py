"""One cost rule: batchdb/pricing.py (estimates) and batchdb.call_cost_usd (recorded costs) agree."""

from __future__ import annotations

import math
from decimal import Decimal

import pandas as pd
import psycopg
import pytest

from batchdb.ledger import DEFAULT_MAX_TOKENS_CHARGE
from batchdb.pricing import Price, output_charge

# (input, cached input, output, batch discount) per million tokens; None: not listed.
PRICES = [
    ("0.15", "0.075", "0.60", "0.5"),
    ("2.50", None, "10.00", None),
    ("0.075", "0.01875", "0.30", "0.25"),
    ("0", "0", "0", "0"),
    ("1.234567", "0.308642", "7.654321", "0.333"),
]
# (prompt, cached, completion): cached is part of prompt; out-of-range cached counts are clipped.
TOKENS = [
    (0, 0, 0),
    (1, 0, 0),
    (0, 0, 1),
    (1_000, 0, 200),
    (1_000, 768, 200),
    (2_048, 2_048, 5),
    (123_457, 4_096, 4_096),
    (1_000_000, 999_999, 1_000_000),
    (2_000_000_000, 1_000_000_000, 7),
    (100, 500, 3),  # more cached than prompt: all of the prompt is cached
    (100, -5, 3),  # negative: none
]


def test_python_and_sql_price_a_call_the_same(conn: psycopg.Connection) -> None:
    checked = 0
    for input_price, cached_price, output_price, discount in PRICES:
        price = Price.of(input_price, output_price, cached_input_per_mtok=cached_price, batch_discount=discount)
        assert price is not None
        for prompt, cached, completion in TOKENS:
            for batch in (False, True):
                in_sql = conn.execute(
                    "SELECT batchdb.call_cost_usd(%s::numeric, %s::numeric, %s::numeric, %s::numeric,"
                    " %s, %s, %s, %s) AS usd",
                    (input_price, cached_price, output_price, discount, prompt, cached, completion, batch),
                ).fetchone()["usd"]
                in_python = price.cost_usd(prompt, completion, cached_tokens=cached, batch=batch)
                assert in_python == in_sql, (input_price, cached_price, discount, prompt, cached, completion, batch)
                checked += 1
    assert checked == len(PRICES) * len(TOKENS) * 2


def test_cached_tokens_cost_the_cached_price_and_batch_calls_the_discounted_one() -> None:
    price = Price.of("2.00", "8.00", cached_input_per_mtok="0.50", batch_discount="0.5")
    assert price is not None
    # 1,000 prompt tokens of which 600 cached: 400 x 2.00 + 600 x 0.50 = 1,100 per million.
    assert price.cost_usd(1_000, 0, cached_tokens=600) == Decimal("0.0011")
    assert price.cost_usd(1_000, 100, batch=True) == (Decimal("0.002") + Decimal("0.0008")) / 2
    unlisted = Price.of("2.00", "8.00")
    assert unlisted is not None
    assert unlisted.cost_usd(1_000, 0, cached_tokens=600) == unlisted.cost_usd(1_000, 0)  # no cached price: full
    assert unlisted.cost_usd(1_000, 0, batch=True) == unlisted.cost_usd(1_000, 0)  # no discount listed


def test_the_previous_four_argument_form_still_prices_for_old_workers(conn: psycopg.Connection) -> None:
    """Workers of the previous release call call_cost_usd(input, output, prompt, completion) until they restart."""
    old = conn.execute("SELECT batchdb.call_cost_usd(0.15, 0.60, 1000, 200) AS usd").fetchone()["usd"]
    assert old == Decimal("0.00027") == Price(Decimal("0.15"), Decimal("0.60")).cost_usd(1000, 200)


def test_an_unknown_price_is_no_cost_not_zero(conn: psycopg.Connection) -> None:
    unknown = "SELECT batchdb.call_cost_usd(NULL, NULL, 0.6, NULL, 10, 0, 10, false) AS usd"
    assert conn.execute(unknown).fetchone()["usd"] is None
    for missing in (None, math.nan, pd.NA, float("inf")):
        assert Price.of(missing, "0.60") is None
        assert Price.of("0.15", missing) is None
        assert Price.of("0.15", "0.60", cached_input_per_mtok=missing, batch_discount=missing) == Price(
            Decimal("0.15"), Decimal("0.60")
        )
    assert Price.of(0.15, Decimal("0.6")) == Price(Decimal("0.15"), Decimal("0.6"))


def test_the_ceiling_charges_max_tokens_or_the_ledgers_default() -> None:
    price = Price(Decimal("1"), Decimal("2"))
    assert price.ceiling_usd(1_000, 50) == price.cost_usd(1_000, 50)
    assert price.ceiling_usd(1_000, None) == price.cost_usd(1_000, DEFAULT_MAX_TOKENS_CHARGE)
    assert price.ceiling_usd(1_000, 0) == price.cost_usd(1_000, DEFAULT_MAX_TOKENS_CHARGE)
    assert price.ceiling_usd(-5, 10) == price.cost_usd(0, 10)
    assert output_charge(None) == DEFAULT_MAX_TOKENS_CHARGE == 4096


@pytest.mark.parametrize(
    ("max_tokens", "per_mtok"),
    [(20, ("1.25", "3.5")), (None, ("1.25", "3.5")), (20, ("0.0123", "0.0457"))],
)
def test_the_recorded_cost_of_a_completion_is_the_functions(
    conn: psycopg.Connection, max_tokens: int | None, per_mtok: tuple[str, str], drain
) -> None:
    """A row run by a worker records exactly what `Price.cost_usd` says for its tokens, every digit
    (a token at $0.0123 per million costs $0.0000000123: ten decimals, as a batch price can need)."""
    import batchdb

    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) "
        "VALUES ('instant', 'priced', %s, %s)",
        per_mtok,
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
    price = Price(Decimal(per_mtok[0]), Decimal(per_mtok[1]))
    rows = conn.execute(
        "SELECT prompt_tokens, completion_tokens, cost_usd FROM batchdb.requests WHERE job_id = %s", (job.id,)
    ).fetchall()
    assert len(rows) == 2 and all(r["prompt_tokens"] > 0 for r in rows)
    for r in rows:
        assert r["cost_usd"] == price.cost_usd(r["prompt_tokens"], r["completion_tokens"])
    assert job.status().cost_usd == sum(r["cost_usd"] for r in rows)


def test_prompt_cache_hits_are_recorded_and_priced_at_the_cached_price(conn: psycopg.Connection, simulator) -> None:
    """Rows sharing a long system prompt: the provider serves the prefix from its cache after the first
    call; each row records its cached tokens and the cost at the cached-input price, the job sums them."""
    import asyncio

    import batchdb
    from batchdb.providers.openai import OpenAIProvider
    from batchdb.workers.outcomes import RetryPolicy
    from batchdb.workers.worker import Worker, WorkerConfig

    sim = simulator()
    frame = pd.DataFrame({"text": [f"headline number {i}" for i in range(12)]})
    job = batchdb.submit(
        frame,
        prompt="Label: {text}",
        system="Background for every headline. " * 250,
        model="gpt-4o-mini",
        max_tokens=5,
        dsn=conn.info.dsn,
    )
    provider = OpenAIProvider(api_key="sk-test", base_url=sim.openai_base_url, timeout=30)
    config = WorkerConfig(dsn=conn.info.dsn, concurrency=1, retry=RetryPolicy(0.05, 0.2), exit_when_idle=True)
    asyncio.run(Worker(config, providers={"openai": provider}).run())  # type: ignore[dict-item]

    price = Price.of("0.15", "0.60", cached_input_per_mtok="0.075", batch_discount="0.5")
    assert price is not None
    rows = conn.execute(
        "SELECT prompt_tokens, cached_tokens, completion_tokens, cost_usd FROM batchdb.requests "
        "WHERE job_id = %s ORDER BY id",
        (job.id,),
    ).fetchall()
    assert [r["cached_tokens"] > 0 for r in rows] == [False] + [True] * 11  # one call at a time: all but the first
    for r in rows:
        expected = price.cost_usd(r["prompt_tokens"], r["completion_tokens"], cached_tokens=r["cached_tokens"])
        assert r["cost_usd"] == expected
        if r["cached_tokens"]:
            assert expected < price.cost_usd(r["prompt_tokens"], r["completion_tokens"])  # cheaper than uncached
    progress = conn.execute("SELECT cached_tokens, cost_usd FROM batchdb.job_progress WHERE job_id = %s", (job.id,))
    total = progress.fetchone()
    assert total["cached_tokens"] == sum(r["cached_tokens"] for r in rows)
    assert total["cost_usd"] == sum(r["cost_usd"] for r in rows)
    assert list(job.results()["cached_tokens"]) == [r["cached_tokens"] for r in rows]


def test_the_modules_example_runs() -> None:
    import doctest

    import batchdb.pricing

    result = doctest.testmod(batchdb.pricing)
    assert result.attempted >= 3 and result.failed == 0
