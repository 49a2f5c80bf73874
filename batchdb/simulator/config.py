"""What the provider simulator is told to do: limits, latency, output lengths, faults.

`SimulatorConfig` is the single source of truth for one simulator run. It is a
frozen dataclass that round-trips through JSON (`to_dict` / `from_dict`), so a
parent process can write it to a file for `python -m batchdb.simulator --config`
and `POST /_sim/config` can replace parts of it at runtime. Unknown keys are an
error: a typo in a benchmark config should fail loudly, not silently run unlimited.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DISTRIBUTION_KINDS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True, slots=True)
class Distribution:
    """A small random distribution, used for latency (seconds) and output length (tokens).

    - ``fixed``: always ``value``.
    - ``uniform``: uniform in ``[low, high]``.
    - ``lognormal``: median ``median``, shape ``sigma`` (``exp(N(ln median, sigma))``),
      the heavy right tail real providers show.
    ``cap``, when set, clamps every sample from above; samples are never negative.
    """

    kind: str = "fixed"
    value: float = 0.0
    low: float = 0.0
    high: float = 0.0
    median: float = 0.0
    sigma: float = 0.0
    cap: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in DISTRIBUTION_KINDS:
            raise ValueError(f"distribution kind must be one of {DISTRIBUTION_KINDS}, got {self.kind!r}")
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError("uniform distribution needs low <= high")
        if self.kind == "lognormal" and (self.median <= 0 or self.sigma < 0):
            raise ValueError("lognormal distribution needs median > 0 and sigma >= 0")

    @property
    def is_zero(self) -> bool:
        return self.kind == "fixed" and self.value <= 0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            x = self.value
        elif self.kind == "uniform":
            x = rng.uniform(self.low, self.high)
        else:
            x = rng.lognormvariate(math.log(self.median), self.sigma)
        if self.cap is not None:
            x = min(x, self.cap)
        return max(0.0, x)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute (and per-day) limits for one (api key, model). ``None`` means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "rpd"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")


@dataclass(frozen=True, slots=True)
class LimitRule:
    """Overrides `SimulatorConfig.default_limits` for a key and/or model (``"*"`` = any).

    Resolution is per field, most specific rule first: (key, model), then (key, *),
    then (*, model), then the defaults. A field left ``None`` inherits from the
    next level, so ``{"key": "sk-a", "rpm": 60}`` keeps the default TPM.
    """

    key: str = "*"
    model: str = "*"
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None

    def __post_init__(self) -> None:
        Limits(self.rpm, self.tpm, self.rpd)  # same validation


@dataclass(frozen=True, slots=True)
class ErrorRates:
    """Probabilities (per admitted request) of injected faults; their sum must be <= 1."""

    http_500: float = 0.0
    http_503: float = 0.0
    connection_reset: float = 0.0

    def __post_init__(self) -> None:
        rates = (self.http_500, self.http_503, self.connection_reset)
        if any(r < 0 or r > 1 for r in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError("error rates must be in [0, 1] and sum to at most 1")

    @property
    def total(self) -> float:
        return self.http_500 + self.http_503 + self.connection_reset


@dataclass(frozen=True, slots=True)
class Outage:
    """Every provider request answers ``status`` during the window.

    The window starts ``start_s`` seconds after the config was applied (server start,
    `POST /_sim/config` with an ``outage`` field, or `POST /_sim/reset`) and lasts
    ``duration_s`` seconds; ``None`` means until the outage is replaced or removed.
    """

    start_s: float = 0.0
    duration_s: float | None = None
    status: int = 503

    def __post_init__(self) -> None:
        if self.status not in (500, 502, 503, 504):
            raise ValueError("outage status must be 500, 502, 503 or 504")

    def active(self, seconds_since_applied: float) -> bool:
        if seconds_since_applied < self.start_s:
            return False
        return self.duration_s is None or seconds_since_applied < self.start_s + self.duration_s


# What the providers publish for the models batchdb.prices seeds (0006_ledger_settlement.sql):
# the context window (prompt + output) for OpenAI and Azure, the input limit for Gemini, which is
# what the simulator compares with. tests/simulator checks the two tables agree.
DEFAULT_CONTEXT_WINDOW = 128_000
PUBLISHED_CONTEXT_WINDOWS: Mapping[str, int] = {
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
    "gpt-5": 400_000,
    "gpt-5-mini": 400_000,
    "gpt-5-nano": 400_000,
    "o4-mini": 200_000,
    "gemini-2.5-pro": 1_048_576,
    "gemini-2.5-flash": 1_048_576,
    "gemini-2.5-flash-lite": 1_048_576,
    "gemini-2.0-flash": 1_048_576,
}


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything a simulator run is configured with. All fields have working defaults.

    The defaults serve every request with no limits, no latency and no faults;
    tests and benchmarks switch on what they exercise.
    """

    # Seeds the fault/latency stream and the generated content.
    seed: int = 0
    # Limits for any (key, model) not matched by a rule; None = unlimited.
    default_limits: Limits = Limits()
    limits: tuple[LimitRule, ...] = ()
    # Burst allowance of the per-minute buckets, in seconds of the limit
    # (1.0: a 120 RPM limit admits 2 requests at once, then 1 every 0.5 s).
    burst_window_s: float = 1.0
    # Rejected (429) requests drain the bucket too, as with the real providers.
    count_rejected: bool = True
    # Completion tokens charged to an OpenAI TPM limit when a request sets no max_tokens.
    default_max_tokens: int = 4096
    # Prompt + max_tokens (Gemini: the prompt) above this answers 400 context_length_exceeded.
    # None: each known model's published window (PUBLISHED_CONTEXT_WINDOWS, the same as
    # batchdb.prices), 128,000 for others. A number applies to every model not in context_windows.
    context_window: int | None = None
    context_windows: Mapping[str, int] = field(default_factory=dict)
    # Accepted keys; empty accepts any non-empty key.
    api_keys: tuple[str, ...] = ()
    # Keys answered with 429 insufficient_quota (OpenAI) / RESOURCE_EXHAUSTED (Gemini).
    quota_exhausted_keys: tuple[str, ...] = ()
    # Known models; empty accepts any model name.
    models: tuple[str, ...] = ()
    # Time to answer an admitted request, slept after admission (seconds).
    latency_s: Distribution = Distribution()
    # Length of generated text, before the max_tokens cap (tokens).
    output_tokens: Distribution = Distribution(kind="lognormal", median=120.0, sigma=0.6, cap=4000.0)
    error_rates: ErrorRates = ErrorRates()
    # Share of JSON-mode responses that come back as broken JSON.
    invalid_json_rate: float = 0.0
    outage: Outage | None = None
    embedding_dimensions: int = 1536
    # Automatic prompt caching (batchdb.simulator.prompt_cache): a prompt that repeats a prefix
    # served before to the same key and model reports cached tokens, as OpenAI / Azure OpenAI
    # (usage.prompt_tokens_details.cached_tokens) and Gemini 2.5+ (usageMetadata.
    # cachedContentTokenCount) do. False: cached tokens are always 0.
    prompt_cache: bool = True
    # Seconds of disuse (simulator clock) after which a cached prefix is gone.
    prompt_cache_ttl_s: float = 300.0
    # Shortest prompt that can hit, in tokens: OpenAI's 1,024; Gemini 2.5 Flash / Pro's 2,048.
    prompt_cache_min_tokens_openai: int = 1024
    prompt_cache_min_tokens_gemini: int = 2048
    # Hits cover the minimum plus whole steps of this many tokens (OpenAI: 1,024, 1,152, 1,280, ...).
    prompt_cache_step_tokens: int = 128
    # -- Batch APIs (batchdb.simulator.batches: OpenAI / Azure Batch API, Gemini Batch Mode) -------
    # Real batches take minutes to hours inside a 24 h (OpenAI) / 48 h (Gemini) window; here the
    # whole life of a batch is compressed into seconds so tests can watch every state.
    # Seconds a batch spends validating (OpenAI "validating", Gemini BATCH_STATE_PENDING).
    batch_validation_s: float = 0.1
    # Seconds its lines take once running; they finish evenly spread over this time, in file order.
    batch_duration_s: Distribution = Distribution(kind="uniform", low=1.0, high=2.0)
    # Seconds in "finalizing" after the last line, before "completed" (OpenAI / Azure).
    batch_finalizing_s: float = 0.1
    # Seconds in "cancelling" after a cancel (OpenAI / Azure); lines due by its end still finish.
    batch_cancelling_s: float = 0.2
    # The completion window (OpenAI's 24 h, Gemini's 48 h), compressed: a batch not done by then
    # expires. Azure OpenAI does not expire batches (its documentation says so), whatever this is.
    batch_window_s: float = 30.0
    # Share of lines answered with a 500 server_error instead of a completion (partial failures).
    batch_error_rate: float = 0.0
    # Enqueued prompt tokens allowed per (key, model) across unfinished batches (OpenAI's per-model
    # "batch queue limit", Azure's enqueued-token quota, Gemini's batch enqueued tokens); None =
    # unlimited. batch_queue_tokens_by_model overrides it per model.
    batch_queue_tokens: int | None = None
    batch_queue_tokens_by_model: Mapping[str, int] = field(default_factory=dict)
    # Requests per input file; None = the provider's (OpenAI 50,000; Azure 100,000; Gemini no limit).
    batch_max_requests: int | None = None
    # Input file size in bytes; None = the provider's (OpenAI / Azure 200 MB; Gemini 2 GB).
    batch_max_file_bytes: int | None = None
    # Size of a Gemini batchGenerateContent request with inlined requests (20 MB).
    batch_max_inline_bytes: int = 20 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.burst_window_s <= 0 or self.burst_window_s > 60:
            raise ValueError("burst_window_s must be in (0, 60]")
        if not 0 <= self.invalid_json_rate <= 1:
            raise ValueError("invalid_json_rate must be in [0, 1]")
        if (
            self.default_max_tokens < 0
            or (self.context_window is not None and self.context_window < 1)
            or self.embedding_dimensions < 1
        ):
            raise ValueError("default_max_tokens, context_window and embedding_dimensions must be positive")
        if self.prompt_cache_ttl_s < 0:
            raise ValueError("prompt_cache_ttl_s must be >= 0")
        if (
            min(self.prompt_cache_min_tokens_openai, self.prompt_cache_min_tokens_gemini, self.prompt_cache_step_tokens)
            < 1
        ):
            raise ValueError("prompt_cache_min_tokens_* and prompt_cache_step_tokens must be positive")
        if min(self.batch_validation_s, self.batch_finalizing_s, self.batch_cancelling_s) < 0:
            raise ValueError("batch_validation_s, batch_finalizing_s and batch_cancelling_s must be >= 0")
        if self.batch_window_s <= 0:
            raise ValueError("batch_window_s must be positive")
        if not 0 <= self.batch_error_rate <= 1:
            raise ValueError("batch_error_rate must be in [0, 1]")
        limits = [self.batch_queue_tokens, self.batch_max_requests, self.batch_max_file_bytes]
        limits += [self.batch_max_inline_bytes, *self.batch_queue_tokens_by_model.values()]
        if any(limit is not None and limit < 1 for limit in limits):
            raise ValueError("batch limits must be positive (or null for the provider's)")

    def batch_queue_limit(self, model: str) -> int | None:
        """Enqueued prompt tokens allowed for ``model`` per key (None: unlimited)."""
        return self.batch_queue_tokens_by_model.get(model, self.batch_queue_tokens)

    def context_window_for(self, model: str) -> int:
        if model in self.context_windows:
            return self.context_windows[model]
        if self.context_window is not None:
            return self.context_window
        return PUBLISHED_CONTEXT_WINDOWS.get(model, DEFAULT_CONTEXT_WINDOW)

    # -- JSON round trip ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["context_windows"] = dict(self.context_windows)
        data["batch_queue_tokens_by_model"] = dict(self.batch_queue_tokens_by_model)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimulatorConfig:
        return _from_mapping(cls, data, _CONFIG_FIELDS)

    @classmethod
    def load(cls, path: str | Path) -> SimulatorConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def updated(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """A copy with the top-level fields in ``changes`` replaced (as `POST /_sim/config` does)."""
        merged = self.to_dict()
        unknown = set(changes) - set(merged)
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        merged.update(changes)
        return SimulatorConfig.from_dict(merged)


def _from_mapping(cls: type[T], data: Any, converters: Mapping[str, Callable[[Any], Any]] | None = None) -> T:
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    converters = converters or {}
    kwargs = {name: converters[name](value) if name in converters else value for name, value in data.items()}
    return cls(**kwargs)


def _optional(convert: Callable[[Any], T]) -> Callable[[Any], T | None]:
    return lambda value: None if value is None else convert(value)


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


_CONFIG_FIELDS: dict[str, Callable[[Any], Any]] = {
    "seed": int,
    "default_limits": lambda v: _from_mapping(Limits, v),
    "limits": lambda v: tuple(_from_mapping(LimitRule, rule) for rule in v),
    "burst_window_s": float,
    "count_rejected": bool,
    "default_max_tokens": int,
    "context_window": _optional(int),
    "context_windows": lambda v: {str(k): int(n) for k, n in dict(v).items()},
    "api_keys": _strings,
    "quota_exhausted_keys": _strings,
    "models": _strings,
    "latency_s": lambda v: _from_mapping(Distribution, v),
    "output_tokens": lambda v: _from_mapping(Distribution, v),
    "error_rates": lambda v: _from_mapping(ErrorRates, v),
    "invalid_json_rate": float,
    "outage": _optional(lambda v: _from_mapping(Outage, v)),
    "embedding_dimensions": int,
    "prompt_cache": bool,
    "prompt_cache_ttl_s": float,
    "prompt_cache_min_tokens_openai": int,
    "prompt_cache_min_tokens_gemini": int,
    "prompt_cache_step_tokens": int,
    "batch_validation_s": float,
    "batch_duration_s": lambda v: _from_mapping(Distribution, v),
    "batch_finalizing_s": float,
    "batch_cancelling_s": float,
    "batch_window_s": float,
    "batch_error_rate": float,
    "batch_queue_tokens": _optional(int),
    "batch_queue_tokens_by_model": lambda v: {str(k): int(n) for k, n in dict(v).items()},
    "batch_max_requests": _optional(int),
    "batch_max_file_bytes": _optional(int),
    "batch_max_inline_bytes": int,
}
