"""docs/sql.md is the SQL contract: its examples run verbatim, in order, and refusals say what the doc says."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

DOC = Path(__file__).parent.parent / "docs" / "sql.md"
BLOCK = re.compile(r"```sql\n(.*?)```", re.DOTALL)
REJECTED = re.compile(r"^-- rejected: (.+)$", re.MULTILINE)


def sql_blocks() -> list[str]:
    return BLOCK.findall(DOC.read_text())


def test_doc_has_examples_and_rejections() -> None:
    blocks = sql_blocks()
    assert len(blocks) >= 10
    assert sum(1 for b in blocks if REJECTED.search(b)) >= 5


def test_sql_examples_run_verbatim_in_order(conn: psycopg.Connection) -> None:
    for number, block in enumerate(sql_blocks(), start=1):
        expected = REJECTED.search(block)
        if expected is None:
            conn.execute(block)
            continue
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(block)
        assert expected.group(1).strip() in str(refused.value), f"block {number}: {refused.value}"

    # The documented inserts really queued work with the documented defaults.
    jobs = {
        r["name"]: r for r in conn.execute("SELECT name, owner, provider, status, n_total FROM batchdb.jobs").fetchall()
    }
    assert jobs["headline-sentiment"]["n_total"] == 3
    assert jobs["headline-sentiment"]["provider"] == "openai"
    assert jobs["headline-sentiment"]["status"] == "running"
    assert jobs["headline-sentiment"]["owner"] == conn.execute("SELECT current_user AS u").fetchone()["u"]
    assert "ticker-summary" not in jobs  # deleted by the last example
    rows = conn.execute(
        "SELECT custom_id, status, attempts, run_after <= now() AS due FROM batchdb.requests ORDER BY custom_id"
    ).fetchall()
    assert [(r["custom_id"], r["status"], r["attempts"], r["due"]) for r in rows] == [
        ("h-001", "queued", 0, True),
        ("h-002", "queued", 0, True),
        ("h-003", "queued", 0, True),
    ]
    tables = {
        r["tablename"] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'batchdb'").fetchall()
    }
    # Deleting the ticker-summary job (id 2) dropped its partitions with it.
    assert {"requests_1", "results_1"} <= tables and not {"requests_2", "results_2"} & tables, tables


def test_insert_wakes_workers_once_per_statement(dsn: str, conn: psycopg.Connection) -> None:
    job_id = conn.execute("INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mini') RETURNING id").fetchone()["id"]
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN batchdb_requests")
        conn.execute(
            "INSERT INTO batchdb.requests (job_id, custom_id, payload) "
            'SELECT %s, g::text, \'{"prompt": "x"}\' FROM generate_series(1, 5000) g',
            (job_id,),
        )
        received = list(listener.notifies(timeout=1.0))
    assert [n.payload for n in received] == [str(job_id)]
