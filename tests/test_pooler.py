"""Connections through a transaction-pooling PgBouncer (batchdb/pooler.py).

The real-pooler tests put Debian's PgBouncer (transaction mode, its default refusal of `options`)
in front of the test server; they skip where pgbouncer is not installed (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import psycopg
import pytest
from pgbouncer_support import in_front_of, pgbouncer_binary
from psycopg.conninfo import conninfo_to_dict

from batchdb import db, pooler, settings
from batchdb.queries import query
from batchdb.workers.connection import LISTEN_POLL_S, Listener, Reconnecting

needs_pgbouncer = pytest.mark.skipif(
    pgbouncer_binary() is None, reason="pgbouncer is not installed (apt-get install -y pgbouncer; .ci/run does)"
)


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No pooler mode or LISTEN DSN from outside, and no detection left by another test."""
    monkeypatch.delenv(settings.POOLER, raising=False)
    monkeypatch.delenv(settings.LISTEN_DSN, raising=False)
    monkeypatch.setattr(pooler, "_refused", set())
    monkeypatch.setattr(pooler, "_checked", set())
    yield


@pytest.fixture
def pooled(dsn: str) -> Iterator[str]:
    with in_front_of(dsn) as through:
        yield through


# -- without a pooler -----------------------------------------------------------------------------


def test_the_mode_is_auto_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pooler.mode() == "auto"
    assert pooler.mode({settings.POOLER: " Transaction "}) == "transaction"
    assert pooler.mode({settings.POOLER: "none"}) == "none"
    assert settings.environment_problems({settings.POOLER: "pgbouncer"}) == [
        "BATCHDB_POOLER: expected auto, none or transaction, got 'pgbouncer'"
    ]
    assert settings.environment_problems({settings.POOLER: "transaction"}) == []


def test_requested_settings_are_read_from_the_options() -> None:
    conninfo = db.with_options("postgresql://u@h/d", "-c jit=off -cplan_cache_mode=force_custom_plan --work-mem=8MB")
    assert pooler.requested_settings(conninfo) == {
        "jit": "off",
        "plan_cache_mode": "force_custom_plan",
        "work_mem": "8MB",
    }
    assert "options" not in conninfo_to_dict(pooler.without_options(conninfo))
    assert pooler.without_options(conninfo) == pooler.without_options("postgresql://u@h/d")
    # A pooler is told by where it listens, whatever the database, user or application name.
    assert pooler.endpoint(conninfo) == pooler.endpoint("postgresql://v@h:5432/e?application_name=x") == "h:5432"
    assert pooler.endpoint("host=h port=6432") != pooler.endpoint("host=h")


def test_an_explicit_mode_decides_the_connect_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    conninfo = db.with_options("postgresql://u@h:6432/d", db.SESSION_OPTIONS)
    assert pooler.connect_kwargs(conninfo) == {"conninfo": conninfo}  # auto, nothing refused yet
    monkeypatch.setenv(settings.POOLER, "transaction")
    through = pooler.connect_kwargs(conninfo)
    assert through["prepare_threshold"] is None
    assert "options" not in conninfo_to_dict(through["conninfo"])
    assert pooler.listen_conninfo(conninfo) is None  # LISTEN would be lost: poll
    monkeypatch.setenv(settings.LISTEN_DSN, "postgresql://u@h:5432/d")
    assert pooler.listen_conninfo(conninfo) == "postgresql://u@h:5432/d"
    monkeypatch.setenv(settings.POOLER, "none")
    assert pooler.connect_kwargs(conninfo) == {"conninfo": conninfo}


def test_a_direct_connection_keeps_its_options_and_prepared_statements(dsn: str) -> None:
    with db.connect(dsn) as conn:
        assert conn.execute("SHOW jit").fetchone() == {"jit": "off"}
        assert conn.prepare_threshold == 5  # psycopg's default
    assert not pooler.is_pooled(dsn)
    assert pooler.listen_conninfo(dsn) == dsn


# -- through PgBouncer ----------------------------------------------------------------------------


@needs_pgbouncer
def test_auto_mode_finds_pgbouncer_by_its_refusal_of_options(
    pooled: str, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter"):
        psycopg.connect(db.with_options(pooled, db.SESSION_OPTIONS)).close()
    caplog.set_level(logging.INFO, logger="batchdb.pooler")
    with db.connect(pooled) as conn:
        assert conn.prepare_threshold is None
        # Many runs of one statement: psycopg would have prepared it on the fifth.
        for i in range(20):
            assert conn.execute("SELECT %s::int AS i", (i,)).fetchone() == {"i": i}
        assert conn.execute("SELECT count(*) AS n FROM batchdb.jobs").fetchone() == {"n": 0}
    assert pooler.is_pooled(pooled)
    assert not pooler.is_pooled(dsn)  # the server itself, beside it
    messages = [r.getMessage() for r in caplog.records]
    assert sum("refused startup options" in m for m in messages) == 1
    # The test server runs with jit on: the setting that did not pass the pooler is named, once.
    with db.connect(pooled):
        pass
    unset = [m for m in [r.getMessage() for r in caplog.records] if "cannot be set per connection" in m]
    assert len(unset) == 1 and "jit=off" in unset[0] and "ALTER DATABASE" in unset[0]


@needs_pgbouncer
def test_mode_none_reports_the_refusal(pooled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.POOLER, "none")
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter"):
        db.connect(pooled)


@needs_pgbouncer
def test_a_worker_connection_runs_its_statements_through_the_pooler(pooled: str) -> None:
    async def scenario() -> list[int]:
        conn = Reconnecting(pooled, name="claim")
        try:
            seen = []
            for i in range(12):

                async def one(c: psycopg.AsyncConnection, i: int = i) -> int:
                    cur = await c.execute("SELECT %s::int AS i", (i,))
                    row = await cur.fetchone()
                    assert row is not None
                    return int(row["i"])

                seen.append(await conn.run(one, what="select"))
            return seen
        finally:
            await conn.close()

    assert asyncio.run(scenario()) == list(range(12))


@needs_pgbouncer
def test_listen_falls_back_to_polling_through_the_pooler(pooled: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert pooler.listen_connect(db.with_options(pooled, db.SESSION_OPTIONS)) is None
    assert pooler.is_pooled(pooled)

    async def woken_twice() -> list[tuple[float, str | None]]:
        calls: list[tuple[float, str | None]] = []
        twice = asyncio.Event()

        def on_notify(payload: str | None) -> None:
            calls.append((time.monotonic(), payload))
            if len(calls) >= 2:
                twice.set()

        listener = Listener(pooled, name="listen")
        listener.subscribe(query("listen_requests"), on_notify)
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(twice.wait(), 60)
            assert not task.done()  # polls until cancelled, as a LISTEN loop does
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return calls

    calls = asyncio.run(woken_twice())
    # No notification can arrive: the subscribers are told "look again" (None) every LISTEN_POLL_S.
    assert [payload for _, payload in calls[:2]] == [None, None]
    assert calls[1][0] - calls[0][0] >= LISTEN_POLL_S * 0.99
    assert any("no LISTEN through a transaction pooler" in r.getMessage() for r in caplog.records)


@needs_pgbouncer
def test_listen_goes_to_the_listen_dsn_beside_the_pooler(
    pooled: str, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(settings.LISTEN_DSN, dsn)
    listening = pooler.listen_connect(db.with_options(pooled, db.SESSION_OPTIONS), autocommit=True)
    assert listening is not None
    with listening, db.connect(pooled) as through:
        listening.execute(query("listen_requests"))
        through.execute("NOTIFY batchdb_requests, '7'")  # sent through the pooler, heard directly
        heard = [n.payload for n in listening.notifies(timeout=5, stop_after=1)]
    assert heard == ["7"]


@needs_pgbouncer
def test_the_sdk_and_the_cli_work_through_the_pooler(pooled: str) -> None:
    import pandas as pd
    from click.testing import CliRunner

    import batchdb
    from batchdb.cli import cli

    job = batchdb.submit(
        pd.DataFrame({"text": [f"t{i}" for i in range(30)]}),
        prompt="Say {text}",
        model="instant",
        provider="instant",
        dsn=pooled,
    )
    assert job.status().n_total == 30
    assert job.cancel() == 30
    assert job.wait(timeout=30, poll_interval=0.1).status == "cancelled"  # polls: no LISTEN through it
    status = CliRunner().invoke(cli, ["status", str(job.id), "--dsn", pooled])
    assert status.exit_code == 0 and "cancelled" in status.output
    watch = CliRunner().invoke(cli, ["watch", "--dsn", pooled])
    assert watch.exit_code != 0 and "BATCHDB_LISTEN_DSN" in watch.output


@needs_pgbouncer
def test_the_dashboard_reads_through_the_pooler(pooled: str) -> None:
    from batchdb.dashboard.queries import load_jobs, load_overview

    overview = load_overview(pooled)
    assert isinstance(overview, dict) and overview
    assert len(load_jobs(pooled)) == 0
    assert pooler.is_pooled(pooled)


@needs_pgbouncer
def test_a_workers_listener_wakes_through_the_listen_dsn(
    pooled: str, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(settings.LISTEN_DSN, dsn)

    async def woken() -> bool:
        wake = asyncio.Event()
        listener = Listener(pooled, name="listen")
        listener.subscribe(query("listen_requests"), lambda _payload: wake.set())
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(wake.wait(), 30)  # set once on connecting
            wake.clear()
            await asyncio.sleep(0.5)  # its LISTEN has run by now
            async with await db.connect_async(pooled) as through:
                await through.execute("NOTIFY batchdb_requests, '1'")
            await asyncio.wait_for(wake.wait(), 10)
            return True
        finally:
            task.cancel()

    assert asyncio.run(woken())


@needs_pgbouncer
def test_a_pooler_that_ignores_options_is_named_by_the_setting(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`ignore_startup_parameters = options` drops them silently: auto cannot tell, the setting can."""
    with in_front_of(dsn, ignore_startup_parameters="options") as pooled:
        with db.connect(pooled) as conn:
            assert conn.execute("SHOW jit").fetchone() == {"jit": "on"}  # the option never arrived
        assert not pooler.is_pooled(pooled)
        monkeypatch.setenv(settings.POOLER, "transaction")
        with db.connect(pooled) as conn:
            assert conn.prepare_threshold is None
            for i in range(10):
                assert conn.execute("SELECT %s::int AS i", (i,)).fetchone() == {"i": i}
        assert any("jit=off cannot be set" in r.getMessage() for r in caplog.records)


@needs_pgbouncer
def test_a_connection_pool_gets_its_arguments_after_a_probe(pooled: str, dsn: str) -> None:
    conninfo = db.with_options(pooled, db.SESSION_OPTIONS)
    through = asyncio.run(pooler.pool_kwargs_async(conninfo))
    assert through["prepare_threshold"] is None and "options" not in conninfo_to_dict(through["conninfo"])
    direct = db.with_options(dsn, db.SESSION_OPTIONS)
    assert asyncio.run(pooler.pool_kwargs_async(direct)) == {"conninfo": direct}
