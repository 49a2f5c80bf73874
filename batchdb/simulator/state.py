"""The state of one simulator run: config, limiter, recorder and its random streams.

Kept apart from the HTTP layer so the decisions (which fault, how long to wait,
what to answer) can be read, and tested, without a socket in sight.

Randomness comes from separate seeded streams so switching one feature on does
not shift another: faults and broken-JSON draws follow arrival order; latency
has its own stream; generated content is seeded by the prompt, model, request
``seed`` and config seed, so the same request always gets the same answer.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from batchdb.simulator import content
from batchdb.simulator.batches import BatchStore
from batchdb.simulator.config import SimulatorConfig
from batchdb.simulator.limits import RateLimiter
from batchdb.simulator.prompt_cache import PromptCache
from batchdb.simulator.recorder import Recorder
from batchdb.tokens import encoding

# A new value in any of these rebuilds the limiter (all buckets start full again).
_LIMIT_FIELDS = frozenset({"default_limits", "limits", "burst_window_s", "count_rejected"})
RESET = "reset"  # the fault that aborts the connection


@dataclass(frozen=True, slots=True)
class Generated:
    text: str
    completion_tokens: int
    truncated: bool  # hit the max-tokens cap


class Simulator:
    """The state of one simulator run; the HTTP layer is a thin shell around it."""

    def __init__(self, config: SimulatorConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Fresh counters, full buckets, an empty prompt cache, no files or batches, reseeded streams;
        second 0 starts now."""
        self.start = self._clock()
        self.started_at = time.time()
        self.limiter = RateLimiter(self.config, start=self.start)
        self.recorder = Recorder()
        self.prompt_cache = PromptCache()
        self.outage_anchor = self.start
        self._reseed()
        self.batches = BatchStore(self)  # after _reseed: it draws ids from the run's counter

    def _reseed(self) -> None:
        seed = self.config.seed
        self.fault_rng = random.Random(content.seed_for("faults", seed))
        self.latency_rng = random.Random(content.seed_for("latency", seed))
        self._run_token = secrets.token_hex(4)
        self._counter = 0

    def apply(self, changes: dict[str, Any]) -> SimulatorConfig:
        """Replace top-level config fields at runtime (`POST /_sim/config`).

        New limit values refill every bucket; an ``outage`` field (re)starts its
        window now; a ``seed`` field reseeds the fault and latency streams.
        """
        old, self.config = self.config, self.config.updated(changes)
        if any(getattr(old, name) != getattr(self.config, name) for name in _LIMIT_FIELDS):
            self.limiter = RateLimiter(self.config, start=self.start)
        else:
            self.limiter.config = self.config
        if "outage" in changes:
            self.outage_anchor = self._clock()
        if "seed" in changes:
            self._reseed()
        return self.config

    def now(self) -> float:
        return self._clock()

    def next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._run_token}{self._counter:08x}"

    def outage_status(self, now: float) -> int | None:
        outage = self.config.outage
        if outage is not None and outage.active(now - self.outage_anchor):
            return outage.status
        return None

    def draw_fault(self) -> int | str | None:
        """500, 503, "reset" or None, from the arrival-ordered fault stream."""
        rates = self.config.error_rates
        if rates.total <= 0:
            return None
        u = self.fault_rng.random()
        if u < rates.http_500:
            return 500
        if u < rates.http_500 + rates.http_503:
            return 503
        if u < rates.total:
            return RESET
        return None

    def draw_latency(self) -> float:
        latency = self.config.latency_s
        return 0.0 if latency.is_zero else latency.sample(self.latency_rng)

    def draw_broken_json(self) -> bool:
        rate = self.config.invalid_json_rate
        return rate > 0 and self.fault_rng.random() < rate

    def cached_prompt_tokens(
        self,
        scope: tuple[str, str, str],
        prompt_tokens: int,
        minimum: int,
        prompt_ids: Callable[[], Sequence[int]],
        *,
        now: float | None = None,
    ) -> int:
        """Prompt tokens this served request reports as cached, and remember its prefixes.

        ``scope`` is (route, key, model). A prompt under ``minimum`` (or the cache switched
        off) answers 0 before ``prompt_ids`` is called, so short prompts cost nothing.
        ``now`` is when the request is served (a batch line's due time), default the clock.
        """
        config = self.config
        if not config.prompt_cache or prompt_tokens < minimum:
            return 0
        return self.prompt_cache.serve(
            scope,
            prompt_ids,
            n_tokens=prompt_tokens,
            minimum=minimum,
            step=config.prompt_cache_step_tokens,
            ttl_s=config.prompt_cache_ttl_s,
            now=self._clock() if now is None else now,
        )

    def generate(self, rng: random.Random, json_mode: Any, cap: int, broken: bool) -> Generated:
        """Text (``json_mode`` None), a JSON object ("object") or a schema instance (a dict)."""
        target = max(1, round(self.config.output_tokens.sample(rng)))
        if json_mode is None:
            n = min(target, cap)
            return Generated(content.text_of_tokens(rng, n), n, target >= cap)
        if json_mode == "object":
            text = content.json_object_text(rng, target)
        else:
            text = json.dumps(content.schema_instance(json_mode, rng), ensure_ascii=False)
        if broken:
            text = content.break_json(text, rng)
        tokens = encoding().encode_ordinary(text)
        if len(tokens) > cap:
            return Generated(encoding().decode(tokens[:cap]) if cap > 0 else "", cap, True)
        return Generated(text, len(tokens), False)

    def stats(self, *, include_series: bool = True) -> dict[str, Any]:
        now = self._clock()
        self.batches.advance_all(now)  # batch lines due by now are counted, even if no one polled them
        return {
            "started_at": self.started_at,
            "elapsed_s": now - self.start,
            "second": self.limiter.second(now),
            **self.recorder.stats(include_series=include_series),
        }
