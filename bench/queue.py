"""Queue benchmark: batchdb's own overhead (claim -> call -> record) against pgqueuer 1.6's benchmark.

    .venv/bin/python -m bench.queue [--dsn ADMIN_DSN] [--rows 200000] [--workers 1,2,4]

Three parts, one after the other on the same PostgreSQL server, each in its own
scratch database (created, migrated, dropped):

1. Throughput. Submit `--rows` rows with `provider="instant"` (answers at once, no
   network), run 1, 2 and 4 worker processes (`python -m batchdb.workers --concurrency 256
   --exit-when-idle --poll-interval 0.5`), and take rows/s from the job's own
   started_at (first claim) to finished_at (last row recorded). Each row's result,
   token usage and cost are written as in production. Checked: every row succeeded
   exactly once (n_succeeded = results = rows, every row attempted once, no retries,
   the workers' own counts add up).
2. pgqueuer 1.6's own benchmark, `tools/benchmark.py` from its sdist, run as is
   with the psycopg driver (`-d psy`): the default throughput strategy for
   `--pgqueuer-seconds` and the drain strategy (50,000 jobs). Its jobs/s is the
   baseline; the target is batchdb >= 3x.
3. Claim latency at a `--backlog` (1,000,000) row backlog: `batchdb.queue.claim_batch`
   timed for batch sizes 50 and 500, each claim in a rolled-back transaction so
   the backlog stays as it was; then again after `--drain` (300,000) rows were
   claimed and completed (no manual VACUUM: as shipped, with whatever the
   partition's autovacuum did by then), and once more after a manual VACUUM.
   EXPLAIN (ANALYZE, BUFFERS) of the claim is printed for each state.
"""

from __future__ import annotations

if not __package__:  # run as a file: bench/ on sys.path would shadow the standard library's `queue`
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import asyncio
import importlib.metadata
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

import batchdb
from batchdb import queue
from batchdb.models import Outcome, RequestStatus
from batchdb.queries import query
from bench._common import (
    DEFAULT_ADMIN_DSN,
    MODEL,
    PROMPT,
    REPO,
    Stopwatch,
    background_load,
    environment_line,
    fmt_int,
    headlines_table,
    libpq_env,
    percentile,
    print_table,
    progress,
    scratch_database,
)

PGQUEUER_VERSION = "1.6.0"
PGQUEUER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "batchdb-bench"
TARGET_RATIO = 3.0
WORKER_TIMEOUT = 300.0


# -- 1. throughput -----------------------------------------------------------------------------


@dataclass
class Throughput:
    workers: int
    rows: int
    db_seconds: float
    wall_seconds: float
    worker_cpu_seconds: float
    machine_cpu_pct: float
    verified: bool
    detail: str

    @property
    def rate(self) -> float:
        return self.rows / self.db_seconds


def _busy(t: psutil._common.scputimes) -> float:
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def run_workers(dsn: str, n: int) -> tuple[float, float, float]:
    """Start n worker processes, wait for all to exit; (wall s, their CPU s, machine CPU busy %)."""
    env = {**os.environ, "BATCHDB_DSN": dsn, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "batchdb.workers",
        "--concurrency",
        "256",
        "--exit-when-idle",
        "--poll-interval",
        "0.5",
    ]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = psutil.cpu_times()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"worker-{i}.log" for i in range(n)]
        procs = []
        for log in logs:
            with log.open("w") as handle:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT))
        try:
            deadline = time.monotonic() + WORKER_TIMEOUT
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=60)
        wall = time.perf_counter() - started
        for p, log in zip(procs, logs, strict=True):
            if p.returncode != 0:
                raise SystemExit(f"worker exited with {p.returncode}:\n{log.read_text()[-2000:]}")
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_after = psutil.cpu_times()
    elapsed_cpu = (_busy(cpu_after) + cpu_after.idle + cpu_after.iowait) - (
        _busy(cpu_before) + cpu_before.idle + cpu_before.iowait
    )
    machine = 100.0 * (_busy(cpu_after) - _busy(cpu_before)) / max(elapsed_cpu, 1e-9)
    worker_cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    return wall, worker_cpu, machine


def verify_job(dsn: str, job_id: int, rows: int) -> tuple[bool, str, float]:
    """Every row succeeded exactly once; returns (ok, detail, seconds from first claim to completion)."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        job = conn.execute(
            "SELECT status, n_total, n_succeeded, n_failed, n_dead, n_retries, prompt_tokens, completion_tokens, "
            "cost_usd, extract(epoch FROM finished_at - started_at)::float8 AS seconds "
            "FROM batchdb.jobs WHERE id = %s",
            [job_id],
        ).fetchone()
        rows_check = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded, "
            "count(*) FILTER (WHERE attempts <> 1) AS not_once, "
            "count(*) FILTER (WHERE cost_usd <= 0 OR prompt_tokens <= 0) AS unpriced "
            "FROM batchdb.requests WHERE job_id = %s",
            [job_id],
        ).fetchone()
        # `writes` counts every write of a row's result: a double completion shows as writes > 1.
        results = conn.execute(
            "SELECT count(*) AS n, count(*) FILTER (WHERE writes > 1) AS overwritten "
            "FROM batchdb.results WHERE job_id = %s",
            [job_id],
        ).fetchone()
        by_workers = conn.execute("SELECT coalesce(sum(n_completed), 0) AS n FROM batchdb.workers").fetchone()["n"]
    ok = (
        job["status"] == "completed"
        and job["n_total"] == job["n_succeeded"] == rows
        and job["n_failed"] == job["n_dead"] == job["n_retries"] == 0
        and rows_check["succeeded"] == rows
        and rows_check["not_once"] == 0
        and rows_check["unpriced"] == 0
        and results["n"] == rows
        and results["overwritten"] == 0
        and by_workers == rows
    )
    detail = (
        f"succeeded {fmt_int(job['n_succeeded'])}, results {fmt_int(results['n'])}, "
        f"attempts<>1: {rows_check['not_once']}, retries {job['n_retries']}, "
        f"workers' count {fmt_int(by_workers)}, cost ${job['cost_usd']:.2f}"
    )
    return ok, detail, job["seconds"]


def price_instant_provider(dsn: str) -> None:
    """batchdb.prices has no row for provider 'instant'; copy gpt-4o-mini's so every row's cost is really computed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) "
            "SELECT 'instant', model, input_per_mtok, output_per_mtok FROM batchdb.prices "
            "WHERE provider = 'openai' AND model = %s",
            [MODEL],
        )


def throughput(admin_dsn: str, rows: int, workers: list[int]) -> list[Throughput]:
    table = headlines_table(rows)
    measured = []
    for n in workers:
        with scratch_database(admin_dsn, "queue") as dsn:
            price_instant_provider(dsn)
            job = batchdb.submit(table, prompt=PROMPT, model=MODEL, provider="instant", dsn=dsn)
            progress(f"throughput: {rows:,} rows queued as job {job.id}; running {n} worker(s)")
            wall, worker_cpu, machine = run_workers(dsn, n)
            ok, detail, db_seconds = verify_job(dsn, job.id, rows)
        result = Throughput(n, rows, db_seconds, wall, worker_cpu, machine, ok, detail)
        progress(f"throughput: {n} worker(s): {result.rate:,.0f} rows/s; {'OK' if ok else 'NOT OK'}: {detail}")
        measured.append(result)
    return measured


# -- 2. pgqueuer's own benchmark ---------------------------------------------------------------


def pgqueuer_script(explicit: Path | None) -> Path:
    """pgqueuer's tools/benchmark.py: not in its wheel, so taken from the matching sdist (cached)."""
    installed = importlib.metadata.version("pgqueuer")
    if installed != PGQUEUER_VERSION:
        raise SystemExit(f"pgqueuer {installed} is installed; this baseline is pinned to {PGQUEUER_VERSION}")
    if explicit is not None:
        return explicit
    script = PGQUEUER_CACHE / f"pgqueuer-{PGQUEUER_VERSION}" / "tools" / "benchmark.py"
    if script.exists():
        return script
    PGQUEUER_CACHE.mkdir(parents=True, exist_ok=True)
    progress(f"pgqueuer: downloading the pgqueuer {PGQUEUER_VERSION} sdist for tools/benchmark.py")
    download = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"pgqueuer=={PGQUEUER_VERSION}",
            "--no-binary",
            ":all:",
            "--no-deps",
            "--quiet",
            "-d",
            str(PGQUEUER_CACHE),
        ],
        capture_output=True,
        text=True,
    )
    sdist = PGQUEUER_CACHE / f"pgqueuer-{PGQUEUER_VERSION}.tar.gz"
    if download.returncode != 0 or not sdist.exists():
        raise SystemExit(
            f"could not download the pgqueuer sdist ({download.stderr.strip()[-500:]}); "
            "pass --pgqueuer-script PATH/tools/benchmark.py or --skip-pgqueuer"
        )
    with tarfile.open(sdist) as tar:
        tar.extract(f"pgqueuer-{PGQUEUER_VERSION}/tools/benchmark.py", PGQUEUER_CACHE, filter="data")
    return script


def run_pgqueuer(script: Path, dsn: str, args: list[str], log: Path) -> dict:
    out = log.with_suffix(".json")
    env = {**os.environ, **libpq_env(dsn), "PGQUEUER_TABLEFMT": "github"}
    with log.open("w") as handle:
        proc = subprocess.run(
            [sys.executable, str(script), "-d", "psy", "--output-json", str(out), *args],
            cwd=script.parent.parent,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"pgqueuer's benchmark failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return json.loads(out.read_text())


def pgqueuer_baseline(admin_dsn: str, script: Path, seconds: float, drain_jobs: int) -> dict[str, dict]:
    with scratch_database(admin_dsn, "pgq", migrate=False) as dsn, tempfile.TemporaryDirectory() as tmp:
        install = subprocess.run(
            [str(Path(sys.executable).parent / "pgq"), "--pg-dsn", dsn, "install"], capture_output=True, text=True
        )
        if install.returncode != 0:
            raise SystemExit(f"pgq install failed: {install.stdout}{install.stderr}")
        progress(f"pgqueuer: throughput strategy for {seconds:.0f}s (5 consumers x batch 10, 1 producer x batch 10)")
        tput = run_pgqueuer(script, dsn, ["-t", str(seconds)], Path(tmp) / "throughput.log")
        progress(f"pgqueuer: throughput {tput['rate']:,.0f} jobs/s; drain strategy of {drain_jobs:,} jobs")
        drain = run_pgqueuer(script, dsn, ["--strategy", "drain", "--jobs", str(drain_jobs)], Path(tmp) / "drain.log")
        progress(f"pgqueuer: drain {drain['rate']:,.0f} jobs/s")
    return {"throughput": tput, "drain": drain}


# -- 3. claim latency at a large backlog -------------------------------------------------------


@dataclass
class Latency:
    state: str
    plan: str  # "custom" or "generic"
    batch: int
    samples: list[float]
    explain_ms: float
    explain_buffers: int
    index_buffers: int  # buffers of the scan of the partition's claimable index: dead entries show here
    jit_ms: float | None
    explain: str

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p95(self) -> float:
        return percentile(self.samples, 95)


CLAIM_PARAMS = {
    "worker_id": "bench",
    "lease_seconds": 60.0,
    "max_jobs": 16,
    # A worker claims only on the lanes it serves (workers/lanes.py).
    "lane_providers": ["instant"],
    "lane_key_aliases": ["default"],
}
CLAIM_LANES = [("instant", "default")]


async def time_claims(conn: psycopg.AsyncConnection, batch: int, reps: int, warmup: int = 10) -> list[float]:
    """claim_batch timings in ms; each claim rolled back so the backlog is left as it was."""
    samples = []
    for i in range(warmup + reps):
        async with conn.transaction(force_rollback=True):
            started = time.perf_counter()
            claimed = await queue.claim_batch(
                conn, worker_id="bench", limit=batch, lease_seconds=60.0, lanes=CLAIM_LANES
            )
            elapsed = (time.perf_counter() - started) * 1000
        if len(claimed) != batch:
            raise SystemExit(f"claim_batch returned {len(claimed)} rows, expected {batch}")
        if i >= warmup:
            samples.append(elapsed)
    return samples


def buffers_of(line: str) -> int:
    return sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", line.split(",")[0]))


def plan_figures(plan: str) -> tuple[float, int, int, float | None]:
    """(execution ms, top node's shared buffers, claimable-index scan's buffers, JIT ms or None)."""
    lines = plan.splitlines()
    execution = float(re.search(r"Execution Time: ([\d.]+) ms", plan).group(1))
    top = buffers_of(next(line for line in lines if "Buffers: shared" in line).split("Buffers: ")[1])
    scan = next(
        i for i, line in enumerate(lines) if re.search(r"Index Scan using requests_\d+_job_id_run_after_id_idx", line)
    )
    index = buffers_of(next(line for line in lines[scan:] if "Buffers: shared" in line).split("Buffers: ")[1])
    jit = re.search(r"JIT:.*?Total ([\d.]+) ms", plan, re.DOTALL)
    return execution, top, index, None if jit is None else float(jit.group(1))


async def explain_claim(conn: psycopg.AsyncConnection, batch: int, *, generic: bool) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim, rolled back.

    The generic plan is what a prepared statement may settle on after 5 runs; it is
    shown through SQL-level PREPARE/EXECUTE with plan_cache_mode = force_generic_plan.
    """
    values = {**CLAIM_PARAMS, "limit": batch}
    async with conn.transaction(force_rollback=True):
        if generic:
            order = ["worker_id", "limit", "lease_seconds", "max_jobs", "lane_providers", "lane_key_aliases"]
            text = re.sub(r"%\((\w+)\)s", lambda m: f"${order.index(m.group(1)) + 1}", query("claim_batch"))
            name = f"bench_claim_{time.monotonic_ns()}"
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE {name} (text, integer, double precision, integer, text[], text[]) AS {text}")
            arguments = sql.SQL(", ").join(sql.Literal(values[k]) for k in order)  # EXECUTE takes no $n parameters
            cur = await conn.execute(
                sql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE {} ({})").format(sql.Identifier(name), arguments)
            )
        else:
            cur = await conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + query("claim_batch"), values)
        return "\n".join(row["QUERY PLAN"] for row in await cur.fetchall())


async def measure_state(dsn: str, state: str, batches: list[int], reps: int) -> list[Latency]:
    """Claim latency on connections like a worker's (batchdb.workers.connection.Reconnecting: autocommit, dict rows).

    A rolled-back claim is never prepared by psycopg (a ROLLBACK resets its prepare
    counters), so it is planned afresh each time: a custom plan. A worker's committed
    claims are prepared after 5 runs and PostgreSQL may then switch to a generic plan;
    the second pass forces that plan (prepare at once, plan_cache_mode = force_generic_plan).
    """
    measured = []
    for plan in ("custom", "generic"):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            if plan == "generic":
                conn.prepare_threshold = 0
                await conn.execute("SET plan_cache_mode = force_generic_plan")
            for batch in batches:
                samples = await time_claims(conn, batch, reps)
                text = await explain_claim(conn, batch, generic=plan == "generic")
                m = Latency(state, plan, batch, samples, *plan_figures(text), text)
                measured.append(m)
                progress(
                    f"claim latency [{state}] {plan} plan, batch {batch}: p50 {m.p50:.2f} ms, "
                    f"p95 {m.p95:.2f} ms; EXPLAIN {m.explain_ms:.2f} ms, {m.explain_buffers} buffers "
                    f"({m.index_buffers} in the claimable index), JIT {m.jit_ms} ms"
                )
    return measured


async def drain_rows(dsn: str, rows: int, tasks: int = 4, batch: int = 500) -> tuple[float, str]:
    """Claim and complete `rows` rows through batchdb.queue, as workers do.

    Returns rows/s and how PostgreSQL planned the prepared claim on these
    connections (generic vs custom plan runs), i.e. what a worker's claim does.
    """
    remaining = rows
    plan_runs: list[str] = []

    async def loop() -> None:
        nonlocal remaining
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            while remaining > 0:
                take = min(batch, remaining)
                remaining -= take
                claimed = await queue.claim_batch(conn, worker_id="bench-drain", limit=take, lease_seconds=60.0)
                outcomes = [
                    Outcome(
                        job_id=r.job_id,
                        id=r.id,
                        lease_token=r.lease_token,
                        status=RequestStatus.SUCCEEDED,
                        prompt_tokens=20,
                        completion_tokens=5,
                        latency_ms=0,
                        response_text="positive",
                        finish_reason="stop",
                        model=MODEL,
                    )
                    for r in claimed
                ]
                recorded = await queue.complete_batch(conn, outcomes)
                if len(recorded) != len(claimed):
                    raise SystemExit("drain: a completion was fenced out")
            cur = await conn.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE %s",
                ["%candidate_jobs%"],
            )
            plan_runs.extend(f"{r['generic_plans']} generic/{r['custom_plans']} custom" for r in await cur.fetchall())

    with Stopwatch() as watch:
        await asyncio.gather(*(loop() for _ in range(tasks)))
    return rows / watch.seconds, ", ".join(plan_runs)


def partition_stats(dsn: str, job_id: int) -> dict:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT n_live_tup, n_dead_tup, autovacuum_count, vacuum_count, last_autovacuum, "
            "last_autoanalyze FROM pg_stat_user_tables WHERE relid = %s::regclass",
            [f"batchdb.requests_{job_id}"],
        ).fetchone()


def claim_latency(admin_dsn: str, backlog: int, drain: int, reps: int) -> tuple[list[Latency], list[str]]:
    batches = [50, 500]
    notes = []
    with scratch_database(admin_dsn, "claim") as dsn:
        progress(f"claim latency: submitting a {backlog:,}-row backlog")
        job = batchdb.submit(headlines_table(backlog), prompt=PROMPT, model=MODEL, provider="instant", dsn=dsn)
        measured = asyncio.run(measure_state(dsn, f"{backlog // 1000:,}k backlog, fresh", batches, reps))

        progress(f"claim latency: claiming and completing {drain:,} rows (4 connections, batches of 500)")
        rate, plan_runs = asyncio.run(drain_rows(dsn, drain))
        time.sleep(1.0)  # let the statistics collector catch up before reading n_dead_tup
        stats = partition_stats(dsn, job.id)
        state = f"after {drain // 1000:,}k claimed+completed, no manual VACUUM"
        notes.append(
            f"Drain of {drain:,} rows through claim_batch/complete_batch (4 connections, batches of 500): "
            f"{rate:,.0f} rows/s. The prepared claim on those 4 connections ran: {plan_runs}. "
            f"At the 'no manual VACUUM' measurement the partition had {fmt_int(stats['n_dead_tup'])} dead "
            f"tuples and autovacuum had run {stats['autovacuum_count']} time(s) on it "
            f"(last {stats['last_autovacuum'] or 'never'})."
        )
        progress(f"claim latency: partition stats before measuring: {stats}")
        measured += asyncio.run(measure_state(dsn, state, batches, reps))

        with psycopg.connect(dsn, autocommit=True) as conn, Stopwatch() as vacuum:
            conn.execute(f"VACUUM batchdb.requests_{job.id}")
        notes.append(f"Manual VACUUM of the partition took {vacuum.seconds:.1f} s.")
        measured += asyncio.run(measure_state(dsn, "same, after manual VACUUM", batches, reps))
    notes.append(
        "Claim timings: batchdb.queue.claim_batch on an autocommit psycopg connection like a worker's, "
        "10 warm-up claims, then each timed claim rolled back (no commit/WAL flush included; the backlog "
        "is unchanged, though every rolled-back claim leaves dead row versions in the heap). 'custom' = "
        "planned per call (psycopg never prepares a statement whose transaction rolls back); 'generic' "
        "= prepared at once with plan_cache_mode = force_generic_plan (re-prepared on every call, "
        "as each rollback clears psycopg's statement cache, so its timings include that round trip)."
    )
    for m in measured:
        print(
            f"\n-- EXPLAIN (ANALYZE, BUFFERS) claim_batch limit {m.batch}, {m.plan} plan [{m.state}]\n{m.explain}",
            file=sys.stderr,
        )
    return measured, notes


# -- report ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn",
        default=DEFAULT_ADMIN_DSN,
        help="admin DSN; scratch databases are created on that server and dropped afterwards",
    )
    parser.add_argument("--rows", type=int, default=200_000, help="rows per throughput run")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts to measure")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="backlog for the claim-latency part")
    parser.add_argument("--drain", type=int, default=300_000, help="rows claimed+completed before re-measuring")
    parser.add_argument("--claim-reps", type=int, default=200, help="timed claims per batch size and state")
    parser.add_argument("--pgqueuer-seconds", type=float, default=25.0)
    parser.add_argument("--pgqueuer-drain-jobs", type=int, default=50_000)
    parser.add_argument("--pgqueuer-script", type=Path, help="pgqueuer's tools/benchmark.py (default: from its sdist)")
    parser.add_argument("--skip-pgqueuer", action="store_true")
    parser.add_argument("--skip-claim-latency", action="store_true")
    args = parser.parse_args(argv)

    env = environment_line(args.dsn)
    before = background_load(args.dsn)
    started = time.perf_counter()
    script = None if args.skip_pgqueuer else pgqueuer_script(args.pgqueuer_script)
    runs = throughput(args.dsn, args.rows, [int(n) for n in args.workers.split(",")])
    baseline = (
        None if script is None else pgqueuer_baseline(args.dsn, script, args.pgqueuer_seconds, args.pgqueuer_drain_jobs)
    )
    latencies, notes = (
        ([], []) if args.skip_claim_latency else claim_latency(args.dsn, args.backlog, args.drain, args.claim_reps)
    )
    total = time.perf_counter() - started
    after = background_load(args.dsn)

    rows: list[list[object]] = []
    ref = None if baseline is None else baseline["throughput"]["rate"]
    for r in runs:
        ratio = ""
        if baseline is not None:
            ratio = (
                f"{r.rate / ref:.1f}x pgqueuer's throughput figure "
                f"({'PASS' if r.rate >= TARGET_RATIO * ref else 'MISS'} >= {TARGET_RATIO:.0f}x), "
                f"{r.rate / baseline['drain']['rate']:.1f}x its drain figure"
            )
        rows.append(
            [
                f"batchdb, {r.workers} worker process(es) x 256 in flight, {fmt_int(r.rows)} rows",
                f"{fmt_int(r.rate)} rows/s",
                f"{r.db_seconds:.1f} s first claim -> job completed "
                f"(wall {r.wall_seconds:.1f} s incl. start/exit; workers' CPU {r.worker_cpu_seconds:.0f} s; "
                f"machine CPU {r.machine_cpu_pct:.0f}% busy)",
                f"{'OK' if r.verified else 'NOT OK'}: {r.detail}; {ratio}",
            ]
        )
    if baseline is not None:
        t, d = baseline["throughput"], baseline["drain"]
        rows.append(
            [
                "pgqueuer 1.6.0 tools/benchmark.py -d psy (throughput, default 5x10 consumers, 1x10 producer)",
                f"{fmt_int(t['rate'])} jobs/s",
                f"{fmt_int(t['steps'])} jobs in {args.pgqueuer_seconds:.0f} s timer",
                "enqueue runs concurrently; no-op entrypoint",
            ]
        )
        rows.append(
            [
                f"pgqueuer 1.6.0 tools/benchmark.py -d psy --strategy drain --jobs {args.pgqueuer_drain_jobs}",
                f"{fmt_int(d['rate'])} jobs/s",
                f"{fmt_int(d['steps'])} jobs drained",
                "backlog enqueued first",
            ]
        )
    for m in latencies:
        rows.append(
            [
                f"claim_batch({m.batch}), {m.plan} plan, {m.state}",
                f"p50 {m.p50:.2f} ms / p95 {m.p95:.2f} ms",
                f"{len(m.samples)} claims, max {max(m.samples):.2f} ms",
                f"EXPLAIN ANALYZE: {m.explain_ms:.2f} ms, {m.explain_buffers:,} buffers, "
                f"{m.index_buffers:,} of them in the claimable-index scan"
                + ("" if m.jit_ms is None else f"; JIT compilation {m.jit_ms:.1f} ms"),
            ]
        )
    notes = [
        *notes,
        f"Total run time {total / 60:.1f} min. Environment: {env}",
        f"Background before the run: {before}. After: {after}.",
    ]
    print_table(
        "batchdb queue: throughput with the instant provider, pgqueuer baseline, claim latency",
        ["run", "rate / latency", "how measured", "checks"],
        rows,
        notes=notes,
    )
    if not all(r.verified for r in runs):
        raise SystemExit("a throughput run did not succeed every row exactly once")


if __name__ == "__main__":
    main()
