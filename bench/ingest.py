"""Ingest benchmark: `batchdb.submit()` of a 1,000,000-row Parquet file.

    .venv/bin/python -m bench.ingest [--dsn ADMIN_DSN] [--rows 1000000]

Generates the file in a temp dir with a separate process (not timed), then runs
`submit()` in a child process so that the peak RSS measured is the submit's alone:
the child's `ru_maxrss` as returned by `os.wait4` for that pid (the kernel's
RUSAGE_CHILDREN figure for exactly this child), cross-checked by polling psutil
every 20 ms. Reports the wall time of the `submit()` call (measured in the child
around the call), rows/s, peak RSS, and checks the job holds every row.
Targets: <= 20 s and < 1 GB for 1,000,000 rows.

Why generation runs in its own process: a child started with vfork/posix_spawn
inherits the parent's RSS high-water mark into its own `ru_maxrss` at exec, so a
parent holding the generated table would inflate the child's figure (measured:
659 MiB reported vs 321 MiB real). The parent here stays small, and its own
high-water mark at spawn time is printed next to the child's.
"""

from __future__ import annotations

if not __package__:  # run as a file: make `bench` importable and keep bench/ off sys.path
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
import pyarrow.parquet as pq

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
    print_table,
    progress,
    scratch_database,
)

TARGET_SECONDS = 20.0
TARGET_RSS_BYTES = 1 << 30


def child(path: str, dsn: str, out: str) -> None:
    """Runs in the measured process: submit, write the figures as JSON."""
    import batchdb

    with Stopwatch() as submit:
        job = batchdb.submit(path, prompt=PROMPT, model=MODEL, provider="instant", dsn=dsn)
    Path(out).write_text(json.dumps({"job_id": job.id, "submit_seconds": submit.seconds}))


def generate(path: str, rows: str) -> None:
    """Runs in its own process so the parent's RSS stays small (see the module docstring)."""
    pq.write_table(headlines_table(int(rows)), path)


def run_module(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "bench.ingest", *args], cwd=REPO, env=env)


def run_child(path: Path, dsn: str, workdir: Path) -> dict:
    out = workdir / "child.json"
    parent_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    proc = run_module("--child", str(path), dsn, str(out))
    handle = psutil.Process(proc.pid)
    polled_peak = 0
    while True:
        # os.wait4 (not Popen.poll) so the child's own rusage is not thrown away when it is reaped.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        try:
            polled_peak = max(polled_peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"submit child exited with {proc.returncode}")
    return {
        **json.loads(out.read_text()),
        "process_seconds": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "polled_peak_rss_bytes": polled_peak,
        "parent_maxrss_bytes": parent_maxrss,
    }


def verify(dsn: str, job_id: int, rows: int) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        status, n_total = conn.execute("SELECT status, n_total FROM batchdb.jobs WHERE id = %s", [job_id]).fetchone()
        counted, distinct_ids, with_headline = conn.execute(
            "SELECT count(*), count(DISTINCT custom_id), count(*) FILTER (WHERE input ? 'headline') "
            "FROM batchdb.requests WHERE job_id = %s",
            [job_id],
        ).fetchone()
    ok = status == "running" and n_total == counted == distinct_ids == with_headline == rows
    return {"status": status, "n_total": n_total, "counted": counted, "ok": ok}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn",
        default=DEFAULT_ADMIN_DSN,
        help="admin DSN; a scratch database is created on that server and dropped afterwards",
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep-db", action="store_true", help="keep the scratch database for inspection")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "DSN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=2, metavar=("PATH", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    if args.generate:
        generate(*args.generate)
        return

    with tempfile.TemporaryDirectory(prefix="batchdb-bench-ingest-") as tmp:
        workdir = Path(tmp)
        path = workdir / "headlines.parquet"
        progress(f"generating {args.rows:,} rows into {path}")
        with Stopwatch() as generation:
            if run_module("--generate", str(path), str(args.rows)).wait() != 0:
                raise SystemExit("generating the Parquet file failed")
        progress(f"generated in {generation.seconds:.1f}s ({path.stat().st_size / 1e6:.1f} MB)")
        with scratch_database(args.dsn, "ingest", keep=args.keep_db) as dsn:
            env = environment_line(dsn)
            before = background_load(dsn)
            progress("submitting in a child process")
            figures = run_child(path, dsn, workdir)
            progress(f"submit() took {figures['submit_seconds']:.1f}s; verifying the job")
            check = verify(dsn, figures["job_id"], args.rows)
        size_mb = path.stat().st_size / 1e6

    seconds = figures["submit_seconds"]
    rss = figures["peak_rss_bytes"]
    scale = args.rows / 1_000_000
    time_ok = seconds <= TARGET_SECONDS * scale
    rss_ok = rss < TARGET_RSS_BYTES
    rows = [
        ["rows submitted (Parquet, 4 columns)", fmt_int(args.rows), f"file {size_mb:.1f} MB"],
        [
            "submit() wall time",
            f"{seconds:.2f} s",
            f"target <= {TARGET_SECONDS * scale:.0f} s: {'PASS' if time_ok else 'MISS'}",
        ],
        ["throughput", f"{fmt_int(args.rows / seconds)} rows/s", ""],
        [
            "peak RSS of the submitting process (ru_maxrss via wait4)",
            f"{rss / 2**20:,.0f} MiB",
            f"target < 1 GiB: {'PASS' if rss_ok else 'MISS'}",
        ],
        [
            "peak RSS, psutil polled every 20 ms",
            f"{figures['polled_peak_rss_bytes'] / 2**20:,.0f} MiB",
            f"bench parent's own high-water at spawn: {figures['parent_maxrss_bytes'] / 2**20:,.0f} MiB",
        ],
        ["child process wall (interpreter start + imports + submit)", f"{figures['process_seconds']:.2f} s", ""],
        [
            "job rows in batchdb.requests",
            fmt_int(check["counted"]),
            f"n_total {fmt_int(check['n_total'])}, status {check['status']}: {'OK' if check['ok'] else 'WRONG'}",
        ],
        ["(not timed) Parquet generation", f"{generation.seconds:.1f} s", ""],
    ]
    print_table(
        "batchdb ingest: submit() of a Parquet file",
        ["measure", "value", "target / check"],
        rows,
        notes=[f"Environment: {env}", f"Background before the run: {before}"],
    )
    if not check["ok"]:
        raise SystemExit("the job does not hold every row")


if __name__ == "__main__":
    main()
