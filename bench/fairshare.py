"""Fair share between users on one provider key: measured shares vs weights, and a newcomer's wait.

Users are real PostgreSQL roles (`batchdb users add`), each submitting as itself;
worker processes connect as a worker role and call the simulator through the
OpenAI SDK; the key's limit (RPM) is the contended resource. For each scenario
both users stay backlogged for the whole run, and the share of calls each got is
measured over the steady part (after `--warmup`) from the rows' finish times.
Half way through, a third user submits a 10-row job: we report how long until
its first row was sent and until it finished.

    .venv/bin/python -m bench.fairshare                 # both scenarios, 90 s each
    .venv/bin/python -m bench.fairshare --seconds 60 --scenarios equal
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psycopg
from psycopg.conninfo import make_conninfo

MODEL = "gpt-4o-mini"
API_KEY = "sk-bench-fairshare"


@dataclass(frozen=True)
class Tenant:
    label: str
    weight: float
    jobs: tuple[int, ...]  # rows per job


SCENARIOS: dict[str, tuple[Tenant, Tenant]] = {
    # One big job against four small ones (one of them at priority 2): equal weights.
    "equal": (Tenant("alice", 1.0, (20_000,)), Tenant("bob", 1.0, (3_000, 3_000, 3_000, 3_000))),
    # Weight 2 against weight 1, each with one job.
    "weighted": (Tenant("carol", 2.0, (20_000,)), Tenant("dave", 1.0, (20_000,))),
}


@dataclass
class Result:
    scenario: str
    shares: dict[str, tuple[float, int]]  # label -> (share of calls in the window, calls)
    expected: dict[str, float]
    newcomer_first_s: float | None
    newcomer_done_s: float | None
    calls_per_s: float
    rate_limited: int


@contextmanager
def roles(admin_conn: psycopg.Connection, labels: list[str], weights: dict[str, float]) -> Iterator[dict[str, str]]:
    from batchdb import users

    names = {label: f"{label}_{uuid.uuid4().hex[:6]}" for label in labels}
    try:
        for label, name in names.items():
            kind = users.UserKind.WORKER if label == "worker" else users.UserKind.USER
            users.add_user(admin_conn, name, kind=kind, weight=weights.get(label))
        yield names
    finally:
        for name in names.values():
            admin_conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            admin_conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def frame(rows: int, tag: str) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"{tag} item {i}: summarise the quarterly numbers" for i in range(rows)]})


def run_scenario(admin_dsn: str, sim_url: str, name: str, args: argparse.Namespace, workdir: Path) -> Result:
    import batchdb
    from batchdb import ledger
    from batchdb.workers.processes import start_workers
    from bench._common import progress, scratch_database

    first, second = SCENARIOS[name]
    with scratch_database(admin_dsn, "fairshare") as dsn, psycopg.connect(dsn, autocommit=True) as admin:
        ledger.set_limits(admin, ledger.Lane("openai", "default", MODEL), rpm=args.rpm)
        weights = {first.label: first.weight, second.label: second.weight}
        with roles(admin, [first.label, second.label, "erin", "worker"], weights) as names:
            as_user = {label: make_conninfo(dsn, user=role) for label, role in names.items()}
            for tenant in (first, second):
                for i, rows in enumerate(tenant.jobs):
                    batchdb.submit(
                        frame(rows, tenant.label),
                        prompt="{text}",
                        model=MODEL,
                        provider="openai",
                        max_tokens=16,
                        priority=2 if i == 0 and len(tenant.jobs) > 1 else 1,
                        name=f"{tenant.label}-{i}",
                        dsn=as_user[tenant.label],
                    )
            env = {"OPENAI_BASE_URL": sim_url, "OPENAI_API_KEY": API_KEY}
            started = time.monotonic()
            with start_workers(
                args.workers, as_user["worker"], env=env, log_dir=workdir, args=("--concurrency", str(args.concurrency))
            ):
                progress(
                    f"{name}: {args.workers} workers x {args.concurrency} in flight, {args.rpm} RPM, "
                    f"{args.seconds:.0f} s"
                )
                time.sleep(max(0.0, args.seconds / 2 - (time.monotonic() - started)))
                newcomer = batchdb.submit(
                    frame(10, "erin"),
                    prompt="{text}",
                    model=MODEL,
                    provider="openai",
                    max_tokens=16,
                    name="erin-tiny",
                    dsn=as_user["erin"],
                )
                submitted_at = admin.execute(
                    "SELECT created_at FROM batchdb.jobs WHERE id = %s", (newcomer.id,)
                ).fetchone()[0]
                time.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
                window = admin.execute(
                    "SELECT now() - make_interval(secs => %s), now()", (args.seconds - args.warmup,)
                ).fetchone()
            per_owner = dict(
                admin.execute(
                    "SELECT j.owner, count(*) FROM batchdb.requests q JOIN batchdb.jobs j ON j.id = q.job_id "
                    "WHERE q.status = 'succeeded' AND q.finished_at BETWEEN %s AND %s GROUP BY j.owner",
                    window,
                ).fetchall()
            )
            first_sent, last_done = admin.execute(
                "SELECT min(started_at), max(finished_at) FILTER (WHERE status = 'succeeded') "
                "FROM batchdb.requests WHERE job_id = %s",
                (newcomer.id,),
            ).fetchone()
            erin_done = newcomer.status().n_succeeded == 10
            rate_limited = admin.execute("SELECT coalesce(sum(rate_limited), 0) FROM batchdb.rate_limits").fetchone()[0]
    total_weight = first.weight + second.weight
    contenders = [t.label for t in (first, second)]
    calls = {label: per_owner.get(names[label], 0) for label in contenders}
    in_window = sum(calls.values())
    return Result(
        scenario=name,
        shares={label: (calls[label] / in_window if in_window else 0.0, calls[label]) for label in contenders},
        expected={t.label: t.weight / total_weight for t in (first, second)},
        newcomer_first_s=None if first_sent is None else (first_sent - submitted_at).total_seconds(),
        newcomer_done_s=(last_done - submitted_at).total_seconds() if erin_done and last_done else None,
        calls_per_s=(in_window + per_owner.get(names["erin"], 0)) / (args.seconds - args.warmup),
        rate_limited=int(rate_limited),
    )


def report(results: list[Result]) -> tuple[list[list[str]], list[str]]:
    """The table's rows, and one line for every MISS (a share off its weight by more than 5
    points) or NOT SERVED (the newcomer never ran): any of them makes `main` exit 1."""
    rows = []
    missed = []
    for r in results:
        for label, (share, calls) in r.shares.items():
            error = share - r.expected[label]
            rows.append(
                [
                    r.scenario,
                    label,
                    f"{r.expected[label]:.1%}",
                    f"{share:.1%} ({calls:,} calls)",
                    f"{error:+.1%}",
                    "ok" if abs(error) <= 0.05 else "MISS",
                ]
            )
            if abs(error) > 0.05:
                missed.append(f"{r.scenario}: {label} MISS: {share:.1%} of calls, expected {r.expected[label]:.1%}")
        rows.append(
            [
                r.scenario,
                "erin (10 rows, mid-run)",
                "-",
                f"first call {r.newcomer_first_s:.1f} s, done {r.newcomer_done_s:.1f} s"
                if r.newcomer_first_s is not None and r.newcomer_done_s is not None
                else "NOT SERVED",
                "-",
                f"{r.calls_per_s:.1f} calls/s, {r.rate_limited} 429s",
            ]
        )
        if r.newcomer_first_s is None or r.newcomer_done_s is None:
            missed.append(f"{r.scenario}: the newcomer's 10 rows were NOT SERVED")
    return rows, missed


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 on any MISS or NOT SERVED line (as bench.drills), so a script or CI can rely on it."""
    import tempfile

    from batchdb.simulator.config import Distribution, Limits, SimulatorConfig
    from batchdb.simulator.process import start_simulator
    from bench._common import DEFAULT_ADMIN_DSN, environment_line, print_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_ADMIN_DSN, help="admin DSN (scratch databases and roles)")
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds left out of the measured window")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--rpm", type=int, default=1800, help="the key's limit: the contended resource")
    parser.add_argument("--latency", default="0.2,0.8", help="simulator latency, uniform LOW,HIGH seconds")
    parser.add_argument("--scenarios", default="equal,weighted")
    args = parser.parse_args(argv)
    low, high = (float(x) for x in args.latency.split(","))
    config = SimulatorConfig(
        seed=5, default_limits=Limits(rpm=args.rpm), latency_s=Distribution(kind="uniform", low=low, high=high)
    )
    results = []
    with start_simulator(config) as sim, tempfile.TemporaryDirectory(prefix="bench-fairshare-") as tmp:
        for name in [s for s in args.scenarios.split(",") if s]:
            results.append(run_scenario(args.dsn, sim.openai_base_url, name, args, Path(tmp)))
    rows, missed = report(results)
    print_table(
        "Fair share between users on one key (target: within +-5% of the weights)",
        ["scenario", "user", "weight share", "measured share", "error", "note"],
        rows,
        [
            environment_line(args.dsn),
            f"{args.workers} workers x {args.concurrency} in flight; key limit {args.rpm} RPM; latency "
            f"uniform {low}-{high} s; window = last {args.seconds - args.warmup:.0f} s of {args.seconds:.0f} s",
        ],
    )
    for line in missed:
        print(line, file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
