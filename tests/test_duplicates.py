"""Identical requests of a job are sent once (sql/migrations/0019_send_each_distinct_request_once.sql).

The first row of each distinct request is sent; the rows repeating it wait and take its outcome in the
transaction that records it: its answer (a copy of its result, no tokens, no cost), or its failure.
"""

from __future__ import annotations

from decimal import Decimal

import pandas as pd
import psycopg
import pytest
from counting_provider import CountingProvider

import batchdb
from batchdb.providers.base import ErrorKind
from batchdb.workers.outcomes import RetryPolicy

HEADLINES = ["Acme up", "Globex down", "Acme up", "Initech flat", "Globex down", "Acme up"]


def rows_of(conn: psycopg.Connection, job_id: int) -> list[dict]:
    return conn.execute(
        "SELECT custom_id, status, duplicate_of, prompt_tokens, cost_usd, error, attempts FROM batchdb.requests "
        "WHERE job_id = %s ORDER BY id",
        (job_id,),
    ).fetchall()


def test_identical_rows_are_sent_once_and_every_row_gets_the_answer(dsn: str, conn: psycopg.Connection, drain) -> None:
    conn.execute(
        "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok)"
        " VALUES ('instant', 'priced', 1, 2)"
    )
    frame = pd.DataFrame({"id": [f"h{i}" for i in range(len(HEADLINES))], "headline": HEADLINES})
    job = batchdb.submit(frame, prompt="Label: {headline}", id_column="id", model="priced", provider="instant", dsn=dsn)
    provider = CountingProvider()
    drain(provider)

    assert provider.calls == {"Label: Acme up": 1, "Label: Globex down": 1, "Label: Initech flat": 1}
    done = job.status()
    assert (done.status, done.n_succeeded, done.n_duplicates) == ("completed", 6, 3)
    results = job.results().set_index("custom_id")
    assert list(results["response"]) == [f"answer to Label: {h}" for h in HEADLINES]
    assert list(results["duplicate_of"].fillna("")) == ["", "", "h0", "", "h1", "h0"]
    assert list(results["prompt_tokens"]) == [9, 9, 0, 9, 0, 0]  # a duplicate made no call
    one_call = Decimal(9 * 1 + 4 * 2) / 1_000_000
    assert done.cost_usd == 3 * one_call and done.prompt_tokens == 27  # three calls paid, not six
    assert list(results["attempts"]) == [1, 1, 0, 1, 0, 0]


def test_columns_the_template_does_not_use_do_not_make_rows_different(
    dsn: str, conn: psycopg.Connection, drain
) -> None:
    frame = pd.DataFrame({"id": ["a", "b", "c"], "note": ["x", "y", "z"], "headline": ["same", "same", "other"]})
    job = batchdb.submit(frame, prompt="{headline}", id_column="id", model="m", provider="instant", dsn=dsn)
    provider = CountingProvider()
    drain(provider)
    assert provider.calls == {"same": 1, "other": 1}
    assert job.results()["note"].tolist() == ["x", "y", "z"]  # every row keeps its own columns


def test_dedupe_false_sends_every_row(dsn: str, drain) -> None:
    frame = pd.DataFrame({"headline": HEADLINES})
    job = batchdb.submit(frame, prompt="{headline}", model="m", provider="instant", dedupe=False, dsn=dsn)
    provider = CountingProvider()
    drain(provider)
    assert sum(provider.calls.values()) == 6
    assert job.status().n_duplicates == 0 and job.results()["duplicate_of"].isna().all()


@pytest.mark.parametrize(("kind", "status"), [(ErrorKind.PERMANENT, "failed"), (ErrorKind.TRANSIENT, "dead")])
def test_a_first_row_that_fails_passes_its_failure_to_its_duplicates(
    dsn: str, conn: psycopg.Connection, drain, kind: ErrorKind, status: str
) -> None:
    frame = pd.DataFrame({"headline": ["bad", "good", "bad", "bad"]})
    job = batchdb.submit(frame, prompt="{headline}", model="m", provider="instant", max_attempts=2, dsn=dsn)
    provider = CountingProvider(refuse={"bad": kind})
    drain(provider, retry=RetryPolicy(0.01, 0.02))
    assert provider.calls["bad"] == (1 if status == "failed" else 2)  # its own attempts; none for its duplicates
    rows = rows_of(conn, job.id)
    assert [r["status"] for r in rows] == [status, "succeeded", status, status]
    assert rows[2]["error"] == rows[3]["error"] == rows[0]["error"] and "refused: bad" in rows[0]["error"]
    done = job.status()
    assert done.status == "completed" and (done.n_failed + done.n_dead, done.n_succeeded) == (3, 1)

    # Retried, the duplicates wait for their first row again: still one call per attempt.
    assert job.retry(failed=True, dead=True) == 3
    provider.refuse.clear()
    drain(provider)
    assert provider.calls["bad"] == (2 if status == "failed" else 3)
    assert [r["status"] for r in rows_of(conn, job.id)] == ["succeeded"] * 4


def test_rows_inserted_with_sql_are_deduplicated_by_their_request_key(
    dsn: str, conn: psycopg.Connection, drain
) -> None:
    """The SQL contract: rows of a job with equal request_key values are one request (docs/sql.md)."""
    job_id = conn.execute(
        "INSERT INTO batchdb.jobs (model, provider, params) VALUES ('m', 'instant', '{\"prompt\": \"{q}\"}') "
        "RETURNING id"
    ).fetchone()["id"]
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, input, request_key) VALUES "
        "(%(j)s, 'a', '{\"q\": \"one\"}', 'k1'), (%(j)s, 'b', '{\"q\": \"one\"}', 'k1'), "
        "(%(j)s, 'c', '{\"q\": \"two\"}', NULL), (%(j)s, 'd', '{\"q\": \"two\"}', NULL)",
        {"j": job_id},
    )
    with pytest.raises(psycopg.errors.CheckViolation, match="duplicate_of is set by batchdb"):
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, input, duplicate_of)"
            " VALUES (%s, 'e', '{\"q\": \"x\"}', 1)",
            (job_id,),
        )
    provider = CountingProvider()
    drain(provider)
    assert provider.calls == {"one": 1, "two": 2}  # NULL keys are never merged
    assert [r["status"] for r in rows_of(conn, job_id)] == ["succeeded"] * 4


def test_a_later_statement_s_rows_follow_the_first_row_of_their_key(dsn: str, conn: psycopg.Connection, drain) -> None:
    """Rows come in chunks (a submit's COPYs, a user's INSERTs): a new row's leader is the job's first row
    with its key, whichever statement inserted it; keys the new rows lack are left alone."""
    job_id = conn.execute(
        "INSERT INTO batchdb.jobs (model, provider, params) VALUES ('m', 'instant', '{\"prompt\": \"{q}\"}') "
        "RETURNING id"
    ).fetchone()["id"]
    insert = "INSERT INTO batchdb.requests (job_id, custom_id, input, request_key) VALUES (%s, %s, %s, %s)"
    with conn.cursor() as cur:
        cur.executemany(insert, [(job_id, "a", '{"q": "one"}', b"k1"), (job_id, "b", '{"q": "two"}', b"k2")])
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, input, request_key) VALUES "
        "(%(j)s, 'c', '{\"q\": \"one\"}', 'k1'), (%(j)s, 'd', '{\"q\": \"one\"}', 'k1'), "
        "(%(j)s, 'e', '{\"q\": \"three\"}', 'k3'), (%(j)s, 'f', '{\"q\": \"three\"}', 'k3')",
        {"j": job_id},
    )
    leaders = {
        r["custom_id"]: r["leader"]
        for r in conn.execute(
            "SELECT q.custom_id, l.custom_id AS leader FROM batchdb.requests q "
            "LEFT JOIN batchdb.requests l ON l.job_id = q.job_id AND l.id = q.duplicate_of WHERE q.job_id = %s",
            (job_id,),
        ).fetchall()
    }
    assert leaders == {"a": None, "b": None, "c": "a", "d": "a", "e": None, "f": "e"}
    provider = CountingProvider()
    drain(provider)
    assert provider.calls == {"one": 1, "two": 1, "three": 1}
    assert [r["status"] for r in rows_of(conn, job_id)] == ["succeeded"] * 6
