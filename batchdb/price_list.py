"""Prices and model limits as data: load them from a file into batchdb.prices.

Hand-seeded prices go stale. `batchdb prices update FILE` reads a price map in the
format LiteLLM maintains (model_prices_and_context_window.json, which a user downloads:
batchdb never fetches anything) and shows what it would add and change; `--yes`
writes it. Without FILE it reads the dated map shipped in the package
(batchdb/price_list.json), the same prices the migrations seed.

What is read, per chat model of the providers batchdb speaks (openai, azure, gemini, vertex;
keys "gpt-4o-mini", "azure/gpt-4o-mini", "gemini/gemini-2.5-flash", "vertex_ai/gemini-2.5-flash"):

- input_cost_per_token, output_cost_per_token -> input_per_mtok, output_per_mtok;
- cache_read_input_token_cost -> cached_input_per_mtok;
- input_cost_per_token_batches -> batch_discount (1 - batch price / price);
- max_input_tokens -> max_input_tokens (a prompt limit), max_output_tokens -> max_output_tokens.

A field the map does not give keeps its value; rows the map does not name are left
alone (a price added by hand stays). Only a price the map gives differently is a
change, and changes are written only when asked. The map's date (`as_of`) is kept
with each row it wrote and shown on the dashboard's Cost page.

Example:

    >>> import json, pathlib, tempfile
    >>> from batchdb.price_list import read_price_map
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "prices.json"
    >>> _ = path.write_text(json.dumps({"gpt-4o-mini": {"litellm_provider": "openai", "mode": "chat",
    ...     "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
    ...     "input_cost_per_token_batches": 7.5e-08}}))
    >>> [entry] = read_price_map(path).entries
    >>> entry.provider, entry.model, entry.values["input_per_mtok"], entry.values["batch_discount"]
    ('openai', 'gpt-4o-mini', Decimal('0.15'), Decimal('0.5'))
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import DictRow

from batchdb.errors import BatchDBError
from batchdb.queries import query

# LiteLLM's provider names -> batchdb's.
PROVIDERS = {
    "openai": "openai",
    "azure": "azure",
    "gemini": "gemini",
    # LiteLLM names Vertex AI's Gemini models both ways, keyed "vertex_ai/<model>" or "<model>".
    "vertex_ai-language-models": "vertex",
    "vertex_ai": "vertex",
}
# Key prefixes LiteLLM puts before a model name, by batchdb provider (besides its own provider name).
_KEY_PREFIXES = {"vertex": "vertex_ai/"}
# batchdb.prices columns a map can set, in the order they are shown.
FIELDS = (
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "batch_discount",
    "max_input_tokens",
    "max_output_tokens",
)
_PER_MTOK = Decimal(1_000_000)
_PACKAGED = "price_list.json"
# A key the packaged map uses for its date; LiteLLM's own maps have none (the file's date is used).
AS_OF_KEY = "batchdb_as_of"


class PriceListError(BatchDBError):
    """The price map cannot be read: not JSON, not an object, a price that is not a number."""


@dataclass(frozen=True, slots=True)
class PriceEntry:
    provider: str
    model: str
    values: dict[str, Decimal | int]  # only the fields the map gives


@dataclass(frozen=True, slots=True)
class PriceMap:
    source: str  # the file's name, for the rows it writes
    as_of: datetime.date
    entries: list[PriceEntry]
    skipped: int  # entries of other providers or modes


@dataclass(frozen=True, slots=True)
class Change:
    provider: str
    model: str
    before: dict[str, Any]  # empty for a new row
    after: dict[str, Any]

    @property
    def is_new(self) -> bool:
        return not self.before

    def describe(self) -> str:
        if self.is_new:
            shown = ", ".join(f"{k} {_show(v)}" for k, v in self.after.items())
            return f"add {self.provider}/{self.model}: {shown}"
        shown = ", ".join(f"{k} {_show(self.before[k])} -> {_show(v)}" for k, v in self.after.items())
        return f"change {self.provider}/{self.model}: {shown}"


@dataclass(frozen=True, slots=True)
class Plan:
    price_map: PriceMap
    changes: list[Change] = field(default_factory=list)
    unchanged: list[tuple[str, str]] = field(default_factory=list)  # (provider, model) the map gives as they are
    # Dates of the current prices the changes would replace that are newer than the map.
    newer_replaced: list[datetime.date] = field(default_factory=list)

    def text(self) -> str:
        head = (
            f"{self.price_map.source} (prices as of {self.price_map.as_of}): {len(self.price_map.entries)} chat models "
            f"of openai/azure/gemini ({self.price_map.skipped} other entries skipped); "
            f"{sum(c.is_new for c in self.changes)} to add, {sum(not c.is_new for c in self.changes)} to change, "
            f"{len(self.unchanged)} unchanged"
        )
        lines = [head, *(f"  {c.describe()}" for c in self.changes)]
        if self.newer_replaced:
            lines.append(
                f"note: {len(self.newer_replaced)} of these changes replace prices dated after this map "
                f"(up to {max(self.newer_replaced)}); check it is the map you meant"
            )
        return "\n".join(lines)


def packaged_price_map() -> Path:
    """The dated price map shipped with batchdb (the prices the migrations seed)."""
    return Path(str(resources.files("batchdb").joinpath(_PACKAGED)))


def read_price_map(path: Path, *, as_of: datetime.date | None = None) -> PriceMap:
    """Read a LiteLLM-format price map; `as_of` defaults to the map's own date, else the file's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PriceListError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PriceListError(f"{path}: not a JSON price map ({exc})") from None
    if not isinstance(data, dict):
        raise PriceListError(f"{path}: expected a JSON object of model -> prices, got {type(data).__name__}")
    if as_of is None:
        stamped = data.get(AS_OF_KEY)
        as_of = (
            datetime.date.fromisoformat(stamped)
            if isinstance(stamped, str)
            else datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC).date()
        )
    entries, skipped = [], 0
    for key, spec in data.items():
        if not isinstance(spec, dict) or key == "sample_spec":
            continue
        provider = PROVIDERS.get(str(spec.get("litellm_provider")))
        if provider is None or spec.get("mode", "chat") != "chat":
            skipped += 1
            continue
        prefixes = (f"{spec['litellm_provider']}/", _KEY_PREFIXES.get(provider, f"{spec['litellm_provider']}/"))
        model = key.split("/", 1)[1] if key.startswith(prefixes) else key
        values = _values(path, key, spec)
        if "input_per_mtok" in values and "output_per_mtok" in values:
            entries.append(PriceEntry(provider, model, values))
        else:
            skipped += 1  # a chat model without token prices (priced per character, per second, ...)
    source = f"batchdb/{_PACKAGED}" if path == packaged_price_map() else path.name
    return PriceMap(source, as_of, entries, skipped)


def plan(conn: psycopg.Connection[DictRow], price_map: PriceMap) -> Plan:
    """What writing `price_map` would add and change (nothing is written)."""
    current = {(r["provider"], r["model"]): r for r in conn.execute(query("prices_all")).fetchall()}
    changes: list[Change] = []
    unchanged: list[tuple[str, str]] = []
    newer: list[datetime.date] = []
    for entry in price_map.entries:
        row = current.get((entry.provider, entry.model))
        if row is None:
            changes.append(Change(entry.provider, entry.model, {}, dict(entry.values)))
            continue
        after = {k: v for k, v in entry.values.items() if _differs(row[k], v)}
        if after:
            changes.append(Change(entry.provider, entry.model, {k: row[k] for k in after}, after))
            if row["as_of"] is not None and row["as_of"] > price_map.as_of:
                newer.append(row["as_of"])
        else:
            unchanged.append((entry.provider, entry.model))
    return Plan(price_map, changes, unchanged, newer)


def apply(conn: psycopg.Connection[DictRow], planned: Plan) -> int:
    """Write the planned additions and changes in one transaction, and stamp the rows the map gives
    unchanged with its name and date (they are current as of then); returns how many rows changed."""
    with conn.transaction():
        conn.execute(
            query("prices_confirm"),
            {
                "providers": [p for p, _ in planned.unchanged],
                "models": [m for _, m in planned.unchanged],
                "source": planned.price_map.source,
                "as_of": planned.price_map.as_of,
            },
        )
        for change in planned.changes:
            values = {k: change.after.get(k) for k in FIELDS}
            conn.execute(
                query("prices_insert" if change.is_new else "prices_change"),
                {
                    "provider": change.provider,
                    "model": change.model,
                    "set_fields": list(change.after),
                    "source": planned.price_map.source,
                    "as_of": planned.price_map.as_of,
                    **values,
                },
            )
    return len(planned.changes)


def _values(path: Path, key: str, spec: dict[str, Any]) -> dict[str, Decimal | int]:
    values: dict[str, Decimal | int] = {}
    per_token = {
        "input_per_mtok": "input_cost_per_token",
        "output_per_mtok": "output_cost_per_token",
        "cached_input_per_mtok": "cache_read_input_token_cost",
    }
    for column, name in per_token.items():
        price = _number(path, key, name, spec.get(name))
        if price is not None:
            values[column] = (price * _PER_MTOK).quantize(Decimal("0.000001")).normalize()
    batch = _number(path, key, "input_cost_per_token_batches", spec.get("input_cost_per_token_batches"))
    base = _number(path, key, "input_cost_per_token", spec.get("input_cost_per_token"))
    if batch is not None and base:
        discount = (1 - batch / base).quantize(Decimal("0.001")).normalize()
        if not 0 <= discount <= 1:
            raise PriceListError(
                f"{path}: {key}.input_cost_per_token_batches: {batch} is above the price ({base}); "
                "expected a batch price at most the price"
            )
        values["batch_discount"] = discount
    for column in ("max_input_tokens", "max_output_tokens"):
        limit = spec.get(column)
        if isinstance(limit, int) and limit > 0:
            values[column] = limit
    return values


def _number(path: Path, key: str, name: str, value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        number = Decimal("NaN")
    if isinstance(value, bool) or not number.is_finite() or number < 0:
        raise PriceListError(f"{path}: {key}.{name}: expected a non-negative number, got {value!r}")
    return number


def _differs(current: Any, new: Decimal | int) -> bool:
    return current is None or Decimal(str(current)) != Decimal(str(new))


def _show(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    return "none" if value is None else str(value)
