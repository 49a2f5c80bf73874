"""Providers page charts: the limit each minute had (its history), and no empty 429 chart."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pandas as pd
import psycopg
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from batchdb import ledger
from batchdb.dashboard import queries
from batchdb.dashboard.run import APP as dashboard_app

APP = str(dashboard_app)  # batchdb/dashboard/app.py, as `batchdb dashboard` runs it
LANE = ledger.Lane("openai", "default", "gpt-4o-mini")


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    st.cache_data.clear()
    yield
    st.cache_data.clear()


def backdate_last_change(conn: psycopg.Connection, minutes: int) -> None:
    conn.execute(
        """UPDATE batchdb.rate_limit_history SET changed_at = now() - make_interval(mins => %s)
                     WHERE id = (SELECT max(id) FROM batchdb.rate_limit_history)""",
        (minutes,),
    )


def add_usage(conn: psycopg.Connection, minutes_ago: list[int], *, rate_limited: int = 0) -> None:
    conn.execute(
        """
        INSERT INTO batchdb.rate_usage (provider, key_alias, model, minute, requests, tokens, rate_limited)
        SELECT 'openai', 'default', 'gpt-4o-mini', date_trunc('minute', now()) - ago * interval '1 minute',
               10, 1000, %s
          FROM unnest(%s::int[]) AS ago""",
        (rate_limited, minutes_ago),
    )


def start_early_in_a_minute(conn: psycopg.Connection, seconds_needed: float = 20.0) -> None:
    """Wait for the database clock's next minute when fewer than `seconds_needed` are left in this one:
    the limits are backdated from now() and each minute's age counted from now() again, so a minute
    turning in between shifts every age by one (a CI run once crossed it)."""
    left = conn.execute("SELECT 60 - extract(second FROM clock_timestamp())::float8 AS s").fetchone()["s"]
    if left < seconds_needed:
        time.sleep(left + 0.2)


def test_each_minute_shows_the_limit_in_effect_then(dsn: str, conn: psycopg.Connection) -> None:
    start_early_in_a_minute(conn)
    ledger.set_limits(conn, LANE, rpm=100, tpm=10_000)
    backdate_last_change(conn, 40)
    ledger.set_limits(conn, LANE, rpm=200, tpm=20_000)
    backdate_last_change(conn, 10)
    add_usage(conn, [50, 30, 5])
    series = queries.load_providers(dsn, minutes=60)["series"]
    now = conn.execute("SELECT date_trunc('minute', now() AT TIME ZONE 'UTC') AS m").fetchone()["m"]
    by_age = {
        int((pd.Timestamp(now) - pd.Timestamp(m)).total_seconds() // 60): (rpm, tpm)
        for m, rpm, tpm in zip(series["minute"], series["rpm"], series["tpm"], strict=True)
    }
    assert pd.isna(by_age[50][0]) and pd.isna(by_age[42][1])  # before the lane had limits: none drawn
    assert by_age[39] == by_age[30] == by_age[11] == (100, 10_000)
    assert by_age[9] == by_age[5] == by_age[0] == (200, 20_000)


def test_a_lane_without_429s_gets_no_empty_429_chart(dsn: str, conn: psycopg.Connection) -> None:
    ledger.set_limits(conn, LANE, rpm=100, tpm=10_000)
    add_usage(conn, [3, 2, 1])
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("views/providers.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    charts = at.get("vega_lite_chart")
    assert len(charts) == 2  # tokens and requests, against their limits
    assert "No 429s in the last 1 hour." in [c.value for c in at.caption]
    add_usage(conn, [0], rate_limited=3)
    st.cache_data.clear()
    at.run()
    assert len(at.get("vega_lite_chart")) == 3
