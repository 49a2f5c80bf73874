"""`batchdb prices update`: prices and limits from a LiteLLM-format map, shown first, written when asked."""

from __future__ import annotations

import datetime
import json
import shlex
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from batchdb import price_list
from batchdb.cli import cli

# The shape of LiteLLM's model_prices_and_context_window.json (a few of its entries and fields).
LITELLM_MAP = {
    "sample_spec": {"litellm_provider": "one of https://docs.litellm.ai/docs/providers", "mode": "chat"},
    "gpt-4o-mini": {  # a new price; no cached price given: the current one stays
        "litellm_provider": "openai",
        "mode": "chat",
        "input_cost_per_token": 2e-07,
        "output_cost_per_token": 8e-07,
        "input_cost_per_token_batches": 1e-07,
        "max_input_tokens": 128000,
        "max_output_tokens": 16384,
        "supports_vision": True,
    },
    "gpt-4o": {  # exactly what batchdb has
        "litellm_provider": "openai",
        "mode": "chat",
        "input_cost_per_token": 2.5e-06,
        "output_cost_per_token": 1e-05,
        "cache_read_input_token_cost": 1.25e-06,
    },
    "gpt-9": {
        "litellm_provider": "openai",
        "mode": "chat",
        "input_cost_per_token": 3e-06,
        "output_cost_per_token": 1.2e-05,
        "cache_read_input_token_cost": 3e-07,
        "max_input_tokens": 500000,
        "max_output_tokens": 100000,
    },
    "gemini/gemini-9-flash": {
        "litellm_provider": "gemini",
        "mode": "chat",
        "input_cost_per_token": 1e-07,
        "output_cost_per_token": 4e-07,
    },
    "azure/gpt-9": {"litellm_provider": "azure", "input_cost_per_token": 3e-06, "output_cost_per_token": 1.2e-05},
    "text-embedding-3-small": {"litellm_provider": "openai", "mode": "embedding", "input_cost_per_token": 2e-08},
    "claude-9": {"litellm_provider": "anthropic", "mode": "chat", "input_cost_per_token": 3e-06},
    "tts-1": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_character": 1.5e-05},
}


def write_map(tmp_path: Path, data: object = LITELLM_MAP) -> Path:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(data))
    return path


def price(conn: psycopg.Connection, provider: str, model: str) -> dict | None:
    return conn.execute("SELECT * FROM batchdb.prices WHERE provider = %s AND model = %s", (provider, model)).fetchone()


def test_the_packaged_map_is_what_the_migrations_seed(conn: psycopg.Connection) -> None:
    """The dated map in the package and the seeded rows agree: updating from it changes no price."""
    price_map = price_list.read_price_map(price_list.packaged_price_map())
    seeded = conn.execute("SELECT count(*) AS n FROM batchdb.prices").fetchone()["n"]
    planned = price_list.plan(conn, price_map)
    assert planned.changes == [] and len(planned.unchanged) == seeded == len(price_map.entries) > 10
    assert price_map.as_of == datetime.date(2026, 12, 7) and price_map.source == "batchdb/price_list.json"
    price_list.apply(conn, planned)
    stamped = conn.execute("SELECT DISTINCT source, as_of FROM batchdb.prices").fetchall()
    assert [(r["source"], r["as_of"]) for r in stamped] == [("batchdb/price_list.json", datetime.date(2026, 12, 7))]


def test_a_litellm_map_is_shown_then_written_only_when_asked(conn: psycopg.Connection, tmp_path: Path) -> None:
    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) VALUES ('openai', 'mine', 1, 2)"
    )
    price_map = price_list.read_price_map(write_map(tmp_path), as_of=datetime.date(2026, 11, 30))
    assert {(e.provider, e.model) for e in price_map.entries} == {
        ("openai", "gpt-4o-mini"),
        ("openai", "gpt-4o"),
        ("openai", "gpt-9"),
        ("gemini", "gemini-9-flash"),
        ("azure", "gpt-9"),
    }
    assert price_map.skipped == 3  # the embedding model, the anthropic model, the per-character one
    planned = price_list.plan(conn, price_map)
    assert [c.describe() for c in planned.changes] == [
        "change openai/gpt-4o-mini: input_per_mtok 0.15 -> 0.2, output_per_mtok 0.6 -> 0.8, "
        "max_input_tokens none -> 128000",
        "add openai/gpt-9: input_per_mtok 3, output_per_mtok 12, cached_input_per_mtok 0.3, max_input_tokens 500000, "
        "max_output_tokens 100000",
        "add gemini/gemini-9-flash: input_per_mtok 0.1, output_per_mtok 0.4",
        "add azure/gpt-9: input_per_mtok 3, output_per_mtok 12",
    ]
    assert planned.unchanged == [("openai", "gpt-4o")]
    assert price(conn, "openai", "gpt-9") is None  # planning writes nothing

    assert price_list.apply(conn, planned) == 4
    mini = price(conn, "openai", "gpt-4o-mini")
    assert mini is not None
    assert (mini["input_per_mtok"], mini["output_per_mtok"], mini["batch_discount"]) == (
        Decimal("0.2"),
        Decimal("0.8"),
        Decimal("0.5"),
    )
    assert mini["cached_input_per_mtok"] == Decimal("0.075")  # the map gives none: kept
    assert mini["context_window"] == 128000  # a field LiteLLM's map does not carry: kept
    assert (mini["source"], mini["as_of"]) == ("model_prices_and_context_window.json", datetime.date(2026, 11, 30))
    assert price(conn, "openai", "mine") is not None  # a price the map does not name stays
    assert price_list.plan(conn, price_list.read_price_map(write_map(tmp_path))).changes == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a JSON price map"),
        ("[1, 2]", "expected a JSON object of model -> prices, got list"),
        (
            json.dumps(
                {"gpt-x": {"litellm_provider": "openai", "input_cost_per_token": -1, "output_cost_per_token": 1}}
            ),
            "gpt-x.input_cost_per_token: expected a non-negative number, got -1",
        ),
    ],
)
def test_a_map_that_cannot_be_read_is_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(price_list.PriceListError, match=message) as refused:
        price_list.read_price_map(path)
    assert str(refused.value).startswith(f"{path}: ")


def test_a_map_older_than_the_prices_it_would_replace_is_pointed_out(conn: psycopg.Connection, tmp_path: Path) -> None:
    conn.execute("UPDATE batchdb.prices SET as_of = '2026-12-01' WHERE model = 'gpt-4o-mini' AND provider = 'openai'")
    planned = price_list.plan(conn, price_list.read_price_map(write_map(tmp_path), as_of=datetime.date(2026, 6, 1)))
    assert planned.text().splitlines()[-1] == (
        "note: 1 of these changes replace prices dated after this map (up to 2026-12-01); check it is the map you meant"
    )
    bad = {"gpt-x": {"litellm_provider": "openai", "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,
                     "input_cost_per_token_batches": 2e-06}}  # fmt: skip
    with pytest.raises(price_list.PriceListError, match=r"gpt-x\.input_cost_per_token_batches: .* above the price"):
        price_list.read_price_map(write_map(tmp_path, bad))


def test_a_change_of_one_field_keeps_the_others(conn: psycopg.Connection, tmp_path: Path) -> None:
    only_cached = {"gpt-4o-mini": {"litellm_provider": "openai", "cache_read_input_token_cost": 5e-08}}
    path = write_map(tmp_path, {**only_cached, "gpt-9": LITELLM_MAP["gpt-9"]})
    price_map = price_list.read_price_map(path)
    assert [e.model for e in price_map.entries] == ["gpt-9"]  # a model without token prices is skipped
    # A map giving the token prices and only some other fields: those fields change, the rest stay.
    partial = {
        "gpt-4o-mini": {
            "litellm_provider": "openai",
            "input_cost_per_token": 1.5e-07,
            "output_cost_per_token": 6e-07,
            "cache_read_input_token_cost": 5e-08,
        }
    }
    planned = price_list.plan(conn, price_list.read_price_map(write_map(tmp_path, partial)))
    assert [c.describe() for c in planned.changes] == ["change openai/gpt-4o-mini: cached_input_per_mtok 0.075 -> 0.05"]
    price_list.apply(conn, planned)
    mini = price(conn, "openai", "gpt-4o-mini")
    assert mini is not None
    assert (mini["input_per_mtok"], mini["cached_input_per_mtok"], mini["max_output_tokens"]) == (
        Decimal("0.15"),
        Decimal("0.05"),
        16384,
    )


def test_the_cli_shows_the_plan_and_writes_with_yes(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    path = write_map(tmp_path)
    runner = CliRunner()
    shown = runner.invoke(cli, ["prices", "update", str(path), "--as-of", "2026-11-30", "--dsn", dsn])
    assert shown.exit_code == 0, shown.output
    assert "1 to change" in shown.output and "3 to add" in shown.output
    assert shown.output.splitlines()[-1] == (
        f"nothing written; to write it, run: batchdb prices update {path} --as-of 2026-11-30 "
        f"--dsn {shlex.quote(dsn)} --yes"
    )
    assert price(conn, "openai", "gpt-9") is None

    written = runner.invoke(cli, ["prices", "update", str(path), "--as-of", "2026-11-30", "--yes", "--dsn", dsn])
    assert written.exit_code == 0, written.output
    assert written.output.splitlines()[-1] == "wrote 4 price row(s); 1 confirmed as of 2026-11-30"
    listed = runner.invoke(cli, ["prices", "show", "--dsn", dsn]).output
    assert [line for line in listed.splitlines() if line.startswith("openai/gpt-9 ")] == [
        "openai/gpt-9                               3       0.3        12      -    500000   100000  "
        "2026-11-30 (model_prices_and_context_window.json)"
    ]
    missing = runner.invoke(cli, ["prices", "update", str(tmp_path / "nope.json"), "--dsn", dsn])
    assert missing.exit_code == 1 and missing.output.strip() == f"Error: {tmp_path / 'nope.json'}: no such file"
