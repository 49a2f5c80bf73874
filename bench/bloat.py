"""Does a million-row job leave a table that never shrinks?

Submits N rows (default 1,000,000) with the instant provider, drains them with
two worker processes, and reports the job's partition sizes and dead tuples
after the load, after the drain, and after the job is deleted (which drops its
partitions). Also reports what the rest of the queue (the parent tables and
their other partitions) holds throughout: it should stay empty.

    .venv/bin/python -m bench.bloat [--rows 1000000] [--dsn ADMIN_DSN]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psycopg
from psycopg import sql

import batchdb
from bench._common import (
    DEFAULT_ADMIN_DSN,
    MODEL,
    PROMPT,
    REPO,
    environment_line,
    fmt_int,
    headlines_table,
    print_table,
    progress,
    scratch_database,
)

SIZES = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname IN (%(req)s, %(res)s)), 0) AS job_bytes,
       coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname NOT IN (%(req)s, %(res)s)
                                                            AND c.relkind = 'r'), 0) AS other_bytes,
       coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'batchdb' AND relname = %(req)s), 0)
           AS dead_tuples,
       (SELECT count(*) FROM pg_class p JOIN pg_namespace n ON n.oid = p.relnamespace
         WHERE n.nspname = 'batchdb' AND p.relname IN (%(req)s, %(res)s)) AS partitions
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'batchdb' AND c.relkind IN ('r', 'p')
"""


def sizes(dsn: str, job_id: int) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        time.sleep(1.0)  # let the workers' statistics reach the collector
        row = conn.execute(SIZES, {"req": f"requests_{job_id}", "res": f"results_{job_id}"}).fetchone()
    return {"job_bytes": row[0], "other_bytes": row[1], "dead_tuples": row[2], "partitions": row[3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_ADMIN_DSN)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with scratch_database(args.dsn, "bloat") as dsn:
        env_line = environment_line(dsn)
        progress(f"submitting {args.rows:,} rows")
        job = batchdb.submit(headlines_table(args.rows), prompt=PROMPT, model=MODEL, provider="instant", dsn=dsn)
        loaded = sizes(dsn, job.id)
        progress(f"draining with {args.workers} workers")
        started = time.monotonic()
        env = {**os.environ, "BATCHDB_DSN": dsn, "PYTHONPATH": str(REPO)}
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "batchdb.workers",
                    "--concurrency",
                    "256",
                    "--exit-when-idle",
                    "--poll-interval",
                    "0.5",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(args.workers)
        ]
        for w in workers:
            w.wait()
        drained_in = time.monotonic() - started
        status = job.status()
        assert status.n_succeeded == args.rows, status.summary()
        drained = sizes(dsn, job.id)
        with psycopg.connect(dsn, autocommit=True) as conn:
            vacuum_started = time.monotonic()
            conn.execute(sql.SQL("VACUUM batchdb.{}").format(sql.Identifier(f"requests_{job.id}")))
            vacuum_s = time.monotonic() - vacuum_started
        vacuumed = sizes(dsn, job.id)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM batchdb.jobs WHERE id = %s", (job.id,))
        deleted = sizes(dsn, job.id)

    mib = 1024 * 1024
    rows = [
        [
            "after COPY of the rows",
            f"{loaded['job_bytes'] / mib:,.0f}",
            fmt_int(loaded["dead_tuples"]),
            f"{loaded['other_bytes'] / mib:,.1f}",
            loaded["partitions"],
        ],
        [
            f"after the drain ({drained_in:.0f} s, {args.workers} workers)",
            f"{drained['job_bytes'] / mib:,.0f}",
            fmt_int(drained["dead_tuples"]),
            f"{drained['other_bytes'] / mib:,.1f}",
            drained["partitions"],
        ],
        [
            f"after one VACUUM of the partition ({vacuum_s:.1f} s)",
            f"{vacuumed['job_bytes'] / mib:,.0f}",
            fmt_int(vacuumed["dead_tuples"]),
            f"{vacuumed['other_bytes'] / mib:,.1f}",
            vacuumed["partitions"],
        ],
        [
            "after DELETE FROM batchdb.jobs (drops the partitions)",
            f"{deleted['job_bytes'] / mib:,.0f}",
            fmt_int(deleted["dead_tuples"]),
            f"{deleted['other_bytes'] / mib:,.1f}",
            deleted["partitions"],
        ],
    ]
    print_table(
        f"Bloat: one {args.rows:,}-row job (requests + results partitions)",
        ["moment", "job MiB", "dead tuples", "rest of schema MiB", "partitions"],
        rows,
        [
            env_line,
            "Space goes back to the operating system when the job is deleted: no VACUUM FULL, no table "
            "that never shrinks; the rest of the queue stays small throughout.",
        ],
    )


if __name__ == "__main__":
    main()
