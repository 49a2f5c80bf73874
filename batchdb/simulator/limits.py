"""Provider-style rate limiting per (api key, model): RPM, TPM and requests per day.

Exact semantics (the simulator's tests, and anyone reading its stats, rely on them).
Everything is decided when a request *arrives*; latency never enters the windows.

Costs. The requests dimension costs 1 per request. The tokens dimension costs what
the caller charges: for OpenAI/Azure chat, prompt tokens + ``max_completion_tokens``
(or ``max_tokens``, or `SimulatorConfig.default_max_tokens` when neither is sent);
for Gemini and embeddings, prompt tokens only.

Each per-minute limit ``L`` (RPM or TPM) is enforced by two checks, and a request is
admitted only if every configured dimension passes both:

1. Smoothing bucket. Capacity ``C = max(1, L * burst_window_s / 60)``, refilled
   continuously at ``L / 60`` per second, full at start. A request costing ``c``
   needs a level of at least ``min(c, C)``; admitting it subtracts ``c``. So 120 RPM
   with a 1 s burst window admits 2 requests at once and then one every 0.5 s, not
   120 at once. A request larger than the burst (common for tokens: 4,096 charged
   tokens against a 1,666-token burst at 100k TPM) waits for a full bucket and
   leaves it in debt, which keeps the long-run rate at exactly ``L / 60``.
2. Sixty-second window at one-second resolution. Seconds are counted from the
   limiter's start (`/_sim/stats` uses the same clock and buckets). The cost
   admitted in the current second plus the previous 59 must stay ``<= L``. This
   makes the promise exact: in any 60 consecutive seconds of the stats series,
   admitted requests <= RPM and charged tokens <= TPM (the bucket alone could
   admit ``C + L`` in a minute).

A request costing more than ``L`` tokens can never pass: it is rejected as "too
large" (no retry-after), charged nothing.

Rejected requests count, as with the real providers (``count_rejected``, default on):
a 429 drains each per-minute bucket by the request's cost, floored at zero (it adds
no debt and never enters the sixty-second window). A client that keeps hammering
stays locked out; one that stops recovers within ``1 / rate`` seconds.

Requests per day (Gemini-style RPD) count admitted requests per Pacific calendar
day and reset at midnight America/Los_Angeles.

Header values (`RateLimitState`): ``remaining`` is what could be admitted right now,
``floor(min(bucket level, L - window sum))``; ``reset`` is the time for the bucket to
refill to capacity. ``retry_after_s`` on a rejection is the time until this request
would pass every check if nothing else arrived.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo

from batchdb.simulator.config import Limits, SimulatorConfig

_EPSILON = 1e-9
_WINDOW_SECONDS = 60


class Dimension(enum.StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    REQUESTS_PER_DAY = "requests_per_day"


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """The values behind OpenAI's x-ratelimit-* headers; ``None`` for unlimited dimensions."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The limiter's answer for one request."""

    allowed: bool
    state: RateLimitState
    # Set when rejected: which limit, its value, what was used and requested.
    dimension: Dimension | None = None
    limit: int | None = None
    used: int | None = None
    requested: int | None = None
    retry_after_s: float | None = None
    too_large: bool = False


class _MinuteLimit:
    """Smoothing bucket + 60 one-second slots for one (key, model, dimension)."""

    __slots__ = ("capacity", "head", "level", "limit", "rate", "slots", "updated", "window_sum")

    def __init__(self, limit: int, burst_window_s: float, now: float, second: int) -> None:
        self.limit = limit
        self.capacity = max(1.0, limit * burst_window_s / 60.0)
        self.rate = limit / 60.0
        self.level = self.capacity
        self.updated = now
        self.slots = [0] * _WINDOW_SECONDS
        self.head = second
        self.window_sum = 0

    def sync(self, now: float, second: int) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now
        gap = second - self.head
        if gap <= 0:
            return
        if gap >= _WINDOW_SECONDS:
            self.slots = [0] * _WINDOW_SECONDS
            self.window_sum = 0
        else:  # amortised O(1): each slot is cleared once per minute
            slots = self.slots
            for s in range(self.head + 1, second + 1):
                i = s % _WINDOW_SECONDS
                self.window_sum -= slots[i]
                slots[i] = 0
        self.head = second

    def wait_s(self, cost: int, now: float, second: int, start: float) -> float:
        """Seconds until ``cost`` passes both checks (0 if it passes now). Call after `sync`."""
        wait = 0.0
        need = min(float(cost), self.capacity)
        if self.level < need - _EPSILON:
            wait = (need - self.level) / self.rate
        excess = self.window_sum + cost - self.limit
        if excess > 0:  # only on rejections: walk the window oldest first
            freed = 0
            for s in range(second - _WINDOW_SECONDS + 1, second + 1):
                freed += self.slots[s % _WINDOW_SECONDS]
                if freed >= excess:
                    wait = max(wait, start + s + _WINDOW_SECONDS - now)
                    break
        return wait

    def consume(self, cost: int, second: int) -> None:
        self.level -= cost
        self.slots[second % _WINDOW_SECONDS] += cost
        self.window_sum += cost

    def penalise(self, cost: int) -> None:
        if self.level > 0:
            self.level = max(0.0, self.level - cost)

    def remaining(self) -> int:
        return max(0, math.floor(min(self.level, self.limit - self.window_sum) + _EPSILON))

    def reset_s(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


class _DayLimit:
    __slots__ = ("count", "day", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.day = -1
        self.count = 0


class _KeyModelState:
    __slots__ = ("limits", "per_day", "requests", "tokens")

    def __init__(self, limits: Limits, burst_window_s: float, now: float, second: int) -> None:
        self.limits = limits
        self.requests = _MinuteLimit(limits.rpm, burst_window_s, now, second) if limits.rpm else None
        self.tokens = _MinuteLimit(limits.tpm, burst_window_s, now, second) if limits.tpm else None
        self.per_day = _DayLimit(limits.rpd) if limits.rpd else None


def _pacific() -> tzinfo:
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo("America/Los_Angeles")
    except Exception:  # noqa: BLE001 - no tz database: a fixed offset is close enough for a simulator
        return timezone(timedelta(hours=-8))


_PACIFIC = _pacific()


def pacific_day(wall_time: float) -> tuple[int, float]:
    """(ordinal of the Pacific calendar day, seconds until its midnight) for a Unix time."""
    local = datetime.fromtimestamp(wall_time, _PACIFIC)
    midnight = datetime(local.year, local.month, local.day, tzinfo=_PACIFIC) + timedelta(days=1)
    return local.toordinal(), max(0.0, midnight.timestamp() - wall_time)


class RateLimiter:
    """Admits or rejects requests per (api key, model); O(1) per request."""

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        start: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.start = time.monotonic() if start is None else start
        self._wall_clock = wall_clock
        self._states: dict[tuple[str, str], _KeyModelState] = {}

    def second(self, now: float) -> int:
        """The one-second bucket ``now`` (monotonic) falls in; shared with the recorder."""
        return int(now - self.start) if now >= self.start else -1

    def resolve(self, key: str, model: str) -> Limits:
        """Per-field resolution: (key, model) rule, (key, *), (*, model), then defaults."""
        rpm, tpm, rpd = None, None, None
        rules = self.config.limits
        ranked = sorted(
            (rule for rule in rules if rule.key in ("*", key) and rule.model in ("*", model)),
            key=lambda rule: (rule.key == "*", rule.model == "*"),
        )
        for rule in ranked:
            rpm = rule.rpm if rpm is None else rpm
            tpm = rule.tpm if tpm is None else tpm
            rpd = rule.rpd if rpd is None else rpd
        default = self.config.default_limits
        return Limits(
            rpm=default.rpm if rpm is None else rpm,
            tpm=default.tpm if tpm is None else tpm,
            rpd=default.rpd if rpd is None else rpd,
        )

    def _state(self, key: str, model: str, now: float, second: int) -> _KeyModelState:
        state = self._states.get((key, model))
        if state is None:
            state = _KeyModelState(self.resolve(key, model), self.config.burst_window_s, now, second)
            self._states[(key, model)] = state
        return state

    def snapshot(self, key: str, model: str, now: float) -> RateLimitState:
        """Header values without admitting anything (for 400s, 503s, quota errors)."""
        second = self.second(now)
        state = self._state(key, model, now, second)
        for bucket in (state.requests, state.tokens):
            if bucket is not None:
                bucket.sync(now, second)
        return _headers(state)

    def admit(self, key: str, model: str, tokens: int, now: float) -> Verdict:
        second = self.second(now)
        state = self._state(key, model, now, second)
        per_day = state.per_day
        day_wait = 0.0
        if per_day is not None:
            day, day_wait = pacific_day(self._wall_clock())
            if day != per_day.day:
                per_day.day, per_day.count = day, 0
        requests, token_bucket = state.requests, state.tokens
        if requests is not None:
            requests.sync(now, second)
        if token_bucket is not None:
            token_bucket.sync(now, second)

        if per_day is not None and per_day.count >= per_day.limit:
            return Verdict(
                False, _headers(state), Dimension.REQUESTS_PER_DAY, per_day.limit, per_day.count, 1, day_wait
            )
        if token_bucket is not None and tokens > token_bucket.limit:
            return Verdict(
                False, _headers(state), Dimension.TOKENS, token_bucket.limit, token_bucket.window_sum, tokens,
                None, too_large=True,
            )  # fmt: skip

        wait_requests = requests.wait_s(1, now, second, self.start) if requests is not None else 0.0
        wait_tokens = token_bucket.wait_s(tokens, now, second, self.start) if token_bucket is not None else 0.0
        if wait_requests > 0 or wait_tokens > 0:
            if self.config.count_rejected:
                if requests is not None:
                    requests.penalise(1)
                if token_bucket is not None:
                    token_bucket.penalise(tokens)
            if wait_requests > 0:
                assert requests is not None
                dimension, bucket, requested = Dimension.REQUESTS, requests, 1
            else:
                assert token_bucket is not None
                dimension, bucket, requested = Dimension.TOKENS, token_bucket, tokens
            return Verdict(
                False, _headers(state), dimension, bucket.limit, bucket.window_sum, requested,
                max(wait_requests, wait_tokens),
            )  # fmt: skip

        if requests is not None:
            requests.consume(1, second)
        if token_bucket is not None:
            token_bucket.consume(tokens, second)
        if per_day is not None:
            per_day.count += 1
        return Verdict(True, _headers(state))


def _headers(state: _KeyModelState) -> RateLimitState:
    requests, tokens = state.requests, state.tokens
    return RateLimitState(
        limit_requests=requests.limit if requests else None,
        remaining_requests=requests.remaining() if requests else None,
        reset_requests_s=requests.reset_s() if requests else None,
        limit_tokens=tokens.limit if tokens else None,
        remaining_tokens=tokens.remaining() if tokens else None,
        reset_tokens_s=tokens.reset_s() if tokens else None,
    )
