"""batchdb.queue_depth (sql/migrations/0025_queue_depth.sql): rows due per lane, for autoscalers and
alerts, counted right from real rows, readable by the monitoring role alone, and cheap."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

KEDA_QUERY = "SELECT coalesce(sum(due_rows), 0) FROM batchdb.queue_depth"


def add_job(conn: psycopg.Connection, provider: str, model: str, rows: int, **job: Any) -> int:
    """A job inserted the plain-SQL way (docs/sql.md), with `rows` rows due now."""
    found = conn.execute(
        "INSERT INTO batchdb.jobs (name, provider, model, params) VALUES (%s, %s, %s, '{}') RETURNING id",
        (f"{provider}-{model}-{uuid.uuid4().hex[:6]}", provider, model),
    ).fetchone()
    assert found is not None
    job_id = int(found["id"])
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload, request_key)"
        " SELECT %s, g::text, jsonb_build_object('prompt', 'row ' || g), %s FROM generate_series(1, %s) g",
        (job_id, job.pop("request_key", None), rows),
    )
    if job:
        conn.execute(
            sql.SQL("UPDATE batchdb.jobs SET {} WHERE id = %s").format(
                sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in job)
            ),
            (*job.values(), job_id),
        )
    return job_id


def set_rows(conn: psycopg.Connection, job_id: int, ids: range, assignments: str) -> None:
    """Give rows `ids` (1-based, in insert order) of the job new values (as a worker would)."""
    conn.execute(
        f"UPDATE batchdb.requests SET {assignments} WHERE job_id = %s AND custom_id = ANY(%s)",
        (job_id, [str(i) for i in ids]),
    )


def depth(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    return {
        f"{r['provider']}/{r['key_alias']}/{r['model']}": r
        for r in conn.execute("SELECT * FROM batchdb.queue_depth").fetchall()
    }


def test_rows_are_due_held_scheduled_running_or_dead_per_lane(conn: psycopg.Connection) -> None:
    mini = add_job(conn, "openai", "gpt-4o-mini", 12)
    set_rows(conn, mini, range(1, 3), "status = 'running', attempts = 1, lease_owner = 'w', "
             "lease_expires_at = now() + interval '1 minute'")  # fmt: skip
    set_rows(conn, mini, range(3, 6), "attempts = 1, run_after = now() + interval '1 hour'")  # retries, later
    set_rows(conn, mini, range(6, 7), "status = 'dead', attempts = 5, finished_at = now()")
    set_rows(conn, mini, range(7, 8), "status = 'succeeded', attempts = 1, finished_at = now()")
    set_rows(conn, mini, range(8, 9), "run_after = now() - interval '120 seconds'")  # waited 2 minutes
    # Left due: rows 8-12 (5 rows). A paused job's due rows on the same lane are held.
    add_job(conn, "openai", "gpt-4o-mini", 4, status="paused", status_reason="budget reached")
    # Another lane, its circuit open: due rows held, not due.
    add_job(conn, "openai", "gpt-4o", 3)
    conn.execute(
        "INSERT INTO batchdb.circuits (provider, key_alias, model, state, opened_at, last_error)"
        " VALUES ('openai', 'default', 'gpt-4o', 'open', now(), 'connection refused')"
    )
    # A lane whose three rows ask one thing: the first is due, the two repeats wait for its answer.
    add_job(conn, "gemini", "gemini-2.0-flash", 3, request_key=b"same")
    # Not shown: a job still loading its rows, a completed job, a cancelled one.
    add_job(conn, "openai", "gpt-4.1", 2, status="loading")
    done = add_job(conn, "openai", "gpt-4.1-mini", 2)
    set_rows(conn, done, range(1, 3), "status = 'succeeded', attempts = 1, finished_at = now()")
    add_job(conn, "openai", "gpt-5", 2, status="cancelled")

    found = depth(conn)
    assert set(found) == {"openai/default/gpt-4o-mini", "openai/default/gpt-4o", "gemini/default/gemini-2.0-flash"}
    lane = found["openai/default/gpt-4o-mini"]
    assert {k: lane[k] for k in ("due_rows", "held_rows", "scheduled_rows", "running_rows", "dead_rows", "jobs")} == {
        "due_rows": 5,
        "held_rows": 4,
        "scheduled_rows": 3,
        "running_rows": 2,
        "dead_rows": 1,
        "jobs": 2,
    }
    assert 119 <= lane["oldest_due_age_seconds"] < 180  # database time: row 8 became due 120 s ago
    assert lane["circuit_open"] is False
    outage = found["openai/default/gpt-4o"]
    assert (outage["due_rows"], outage["held_rows"], outage["circuit_open"]) == (0, 3, True)
    assert outage["oldest_due_age_seconds"] is None  # nothing due: no age
    repeats = found["gemini/default/gemini-2.0-flash"]
    assert (repeats["due_rows"], repeats["scheduled_rows"], repeats["held_rows"]) == (1, 0, 0)
    # What KEDA runs: every row a worker could take now, on every lane.
    assert conn.execute(KEDA_QUERY).fetchone() == {"coalesce": 5 + 1}


def test_an_empty_queue_reads_zero_rows_and_zero_due(conn: psycopg.Connection) -> None:
    assert depth(conn) == {}
    assert conn.execute(KEDA_QUERY).fetchone() == {"coalesce": 0}
    job = add_job(conn, "openai", "gpt-4o-mini", 3)
    set_rows(conn, job, range(1, 4), "attempts = 1, run_after = now() + interval '10 minutes'")
    lane = depth(conn)["openai/default/gpt-4o-mini"]
    assert (lane["due_rows"], lane["scheduled_rows"], lane["oldest_due_age_seconds"]) == (0, 3, None)


@pytest.fixture
def make_login(dsn: str, conn: psycopg.Connection) -> Iterator[Callable[[str], str]]:
    """A login role in a group role (roles are cluster-wide: a unique name, dropped afterwards)."""
    made: list[str] = []

    def make(group: str) -> str:
        name = f"qd_{group.removeprefix('batchdb_')}_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(name), sql.Identifier(group)))
        made.append(name)
        return make_conninfo(dsn, user=name)

    yield make
    for name in made:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_the_monitoring_role_reads_every_users_depth_and_nothing_else(
    conn: psycopg.Connection, make_login: Callable[[str], str]
) -> None:
    add_job(conn, "openai", "gpt-4o-mini", 7)
    keda = make_login("batchdb_monitor")
    with psycopg.connect(keda, autocommit=True) as monitor:
        assert monitor.execute(KEDA_QUERY).fetchone() == (7,)  # rows of a job it does not own
        for table in ("batchdb.jobs", "batchdb.requests", "batchdb.results", "batchdb.circuits"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                monitor.execute(f"SELECT 1 FROM {table} LIMIT 1")
    with psycopg.connect(make_login("batchdb_worker"), autocommit=True) as worker:
        assert worker.execute(KEDA_QUERY).fetchone() == (7,)  # a worker's /metrics reads it
    with psycopg.connect(make_login("batchdb_admin"), autocommit=True) as admin:
        assert admin.execute(KEDA_QUERY).fetchone() == (7,)
    # A user sees only their own jobs everywhere else; fleet-wide counts are not theirs to read.
    with (
        psycopg.connect(make_login("batchdb_user"), autocommit=True) as user,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        user.execute(KEDA_QUERY)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def test_the_view_reads_no_due_row_of_a_large_backlog(conn: psycopg.Connection) -> None:
    """Counting due rows one by one took 1.2-2.3 s on 1,500,000 of them; the view reads the running and
    the later rows and one index entry per job, whatever the backlog (scale-free, like the claim's EXPLAIN)."""
    due = 20_000
    job = add_job(conn, "openai", "gpt-4o-mini", due + 30)
    set_rows(conn, job, range(1, 11), "status = 'running', attempts = 1, lease_owner = 'w', "
             "lease_expires_at = now() + interval '1 minute'")  # fmt: skip
    set_rows(conn, job, range(11, 31), "attempts = 1, run_after = now() + interval '1 hour'")
    conn.execute("ANALYZE batchdb.requests")
    conn.execute("ANALYZE batchdb.jobs")
    with conn.cursor(row_factory=dict_row) as cur:
        (plan,) = cur.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {KEDA_QUERY}").fetchone().values()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    on_requests = [n for n in _nodes(plan[0]["Plan"]) if str(n.get("Relation Name", "")).startswith("requests")]
    assert on_requests, plan
    assert not [n for n in on_requests if n["Node Type"] == "Seq Scan" and n.get("Actual Loops", 0) > 0], plan
    read = sum(n["Actual Rows"] * n["Actual Loops"] for n in on_requests)
    assert read <= 10 + 20 + 1  # the running rows, the later ones, the first queued entry
    assert conn.execute(KEDA_QUERY).fetchone() == {"coalesce": due}
