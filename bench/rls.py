"""What row-level security costs a user: the same job submitted, read and watched as the
owner role (no RLS) and as a `batchdb users add` role (RLS, staged COPY).

    .venv/bin/python -m bench.rls [--rows 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import pandas as pd
import psycopg
from psycopg.conninfo import make_conninfo


def best_of(repeat: int, action) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    import batchdb
    from batchdb import users
    from batchdb.providers.instant import InstantProvider
    from batchdb.workers.worker import Worker, WorkerConfig
    from bench._common import DEFAULT_ADMIN_DSN, environment_line, fmt_int, print_table, progress, scratch_database

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_ADMIN_DSN, help="admin DSN (a scratch database and role)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    frame = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(args.rows)],
            "text": [f"text number {i} about the quarter" for i in range(args.rows)],
        }
    )
    role = f"bench_rls_{uuid.uuid4().hex[:6]}"
    rows = []
    with scratch_database(args.dsn, "rls") as dsn, psycopg.connect(dsn, autocommit=True) as admin:
        users.add_user(admin, role)
        try:
            for label, as_who in (("owner (no RLS)", dsn), ("user role (RLS)", make_conninfo(dsn, user=role))):
                progress(f"{label}: submit {args.rows:,} rows")
                started = time.perf_counter()
                job = batchdb.submit(
                    frame, prompt="{text}", model="instant", provider="instant", id_column="id", dsn=as_who
                )
                submit_s = time.perf_counter() - started
                asyncio.run(
                    Worker(
                        WorkerConfig(dsn=dsn, exit_when_idle=True, concurrency=256, poll_interval=0.2),
                        providers={"instant": InstantProvider()},
                    ).run()
                )
                mine = batchdb.Job(job.id, dsn=as_who)
                results_s = best_of(args.repeat, mine.results)
                status_s = best_of(5, mine.status)
                listing_s = best_of(5, lambda: batchdb.list_jobs(dsn=as_who))  # noqa: B023
                rows.append(
                    [
                        label,
                        f"{submit_s:.2f} s",
                        f"{results_s:.2f} s",
                        f"{status_s * 1000:.1f} ms",
                        f"{listing_s * 1000:.1f} ms",
                    ]
                )
        finally:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(role)))
    print_table(
        f"Row-level security overhead, one {fmt_int(args.rows)}-row job",
        [
            "connected as",
            "submit",
            f"results() (best of {args.repeat})",
            "status() (best of 5)",
            "list_jobs() (best of 5)",
        ],
        rows,
        [environment_line(args.dsn), "each figure includes opening a connection (the SDK opens one per call)"],
    )


if __name__ == "__main__":
    main()
