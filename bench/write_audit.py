"""Count completions from the writes themselves (test-only; bench/write_audit.sql).

`results` has one row per request and completion writes it with ON CONFLICT, so counting
result rows can never show a row completed twice. The fault drills and the exactly-once
tests install this audit before their workers start and then ask `double_writes`: rows
whose request was written into a final state more than once, or whose result was written
more than once. On a correct queue both are empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.rows import tuple_row

SQL = Path(__file__).with_name("write_audit.sql")


def install(dsn: str) -> None:
    """Start logging writes on the database at `dsn` (idempotent)."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(SQL.read_text())


@dataclass(frozen=True)
class AuditedWrites:
    """What the audit saw for one job."""

    final_writes: int  # updates that left a request in a final state
    result_writes: int  # inserts or updates of a result
    rows_finalised_twice: int
    rows_with_two_result_writes: int
    succeeded_without_one_final_write: int  # succeeded rows not written succeeded exactly once

    @property
    def violations(self) -> list[str]:
        found = []
        if self.rows_finalised_twice:
            found.append(f"{self.rows_finalised_twice} row(s) written into a final state more than once")
        if self.rows_with_two_result_writes:
            found.append(f"{self.rows_with_two_result_writes} row(s) with their result written more than once")
        if self.succeeded_without_one_final_write:
            found.append(
                f"{self.succeeded_without_one_final_write} succeeded row(s) without exactly one audited "
                "final write (was the audit installed before the workers started?)"
            )
        return found


def writes(conn: psycopg.Connection, job_id: int) -> AuditedWrites:
    row = (
        conn.cursor(row_factory=tuple_row)
        .execute(
            """
        WITH per_row AS (
            SELECT request_id,
                   count(*) FILTER (WHERE kind = 'final') AS finals,
                   count(*) FILTER (WHERE kind = 'final' AND status = 'succeeded') AS successes,
                   count(*) FILTER (WHERE kind = 'result') AS results
              FROM batchdb_audit.writes
             WHERE job_id = %(job)s
             GROUP BY request_id
        )
        SELECT coalesce(sum(finals), 0), coalesce(sum(results), 0),
               count(*) FILTER (WHERE finals > 1), count(*) FILTER (WHERE results > 1),
               (SELECT count(*) FROM batchdb.requests q LEFT JOIN per_row p ON p.request_id = q.id
                 WHERE q.job_id = %(job)s AND q.status = 'succeeded' AND coalesce(p.successes, 0) <> 1)
          FROM per_row
        """,
            {"job": job_id},
        )
        .fetchone()
    )
    assert row is not None
    return AuditedWrites(*(int(v) for v in row))
