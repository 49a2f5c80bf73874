"""Auto mode end to end: jobs submitted with mode="auto" and a deadline go through the OpenAI Batch
API of the provider simulator where a batch can make the deadline and online where it cannot,
through the real SDK and real workers, in compressed time.

The lane's batch window and margin (rate_limits.batch_window_seconds / batch_margin_seconds, 0022)
are set in seconds, as the simulator's compressed "24 h" is. Every deadline is chosen with tens of
seconds to spare on either side of what the test needs (a batch here takes well under a second),
and each test waits for outcomes, not for a time, so none depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pandas as pd
import psycopg
import pytest
from batch_support import FAST, QUICK_BATCHES
from click.testing import CliRunner

import batchdb
from batchdb.cli import cli
from batchdb.simulator import Distribution, SimulatorConfig, SimulatorProcess
from batchdb.workers.batch_driver import BatchDriverConfig
from batchdb.workers.worker import Worker, WorkerConfig

MODEL = "gpt-4o-mini"
KEY = "sk-auto-test"


def start_sim(
    simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch, **config: Any
) -> SimulatorProcess:
    sim = simulator(SimulatorConfig(**{**FAST, **config}))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return sim


def lane(conn: psycopg.Connection, *, window_s: float, margin_s: float, queue_tokens: int | None = None) -> None:
    """The lane's batch window and margin in compressed seconds, and its batch queue limit."""
    conn.execute(
        "INSERT INTO batchdb.rate_limits (provider, key_alias, model, batch_window_seconds, batch_margin_seconds, "
        "batch_queue_tokens) VALUES ('openai', 'default', %s, %s, %s, %s) "
        "ON CONFLICT (provider, key_alias, model) DO UPDATE SET batch_window_seconds = EXCLUDED.batch_window_seconds, "
        "batch_margin_seconds = EXCLUDED.batch_margin_seconds, batch_queue_tokens = EXCLUDED.batch_queue_tokens",
        (MODEL, window_s, margin_s, queue_tokens),
    )


def chunks(conn: psycopg.Connection, job_id: int) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT id, state, n_requests, batch_id, last_error FROM batchdb.provider_batches "
        "WHERE job_id = %s ORDER BY id",
        (job_id,),
    ).fetchall()


def assert_billed(recorded: Decimal, billed: Decimal, rows: int) -> None:
    """Each row's cost is stored to 1e-8 USD: their sum equals the bill priced at once to within that."""
    assert abs(recorded - billed) <= Decimal("0.5e-8") * rows, (recorded, billed)


def submit(dsn: str, n: int, deadline: dt.datetime | dt.timedelta, **options: Any) -> batchdb.Job:
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "text": [f"Review number {i}: fine." for i in range(n)]})
    return batchdb.submit(
        frame,
        prompt="Sentiment of: {text}",
        id_column="id",
        model=MODEL,
        mode="auto",
        deadline=deadline,
        dsn=dsn,
        **options,
    )


def run_worker(dsn: str, **batch: Any) -> Worker:
    """One worker (online slots and the batch driver) until the job's rows are all final."""
    config = BatchDriverConfig(**{**QUICK_BATCHES.__dict__, **batch})
    worker = Worker(WorkerConfig(dsn=dsn, concurrency=4, exit_when_idle=True, poll_interval=0.1, batch=config))
    asyncio.run(worker.run())
    return worker


def price(conn: psycopg.Connection, prompt: int, cached: int, completion: int, *, batch: bool) -> Decimal:
    row = conn.execute(
        "SELECT batchdb.call_cost_usd(input_per_mtok, cached_input_per_mtok, output_per_mtok, batch_discount, "
        "%s, %s, %s, %s) AS usd FROM batchdb.prices WHERE provider = 'openai' AND model = %s",
        (prompt, cached, completion, batch, MODEL),
    ).fetchone()
    return Decimal(row["usd"])


def by_path(conn: psycopg.Connection, job_id: int) -> dict[bool, dict[str, int]]:
    """Final rows' counts and tokens, by whether a provider batch answered them (batch_id set)."""
    rows = conn.execute(
        "SELECT batch_id IS NOT NULL AS by_batch, count(*) AS n, coalesce(sum(prompt_tokens), 0) AS prompt, "
        "coalesce(sum(cached_tokens), 0) AS cached, coalesce(sum(completion_tokens), 0) AS completion "
        "FROM batchdb.requests WHERE job_id = %s AND status = 'succeeded' GROUP BY 1",
        (job_id,),
    ).fetchall()
    out = {
        True: {"n": 0, "prompt": 0, "cached": 0, "completion": 0},
        False: {"n": 0, "prompt": 0, "cached": 0, "completion": 0},
    }
    for row in rows:
        out[row["by_batch"]] = {k: int(row[k]) for k in ("n", "prompt", "cached", "completion")}
    return out


def assert_each_row_once(job: batchdb.Job, sim: SimulatorProcess, n: int) -> dict[str, Any]:
    done = job.status()
    assert (done.status, done.mode, done.n_succeeded, done.n_total) == ("completed", "auto", n, n)
    results = job.results()
    assert set(results["attempts"]) == {1}  # every row sent once, by one path
    totals = sim.stats(series=False)["totals"]
    # The provider answered each row once: batch lines plus online calls.
    assert totals["batch_requests"] + totals["accepted"] == n, totals
    assert totals["requests"] == totals["accepted"]  # no online call failed or was sent twice
    assert done.wasted_calls == 0
    assert done.finished_at is not None and done.deadline is not None and done.finished_at < done.deadline
    return totals


def test_a_deadline_far_enough_sends_every_row_by_batch_at_the_batch_price(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = start_sim(simulator, monkeypatch)
    lane(conn, window_s=30, margin_s=5)
    job = submit(dsn, 25, dt.timedelta(hours=1))
    run_worker(dsn, chunk_rows=10)

    totals = assert_each_row_once(job, sim, 25)
    assert totals["requests"] == 0 and totals["batch_requests"] == 25  # not one online call
    assert [c["n_requests"] for c in chunks(conn, job.id)] == [10, 10, 5]
    done = job.status()
    assert_billed(
        done.cost_usd, price(conn, done.prompt_tokens, done.cached_tokens, done.completion_tokens, batch=True), 25
    )
    assert job.lanes()["n_by_batch"] == 25 and job.lanes()["n_by_online"] == 0
    status = CliRunner().invoke(cli, ["status", str(job.id), "--dsn", dsn])
    assert status.exit_code == 0, status.output
    assert f"job {job.id} completed (auto mode, deadline " in status.output
    assert "answered: 25 by batch, 0 online" in status.output


def test_a_deadline_the_batch_window_would_miss_sends_rows_online_and_meets_it(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = start_sim(simulator, monkeypatch)
    lane(conn, window_s=3600, margin_s=60)  # a batch may take an hour: a 2-minute deadline leaves none
    job = submit(dsn, 20, dt.timedelta(minutes=2))
    assert job.lanes()["lane"] == "online"
    run_worker(dsn)

    totals = assert_each_row_once(job, sim, 20)
    assert totals["batch_requests"] == 0 and totals["accepted"] == 20
    assert chunks(conn, job.id) == []  # no batch was ever formed
    done = job.status()
    assert_billed(
        done.cost_usd, price(conn, done.prompt_tokens, done.cached_tokens, done.completion_tokens, batch=False), 20
    )
    assert (job.lanes()["n_by_batch"], job.lanes()["n_by_online"]) == (0, 20)


def test_a_batch_queue_holding_part_of_the_job_sends_the_rest_online_at_the_same_time(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches end within a second, but may take 60 s: one opened now is not sure to free its room
    # before the cutoff (deadline - 60 - 10 = 30 s from now), so rows the full queue cannot hold go
    # online meanwhile. The queue holds about 5 of the 40 rows' prompts.
    sim = start_sim(simulator, monkeypatch, batch_window_s=120)
    lane(conn, window_s=60, margin_s=10, queue_tokens=100)
    job = submit(dsn, 40, dt.timedelta(seconds=100))
    run_worker(dsn)

    totals = assert_each_row_once(job, sim, 40)
    paths = by_path(conn, job.id)
    print(f"rows by batch: {paths[True]['n']}, online: {paths[False]['n']}, batches: {len(chunks(conn, job.id))}")
    assert paths[True]["n"] > 0 and paths[False]["n"] > 0, paths  # both quotas worked on the job
    assert paths[True]["n"] + paths[False]["n"] == 40
    assert paths[True]["n"] == totals["batch_requests"] and paths[False]["n"] == totals["accepted"]
    assert (paths[True]["prompt"], paths[True]["completion"]) == (
        totals["batch_prompt_tokens"],
        totals["batch_completion_tokens"],
    )
    assert (paths[False]["prompt"], paths[False]["completion"]) == (
        totals["prompt_tokens"],
        totals["completion_tokens"],
    )
    # Every batch fitted the queue: none waited, none was refused.
    made = chunks(conn, job.id)
    assert all(c["state"] == "collected" for c in made)
    # The bill: batch price for the batch rows, online price for the online rows.
    batch = paths[True]
    online = paths[False]
    billed = price(conn, batch["prompt"], batch["cached"], batch["completion"], batch=True) + price(
        conn, online["prompt"], online["cached"], online["completion"], batch=False
    )
    assert_billed(job.status().cost_usd, billed, 40)
    assert (job.lanes()["n_by_batch"], job.lanes()["n_by_online"]) == (batch["n"], online["n"])


def test_an_open_batch_that_would_miss_the_deadline_is_cancelled_and_its_rows_answered_online(
    dsn: str, conn: psycopg.Connection, simulator: Callable[..., SimulatorProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The provider is slower than the lane's window says: its batch would run 300 s. The job's
    # cutoff is 20 s from now (45 - 5 - 20), its batches are cancelled 25 s from now, which leaves
    # 20 s for the online path to answer the rows the batch did not.
    sim = start_sim(
        simulator, monkeypatch, batch_duration_s=Distribution(kind="fixed", value=300.0), batch_window_s=600
    )
    lane(conn, window_s=5, margin_s=20)
    job = submit(dsn, 10, dt.timedelta(seconds=45))
    run_worker(dsn)

    totals = assert_each_row_once(job, sim, 10)
    made = chunks(conn, job.id)
    assert len(made) == 1 and made[0]["state"] == "collected" and made[0]["batch_id"] is not None
    remote = conn.execute(
        "SELECT provider_status FROM batchdb.provider_batches WHERE id = %s", (made[0]["id"],)
    ).fetchone()
    assert remote["provider_status"] == "cancelled"
    paths = by_path(conn, job.id)
    assert paths[False]["n"] >= 1 and paths[True]["n"] + paths[False]["n"] == 10
    assert paths[True]["n"] == totals["batch_requests"] and paths[False]["n"] == totals["accepted"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"deadline": None}, "deadline: mode='auto' needs a deadline"),
        ({"deadline": dt.timedelta(seconds=-5)}, "deadline: expected a time in the future"),
        ({"deadline": dt.datetime(2030, 1, 1)}, "deadline: expected a datetime with a timezone"),
        ({"deadline": "6h"}, "deadline: expected a datetime or a timedelta, got str"),
        ({"deadline": dt.timedelta(hours=1), "provider": "instant", "model": "any"}, "provider 'instant' has none"),
        ({"deadline": dt.timedelta(hours=1), "budget_usd": 5.0}, "budget_usd: not supported with mode='auto'"),
        ({"deadline": dt.timedelta(hours=1), "mode": "online"}, "deadline: only mode='auto' takes a deadline"),
    ],
)
def test_auto_mode_is_refused_without_a_future_deadline_or_a_batch_api(
    dsn: str, options: dict[str, Any], message: str
) -> None:
    frame = pd.DataFrame({"text": ["a", "b"]})
    arguments: dict[str, Any] = {"model": MODEL, "mode": "auto", **options}
    with pytest.raises(batchdb.InputError, match=message):
        batchdb.submit(frame, prompt="{text}", dsn=dsn, **arguments)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("'auto', NULL", "batchdb.jobs.deadline: mode auto needs a deadline"),
        ("'auto', now() - interval '1 minute'", "batchdb.jobs.deadline: expected a time in the future"),
        ("'sometimes', NULL", "batchdb.jobs.mode: expected online, batch or auto"),
    ],
)
def test_sql_inserts_name_the_field_the_auto_mode_needs(conn: psycopg.Connection, values: str, message: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=message):
        conn.execute(f"INSERT INTO batchdb.jobs (model, mode, deadline) VALUES ('gpt-4o-mini', {values})")


def test_an_sql_insert_with_a_deadline_makes_an_auto_job(conn: psycopg.Connection) -> None:
    row = conn.execute(
        "INSERT INTO batchdb.jobs (model, mode, deadline) VALUES ('gpt-4o-mini', 'auto', now() + interval '6 hours') "
        "RETURNING id"
    ).fetchone()
    # The default lane window (24 h) cannot end before a 6-hour deadline: its rows go online.
    clock = conn.execute("SELECT * FROM batchdb.auto_lane(%s)", (row["id"],)).fetchone()
    assert clock["lane"] == "online" and clock["past_cutoff"]
    # An old job keeps its deadline when another column changes.
    conn.execute("UPDATE batchdb.jobs SET deadline = now() + interval '1 second' WHERE id = %s", (row["id"],))
    conn.execute("SELECT pg_sleep(1.1)")
    conn.execute("UPDATE batchdb.jobs SET priority = 3 WHERE id = %s", (row["id"],))


def test_the_cli_takes_a_deadline_as_a_span_or_a_time(dsn: str, tmp_path: Any, conn: psycopg.Connection) -> None:
    path = tmp_path / "rows.csv"
    pd.DataFrame({"text": ["a", "b"]}).to_csv(path, index=False)
    base = ["submit", str(path), "--prompt", "{text}", "--model", MODEL, "--dsn", dsn, "--mode", "auto"]
    made = CliRunner().invoke(cli, [*base, "--deadline", "6h"])
    assert made.exit_code == 0, made.output
    at = CliRunner().invoke(cli, [*base, "--deadline", "2099-12-08T09:00Z"])
    assert at.exit_code == 0, at.output
    deadlines = [
        r["left"]
        for r in conn.execute("SELECT deadline - created_at AS left FROM batchdb.jobs WHERE mode = 'auto' ORDER BY id")
    ]
    assert abs(deadlines[0] - dt.timedelta(hours=6)) < dt.timedelta(minutes=1)
    assert deadlines[1] > dt.timedelta(days=365)
    bad = CliRunner().invoke(cli, [*base, "--deadline", "tomorrow"])
    assert bad.exit_code != 0 and "--deadline" in bad.output
    missing = CliRunner().invoke(cli, base)
    assert missing.exit_code != 0 and "deadline: mode='auto' needs a deadline" in missing.output
    status = CliRunner().invoke(cli, ["status", "1", "--dsn", dsn])
    assert "(auto mode, deadline " in status.output and "now: rows go online" in status.output


def test_the_estimate_of_an_auto_job_gives_the_range_from_all_batch_to_all_online(dsn: str) -> None:
    frame = pd.DataFrame({"text": ["a", "b", "c"]})
    options: dict[str, Any] = {"prompt": "{text}", "model": MODEL, "dsn": dsn, "mode": "auto"}
    estimate = batchdb.estimate(frame, deadline=dt.timedelta(hours=6), **options)
    batch, online = estimate.cost_usd(batch=True), estimate.cost_usd()
    assert batch is not None and online is not None and batch < online
    assert "  mode auto:         from $" in estimate.text()
    with pytest.raises(batchdb.InputError, match="deadline: mode='auto' needs a deadline"):
        batchdb.estimate(frame, **options)


def test_online_takes_an_auto_jobs_rows_only_when_no_batch_can_make_the_deadline_for_them(
    conn: psycopg.Connection, dsn: str
) -> None:
    """The rule of 0022 on hand-made lane states: window 60 s, margin 10 s, a queue of 100 tokens."""
    from batchdb import queue

    lane(conn, window_s=60, margin_s=10, queue_tokens=100)
    job_id = conn.execute(
        "INSERT INTO batchdb.jobs (model, mode, deadline, params) VALUES (%s, 'auto', now() + interval '1000 seconds', "
        '\'{"prompt": "{h}"}\') RETURNING id',
        (MODEL,),
    ).fetchone()["id"]
    conn.execute("INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'r1', '{\"h\": 1}')", (job_id,))

    def goes_online(deadline_s: float) -> bool:
        conn.execute(
            "UPDATE batchdb.jobs SET deadline = now() + make_interval(secs => %s) WHERE id = %s", (deadline_s, job_id)
        )
        return bool(conn.execute("SELECT lane FROM batchdb.auto_lane(%s)", (job_id,)).fetchone()["lane"] == "online")

    async def claimed() -> int:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            rows = await queue.claim_batch(c, worker_id="w", limit=10, lease_seconds=30)
            await queue.release_leases(c, rows)
            return len(rows)

    assert not goes_online(1000)  # an empty queue: batch
    assert goes_online(69)  # past the cutoff (deadline - 70 s): online
    # A full queue (100 of 100 tokens, 20 a row), its batch created now: it surely ends by now + 60 s.
    conn.execute(
        "INSERT INTO batchdb.provider_batches (job_id, provider, key_alias, model, state, n_requests, enqueued_tokens, "
        "submitted_at) VALUES (%s, 'openai', 'default', %s, 'in_progress', 5, 100, now())",
        (job_id, MODEL),
    )
    assert not goes_online(1000)  # the room frees before the cutoff (now + 930 s): the row waits for it
    assert asyncio.run(claimed()) == 0
    assert goes_online(100)  # cutoff now + 30 s, before the batch's worst-case end: online now
    assert asyncio.run(claimed()) == 1
    conn.execute("UPDATE batchdb.provider_batches SET enqueued_tokens = 60 WHERE job_id = %s", (job_id,))
    assert not goes_online(100)  # 40 tokens of room, more than a row (12): not full, batch takes it
    assert asyncio.run(claimed()) == 0
