"""One worker's server connections, and what sharing them costs the hot statements.

Runs one worker in this process (provider `instant`: answers at once, no network) over a
`--rows` job with a rate-limited lane (every call reserves and settles ledger capacity; with
`--budget` it also reserves and settles budget), at each `--concurrency`. Every statement a
worker runs goes through `Reconnecting.run(operation, what=...)`; the benchmark wraps that one
method and times each call by its `what`: the time a caller waits, queueing for a connection
included. Meanwhile a thread samples pg_stat_activity every 50 ms and keeps the most
`batchdb-*` backends seen at once (the worker is the database's only client).

rows/s = rows / (jobs.finished_at - jobs.started_at), first claim to last recorded row.

Comparing two versions: run it against each checkout with PYTHONPATH, e.g.
    git worktree add --detach /tmp/batchdb-base 20af56c
    PYTHONPATH=/tmp/batchdb-base .venv/bin/python bench/connections.py   # the code before the pool
    .venv/bin/python bench/connections.py                                 # this checkout
(the script prints which `batchdb` it imported).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: bench/ itself must not shadow the standard library
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import psycopg
import pyarrow as pa

import batchdb
from batchdb import ledger, migrations
from batchdb.workers import connection
from batchdb.workers.notifier import NotifierConfig
from batchdb.workers.worker import Worker, WorkerConfig

MODEL = "gpt-4o-mini"
# The statements on the hot path, in the table's order.
HOT = ("claim_batch", "complete_batch", "reserve_capacity", "settle_capacity", "reserve_budget", "settle_budget")


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered)) - 1))]


class Timings:
    """Seconds each `Reconnecting.run` call took, by its `what`."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def install(self) -> Callable[[], None]:
        original = connection.Reconnecting.run
        timings = self

        async def timed(self: Any, operation: Callable[[Any], Awaitable[Any]], *, what: str) -> Any:
            started = time.perf_counter()
            try:
                return await original(self, operation, what=what)
            finally:
                timings.seconds[what].append(time.perf_counter() - started)

        connection.Reconnecting.run = timed  # type: ignore[method-assign]

        def uninstall() -> None:
            connection.Reconnecting.run = original  # type: ignore[method-assign]

        return uninstall


def _sample_connections(dsn: str, stop: threading.Event, peak: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True, application_name="bench-sampler") as conn:
        while not stop.is_set():
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'batchdb-%%'"
            ).fetchone()
            peak[0] = max(peak[0], row[0] if row else 0)
            stop.wait(0.05)


def _prepare(dsn: str, rows: int, budget: bool) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.upgrade(conn)
        conn.execute(
            "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) "
            "SELECT 'instant', model, input_per_mtok, output_per_mtok FROM batchdb.prices "
            "WHERE provider = 'openai' AND model = %s",
            [MODEL],
        )
        # Limits far above what one worker reaches: every call reserves and settles, none waits.
        ledger.set_limits(conn, ledger.Lane("instant", "default", MODEL), rpm=10_000_000, tpm=2_000_000_000)
    table = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "headline": pa.array([f"headline number {i} about markets and shares" for i in range(rows)]),
        }
    )
    job = batchdb.submit(
        table,
        prompt="Classify the sentiment of: {headline}",
        model=MODEL,
        provider="instant",
        budget_usd=1_000_000 if budget else None,
        dsn=dsn,
    )
    return job.id


def run_one(admin_dsn: str, prefix: str, rows: int, concurrency: int, budget: bool) -> dict[str, Any]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    try:
        job_id = _prepare(dsn, rows, budget)
        timings = Timings()
        uninstall = timings.install()
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=_sample_connections, args=(dsn, stop, peak), daemon=True)
        sampler.start()
        config = WorkerConfig(
            dsn=dsn,
            concurrency=concurrency,
            exit_when_idle=True,
            poll_interval=0.5,
            notifier=NotifierConfig(smtp=None),
        )
        try:
            asyncio.run(Worker(config).run())
        finally:
            stop.set()
            sampler.join()
            uninstall()
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT status, n_succeeded, extract(epoch FROM finished_at - started_at)::float8 "
                "FROM batchdb.jobs WHERE id = %s",
                [job_id],
            ).fetchone()
        assert row is not None
        status, succeeded, seconds = row
        if status != "completed" or succeeded != rows:
            raise SystemExit(f"job {job_id} ended {status} with {succeeded}/{rows} succeeded")
        return {"concurrency": concurrency, "rows_s": rows / seconds, "peak": peak[0], "timings": timings.seconds}
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres", help="an admin DSN")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument(
        "--budget", action="store_true", help="give the job a budget: every call also reserves and settles budget"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per concurrency (all are shown)")
    parser.add_argument("--db-prefix", default="bench_connections", help="scratch databases are named PREFIX_<random>")
    args = parser.parse_args(argv)
    print(f"batchdb from {Path(batchdb.__file__).resolve().parent.parent}", file=sys.stderr)
    header = "| concurrency | rows/s | server connections (peak) | " + " | ".join(
        f"{what} p50 / p99 ms (n)" for what in HOT
    )
    print(header + " |")
    print("|" + "---|" * (3 + len(HOT)))
    for concurrency in args.concurrency:
        for _ in range(args.repeat):
            result = run_one(args.dsn, args.db_prefix, args.rows, concurrency, args.budget)
            cells = [str(concurrency), f"{result['rows_s']:,.0f}", str(result["peak"])]
            for what in HOT:
                seconds = result["timings"].get(what, [])
                cells.append(
                    f"{_percentile(seconds, 50) * 1000:.1f} / {_percentile(seconds, 99) * 1000:.1f} ({len(seconds)})"
                )
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
