"""Many users on one database: roles, row-level security through every way in,
fair shares between users and per-user budgets (batchdb/users.py, 0005_users.sql)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal

import pandas as pd
import psycopg
import pytest
import streamlit as st
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from streamlit.testing.v1 import AppTest

import batchdb
from batchdb import queue, users
from batchdb.cli import cli
from batchdb.jobs import JobNotFound
from batchdb.providers.instant import InstantProvider
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig


@dataclass(frozen=True)
class Account:
    name: str
    dsn: str


@pytest.fixture
def make_user(dsn: str, conn: psycopg.Connection) -> Iterator[Callable[..., Account]]:
    """Create login roles for this test (roles are cluster-wide: unique names, dropped afterwards)."""
    created: list[str] = []

    def make(prefix: str, kind: users.UserKind = users.UserKind.USER, **settings: object) -> Account:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        users.add_user(conn, name, kind=kind, **settings)  # type: ignore[arg-type]
        created.append(name)
        return Account(name, make_conninfo(dsn, user=name))

    yield make
    for name in created:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
        conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def headlines(n: int, tag: str) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"{tag}-{i}" for i in range(n)], "headline": [f"{tag} secret {i}" for i in range(n)]})


def submit_as(account: Account, n: int, tag: str, **options: object) -> batchdb.Job:
    return batchdb.submit(
        headlines(n, tag),
        prompt="Rate: {headline}",
        model="instant",
        provider="instant",
        id_column="id",
        name=f"{tag} job",
        dsn=account.dsn,
        **options,
    )  # type: ignore[arg-type]


def drain_as(dsn: str, **config: object) -> Worker:
    settings = {"concurrency": 16, "poll_interval": 0.2, "retry": RetryPolicy(0.05, 0.2), **config}
    worker = Worker(
        WorkerConfig(dsn=dsn, exit_when_idle=True, **settings),  # type: ignore[arg-type]
        providers={"instant": InstantProvider()},
    )
    asyncio.run(worker.run())
    return worker


@pytest.fixture
def two_users(make_user: Callable[..., Account]) -> tuple[Account, Account, batchdb.Job, batchdb.Job]:
    alice, bob = make_user("alice"), make_user("bob")
    return alice, bob, submit_as(alice, 5, "alice"), submit_as(bob, 5, "bob")


# -- isolation, one way in at a time ---------------------------------------------------------------


def test_plain_sql_sees_only_own_jobs_rows_and_answers(two_users, conn: psycopg.Connection) -> None:
    alice, bob, alice_job, bob_job = two_users
    drain_as(conn.info.dsn)
    with psycopg.connect(alice.dsn, autocommit=True) as c:
        assert c.execute("SELECT array_agg(id) FROM batchdb.jobs").fetchone()[0] == [alice_job.id]
        assert c.execute("SELECT array_agg(job_id) FROM batchdb.job_progress").fetchone()[0] == [alice_job.id]
        prompts = c.execute("SELECT string_agg(input::text, ' ') FROM batchdb.requests").fetchone()[0]
        assert "alice secret" in prompts and "bob secret" not in prompts
        answers = c.execute(
            "SELECT count(*), count(*) FILTER (WHERE response_text LIKE '%%bob%%') FROM batchdb.results"
        ).fetchone()
        assert answers == (5, 0)
        # Partitions are reachable only through their parent, whose policies apply.
        for table in (f"batchdb.requests_{bob_job.id}", f"batchdb.results_{bob_job.id}", "batchdb.requests_orphan"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT * FROM {table}")
        # Writing into or about Bob's job is refused or touches nothing.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            c.execute(
                "INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES (%s, 'x', '{\"prompt\": \"x\"}')",
                (bob_job.id,),
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            c.execute("INSERT INTO batchdb.jobs (model, owner) VALUES ('gpt-4o-mini', %s)", (bob.name,))
        assert c.execute("UPDATE batchdb.jobs SET priority = 9 WHERE id = %s", (bob_job.id,)).rowcount == 0
        assert c.execute("DELETE FROM batchdb.jobs WHERE id = %s", (bob_job.id,)).rowcount == 0
        assert c.execute("UPDATE batchdb.requests SET status = 'queued' WHERE job_id = %s", (bob_job.id,)).rowcount == 0
        with pytest.raises(psycopg.errors.NoDataFound):
            c.execute("SELECT batchdb.cancel_job(%s)", (bob_job.id,))
        with pytest.raises(psycopg.errors.NoDataFound):
            c.execute("SELECT batchdb.retry_job(%s)", (bob_job.id,))
        # Ids, counters, costs and the machinery are not a user's to write.
        for statement in (
            "INSERT INTO batchdb.jobs (id, model) OVERRIDING SYSTEM VALUE VALUES (999, 'gpt-4o-mini')",
            "INSERT INTO batchdb.jobs (model, n_total, cost_usd) VALUES ('gpt-4o-mini', 1000000, -5)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE batchdb.jobs SET cost_usd = 0 WHERE id = %s", (alice_job.id,))
        for statement in (
            "UPDATE batchdb.users SET weight = 100",
            "UPDATE batchdb.user_spend SET spent_usd = 0",
            "UPDATE batchdb.rate_limits SET pace = 1",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
        for call in ("batchdb.drop_job_partitions(%s)", "batchdb.reserve_budget(%s, 1)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT {call}", (bob_job.id,))
    assert bob_job.status().status == "completed" and bob_job.status().n_succeeded == 5


def test_sdk_refuses_another_users_job(two_users) -> None:
    alice, _, alice_job, bob_job = two_users
    as_alice = batchdb.Job(bob_job.id, dsn=alice.dsn)
    for attempt in (as_alice.status, as_alice.results, as_alice.cancel, as_alice.retry, as_alice.resume):
        with pytest.raises(JobNotFound, match=f"job {bob_job.id} does not exist"):
            attempt()
    assert [j.job_id for j in batchdb.list_jobs(dsn=alice.dsn)] == [alice_job.id]
    assert bob_job.status().status == "running" and bob_job.status().n_cancelled == 0


def test_cli_refuses_another_users_job(two_users) -> None:
    alice, _, _alice_job, bob_job = two_users
    runner = CliRunner()
    for command in (
        ["status", str(bob_job.id)],
        ["cancel", str(bob_job.id)],
        ["retry", str(bob_job.id)],
        ["resume", str(bob_job.id)],
        ["results", str(bob_job.id), "-o", "/tmp/never.parquet"],
    ):
        result = runner.invoke(cli, [*command, "--dsn", alice.dsn])
        assert result.exit_code == 1, (command, result.output)
        assert f"job {bob_job.id} does not exist" in result.output, (command, result.output)
    listing = runner.invoke(cli, ["status", "--dsn", alice.dsn], catch_exceptions=False).output
    assert "alice job" in listing and "bob job" not in listing
    assert bob_job.status().n_cancelled == 0


def test_dashboard_shows_a_user_only_their_jobs(two_users, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _, _alice_job, bob_job = two_users
    monkeypatch.setenv("BATCHDB_DSN", alice.dsn)
    st.cache_data.clear()
    from batchdb.dashboard.run import APP

    app = str(APP)
    try:
        at = AppTest.from_file(app, default_timeout=60)
        at.run()
        at.switch_page("views/jobs.py")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        shown = "\n".join(df.value.to_csv() for df in at.dataframe)
        assert "alice job" in shown and "bob job" not in shown
        assert f"Signed in as `{alice.name}`: you see your own jobs only." in [c.value for c in at.sidebar.caption]
        at.query_params["job"] = str(bob_job.id)
        at.switch_page("views/job_detail.py")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        page = "\n".join(str(e.value) for e in (*at.markdown, *at.title, *at.info, *at.warning, *at.error))
        page += "\n".join(df.value.to_csv() for df in at.dataframe)
        assert "bob" not in page
    finally:
        st.cache_data.clear()


def test_dagster_resource_cannot_touch_another_users_job(two_users) -> None:
    from batchdb.dagster import BatchDBResource

    alice, _, _, bob_job = two_users
    resource = BatchDBResource(dsn=alice.dsn)
    with pytest.raises(JobNotFound):
        resource.cancel(bob_job.id)
    assert bob_job.status().n_cancelled == 0


def test_admin_sees_everything_and_a_worker_role_drains_everyone(two_users, make_user) -> None:
    _, _, alice_job, bob_job = two_users
    admin = make_user("ops", users.UserKind.ADMIN)
    worker = make_user("wrk", users.UserKind.WORKER)
    assert {j.job_id for j in batchdb.list_jobs(dsn=admin.dsn)} == {alice_job.id, bob_job.id}
    drain_as(worker.dsn)
    for job in (alice_job, bob_job):
        done = batchdb.Job(job.id, dsn=admin.dsn).status()
        assert (done.status, done.n_succeeded) == ("completed", 5)
    assert batchdb.Job(bob_job.id, dsn=admin.dsn).retry(failed=False, dead=False, cancelled=True) == 0


def test_users_add_from_the_cli_makes_a_working_login(dsn: str, conn: psycopg.Connection) -> None:
    name = f"carol_{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    try:
        out = runner.invoke(
            cli, ["users", "add", name, "--weight", "2", "--budget-day", "5", "--dsn", dsn], catch_exceptions=False
        ).output
        assert f"user {name} (user) ready" in out
        carol = Account(name, make_conninfo(dsn, user=name))
        job = submit_as(carol, 3, "carol", idempotency_key="same")
        assert submit_as(carol, 3, "carol", idempotency_key="same").id == job.id
        assert job.status().owner == name
        with psycopg.connect(carol.dsn) as c:
            assert c.execute("SHOW jit").fetchone()[0] == "off"
            assert c.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "1min"
        runner.invoke(cli, ["users", "set", name, "--weight", "3", "--dsn", dsn], catch_exceptions=False)
        listing = runner.invoke(cli, ["users", "list", "--dsn", dsn], catch_exceptions=False).output
        line = next(line for line in listing.splitlines() if line.startswith(name))
        assert line.split()[1:5] == ["user", "3", "5.00", "-"]
        bad = runner.invoke(cli, ["users", "add", "Robert'); DROP TABLE batchdb.jobs;--", "--dsn", dsn])
        assert bad.exit_code == 1 and "name must be" in bad.output
        assert runner.invoke(cli, ["users", "set", "nobody_here", "--dsn", dsn]).exit_code == 1
    finally:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
        conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def test_idempotency_keys_are_per_user(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    first = submit_as(alice, 2, "alice", idempotency_key="dagster:asset:2024-01-01")
    other = submit_as(bob, 2, "bob", idempotency_key="dagster:asset:2024-01-01")
    assert first.id != other.id
    assert submit_as(alice, 2, "alice", idempotency_key="dagster:asset:2024-01-01").id == first.id


# -- fair share ------------------------------------------------------------------------------------


def claimed_per_owner(dsn: str, claims: int, limit: int) -> Counter[str]:
    async def go() -> list:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as c:
            rows = []
            for _ in range(claims):
                rows += await queue.claim_batch(c, worker_id="w", limit=limit, lease_seconds=60)
            return rows

    rows = asyncio.run(go())
    with psycopg.connect(dsn) as c:
        owners = dict(c.execute("SELECT id, owner FROM batchdb.jobs").fetchall())
    return Counter(owners[r.job_id] for r in rows)


def test_claims_are_shared_between_users_not_jobs(dsn: str, make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    submit_as(alice, 4000, "alice")  # one big job
    for i in range(4):  # four smaller ones, one at a higher priority
        submit_as(bob, 600, f"bob{i}", priority=2 if i == 0 else 1)
    shares = claimed_per_owner(dsn, claims=20, limit=50)
    assert shares[alice.name] == shares[bob.name] == 500


def test_user_weights_split_claims(dsn: str, make_user) -> None:
    alice, bob = make_user("alice", weight=3), make_user("bob")
    submit_as(alice, 2000, "alice")
    submit_as(bob, 2000, "bob")
    submit_as(bob, 2000, "bob2")
    shares = claimed_per_owner(dsn, claims=10, limit=40)
    assert shares[alice.name] == 300 and shares[bob.name] == 100


def test_single_row_claims_follow_the_weights(dsn: str, make_user) -> None:
    """A saturated worker claims one freed slot at a time: the weighted draw must still be fair."""
    alice, bob = make_user("alice", weight=2), make_user("bob")
    submit_as(alice, 1500, "alice")
    submit_as(bob, 1500, "bob")
    shares = claimed_per_owner(dsn, claims=900, limit=1)
    # 900 draws at p = 2/3: mean 600, standard deviation 14; 5 sigma either way.
    assert 530 <= shares[alice.name] <= 670, shares


def test_a_user_with_more_jobs_than_one_claim_samples_still_gets_half(dsn: str, conn, make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    submit_as(alice, 2000, "alice")
    job_ids = [
        conn.execute(
            "INSERT INTO batchdb.jobs (model, provider, owner, priority) "
            "VALUES ('instant', 'instant', %s, 1) RETURNING id",
            (bob.name,),
        ).fetchone()["id"]
        for _ in range(40)
    ]  # more than the 16 jobs one claim samples
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) "
        'SELECT j, g::text, \'{"prompt": "x"}\' FROM unnest(%s::bigint[]) j, generate_series(1, 60) g',
        (job_ids,),
    )
    shares = claimed_per_owner(dsn, claims=20, limit=64)
    assert shares[alice.name] == shares[bob.name] == 640, shares


def test_a_job_with_nothing_due_does_not_waste_a_claim(dsn: str, conn, make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    waiting = submit_as(alice, 50, "alice")
    conn.execute("UPDATE batchdb.requests SET run_after = now() + interval '1 hour' WHERE job_id = %s", (waiting.id,))
    submit_as(bob, 500, "bob")
    shares = claimed_per_owner(dsn, claims=100, limit=1)
    assert shares == {bob.name: 100}


def test_a_new_users_small_job_is_claimed_at_once(dsn: str, make_user) -> None:
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    submit_as(alice, 3000, "alice")
    submit_as(bob, 3000, "bob")
    claimed_per_owner(dsn, claims=5, limit=60)
    submit_as(carol, 10, "carol")
    assert claimed_per_owner(dsn, claims=1, limit=30)[carol.name] == 10


# -- per-user budgets -----------------------------------------------------------------------------


def spend(conn: psycopg.Connection, owner: str) -> dict:
    return conn.execute(
        "SELECT coalesce(sum(spent_usd), 0) AS spent, coalesce(sum(reserved_usd), 0) AS reserved "
        "FROM batchdb.user_spend WHERE owner = %s",
        (owner,),
    ).fetchone()


def test_daily_budget_pauses_every_job_of_the_user_and_only_theirs(
    dsn: str, conn: psycopg.Connection, make_user
) -> None:
    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) "
        "VALUES ('instant', 'instant', 1000, 1000)"
    )
    alice = make_user("alice", budget_usd_day=0.5)
    bob = make_user("bob")
    jobs = [submit_as(alice, 300, "alice", max_tokens=20), submit_as(alice, 300, "alice2", max_tokens=20)]
    bob_job = submit_as(bob, 300, "bob", max_tokens=20)
    drain_as(dsn)

    bob_done = bob_job.status()
    assert (bob_done.status, bob_done.n_succeeded) == ("completed", 300)
    states = [j.status() for j in jobs]
    assert all(s.status == "paused" for s in states), states
    assert all(s.status_reason.startswith("user quota: daily budget of $0.500000 for " + alice.name) for s in states)
    row_costs = conn.execute(
        "SELECT sum(q.cost_usd) FROM batchdb.requests q JOIN batchdb.jobs j ON j.id = q.job_id WHERE j.owner = %s",
        (alice.name,),
    ).fetchone()["sum"]
    ledger = spend(conn, alice.name)
    assert ledger["reserved"] == 0
    assert ledger["spent"] == row_costs and 0 < row_costs <= Decimal("0.5")
    answered = sum(s.n_succeeded for s in states)
    assert 0 < answered < 600
    until = conn.execute("SELECT DISTINCT paused_until FROM batchdb.jobs WHERE owner = %s", (alice.name,)).fetchall()
    assert len(until) == 1 and until[0]["paused_until"].hour == 0

    # The next UTC day: yesterday's spend no longer counts and the jobs resume by themselves.
    conn.execute("UPDATE batchdb.user_spend SET day = day - 1 WHERE owner = %s", (alice.name,))
    conn.execute("UPDATE batchdb.users SET budget_usd_day = 100 WHERE name = %s", (alice.name,))
    conn.execute("UPDATE batchdb.jobs SET paused_until = now() WHERE owner = %s", (alice.name,))
    drain_as(dsn, reclaim_interval=0.2, heartbeat_interval=0.2, poll_interval=1.0)
    assert [j.status().status for j in jobs] == ["completed", "completed"]
    assert sum(j.status().n_succeeded for j in jobs) == 600


def test_monthly_budget_counts_earlier_days(dsn: str, conn: psycopg.Connection, make_user) -> None:
    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) "
        "VALUES ('instant', 'instant', 1000, 1000)"
    )
    alice = make_user("alice", budget_usd_month=1)
    conn.execute(
        "INSERT INTO batchdb.user_spend (owner, day, spent_usd) "
        "VALUES (%s, date_trunc('month', now() AT TIME ZONE 'UTC')::date, 0.999)",
        (alice.name,),
    )
    job = submit_as(alice, 50, "alice", max_tokens=20)
    drain_as(dsn)
    state = job.status()
    assert state.status == "paused" and state.status_reason.startswith("user quota: monthly budget of $1.000000")
    assert state.n_succeeded == 0


@pytest.mark.slow
def test_users_share_a_rate_limited_key_by_weight(dsn: str, make_user, simulator, tmp_path) -> None:
    """End to end: worker processes (as a worker role) on a 1,200 RPM simulated key; alice
    (weight 2, one big job) gets twice the calls of bob (weight 1, three jobs), counted over a
    fixed number of finished rows (after the first 100), whatever the machine's speed."""
    from batchdb import ledger
    from batchdb.simulator import Distribution, Limits, SimulatorConfig
    from batchdb.workers.processes import start_workers

    sim = simulator(
        SimulatorConfig(
            seed=3, default_limits=Limits(rpm=1200), latency_s=Distribution(kind="uniform", low=0.1, high=0.4)
        )
    )
    with psycopg.connect(dsn, autocommit=True) as c:
        ledger.set_limits(c, ledger.Lane("openai", "default", "gpt-4o-mini"), rpm=1200)
    alice, bob = make_user("alice", weight=2), make_user("bob", weight=1)
    worker = make_user("wrk", users.UserKind.WORKER)

    def submit(account: Account, rows: int, tag: str) -> batchdb.Job:
        return batchdb.submit(
            headlines(rows, tag),
            prompt="Rate: {headline}",
            model="gpt-4o-mini",
            provider="openai",
            max_tokens=8,
            id_column="id",
            dsn=account.dsn,
        )

    submit(alice, 2000, "alice")
    for i in range(3):
        submit(bob, 700, f"bob{i}")
    env = {"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": "sk-test-fair"}
    warm_up, counted = 100, 600
    with (
        start_workers(2, worker.dsn, env=env, args=("--concurrency", "16"), log_dir=tmp_path) as workers,
        psycopg.connect(dsn, autocommit=True) as c,
    ):
        deadline = time.monotonic() + 240  # ~35 s at 20 calls/s; generous for a loaded machine
        while (
            time.monotonic() < deadline
            and c.execute("SELECT count(*) FROM batchdb.requests WHERE status = 'succeeded'").fetchone()[0]
            < warm_up + counted
        ):
            time.sleep(0.5)
        codes = workers.stop()
    assert codes == [0, 0], workers.log_text()[-3000:]
    with psycopg.connect(dsn) as c:
        per_owner = dict(
            c.execute(
                "SELECT owner, count(*) FROM (SELECT j.owner FROM batchdb.requests q "
                "JOIN batchdb.jobs j ON j.id = q.job_id"
                " WHERE q.status = 'succeeded' ORDER BY q.finished_at, q.id OFFSET %s LIMIT %s) s GROUP BY owner",
                (warm_up, counted),
            ).fetchall()
        )
    assert sum(per_owner.values()) == counted, per_owner
    assert abs(per_owner[alice.name] / counted - 2 / 3) <= 0.07, per_owner


def test_owner_email_gets_notifications_that_only_the_owner_can_read(make_user, conn: psycopg.Connection) -> None:
    alice, bob = make_user("alice", email="alice@example.com"), make_user("bob")
    job = submit_as(alice, 2, "alice")
    submit_as(bob, 2, "bob")
    targets = conn.execute("SELECT job_id, channel, target FROM batchdb.notification_targets").fetchall()
    assert targets == [{"job_id": job.id, "channel": "email", "target": "alice@example.com"}]
    job.cancel()
    with psycopg.connect(bob.dsn) as c:
        for table in ("notification_targets", "notification_deliveries"):
            assert c.execute(f"SELECT count(*) FROM batchdb.{table}").fetchone()[0] == 0
    with psycopg.connect(alice.dsn) as c:
        assert c.execute("SELECT event FROM batchdb.notification_deliveries").fetchall() == [("job.cancelled",)]


def backend_of(
    conn: psycopg.Connection, user: str, query_text: str, *, after: object = None, timeout: float = 60
) -> object:
    """Wait until `user` has a session idle after running `query_text` (after `after`, a
    query_start), as pg_stat_activity shows it; returns its query_start. Readiness read from the
    server instead of a sleep that a loaded machine can outlast."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT max(query_start) AS at FROM pg_stat_activity WHERE usename = %s AND state = 'idle' "
            "AND query ILIKE %s AND (%s::timestamptz IS NULL OR query_start > %s::timestamptz)",
            (user, query_text, after, after),
        ).fetchone()
        if row["at"] is not None:
            return row["at"]
        time.sleep(0.05)
    raise AssertionError(f"no session of {user} ran {query_text!r} within {timeout} s")


def read_lines_until(stream, marker: str, timeout: float = 60) -> list[str]:
    """Lines from `stream` (a pipe) up to the first containing `marker`, or all read by `timeout`."""
    lines: list[str] = []

    def read() -> None:
        for line in iter(stream.readline, ""):
            lines.append(line)
            if marker in line:
                return

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(marker in line for line in lines):
        time.sleep(0.05)
    return lines


def test_watch_streams_only_the_users_own_job_events(make_user, conn: psycopg.Connection) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "batchdb", "watch"],
        env={**os.environ, "BATCHDB_DSN": alice.dsn},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        backend_of(conn, alice.name, "%LISTEN batchdb_events%")  # it listens: nothing from here on is missed
        mine, theirs = submit_as(alice, 3, "alice"), submit_as(bob, 3, "bob")
        drain_as(conn.info.dsn)
        # Events arrive in commit order: once alice's later cancellation is printed, every event of
        # the drain (bob's included) has been read and filtered.
        last = submit_as(alice, 1, "alice-last")
        last.cancel()
        lines = read_lines_until(watcher.stdout, f'"event": "job.cancelled", "job_id": {last.id},')
    finally:
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=10)
    seen = {(e["job_id"], e["event"]) for e in map(json.loads, filter(str.strip, lines + out.splitlines()))}
    assert (last.id, "job.cancelled") in seen, (lines, out, err)
    assert (mine.id, "job.completed") in seen, (lines, out, err)
    assert not {job_id for job_id, _ in seen} - {mine.id, last.id}, seen
    assert theirs.status().status == "completed"


def test_a_forged_event_neither_breaks_nor_fools_another_users_wait(dsn: str, make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    job = submit_as(alice, 2, "alice")
    outcome: dict[str, object] = {}

    def wait() -> None:
        try:
            outcome["final"] = job.wait(timeout=120, poll_interval=60)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcome["error"] = exc

    waiter = threading.Thread(target=wait)
    waiter.start()
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as admin:
        # wait() LISTENs, reads the job's progress, asks whether a worker is alive (its last statement
        # before it sleeps on the connection): once that shows in pg_stat_activity, the forged events
        # below cannot arrive before it listens.
        read_at = backend_of(admin, alice.name, "%batchdb.live_workers%")
        with psycopg.connect(bob.dsn, autocommit=True) as c:
            c.execute(
                "SELECT pg_notify('batchdb_events', %s)",
                (f'{{"event": "job.completed", "job_id": {job.id}, "status": "completed"}}',),
            )
            c.execute("NOTIFY batchdb_events, 'not json'")
        # Woken by them (its poll interval is a minute), it read the progress again ...
        backend_of(admin, alice.name, "%batchdb.%", after=read_at)
    assert waiter.is_alive()  # ... and still waits: the job is not complete, whatever bob says
    drain_as(dsn)
    waiter.join(timeout=30)
    assert "error" not in outcome, outcome
    assert outcome["final"].status == "completed"


def test_a_budget_is_never_silently_unenforced_for_an_unpriced_model(dsn: str, make_user) -> None:
    alice = make_user("alice", budget_usd_day=1)
    job = submit_as(alice, 5, "alice")  # model 'instant' has no row in batchdb.prices
    drain_as(dsn)
    state = job.status()
    assert state.status == "paused" and state.n_succeeded == 0
    assert state.status_reason == (
        "no price for instant/instant in batchdb.prices, so its budget cannot be enforced; add the price, then resume"
    )
