"""Network benchmark: rows/s of three worker hosts at 0, 2 and 20 ms round trip to the database, with and without loss.

    .venv/bin/python -m bench.network [--rows 20000] [--repeat 1] [--provider instant|simulator]

As root (network namespaces). bench/network_hosts.py builds three worker hosts (network namespaces)
behind emulated cables to a "db host" (the root namespace) running a PostgreSQL server of its own
(batchdb's embedded binaries, durable settings, pg_stat_statements) and, with `--provider simulator`,
the provider simulator (no latency, no limits). For each link setting (delay each way, loss per packet
each way) a fresh database gets the same `--rows` job, then one worker process per host runs
`python -m batchdb.workers --concurrency 256 --exit-when-idle --poll-interval 0.5` (as bench/queue.py)
until it is done. rows/s = rows / (jobs.finished_at - jobs.started_at). The default provider is
`instant` (answers in the worker, no network): only the database is across the network, so the figure
is what the round trips cost. Checked as bench/queue.py does (every row succeeded once, results,
costs, the workers' counts) except attempts, which a lossy link may raise by a lease run-out.

Also measured per setting: the SELECT 1 round trip from a worker host (what the cable really adds,
emulator included), and statements per row by kind (pg_stat_statements, reset before the workers
start): each is one round trip on its connection, so this is the count that latency multiplies.

Target (issue 13): at 2 ms RTT, >= 80% of the 0 ms figure: claim batching should hide latency.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg.rows import dict_row

import batchdb
from batchdb import migrations
from bench._common import (
    MODEL,
    PROMPT,
    REPO,
    background_load,
    environment_line,
    fmt_int,
    headlines_table,
    print_table,
    progress,
)
from bench.network_hosts import NetworkHosts, unavailable
from bench.queue import price_instant_provider

TARGET = 0.80
WORKER_TIMEOUT = 900.0
# (delay each way in seconds, loss per packet each way)
SETTINGS = [(0.0, 0.0), (0.001, 0.0), (0.001, 0.005), (0.010, 0.0), (0.010, 0.005)]
PING = (
    "import psycopg, statistics, sys, time\n"
    "c = psycopg.connect(sys.argv[1], autocommit=True)\n"
    "c.execute('SELECT 1')\n"
    "times = []\n"
    "for _ in range(200):\n"
    "    t = time.perf_counter(); c.execute('SELECT 1'); times.append(time.perf_counter() - t)\n"
    "print(statistics.median(times) * 1000)\n"
)


@dataclass
class Run:
    delay_s: float
    loss: float
    rows: int
    seconds: float
    wall: float
    ping_ms: float
    ok: bool
    detail: str
    machine_busy: float
    statements: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def label(self) -> str:
        loss = f", {self.loss * 100:g}% loss" if self.loss else ", no loss"
        return f"{self.delay_s * 2000:g} ms RTT{loss}"


def ping_ms(net: NetworkHosts, dsn: str) -> float:
    """Median SELECT 1 round trip from worker host 0 (its cable, the emulator and the server)."""
    out = subprocess.run(
        net.hosts[0].command([sys.executable, "-c", PING, dsn]), capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise SystemExit(f"ping from {net.hosts[0].namespace} failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip())


def statement_kind(text: str) -> str:
    """A short name for a worker statement: the first words that tell it apart."""
    words = " ".join(text.split())
    for marker in ("batchdb.", "FROM ", "INTO ", "UPDATE "):
        if marker in words:
            start = words.index(marker)
            return words[:12] + " ... " + words[start : start + 48]
    return words[:64]


def run_one(net: NetworkHosts, rows: int, delay_s: float, loss: float, provider: str, sim_url: str | None) -> Run:
    name = f"h_net_bench_{uuid.uuid4().hex[:8]}"
    dsn = net.create_database(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.upgrade(conn)
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        price_instant_provider(dsn)
        job = batchdb.submit(
            headlines_table(rows), prompt=PROMPT, model=MODEL, provider=provider, max_tokens=16, dsn=dsn
        )
        net.set_all(delay_s=delay_s, loss=loss)
        ping = ping_ms(net, dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        progress(f"{delay_s * 2000:g} ms RTT, loss {loss:g}: SELECT 1 takes {ping:.2f} ms; {rows:,} rows, 3 workers")
        env = {**os.environ, "BATCHDB_DSN": dsn, "PYTHONPATH": str(REPO)}
        if sim_url:
            env |= {"OPENAI_BASE_URL": sim_url, "OPENAI_API_KEY": "sk-bench"}
        argv = [sys.executable, "-m", "batchdb.workers", "--concurrency", "256", "--exit-when-idle"]
        argv += ["--poll-interval", "0.5"]
        started = time.perf_counter()
        cpu_before = psutil.cpu_times()
        with tempfile.TemporaryDirectory() as tmp:
            procs, logs = [], []
            for host in net.hosts:
                log = Path(tmp) / f"{host.namespace}.log"
                with log.open("w") as handle:
                    procs.append(subprocess.Popen(host.command(argv), env=env, stdout=handle, stderr=subprocess.STDOUT))
                logs.append(log)
            try:
                deadline = time.monotonic() + WORKER_TIMEOUT
                for p in procs:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                        p.wait(timeout=60)
            wall = time.perf_counter() - started
            for p, log in zip(procs, logs, strict=True):
                if p.returncode != 0:
                    raise SystemExit(f"worker exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        busy = _busy_pct(cpu_before, psutil.cpu_times())
        net.set_all(delay_s=0.0, loss=0.0)
        ok, detail, seconds = verify(dsn, job.id, rows)
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            statements = {
                statement_kind(r["query"]): int(r["calls"])
                for r in conn.execute(
                    "SELECT query, calls FROM pg_stat_statements "
                    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND query NOT ILIKE '%%pg_stat_statements%%' ORDER BY calls DESC"
                )
            }
        run = Run(delay_s, loss, rows, seconds, wall, ping, ok, detail, busy, statements)
        per_row = sum(statements.values()) / rows
        progress(
            f"  {run.rate:,.0f} rows/s ({seconds:.1f} s, machine {busy:.0f}% busy), "
            f"{per_row:.3f} statements/row; {detail}"
        )
        return run
    finally:
        with psycopg.connect(net.admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _busy_pct(before: Any, after: Any) -> float:
    """How busy the machine's CPUs were between two psutil.cpu_times() (every process, not only ours)."""
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    total = sum(after) - sum(before)
    return 100.0 * (1 - idle / total) if total > 0 else 0.0


def verify(dsn: str, job_id: int, rows: int) -> tuple[bool, str, float]:
    """Every row succeeded and was written once; (ok, detail, seconds from first claim to completion)."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        job = conn.execute(
            "SELECT status, n_total, n_succeeded, n_failed, n_dead, wasted_calls, cost_usd, "
            "extract(epoch FROM finished_at - started_at)::float8 AS seconds FROM batchdb.jobs WHERE id = %s",
            [job_id],
        ).fetchone()
        reclaimed = conn.execute(
            "SELECT count(*) AS n FROM batchdb.requests WHERE job_id = %s AND attempts > 1", [job_id]
        ).fetchone()["n"]
        results = conn.execute(
            "SELECT count(*) AS n, count(*) FILTER (WHERE writes > 1) AS overwritten FROM batchdb.results "
            "WHERE job_id = %s",
            [job_id],
        ).fetchone()
        by_workers = conn.execute("SELECT coalesce(sum(n_completed), 0) AS n FROM batchdb.workers").fetchone()["n"]
    ok = (
        job["status"] == "completed"
        and job["n_total"] == job["n_succeeded"] == results["n"] == by_workers == rows
        and job["n_failed"] == job["n_dead"] == results["overwritten"] == 0
        and job["cost_usd"] > 0
    )
    detail = (
        f"succeeded {fmt_int(job['n_succeeded'])}, results {fmt_int(results['n'])} (rewritten "
        f"{results['overwritten']}), workers' count {fmt_int(by_workers)}, reclaimed {reclaimed}, "
        f"wasted calls {job['wasted_calls']}"
    )
    return ok, detail, job["seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows per run (the same job each time)")
    parser.add_argument("--repeat", type=int, default=1, help="measure every setting this many times")
    parser.add_argument("--provider", choices=["instant", "simulator"], default="instant")
    args = parser.parse_args(argv)
    if reason := unavailable():
        raise SystemExit(reason)

    runs: list[Run] = []
    with NetworkHosts(3, postgres_settings={"shared_preload_libraries": "pg_stat_statements"}) as net:
        env = environment_line(net.admin_dsn)
        before = background_load(net.admin_dsn)
        sim = None
        if args.provider == "simulator":
            from batchdb.simulator import SimulatorConfig, start_simulator
            from batchdb.simulator.config import Distribution

            sim = start_simulator(
                SimulatorConfig(output_tokens=Distribution(kind="fixed", value=8)), host=net.db_address
            )
        try:
            for _ in range(args.repeat):
                for delay_s, loss in SETTINGS:
                    provider = "openai" if sim else "instant"
                    runs.append(run_one(net, args.rows, delay_s, loss, provider, sim.openai_base_url if sim else None))
        finally:
            if sim is not None:
                sim.stop()
        after = background_load(net.admin_dsn)

    table = []
    for delay_s, loss in SETTINGS:
        same = [r for r in runs if (r.delay_s, r.loss) == (delay_s, loss)]
        rate = statistics.median(r.rate for r in same)
        # Each run against the 0 ms run of its own round (the runs next to it in time): the load of a
        # shared machine drifts less within a round than across the whole benchmark.
        index = SETTINGS.index((delay_s, loss))
        paired = [runs[k + index].rate / runs[k].rate for k in range(0, len(runs), len(SETTINGS))]
        share = statistics.median(paired)
        verdict = f" {'PASS' if share >= TARGET else 'MISS'} >= {TARGET:.0%}" if delay_s == 0.001 else ""
        per_row = statistics.median(sum(r.statements.values()) / r.rows for r in same)
        table.append(
            [
                same[0].label,
                f"{statistics.median(r.ping_ms for r in same):.2f} ms",
                f"{fmt_int(rate)} rows/s",
                f"{share:.0%}{verdict} ({', '.join(f'{p:.0%}' for p in paired)})",
                ", ".join(f"{fmt_int(r.rate)} ({r.machine_busy:.0f}%)" for r in same),
                f"{per_row:.3f}",
                "OK" if all(r.ok for r in same) else "NOT OK: " + "; ".join(r.detail for r in same if not r.ok),
            ]
        )
    top = runs[-1].statements
    notes = [
        f"Environment: {env} | provider {args.provider} | 3 worker hosts x 1 worker x 256 in flight | "
        f"{args.repeat} run(s) per setting, interleaved",
        "Checks per run: job completed, every row succeeded, one result each written once, the workers' "
        "counts add up. " + "; ".join(f"{r.label}: {r.detail}" for r in runs[-len(SETTINGS) :]),
        f"Background before the run: {before}",
        f"Background after the run: {after}",
        "Statements in the last run, by kind (calls): " + "; ".join(f"`{k}` {v:,}" for k, v in list(top.items())[:12]),
    ]
    print_table(
        f"Across a network: {fmt_int(args.rows)} rows, 3 worker hosts ({args.provider} provider)",
        ["link (each worker host <-> db host)", "SELECT 1 (median)", "rows/s (median)",
         "of the same round's 0 ms (median; each)", "each run: rows/s (machine CPU busy)", "statements/row",
         "checks"],
        table,
        notes,
    )  # fmt: skip
    if not all(r.ok for r in runs):
        raise SystemExit("some runs did not complete every row exactly once")


if __name__ == "__main__":
    main()
