"""The rate-limit ledger's SQL on real PostgreSQL: buckets in database time, 429 back-off, quotas, budgets."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg.rows import dict_row

from batchdb import ledger
from batchdb.ledger import Lane, Reservation

LANE = Lane("openai", "default", "gpt-4o-mini")


def reserve(dsn: str, tokens: list[int], **extra: object) -> Reservation:
    async def go() -> Reservation:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as c:
            return await ledger.reserve(c, LANE, tokens, **extra)  # type: ignore[arg-type]

    return asyncio.run(go())


def limits(conn: psycopg.Connection, **values: int | None) -> None:
    ledger.set_limits(conn, LANE, rpm=values.get("rpm"), tpm=values.get("tpm"), rpd=values.get("rpd"))


def state(conn: psycopg.Connection) -> dict:
    return conn.execute(
        "SELECT * FROM batchdb.rate_limits WHERE provider = 'openai' AND model = 'gpt-4o-mini'"
    ).fetchone()


def test_a_key_without_limits_is_not_paced(dsn: str) -> None:
    assert reserve(dsn, [100] * 50) == Reservation(granted=50, wait_seconds=0.0, daily_exhausted=False, limited=False)


def elapse(conn: psycopg.Connection, seconds: float) -> None:
    """Let `seconds` pass for the key, in database time: every timestamp of its state moves back.
    The ledger refills from clock_timestamp(), so a test that slept instead would depend on how
    fast its next statement runs."""
    conn.execute(
        "UPDATE batchdb.rate_limits SET refilled_at = refilled_at - make_interval(secs => %(s)s), "
        "blocked_until = blocked_until - make_interval(secs => %(s)s), "
        "slowed_at = slowed_at - make_interval(secs => %(s)s) "
        "WHERE provider = 'openai' AND model = 'gpt-4o-mini'",
        {"s": seconds},
    )


def freeze(conn: psycopg.Connection) -> None:
    """The next reservation sees no time pass since the last one (its refill is greatest(0, t - refilled_at))."""
    conn.execute(
        "UPDATE batchdb.rate_limits SET refilled_at = clock_timestamp() + interval '1 hour' "
        "WHERE provider = 'openai' AND model = 'gpt-4o-mini'"
    )


def test_request_bucket_starts_empty_refills_at_the_limit_and_caps_the_burst(
    dsn: str, conn: psycopg.Connection
) -> None:
    limits(conn, rpm=6000)  # 100/s x 0.99 target; burst 0.5 s = 49.5 calls
    freeze(conn)
    first = reserve(dsn, [1] * 200)
    assert first.granted == 0 and first.limited  # no credit but what time refills
    elapse(conn, 1.0)
    burst = reserve(dsn, [1] * 200)
    assert burst.granted == 49  # capped at half a second of the limit (49.5), not a minute's budget
    assert burst.wait_seconds == pytest.approx(0.5 / 99)  # the next call is due when the half call refills
    before = state(conn)
    elapse(conn, 0.2)
    refill = reserve(dsn, [1] * 200)
    # 0.2 s plus however long the statements took, both in database time, at 99 calls/s.
    elapsed = 0.2 + (state(conn)["refilled_at"] - before["refilled_at"]).total_seconds()
    credit = min(49.5, before["request_credit"] + elapsed * 99)
    assert credit - 1 < refill.granted <= credit + 1e-6 and refill.granted >= 20


def test_token_bucket_binds_and_oversized_calls_wait_for_a_full_bucket(dsn: str, conn: psycopg.Connection) -> None:
    limits(conn, tpm=60_000)  # 990 tokens/s; bucket 495 tokens
    elapse(conn, 1.0)
    got = reserve(dsn, [200, 200, 200])
    assert got.granted == 2
    assert got.wait_seconds == pytest.approx((200 - (495 - 400)) / 990)
    elapse(conn, 1.0)
    big = reserve(dsn, [5000])  # larger than the bucket: goes when the bucket is full, leaving a debt
    assert big.granted == 1
    assert state(conn)["token_credit"] == pytest.approx(495 - 5000)


def test_refund_gives_back_what_the_estimate_overcounted(dsn: str, conn: psycopg.Connection) -> None:
    limits(conn, tpm=60_000)
    elapse(conn, 1.0)
    assert reserve(dsn, [495]).granted == 1
    freeze(conn)
    assert reserve(dsn, [300]).granted == 0
    freeze(conn)
    assert reserve(dsn, [300], refund_tokens=400).granted == 1


def test_a_429_blocks_the_key_for_the_providers_delay_and_slows_it(dsn: str, conn: psycopg.Connection) -> None:
    limits(conn, rpm=6000)
    elapse(conn, 1.0)

    async def limited() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            await ledger.record_rate_limited(c, LANE, 30)

    asyncio.run(limited())
    at_429 = state(conn)
    assert at_429["pace"] == pytest.approx(0.7) and at_429["rate_limited"] == 1
    blocked = reserve(dsn, [1])
    after = state(conn)
    # Held until the provider's delay is over, in database time; the pace recovers 2%/s from 0.7.
    assert blocked.granted == 0
    assert blocked.wait_seconds == pytest.approx((after["blocked_until"] - after["refilled_at"]).total_seconds())
    assert 0 < blocked.wait_seconds <= 30
    since = (after["refilled_at"] - at_429["refilled_at"]).total_seconds()
    assert after["pace"] == pytest.approx(0.7 + 0.02 * since)
    elapse(conn, 30.0)
    assert reserve(dsn, [1] * 100).granted > 0
    usage = conn.execute("SELECT sum(rate_limited) AS n FROM batchdb.rate_usage").fetchone()
    assert usage["n"] == 1


def test_an_empty_provider_window_eases_the_key_at_most_once_a_second(dsn: str, conn: psycopg.Connection) -> None:
    limits(conn, rpm=600)  # a tenth of a second of budget = 1 request
    reserve(dsn, [1], remaining_requests=5.0)
    assert state(conn)["pace"] == pytest.approx(1.0)
    slowdowns = []
    for _ in range(5):  # five workers report the same empty window
        before = state(conn)
        reserve(dsn, [1], remaining_requests=0.0)
        after = state(conn)
        slowed = after["slowed_at"] != before["slowed_at"]
        # The rule, checked in database time: ease off only if the last slow-down is over a second old.
        due = before["slowed_at"] is None or (after["refilled_at"] - before["slowed_at"]).total_seconds() > 1
        assert slowed == due, (before, after)
        slowdowns.append(slowed)
    assert slowdowns[0]  # the first report eases the key; the rest only if a second had passed
    elapse(conn, 1.1)
    before = state(conn)
    reserve(dsn, [1], remaining_requests=0.0)
    assert state(conn)["slowed_at"] != before["slowed_at"]
    assert state(conn)["pace"] < before["pace"]


def test_a_burst_of_429s_slows_the_key_once(dsn: str, conn: psycopg.Connection) -> None:
    limits(conn, rpm=600)

    async def burst() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            for _ in range(5):
                await ledger.record_rate_limited(c, LANE, 30)  # each arrives while the key is held

    asyncio.run(burst())
    after = state(conn)
    assert after["pace"] == pytest.approx(0.7) and after["rate_limited"] == 5


def test_daily_quota_exhaustion_is_reported(dsn: str, conn: psycopg.Connection) -> None:
    limits(conn, rpm=60_000, rpd=3)
    elapse(conn, 1.0)
    assert reserve(dsn, [1] * 5).granted == 3
    spent = reserve(dsn, [1])
    assert spent.granted == 0 and spent.daily_exhausted
    assert 0 < spent.wait_seconds <= 24 * 3600 + 3600


def test_limits_announced_in_headers_fill_in_but_never_override_configured_ones(
    dsn: str, conn: psycopg.Connection
) -> None:
    async def learn(lane: Lane, rpm: int, tpm: int) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            await ledger.learn_limits(c, lane, rpm, tpm)

    unknown = Lane("openai", "default", "gpt-4.1")
    asyncio.run(learn(unknown, 500, 30_000))
    asyncio.run(learn(LANE, 500, 30_000))
    limits(conn, rpm=100, tpm=1000)
    asyncio.run(learn(LANE, 500, 30_000))
    rows = {r["model"]: r for r in ledger.list_limits(conn)}
    assert (rows["gpt-4.1"]["rpm"], rows["gpt-4.1"]["source"]) == (500, "headers")
    assert (rows["gpt-4o-mini"]["rpm"], rows["gpt-4o-mini"]["source"]) == (100, "configured")


def test_budget_reservations_stop_at_the_budget_and_pause_the_job(conn: psycopg.Connection) -> None:
    job_id = conn.execute(
        "INSERT INTO batchdb.jobs (model, budget_usd) VALUES ('gpt-4o-mini', 1.00) RETURNING id"
    ).fetchone()["id"]

    def reserve(usd: float) -> str:
        return conn.execute("SELECT batchdb.reserve_budget(%s, %s::numeric) AS r", (job_id, usd)).fetchone()["r"]

    def job() -> dict:
        return conn.execute(
            "SELECT status, status_reason, reserved_usd FROM batchdb.jobs WHERE id = %s", (job_id,)
        ).fetchone()

    # Calls in flight hold the budget: the fourth waits for them rather than pausing the job.
    assert [reserve(0.30) for _ in range(4)] == ["ok", "ok", "ok", "wait"]
    assert job()["status"] == "running" and float(job()["reserved_usd"]) == pytest.approx(0.90)
    # A negative estimate never frees budget.
    assert reserve(-5) == "ok" and float(job()["reserved_usd"]) == pytest.approx(0.90)
    conn.execute("SELECT batchdb.release_budget(ARRAY[%s]::bigint[], ARRAY[0.9]::numeric[])", (job_id,))
    assert job()["reserved_usd"] == 0
    # What was spent leaves no room: the job pauses with the reason.
    conn.execute("UPDATE batchdb.jobs SET cost_usd = 0.80 WHERE id = %s", (job_id,))
    assert reserve(0.30) == "paused"
    assert job()["status"] == "paused" and "budget of $1.000000 reached" in job()["status_reason"]
