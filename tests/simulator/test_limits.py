"""The rate limiter in-process, on a fake clock: exact, fast and deterministic."""

from __future__ import annotations

import random
import time
from collections import defaultdict

import pytest

from batchdb.simulator.config import LimitRule, Limits, SimulatorConfig
from batchdb.simulator.limits import Dimension, RateLimiter

KEY, MODEL = "sk-test", "gpt-4o-mini"


def limiter(**fields: object) -> RateLimiter:
    return RateLimiter(SimulatorConfig(**fields), start=0.0, wall_clock=lambda: 1_750_000_000.0)  # type: ignore[arg-type]


def test_burst_then_one_request_per_interval() -> None:
    rl = limiter(default_limits=Limits(rpm=120), count_rejected=False)
    assert rl.admit(KEY, MODEL, 0, 0.0).allowed
    assert rl.admit(KEY, MODEL, 0, 0.0).allowed  # burst = 120 * 1 s / 60 = 2
    rejected = rl.admit(KEY, MODEL, 0, 0.0)
    assert not rejected.allowed and rejected.dimension is Dimension.REQUESTS
    assert rejected.retry_after_s == pytest.approx(0.5)
    assert not rl.admit(KEY, MODEL, 0, 0.49).allowed
    assert rl.admit(KEY, MODEL, 0, 0.5).allowed
    assert not rl.admit(KEY, MODEL, 0, 0.6).allowed


def test_retry_after_is_exactly_when_the_request_fits() -> None:
    rl = limiter(default_limits=Limits(rpm=600, tpm=20_000), count_rejected=False)
    rng = random.Random(1)
    now = 0.0
    for _ in range(2000):
        cost = rng.randint(50, 3000)
        verdict = rl.admit(KEY, MODEL, cost, now)
        if not verdict.allowed:
            assert verdict.retry_after_s is not None and verdict.retry_after_s > 0
            assert not rl.admit(KEY, MODEL, cost, now + verdict.retry_after_s * 0.99 - 1e-6).allowed
            assert rl.admit(KEY, MODEL, cost, now + verdict.retry_after_s + 1e-6).allowed
            now += verdict.retry_after_s + 1e-6
        now += rng.random() * 0.05


@pytest.mark.parametrize("burst_window_s", [0.5, 1.0, 10.0, 60.0])
@pytest.mark.parametrize("count_rejected", [False, True])
def test_no_sixty_second_window_exceeds_the_limits(burst_window_s: float, count_rejected: bool) -> None:
    """Ten simulated minutes of bursty overload: every 60 consecutive seconds stay within RPM and TPM."""
    rpm, tpm = 90, 30_000
    rl = limiter(default_limits=Limits(rpm=rpm, tpm=tpm), burst_window_s=burst_window_s, count_rejected=count_rejected)
    rng = random.Random(int(burst_window_s * 10) + count_rejected)
    requests: dict[int, int] = defaultdict(int)
    tokens: dict[int, int] = defaultdict(int)
    now = 0.0
    while now < 600:
        # Bursts of many requests at once, then quiet gaps: the worst case for a bucket.
        for _ in range(rng.choice([1, 1, 5, 40])):
            cost = rng.randint(10, 1500)
            if rl.admit(KEY, MODEL, cost, now).allowed:
                requests[rl.second(now)] += 1
                tokens[rl.second(now)] += cost
        now += rng.expovariate(4.0)
    for series, limit in ((requests, rpm), (tokens, tpm)):
        worst = max(sum(series.get(s, 0) for s in range(start, start + 60)) for start in range(0, 601))
        assert worst <= limit
    if not count_rejected:  # and it does not starve a busy client (random arrivals waste some refill)
        minutes = [sum(requests.get(s, 0) for s in range(m * 60, m * 60 + 60)) for m in range(1, 10)]
        token_minutes = [sum(tokens.get(s, 0) for s in range(m * 60, m * 60 + 60)) for m in range(1, 10)]
        used = [max(n / rpm, t / tpm) for n, t in zip(minutes, token_minutes, strict=True)]
        assert sum(used) / len(used) >= 0.7


def test_rejected_requests_drain_the_bucket() -> None:
    rl = limiter(default_limits=Limits(rpm=60))  # 1 per second, burst 1
    assert rl.admit(KEY, MODEL, 0, 0.0).allowed
    # Hammering every 0.3 s: each rejection empties what had refilled, so nothing gets through.
    for i in range(1, 20):
        assert not rl.admit(KEY, MODEL, 0, i * 0.3).allowed
    # Stop hammering: one refill interval later it works again.
    assert rl.admit(KEY, MODEL, 0, 19 * 0.3 + 1.0).allowed


def test_rejections_do_not_drain_when_not_counted() -> None:
    rl = limiter(default_limits=Limits(rpm=60), count_rejected=False)
    assert rl.admit(KEY, MODEL, 0, 0.0).allowed
    assert not rl.admit(KEY, MODEL, 0, 0.5).allowed
    assert rl.admit(KEY, MODEL, 0, 1.0).allowed


def test_large_token_requests_pass_on_a_full_bucket_and_leave_debt() -> None:
    rl = limiter(default_limits=Limits(tpm=60_000), count_rejected=False)  # burst 1,000 tokens, 1,000/s
    assert rl.admit(KEY, MODEL, 4_000, 0.0).allowed  # bigger than the burst: needs a full bucket
    rejected = rl.admit(KEY, MODEL, 100, 0.0)
    assert rejected.dimension is Dimension.TOKENS
    assert rejected.retry_after_s == pytest.approx(3.1)  # repay 3,000 debt, then 100
    assert rl.admit(KEY, MODEL, 100, 3.1 + 1e-6).allowed


def test_request_larger_than_the_limit_is_too_large() -> None:
    rl = limiter(default_limits=Limits(tpm=1_000))
    verdict = rl.admit(KEY, MODEL, 1_001, 0.0)
    assert not verdict.allowed and verdict.too_large and verdict.retry_after_s is None
    assert verdict.limit == 1_000 and verdict.requested == 1_001
    assert rl.admit(KEY, MODEL, 1_000, 0.0).allowed  # nothing was charged


def test_sixty_second_window_caps_a_full_minute_burst() -> None:
    rl = limiter(default_limits=Limits(rpm=20), burst_window_s=60.0, count_rejected=False)
    assert all(rl.admit(KEY, MODEL, 0, 0.0).allowed for _ in range(20))
    verdict = rl.admit(KEY, MODEL, 0, 30.0)  # the bucket has refilled 10, the minute has not passed
    assert not verdict.allowed and verdict.retry_after_s == pytest.approx(30.0)
    assert not rl.admit(KEY, MODEL, 0, 59.99).allowed
    assert rl.admit(KEY, MODEL, 0, 60.0).allowed


def test_requests_per_day_reset_at_pacific_midnight() -> None:
    wall = [1_750_000_000.0]  # 2025-06-15 08:06:40 PDT
    rl = RateLimiter(SimulatorConfig(default_limits=Limits(rpd=2)), start=0.0, wall_clock=lambda: wall[0])
    assert rl.admit(KEY, MODEL, 0, 0.0).allowed
    assert rl.admit(KEY, MODEL, 0, 1.0).allowed
    verdict = rl.admit(KEY, MODEL, 0, 2.0)
    assert verdict.dimension is Dimension.REQUESTS_PER_DAY and verdict.limit == 2
    seconds_to_midnight = 15 * 3600 + 53 * 60 + 20
    assert verdict.retry_after_s == pytest.approx(seconds_to_midnight)
    wall[0] += seconds_to_midnight
    assert rl.admit(KEY, MODEL, 0, 3.0).allowed


def test_limits_resolve_per_field_most_specific_first() -> None:
    config = SimulatorConfig(
        default_limits=Limits(rpm=100, tpm=10_000, rpd=1_000),
        limits=(
            LimitRule(model="gpt-4o", rpm=50, tpm=5_000),
            LimitRule(key="sk-a", rpm=10),
            LimitRule(key="sk-a", model="gpt-4o", tpm=1_000),
        ),
    )
    rl = RateLimiter(config, start=0.0)
    assert rl.resolve("sk-a", "gpt-4o") == Limits(rpm=10, tpm=1_000, rpd=1_000)
    assert rl.resolve("sk-a", "other") == Limits(rpm=10, tpm=10_000, rpd=1_000)
    assert rl.resolve("sk-b", "gpt-4o") == Limits(rpm=50, tpm=5_000, rpd=1_000)
    assert rl.resolve("sk-b", "other") == Limits(rpm=100, tpm=10_000, rpd=1_000)


def test_limits_are_per_key_and_model() -> None:
    rl = limiter(default_limits=Limits(rpm=60))
    assert rl.admit("sk-a", MODEL, 0, 0.0).allowed
    assert rl.admit("sk-b", MODEL, 0, 0.0).allowed
    assert rl.admit("sk-a", "other-model", 0, 0.0).allowed
    assert not rl.admit("sk-a", MODEL, 0, 0.0).allowed


def test_header_state() -> None:
    rl = limiter(default_limits=Limits(rpm=600, tpm=60_000), count_rejected=False)  # bursts 10 and 1,000
    state = rl.admit(KEY, MODEL, 400, 0.0).state
    assert (state.limit_requests, state.remaining_requests) == (600, 9)
    assert (state.limit_tokens, state.remaining_tokens) == (60_000, 600)
    assert state.reset_requests_s == pytest.approx(0.1)
    assert state.reset_tokens_s == pytest.approx(0.4)
    unlimited = limiter().admit(KEY, MODEL, 400, 0.0).state
    assert unlimited.limit_requests is None and unlimited.limit_tokens is None


def test_admission_is_constant_time() -> None:
    """Guard against O(n) work per request: 100k admissions over 10 minutes of clock, the last
    10k no slower than the first 10k. A ratio of this process's own CPU time, so neither the
    machine's speed nor its load decides it (O(n) work would make the last ones ~10x slower)."""
    rl = limiter(default_limits=Limits(rpm=100_000, tpm=10_000_000))

    def admit(first: int, n: int) -> float:
        started = time.process_time()
        for i in range(first, first + n):
            rl.admit(f"sk-{i % 10}", MODEL, 100, i * 0.006)
        return time.process_time() - started

    early = admit(0, 10_000)
    admit(10_000, 80_000)
    late = admit(90_000, 10_000)
    assert late <= 3 * early + 0.05, (early, late)
