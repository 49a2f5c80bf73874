"""A waiting lane holds no worker slots other lanes could use, and says why it is not moving
(workers/pacer.py LaneWaiting, batchdb.lane_states in 0006, `batchdb limits show`, the worker log)."""

from __future__ import annotations

import asyncio
import logging

import pandas as pd
import psycopg
import pytest
from click.testing import CliRunner

import batchdb
from batchdb.cli import cli
from batchdb.providers.instant import InstantProvider
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig


def hold_lane(conn: psycopg.Connection, model: str, seconds: float) -> None:
    """What a 429 with a long retry-after leaves in the ledger: the lane held for `seconds`."""
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm, blocked_until) "
        "VALUES ('instant', %s, 600, 600000, clock_timestamp() + make_interval(secs => %s))",
        (model, seconds),
    )


def test_a_held_lane_gives_its_rows_back_so_another_lane_runs(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    hold_lane(conn, "gpt-4o", 120)
    held = batchdb.submit(
        pd.DataFrame({"text": [f"held {i}" for i in range(6)]}),
        prompt="{text}",
        model="gpt-4o",
        provider="instant",
        dsn=dsn,
    )
    free = batchdb.submit(
        pd.DataFrame({"text": [f"free {i}" for i in range(20)]}),
        prompt="{text}",
        model="gpt-4o-mini",
        provider="instant",
        dsn=dsn,
    )
    # The default lane_wait_seconds (5 s): what users get.
    worker = Worker(
        WorkerConfig(dsn=dsn, concurrency=3, poll_interval=0.2, shutdown_grace=1, retry=RetryPolicy(0.05, 0.2)),
        providers={"instant": InstantProvider()},
    )

    async def run_until_free_done() -> bool:
        task = asyncio.create_task(worker.run())
        try:
            for _ in range(600):  # bounded: 60 s at most; the other lane needs about 10 s
                row = conn.execute("SELECT n_succeeded FROM batchdb.jobs WHERE id = %s", (free.id,)).fetchone()
                if row["n_succeeded"] == 20:
                    return True
                await asyncio.sleep(0.1)
            return False
        finally:
            worker.stop()
            await task

    with caplog.at_level(logging.INFO, logger="batchdb.workers.pacer"):
        assert asyncio.run(run_until_free_done()), "rows of the held lane kept every slot"
    # The held lane's rows went back without spending an attempt, due again when the hold ends.
    rows = conn.execute(
        "SELECT status, attempts, run_after > now() AS later FROM batchdb.requests WHERE job_id = %s", (held.id,)
    ).fetchall()
    assert {r["status"] for r in rows} == {"queued"} and {r["attempts"] for r in rows} == {0}
    assert any(r["later"] for r in rows)
    # The worker said why the lane did not move, once, with the ledger's reason.
    waiting = [r.getMessage() for r in caplog.records if "not moving" in r.getMessage()]
    assert waiting and "instant/default/gpt-4o not moving: held by a 429 until" in waiting[0], waiting
    assert len(waiting) <= 3


def test_limits_show_says_why_each_lane_is_not_moving(dsn: str, conn: psycopg.Connection) -> None:
    hold_lane(conn, "gpt-4o", 300)
    # ~248,000 tokens in debt, as the frozen key was.
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm, token_credit, refilled_at) "
        "VALUES ('instant', 'gpt-4o-mini', 600, 150000, -248000, clock_timestamp())"
    )
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpm, tpm, refilled_at) "
        "VALUES ('instant', 'o4-mini', 600, 1000, clock_timestamp() - interval '10 seconds')"
    )
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpm, refilled_at) "
        "VALUES ('instant', 'gpt-4.1', 6, clock_timestamp())"
    )
    result = CliRunner().invoke(cli, ["limits", "show"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert "held by a 429 until" in lines["instant/default/gpt-4o"]
    assert "waiting for tokens: 24" in lines["instant/default/gpt-4o-mini"]  # 248,000 less a second's refill
    assert "in debt, moving again about" in lines["instant/default/gpt-4o-mini"]
    assert "waiting for requests: limit 6 per minute, next in" in lines["instant/default/gpt-4.1"]
    assert lines["instant/default/o4-mini"].rstrip().endswith("ready")
    stalled = {r["model"]: r["stalled"] for r in conn.execute("SELECT model, stalled FROM batchdb.lane_states")}
    assert stalled == {"gpt-4o": True, "gpt-4o-mini": True, "gpt-4.1": True, "o4-mini": False}


def test_lane_states_name_a_spent_daily_quota(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, model, rpd, day_key, day_requests) "
        "VALUES ('gemini', 'gemini-2.5-flash', 100, (now() AT TIME ZONE 'America/Los_Angeles')::date, 100)"
    )
    row = conn.execute("SELECT state, state_text, until > now() AS later FROM batchdb.lane_states").fetchone()
    assert row["state"] == "daily quota used up" and row["later"]
    assert "resets at midnight Pacific" in row["state_text"]


def test_limits_show_and_the_providers_page_say_a_lanes_circuit_is_open(dsn: str, conn: psycopg.Connection) -> None:
    # As workers/breaker.py leaves it while the provider is down (a lane with no limits configured).
    conn.execute(
        "INSERT INTO batchdb.circuits (provider, key_alias, model, state, opened_at, last_error, "
        "next_probe_at, n_opened) VALUES ('openai', 'default', 'gpt-4o-mini', 'open', "
        "clock_timestamp(), 'APIConnectionError at http://127.0.0.1:9/v1/chat/completions', "
        "clock_timestamp() + interval '30 seconds', 1)"
    )
    result = CliRunner().invoke(cli, ["limits", "show"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("openai/default/gpt-4o-mini")]
    assert "circuit open since" in line and "last error: APIConnectionError at http://127.0.0.1:9/v1" in line, line
    assert "next probe about" in line

    from batchdb.dashboard import queries

    [shown] = queries.load_providers(dsn)["circuits"].itertuples()
    assert shown.model == "gpt-4o-mini" and shown.state_text.startswith("circuit open since")
