"""Opt-in reuse of answers across jobs (sql/migrations/0021_response_reuse.sql).

A job with reuse="exact" answers each row from a stored successful answer to the same request
(same provider, model, parameters and prompt) at $0, marked reused, instead of calling the provider;
within the owner's own answers or their team's, no older than reuse_max_age.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pandas as pd
import psycopg
import pytest
from click.testing import CliRunner
from counting_provider import CountingProvider
from psycopg.conninfo import make_conninfo

import batchdb
from batchdb import users
from batchdb.cli import cli
from batchdb.ingest import InputError
from batchdb.providers.base import ErrorKind
from batchdb.simulator import Distribution, SimulatorConfig, SimulatorProcess
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig


def frame(*headlines: str) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"r{i}" for i in range(len(headlines))], "headline": list(headlines)})


def submit(data: pd.DataFrame, dsn: str, **options: Any) -> batchdb.Job:
    options = {"model": "m", "provider": "instant", **options}
    return batchdb.submit(data, prompt="Label: {headline}", id_column="id", dsn=dsn, **options)


def rows_of(conn: psycopg.Connection, job_id: int) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT custom_id, status, attempts, cost_usd, prompt_tokens, reused_from, reused_from_job, reused_usd, "
        "duplicate_of FROM batchdb.requests WHERE job_id = %s ORDER BY id",
        (job_id,),
    ).fetchall()


# -- through real workers and the provider simulator ----------------------------------------------


def test_a_second_job_takes_stored_answers_at_no_cost_and_sends_only_new_rows(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(SimulatorConfig(seed=5, output_tokens=Distribution(kind="fixed", value=7)))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-reuse")

    def run_worker() -> None:
        worker = Worker(WorkerConfig(dsn=dsn, concurrency=4, exit_when_idle=True, poll_interval=0.2))
        asyncio.run(worker.run())

    first = submit(frame("Acme up", "Globex down", "Initech flat"), dsn, model="gpt-4o-mini", provider="openai")
    run_worker()
    assert sim.stats(series=False)["totals"]["accepted"] == 3
    paid = {r["custom_id"]: r for r in rows_of(conn, first.id)}

    # Two rows asked before (one of them twice), two new ones.
    second = submit(
        frame("Acme up", "Hooli sideways", "Globex down", "Acme up", "Umbrella up"),
        dsn,
        model="gpt-4o-mini",
        provider="openai",
        reuse="exact",
    )
    status = second.status()
    assert (status.n_reused, status.n_succeeded) == (2, 3)  # answered as they went in, before any worker
    run_worker()
    totals = sim.stats(series=False)["totals"]
    assert totals["accepted"] == 5  # only the two new rows reached the provider

    done = second.status()
    assert (done.status, done.n_succeeded, done.n_reused, done.n_duplicates) == ("completed", 5, 2, 1)
    assert done.reused_usd == paid["r0"]["cost_usd"] + paid["r1"]["cost_usd"] > 0
    assert done.summary().endswith(f"2 reused (saved ${done.reused_usd:.4f})")
    rows = {r["custom_id"]: r for r in rows_of(conn, second.id)}
    for reused, source in (("r0", "r0"), ("r2", "r1")):
        row = rows[reused]
        assert (row["status"], row["attempts"], row["cost_usd"], row["prompt_tokens"]) == ("succeeded", 0, 0, 0)
        assert row["reused_from_job"] == first.id and row["reused_usd"] == paid[source]["cost_usd"]
    assert rows["r3"]["duplicate_of"] is not None and rows["r3"]["reused_from"] is None  # the fan-out's
    assert rows["r1"]["cost_usd"] > 0 and rows["r1"]["reused_from"] is None

    before, after = first.results().set_index("custom_id"), second.results().set_index("custom_id")
    assert after.loc["r0", "response"] == after.loc["r3", "response"] == before.loc["r0", "response"]
    assert after.loc["r2", "response"] == before.loc["r1", "response"]
    assert after["reused_from_job"].isna().tolist() == [False, True, False, True, True]
    source = conn.execute("SELECT id FROM batchdb.requests WHERE job_id = %s AND custom_id = 'r1'", (first.id,))
    assert int(after.loc["r2", "reused_from"]) == source.fetchone()["id"]


def test_a_batch_mode_job_never_sends_a_reused_row(dsn: str, conn: psycopg.Connection) -> None:
    options = {"model": "gpt-4o-mini", "provider": "openai"}
    first = submit(frame("a", "b"), dsn, **options)
    # Answered as a worker would record it (no provider needed for what follows).
    conn.execute(
        "INSERT INTO batchdb.results (job_id, request_id, response_text) SELECT job_id, id, 'yes' "
        "FROM batchdb.requests WHERE job_id = %s",
        (first.id,),
    )
    conn.execute(
        "UPDATE batchdb.requests SET status = 'succeeded', attempts = 1, finished_at = now(), cost_usd = 0.001 "
        "WHERE job_id = %s",
        (first.id,),
    )
    second = submit(frame("a", "b", "c"), dsn, mode="batch", reuse="exact", **options)
    done = second.status()
    assert (done.status, done.n_reused, done.reused_usd) == ("running", 2, Decimal("0.002"))
    # Only the new row is left for a chunk: the batch driver takes 'queued' rows only.
    queued = conn.execute(
        "SELECT custom_id FROM batchdb.requests WHERE job_id = %s AND status = 'queued'", (second.id,)
    ).fetchall()
    assert [r["custom_id"] for r in queued] == ["r2"]
    everything = submit(frame("b", "a"), dsn, mode="batch", reuse="exact", **options)
    assert everything.status().status == "completed"  # nothing left for a claim or a chunk


# -- what is reused, and what is not --------------------------------------------------------------


def test_reuse_is_off_by_default(dsn: str, drain) -> None:
    submit(frame("a", "b"), dsn)
    provider = CountingProvider()
    drain(provider)
    again = submit(frame("a", "b"), dsn)
    drain(provider)
    assert provider.calls == {"Label: a": 2, "Label: b": 2}
    assert again.status().n_reused == 0 and again.results()["reused_from"].isna().all()


def test_other_parameters_or_another_model_are_another_request(dsn: str, drain) -> None:
    submit(frame("a"), dsn)
    provider = CountingProvider()
    drain(provider)
    submit(frame("a"), dsn, reuse="exact", temperature=0.5)
    submit(frame("a"), dsn, reuse="exact", model="other")
    drain(provider)
    assert provider.calls == {"Label: a": 3}


def test_max_age_is_measured_from_when_the_answer_was_given(dsn: str, conn: psycopg.Connection, drain) -> None:
    first = submit(frame("a"), dsn)
    provider = CountingProvider()
    drain(provider)
    conn.execute("UPDATE batchdb.requests SET finished_at = now() - interval '2 days' WHERE job_id = %s", (first.id,))
    conn.execute("UPDATE batchdb.jobs SET finished_at = now() - interval '2 days' WHERE id = %s", (first.id,))
    too_old = submit(frame("a"), dsn, reuse="exact", reuse_max_age=timedelta(days=1))
    assert too_old.status().n_reused == 0
    drain(provider)
    assert provider.calls["Label: a"] == 2
    # The answer just given is young; the first one still counts for a wider window, but the latest wins.
    young = submit(frame("a"), dsn, reuse="exact", reuse_max_age=timedelta(days=1))
    assert young.status().n_reused == 1
    assert rows_of(conn, young.id)[0]["reused_from_job"] == too_old.id
    wide = submit(frame("a"), dsn, reuse="exact", reuse_max_age=timedelta(days=3))
    assert rows_of(conn, wide.id)[0]["reused_from_job"] == too_old.id


@pytest.mark.parametrize(("kind", "status"), [(ErrorKind.PERMANENT, "failed"), (ErrorKind.TRANSIENT, "dead")])
def test_a_failed_or_dead_answer_is_never_reused(
    dsn: str, conn: psycopg.Connection, drain, kind: ErrorKind, status: str
) -> None:
    first = submit(frame("bad", "good"), dsn, max_attempts=1)
    provider = CountingProvider(refuse={"Label: bad": kind})
    drain(provider, retry=RetryPolicy(0.01, 0.02))
    assert [r["status"] for r in rows_of(conn, first.id)] == [status, "succeeded"]
    again = submit(frame("bad", "good"), dsn, reuse="exact")
    assert [r["status"] for r in rows_of(conn, again.id)] == ["queued", "succeeded"]
    provider.refuse.clear()
    drain(provider)
    assert provider.calls == {"Label: bad": 2, "Label: good": 1}


def test_a_reused_answer_is_not_itself_a_source(dsn: str, conn: psycopg.Connection, drain) -> None:
    """Every reused row points at the row that was paid for, whose cost is what reuse saved."""
    first = submit(frame("a"), dsn)
    drain(CountingProvider())
    second = submit(frame("a"), dsn, reuse="exact")
    third = submit(frame("a"), dsn, reuse="exact")
    assert rows_of(conn, second.id)[0]["reused_from_job"] == rows_of(conn, third.id)[0]["reused_from_job"] == first.id


def test_a_deleted_answer_is_not_reused(dsn: str, conn: psycopg.Connection, drain) -> None:
    first = submit(frame("a"), dsn)
    drain(CountingProvider())
    conn.execute("DELETE FROM batchdb.results WHERE job_id = %s", (first.id,))
    assert submit(frame("a"), dsn, reuse="exact").status().n_reused == 0


# -- whose answers: the user's, or the team's -------------------------------------------------------


@dataclass(frozen=True)
class Account:
    name: str
    dsn: str


@pytest.fixture
def make_user(dsn: str, conn: psycopg.Connection) -> Iterator[Callable[..., Account]]:
    created: list[str] = []

    def make(prefix: str, **settings: Any) -> Account:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        users.add_user(conn, name, **settings)
        created.append(name)
        return Account(name, make_conninfo(dsn, user=name))

    yield make
    for name in created:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
        conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def test_scope_user_never_takes_another_users_answer_and_team_never_crosses_teams(
    dsn: str, conn: psycopg.Connection, drain, make_user: Callable[..., Account]
) -> None:
    team = f"t{uuid.uuid4().hex[:6]}"
    alice, bob = make_user("alice", team=team), make_user("bob", team=team)
    carol = make_user("carol", team=f"{team}x")
    dave = make_user("dave")  # no team: only their own answers
    secret = frame("alice's secret question")
    answered = submit(secret, alice.dsn)
    drain(CountingProvider())

    assert submit(secret, bob.dsn, reuse="exact").status().n_reused == 0  # scope user: not alice's
    assert submit(secret, carol.dsn, reuse="exact", reuse_scope="team").status().n_reused == 0  # another team
    assert submit(secret, dave.dsn, reuse="exact", reuse_scope="team").status().n_reused == 0  # no team
    shared = submit(secret, bob.dsn, reuse="exact", reuse_scope="team")
    assert shared.status().n_reused == 1
    assert shared.results()["response"].tolist() == answered.results()["response"].tolist()
    # The reused copy is all bob gets: alice's job and rows stay invisible to him.
    with psycopg.connect(bob.dsn) as as_bob:
        assert as_bob.execute("SELECT count(*) FROM batchdb.requests WHERE job_id = %s", (answered.id,)).fetchone() == (
            0,
        )
        assert as_bob.execute("SELECT count(*) FROM batchdb.jobs WHERE id = %s", (answered.id,)).fetchone() == (0,)
        # A user cannot put themselves in a team.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_bob.execute("UPDATE batchdb.users SET team = %s WHERE name = %s", (f"{team}x", bob.name))


def test_users_add_and_set_give_a_team(dsn: str, conn: psycopg.Connection) -> None:
    name = f"erin_{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    try:
        result = runner.invoke(cli, ["users", "add", name, "--team", "analytics"])
        assert result.exit_code == 0, result.output
        assert conn.execute("SELECT team FROM batchdb.users WHERE name = %s", (name,)).fetchone()["team"] == "analytics"
        result = runner.invoke(cli, ["users", "set", name, "--team", "Not A Team"])
        assert result.exit_code != 0 and "team: expected" in result.output
        result = runner.invoke(cli, ["users", "set", name, "--team", ""])
        assert result.exit_code == 0, result.output
        assert conn.execute("SELECT team FROM batchdb.users WHERE name = %s", (name,)).fetchone()["team"] is None
    finally:
        conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


# -- the SQL contract (docs/sql.md) ----------------------------------------------------------------


def test_rows_inserted_with_sql_reuse_by_their_request_key(dsn: str, conn: psycopg.Connection, drain) -> None:
    def sql_job(**columns: Any) -> int:
        names = ", ".join(["model", "provider", "params", *columns])
        values = ", ".join(["%s"] * (3 + len(columns)))
        return conn.execute(
            f"INSERT INTO batchdb.jobs ({names}) VALUES ({values}) RETURNING id",
            ("m", "instant", '{"prompt": "{q}"}', *columns.values()),
        ).fetchone()["id"]

    def insert_rows(job_id: int) -> None:
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, input, request_key) VALUES "
            "(%(j)s, 'a', '{\"q\": \"one\"}', 'k1'), (%(j)s, 'b', '{\"q\": \"two\"}', 'k2')",
            {"j": job_id},
        )

    first = sql_job()
    insert_rows(first)
    provider = CountingProvider()
    drain(provider)
    second = sql_job(reuse="exact", reuse_scope="user", reuse_max_age="1 hour")
    insert_rows(second)
    job = conn.execute("SELECT status, n_reused, n_succeeded FROM batchdb.jobs WHERE id = %s", (second,)).fetchone()
    assert job == {"status": "completed", "n_reused": 2, "n_succeeded": 2}
    drain(provider)
    assert provider.calls == {"one": 1, "two": 1}


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("reuse", "fuzzy", "batchdb.jobs.reuse: expected 'exact'"),
        ("reuse_scope", "world", "batchdb.jobs.reuse_scope: expected user or team"),
        ("reuse_max_age", "-1 day", "batchdb.jobs.reuse_max_age: expected a positive interval"),
    ],
)
def test_sql_refuses_bad_reuse_options_naming_the_column(
    conn: psycopg.Connection, column: str, value: str, message: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=message):
        conn.execute(
            f"INSERT INTO batchdb.jobs (model, provider, {column}) VALUES ('m', 'instant', %s)",
            (value,),
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reuse": "yes"}, "reuse: expected 'exact' or None"),
        ({"reuse": "exact", "reuse_scope": "org"}, "reuse_scope: expected one of user, team"),
        ({"reuse": "exact", "reuse_max_age": timedelta(0)}, "reuse_max_age: expected a positive"),
        ({"reuse": "exact", "reuse_max_age": 30}, "reuse_max_age: expected a positive datetime.timedelta"),
        ({"reuse": "exact", "dedupe": False}, "reuse: cannot be combined with dedupe=False"),
    ],
)
def test_the_sdk_refuses_bad_reuse_options_naming_them(dsn: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        submit(frame("a"), dsn, **options)
    with pytest.raises(InputError, match=message):
        batchdb.estimate(frame("a"), prompt="{headline}", model="m", provider="instant", dsn=dsn, **options)


# -- the CLI -----------------------------------------------------------------------------------------


def test_cli_submit_reuse_flags(dsn: str, conn: psycopg.Connection, drain, tmp_path) -> None:
    path = tmp_path / "rows.csv"
    frame("a", "b").to_csv(path, index=False)
    runner = CliRunner()
    base = ["submit", str(path), "--prompt", "Label: {headline}", "--id-column", "id"]
    base += ["--model", "m", "--provider", "instant"]
    assert runner.invoke(cli, base).exit_code == 0
    drain(CountingProvider())
    result = runner.invoke(cli, [*base, "--reuse", "--reuse-scope", "team", "--reuse-max-age", "30d"])
    assert result.exit_code == 0, result.output
    job = conn.execute(
        "SELECT id, reuse, reuse_scope, reuse_max_age, n_reused FROM batchdb.jobs ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert (job["reuse"], job["reuse_scope"], job["reuse_max_age"], job["n_reused"]) == (
        "exact",
        "team",
        timedelta(days=30),
        2,
    )
    status = runner.invoke(cli, ["status", str(job["id"])])
    assert "2 reused (saved $" in status.output
    bad = runner.invoke(cli, [*base, "--reuse", "--reuse-max-age", "soon"])
    assert bad.exit_code == 2 and "--reuse-max-age" in bad.output and "30d" in bad.output
    assert (
        Decimal(0)
        == conn.execute("SELECT cost_usd FROM batchdb.jobs WHERE id = %s", (job["id"],)).fetchone()["cost_usd"]
    )
