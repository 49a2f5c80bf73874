"""Queue semantics on real PostgreSQL: claim, lease, fencing, reclaim, fairness, counters."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from psycopg.rows import dict_row

from batchdb import queue
from batchdb.models import ClaimedRequest, Outcome, RequestStatus
from bench import write_audit


def make_job(
    conn: psycopg.Connection,
    rows: int,
    *,
    name: str = "job",
    priority: int = 1,
    max_attempts: int = 5,
    model: str = "gpt-4o-mini",
) -> int:
    job_id = conn.execute(
        "INSERT INTO batchdb.jobs (name, model, priority, max_attempts) VALUES (%s, %s, %s, %s) RETURNING id",
        (name, model, priority, max_attempts),
    ).fetchone()["id"]
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) "
        "SELECT %s, 'r' || g, jsonb_build_object('prompt', 'hello ' || g) FROM generate_series(1, %s) g",
        (job_id, rows),
    )
    return job_id


def run(coro):  # noqa: ANN201
    return asyncio.run(coro)


async def aconn(dsn: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row)


async def claim(dsn: str, limit: int, *, worker: str = "w1", lease: float = 60.0) -> list[ClaimedRequest]:
    async with await aconn(dsn) as c:
        return await queue.claim_batch(c, worker_id=worker, limit=limit, lease_seconds=lease)


async def complete(dsn: str, outcomes: list[Outcome]) -> set[tuple[int, int]]:
    async with await aconn(dsn) as c:
        return await queue.complete_batch(c, outcomes)


def ok(
    row: ClaimedRequest,
    *,
    prompt_tokens: int = 10,
    completion_tokens: int = 5,
    token: int | None = None,
    text: str | None = None,
) -> Outcome:
    """A success; its text names the row and the lease that answered, so a late write would show."""
    token = row.lease_token if token is None else token
    return Outcome(
        row.job_id,
        row.id,
        token,
        RequestStatus.SUCCEEDED,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        response_text=text or f"answer {row.id} under lease {token}",
        finish_reason="stop",
    )


def results_of(conn: psycopg.Connection, job_id: int) -> dict[int, tuple[str, int]]:
    """request id -> (response text, times written)."""
    return {
        r["request_id"]: (r["response_text"], r["writes"])
        for r in conn.execute(
            "SELECT request_id, response_text, writes FROM batchdb.results WHERE job_id = %s", (job_id,)
        ).fetchall()
    }


def job_row(conn: psycopg.Connection, job_id: int) -> dict:
    return conn.execute("SELECT * FROM batchdb.jobs WHERE id = %s", (job_id,)).fetchone()


def test_claim_leases_rows_in_order_and_bumps_fencing_token(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 5)
    rows = run(claim(dsn, 3))
    assert [r.custom_id for r in rows] == ["r1", "r2", "r3"]
    assert all(r.attempts == 1 and r.lease_token == 1 and r.max_attempts == 5 for r in rows)
    leased = conn.execute(
        "SELECT count(*) AS n, min(lease_expires_at - started_at) AS shortest, max(lease_expires_at - started_at) "
        "AS longest FROM batchdb.requests WHERE job_id = %s AND status = 'running' AND lease_owner = 'w1'",
        (job_id,),
    ).fetchone()
    assert leased["n"] == 3
    # Set in database time from the claim's own now(): exactly the lease asked for.
    assert leased["shortest"].total_seconds() == leased["longest"].total_seconds() == 60
    # A second claim skips the leased rows.
    more = run(claim(dsn, 10, worker="w2"))
    assert [r.custom_id for r in more] == ["r4", "r5"]
    assert run(claim(dsn, 10, worker="w3")) == []


def test_concurrent_claims_never_share_a_row(dsn: str, conn: psycopg.Connection) -> None:
    make_job(conn, 2000)

    async def many() -> list[ClaimedRequest]:
        conns = [await aconn(dsn) for _ in range(8)]
        try:
            claimed: list[ClaimedRequest] = []
            while True:
                batches = await asyncio.gather(
                    *(queue.claim_batch(c, worker_id=f"w{i}", limit=37, lease_seconds=60) for i, c in enumerate(conns))
                )
                got = [r for b in batches for r in b]
                if not got:
                    return claimed
                claimed.extend(got)
        finally:
            for c in conns:
                await c.close()

    claimed = run(many())
    assert len(claimed) == 2000
    assert len({r.key for r in claimed}) == 2000


def test_completion_records_once_and_counters_are_exact(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 4)
    rows = run(claim(dsn, 4))
    outcomes = [ok(r, prompt_tokens=100 + i, completion_tokens=10 + i) for i, r in enumerate(rows)]
    assert run(complete(dsn, outcomes)) == {r.key for r in rows}
    # The same completions again (a retried write, a duplicate) record nothing, even with other answers.
    assert run(complete(dsn, outcomes)) == set()
    assert run(complete(dsn, [ok(r, text="a duplicate answer") for r in rows])) == set()
    assert results_of(conn, job_id) == {r.id: (f"answer {r.id} under lease {r.lease_token}", 1) for r in rows}
    job = job_row(conn, job_id)
    assert job["status"] == "completed" and job["finished_at"] is not None
    assert (job["n_total"], job["n_succeeded"]) == (4, 4)
    assert job["prompt_tokens"] == 100 + 101 + 102 + 103
    assert job["completion_tokens"] == 10 + 11 + 12 + 13
    # gpt-4o-mini list price: 0.15 / 0.60 USD per million tokens.
    expected_cost = (Decimal(406) * Decimal("0.15") + Decimal(46) * Decimal("0.60")) / Decimal(1_000_000)
    assert job["cost_usd"] == expected_cost
    sums = conn.execute(
        "SELECT sum(prompt_tokens) AS p, sum(completion_tokens) AS c, sum(cost_usd) AS cost "
        "FROM batchdb.requests WHERE job_id = %s",
        (job_id,),
    ).fetchone()
    assert (sums["p"], sums["c"], sums["cost"]) == (job["prompt_tokens"], job["completion_tokens"], job["cost_usd"])
    assert conn.execute("SELECT count(*) AS n FROM batchdb.results WHERE job_id = %s", (job_id,)).fetchone()["n"] == 4


def test_late_completion_from_a_worker_that_lost_its_lease_is_rejected(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 1)
    [first] = run(claim(dsn, 1, worker="slow", lease=0.2))
    conn.execute("SELECT pg_sleep(0.3)")

    async def reclaim() -> int:
        async with await aconn(dsn) as c:
            return await queue.reclaim_expired(c)

    assert run(reclaim()) == 1
    [second] = run(claim(dsn, 1, worker="fast"))
    assert second.id == first.id and second.lease_token == first.lease_token + 1
    # The slow worker finally answers, before and after the new owner: fenced out, nothing recorded.
    assert run(complete(dsn, [ok(first, prompt_tokens=999, text="late answer")])) == set()
    assert run(complete(dsn, [ok(second, text="accepted answer")])) == {second.key}
    assert run(complete(dsn, [ok(first, prompt_tokens=999, text="later answer")])) == set()
    job = job_row(conn, job_id)
    assert (job["n_succeeded"], job["prompt_tokens"]) == (1, 10)
    assert results_of(conn, job_id) == {second.id: ("accepted answer", 1)}


def test_fenced_out_calls_are_paid_and_counted_once_on_the_job(dsn: str, conn: psycopg.Connection) -> None:
    """A call answered after its row was taken back (lease expired and reclaimed, job cancelled) was billed:
    its usage goes to unrecorded_calls and the job's wasted_* counters, once, at the cost rule's price."""
    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok)"
        " VALUES ('openai', 'priced', 1, 2)"
    )
    job_id = make_job(conn, 3, model="priced")
    expired, *_ = run(claim(dsn, 3, lease=0.2))
    conn.execute("SELECT pg_sleep(0.3)")

    async def reclaim_and_record() -> None:
        async with await aconn(dsn) as c:
            await queue.reclaim_expired(c)

    run(reclaim_and_record())  # every lease ran out: the rows are queued again, nobody took them yet
    late = ok(expired, prompt_tokens=1000, completion_tokens=500)
    assert run(complete(dsn, [late])) == set()
    [again] = run(claim(dsn, 1))
    assert again.id == expired.id and again.lease_token == expired.lease_token + 1
    assert run(complete(dsn, [ok(again)])) == {again.key}  # the row recorded once, by its new lease

    async def record(outcomes: list[Outcome]) -> None:
        async with await aconn(dsn) as c:
            await queue.record_unrecorded_calls(c, outcomes)

    run(record([late]))
    run(record([late]))  # repeated (a lost reply): nothing more
    job = job_row(conn, job_id)
    assert (job["wasted_calls"], job["wasted_usd"]) == (1, Decimal("0.002"))  # 1,000 x $1 + 500 x $2 per million
    assert (job["prompt_tokens"], job["cost_usd"]) == (10, Decimal("0.00002"))  # the rows' own: the new lease's call

    # An outcome this lease did record (the reply of its complete_batch was lost) is not waste.
    [second] = run(claim(dsn, 1))
    answered = ok(second, prompt_tokens=7)
    assert run(complete(dsn, [answered])) == {second.key}
    assert run(complete(dsn, [answered])) == set()  # the repeat finds the row done
    run(record([answered]))
    assert job_row(conn, job_id)["wasted_calls"] == 1

    # The job cancelled while a call was in flight: its answer is fenced out and counted.
    [in_flight] = run(claim(dsn, 1))
    conn.execute("SELECT batchdb.cancel_job(%s)", (job_id,))
    cut = ok(in_flight, prompt_tokens=100, completion_tokens=0)
    assert run(complete(dsn, [cut])) == set()
    run(record([cut]))
    job = job_row(conn, job_id)
    assert (job["wasted_calls"], job["wasted_usd"]) == (2, Decimal("0.0021"))
    unrecorded = conn.execute(
        "SELECT request_id, reason, prompt_tokens FROM batchdb.unrecorded_calls WHERE job_id = %s ORDER BY 1", (job_id,)
    ).fetchall()
    assert [(r["request_id"], r["reason"], r["prompt_tokens"]) for r in unrecorded] == sorted(
        [(expired.id, "fenced", 1000), (in_flight.id, "fenced", 100)]
    )


def test_a_double_completion_is_counted_not_hidden(dsn: str, conn: psycopg.Connection) -> None:
    """results has one row per request, so counting result rows cannot see a second completion:
    the write audit (bench/write_audit.py, used by the drills) and results.writes do."""
    write_audit.install(dsn)
    job_id = make_job(conn, 2)
    rows = run(claim(dsn, 2))
    assert run(complete(dsn, [ok(r, text="first") for r in rows])) == {r.key for r in rows}
    assert write_audit.writes(conn, job_id).violations == []
    # A broken fence: the first row looks in flight again under the same lease, and completes twice.
    conn.execute("UPDATE batchdb.requests SET status = 'running' WHERE job_id = %s AND id = %s", (job_id, rows[0].id))
    assert run(complete(dsn, [ok(rows[0], text="second")])) == {rows[0].key}
    stored = conn.execute(
        "SELECT count(*) AS n, count(DISTINCT request_id) AS d FROM batchdb.results WHERE job_id = %s", (job_id,)
    ).fetchone()
    assert stored["n"] == stored["d"] == 2  # the old check ("no row has two results") sees nothing
    assert results_of(conn, job_id)[rows[0].id] == ("second", 2)  # the overwrite is counted
    audited = write_audit.writes(conn, job_id)
    assert (audited.rows_finalised_twice, audited.rows_with_two_result_writes) == (1, 1)
    assert audited.succeeded_without_one_final_write == 1 and len(audited.violations) == 3, audited


def test_reclaim_requeues_expired_rows_and_dead_letters_the_last_attempt(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 2, max_attempts=2)
    run(claim(dsn, 2, lease=0.1))
    conn.execute("SELECT pg_sleep(0.2)")

    async def reclaim() -> int:
        async with await aconn(dsn) as c:
            return await queue.reclaim_expired(c)

    assert run(reclaim()) == 2
    statuses = conn.execute(
        "SELECT status, attempts, error_class FROM batchdb.requests WHERE job_id = %s", (job_id,)
    ).fetchall()
    assert {(r["status"], r["attempts"], r["error_class"]) for r in statuses} == {("queued", 1, "lease_expired")}
    run(claim(dsn, 2, lease=0.1))
    conn.execute("SELECT pg_sleep(0.2)")
    assert run(reclaim()) == 2
    job = job_row(conn, job_id)
    assert (job["n_dead"], job["status"]) == (2, "completed")
    errors = conn.execute("SELECT error FROM batchdb.requests WHERE job_id = %s", (job_id,)).fetchall()
    assert all("expired during attempt 2" in r["error"] for r in errors)


def test_retry_outcome_waits_for_run_after(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 1)
    [row] = run(claim(dsn, 1))
    retry = Outcome(
        row.job_id, row.id, row.lease_token, RequestStatus.QUEUED, retry_in=30, error_class="rate_limited", error="429"
    )
    before = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
    assert run(complete(dsn, [retry])) == {row.key}
    after = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
    run_after = conn.execute("SELECT run_after FROM batchdb.requests WHERE job_id = %s", (job_id,)).fetchone()
    # Due 30 s after the completion, in database time (however long the statements took).
    assert before + timedelta(seconds=30) <= run_after["run_after"] <= after + timedelta(seconds=30)
    assert run(claim(dsn, 1)) == []  # not due yet
    conn.execute(
        "UPDATE batchdb.requests SET run_after = run_after - interval '30 seconds' WHERE job_id = %s", (job_id,)
    )  # the 30 s have passed
    [again] = run(claim(dsn, 1))
    assert again.attempts == 2 and again.lease_token == 2
    assert job_row(conn, job_id)["n_retries"] == 1


def test_extend_and_release_leases(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 2)
    rows = run(claim(dsn, 2, lease=1))

    async def extend_then_release() -> tuple[set, set]:
        async with await aconn(dsn) as c:
            extended = await queue.extend_leases(c, rows, lease_seconds=120)
            released = await queue.release_leases(c, rows[:1])
            return extended, released

    extended, released = run(extend_then_release())
    assert extended == {r.key for r in rows} and released == {rows[0].key}
    states = {
        r["custom_id"]: r
        for r in conn.execute(
            "SELECT custom_id, status, attempts, lease_expires_at - now() AS lease FROM batchdb.requests "
            "WHERE job_id = %s",
            (job_id,),
        ).fetchall()
    }
    assert states["r1"]["status"] == "queued" and states["r1"]["attempts"] == 0
    assert states["r2"]["status"] == "running" and states["r2"]["lease"].total_seconds() > 100
    assert job_row(conn, job_id)["n_retries"] == 0  # handed back unsent: no attempt spent, no retry


def test_release_leases_with_a_delay(dsn: str, conn: psycopg.Connection) -> None:
    """A waiting lane hands its rows back due later; a stopping worker's are due at once."""
    job_id = make_job(conn, 2)
    rows = sorted(run(claim(dsn, 2)), key=lambda r: r.id)

    async def release() -> tuple[set, set]:
        async with await aconn(dsn) as c:
            return (await queue.release_leases(c, rows[:1]), await queue.release_leases(c, rows[1:], delay_s=600))

    assert run(release()) == ({rows[0].key}, {rows[1].key})
    states = {
        r["id"]: r
        for r in conn.execute(
            "SELECT id, status, attempts, run_after - now() AS due_in FROM batchdb.requests WHERE job_id = %s",
            (job_id,),
        ).fetchall()
    }
    assert all(s["status"] == "queued" and s["attempts"] == 0 for s in states.values())
    assert states[rows[0].id]["due_in"].total_seconds() <= 0
    assert 500 < states[rows[1].id]["due_in"].total_seconds() <= 600
    assert job_row(conn, job_id)["n_retries"] == 0


def test_small_job_submitted_after_a_big_one_is_served_at_once(dsn: str, conn: psycopg.Connection) -> None:
    big = make_job(conn, 5000, name="big")
    run(claim(dsn, 200))  # the big job is under way
    small = make_job(conn, 20, name="small")
    rows = run(claim(dsn, 40))
    per_job = Counter(r.job_id for r in rows)
    assert per_job[small] == 20 and per_job[big] == 20


def test_priority_weights_the_split(dsn: str, conn: psycopg.Connection) -> None:
    low = make_job(conn, 5000, name="low", priority=1)
    high = make_job(conn, 5000, name="high", priority=3)
    per_job: Counter[int] = Counter()
    for _ in range(10):
        per_job.update(r.job_id for r in run(claim(dsn, 40)))
    assert per_job[high] == 300 and per_job[low] == 100


def test_cancel_stops_queued_rows_and_fences_in_flight_ones(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 10)
    in_flight = run(claim(dsn, 3))
    n = conn.execute("SELECT batchdb.cancel_job(%s) AS n", (job_id,)).fetchone()["n"]
    assert n == 10
    assert run(claim(dsn, 10)) == []
    assert run(complete(dsn, [ok(r) for r in in_flight])) == set()
    job = job_row(conn, job_id)
    assert (job["status"], job["n_cancelled"], job["n_succeeded"]) == ("cancelled", 10, 0)


def test_retry_job_replays_dead_and_failed_rows(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 3)
    rows = run(claim(dsn, 3))
    dead = Outcome(rows[0].job_id, rows[0].id, rows[0].lease_token, RequestStatus.DEAD, error="gave up")
    failed = Outcome(rows[1].job_id, rows[1].id, rows[1].lease_token, RequestStatus.FAILED, error="400")
    run(complete(dsn, [dead, failed, ok(rows[2])]))
    assert job_row(conn, job_id)["status"] == "completed"
    assert conn.execute("SELECT batchdb.retry_job(%s, ARRAY['dead']) AS n", (job_id,)).fetchone()["n"] == 1
    job = job_row(conn, job_id)
    assert (job["status"], job["n_dead"], job["n_failed"]) == ("running", 0, 1)
    [again] = run(claim(dsn, 5))
    assert again.id == rows[0].id and again.attempts == 1
    run(complete(dsn, [ok(again)]))
    job = job_row(conn, job_id)
    assert (job["status"], job["n_succeeded"], job["n_failed"]) == ("completed", 2, 1)


def test_claim_uses_the_claimable_index_on_a_large_backlog(dsn: str, conn: psycopg.Connection) -> None:
    job_id = make_job(conn, 200_000)
    conn.execute("SELECT batchdb.analyze_job(%s)", (job_id,))
    # Claim a chunk so dead entries sit at the head of the index, as in a running job.
    run(claim(dsn, 500))
    from batchdb.queries import query

    sql = (
        query("claim_batch")
        .replace("%(worker_id)s", "'explain'")
        .replace("%(limit)s", "50")
        .replace("%(lease_seconds)s", "60")
        .replace("%(max_jobs)s", "16")
        .replace("%(lane_providers)s", "'{instant}'")
        .replace("%(lane_key_aliases)s", "'{default}'")
    )
    with conn.transaction():
        plan = "\n".join(r["QUERY PLAN"] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql).fetchall())
        raise psycopg.Rollback()  # EXPLAIN ANALYZE really claimed rows; undo it
    assert f"requests_{job_id}_job_id_run_after_id_idx" in plan, plan
    assert "Seq Scan on requests_" not in plan, plan


@pytest.mark.parametrize("bad_status", ["succeeded", "bogus"])
def test_rows_must_be_inserted_queued(conn: psycopg.Connection, bad_status: str) -> None:
    job_id = make_job(conn, 0)
    with pytest.raises(psycopg.errors.CheckViolation, match="must be inserted as 'queued'"):
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, payload, status) "
            "VALUES (%s, 'x', '{\"prompt\": \"hi\"}', %s)",
            (job_id, bad_status),
        )


def test_job_completion_is_announced_once_on_batchdb_events(dsn: str, conn: psycopg.Connection) -> None:
    import json

    job_id = make_job(conn, 3)
    rows = run(claim(dsn, 3))
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN batchdb_events")
        run(complete(dsn, [ok(rows[0])]))
        run(complete(dsn, [ok(r) for r in rows[1:]]))
        events = [json.loads(n.payload) for n in listener.notifies(timeout=1.0)]
    assert [(e["event"], e["job_id"], e["n_succeeded"], e["previous_status"]) for e in events] == [
        ("job.completed", job_id, 3, "running")
    ]
