"""`NOTIFY batchdb_events` (what `batchdb watch` prints and `job.wait()` hears) names events as webhooks do."""

from __future__ import annotations

import json

import psycopg

from batchdb import events


def _job_with_webhook(conn: psycopg.Connection, name: str, n_rows: int) -> int:
    job_id = conn.execute(
        "INSERT INTO batchdb.jobs (name, model, provider) VALUES (%s, 'm', 'instant') RETURNING id", (name,)
    ).fetchone()["id"]
    conn.execute(
        "INSERT INTO batchdb.notification_targets (job_id, channel, target, secret) "
        "VALUES (%s, 'webhook', 'http://127.0.0.1:9/unused', 'test-secret-0123456789')",
        (job_id,),
    )
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) SELECT %s, g::text, "
        '\'{"prompt": "x"}\' FROM generate_series(1, %s) g',
        (job_id, n_rows),
    )
    return job_id


def _finish(conn: psycopg.Connection, job_id: int, *statuses: str) -> None:
    for custom_id, status in enumerate(statuses, start=1):
        conn.execute(
            "UPDATE batchdb.requests SET status = %s WHERE job_id = %s AND custom_id = %s",
            (status, job_id, str(custom_id)),
        )


def test_watch_events_and_webhooks_use_one_vocabulary(dsn: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        events.listen(listener)
        dead = _job_with_webhook(conn, "dead rows", 2)
        _finish(conn, dead, "succeeded", "dead")
        clean = _job_with_webhook(conn, "all good", 1)
        _finish(conn, clean, "succeeded")
        cancelled = _job_with_webhook(conn, "cancelled", 2)
        conn.execute("SELECT batchdb.cancel_job(%s)", (cancelled,))
        paused = _job_with_webhook(conn, "paused", 1)
        conn.execute(
            "UPDATE batchdb.jobs SET status = 'paused', status_reason = 'paused by hand' WHERE id = %s", (paused,)
        )
        conn.execute("UPDATE batchdb.jobs SET status = 'running', status_reason = NULL WHERE id = %s", (paused,))
        heard = [json.loads(n.payload) for n in listener.notifies(timeout=2.0, stop_after=5)]
    assert [(e["job_id"], e["event"]) for e in heard] == [
        (dead, "job.failed"),
        (clean, "job.completed"),
        (cancelled, "job.cancelled"),
        (paused, "job.paused"),
        (paused, "job.running"),
    ]
    webhooks = conn.execute("SELECT job_id, event FROM batchdb.notification_deliveries ORDER BY id").fetchall()
    assert [(w["job_id"], w["event"]) for w in webhooks] == [(e["job_id"], e["event"]) for e in heard[:4]]
    assert heard[0]["n_dead"] == 1 and heard[0]["status"] == "completed"


def test_watch_hears_a_job_start_and_stop_waiting_for_its_provider(dsn: str, conn: psycopg.Connection) -> None:
    """A lane's circuit opening makes its running jobs wait (status stays 'running'): the channel
    says so once, stays quiet while the probes fail, and says when the provider is back."""
    job_id = _job_with_webhook(conn, "waits", 1)
    assert conn.execute("SELECT status FROM batchdb.jobs WHERE id = %s", (job_id,)).fetchone()["status"] == "running"
    lane = ("instant", "default", "m")
    with psycopg.connect(dsn, autocommit=True) as listener:
        events.listen(listener)
        conn.execute("SELECT * FROM batchdb.circuit_open(%s, %s, %s, 'APIConnectionError at http://x/v1', 1)", lane)
        conn.execute("SELECT batchdb.circuit_probe_failed(%s, %s, %s, '503 at http://x/v1', 1, 60)", lane)
        reason = conn.execute("SELECT status_reason FROM batchdb.jobs WHERE id = %s", (job_id,)).fetchone()
        assert "503 at http://x/v1" in reason["status_reason"]  # the reason changed, still waiting
        conn.execute("SELECT batchdb.circuit_close(%s, %s, %s)", lane)
        heard = [json.loads(n.payload) for n in listener.notifies(timeout=2.0, stop_after=3)]
    assert [(e["job_id"], e["event"], e["status"]) for e in heard] == [
        (job_id, "job.provider_unavailable", "running"),
        (job_id, "job.running", "running"),
    ], heard
    assert heard[0]["reason"].startswith("waiting: provider unavailable since ")
    assert "APIConnectionError" in heard[0]["reason"]
    assert heard[1]["reason"] is None
    # The probe's new last error changed the reason without a second event or webhook.
    webhooks = conn.execute("SELECT event FROM batchdb.notification_deliveries WHERE job_id = %s", (job_id,)).fetchall()
    assert [w["event"] for w in webhooks] == ["job.provider_unavailable"]
