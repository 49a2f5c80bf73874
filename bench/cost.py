"""The cost benchmark: one job with 30% exact duplicate rows, run online, batch, batch + dedupe and auto.

    python -m bench.cost [--rows 20000] [--workers 2] [--concurrency 64] [--dsn ADMIN_DSN]

The same rows (`--rows`, of which `--duplicates` (0.3) are exact copies of earlier rows; fixed
seed) are submitted as separate jobs, one after another, run by `--workers` worker processes
against one simulator that is reset before each run (fresh counters, no batches, the same seed),
so each run's provider counters are its own:

- online (`dedupe=False`): one call per row;
- batch (`mode="batch"`, `dedupe=False`): every row through the OpenAI Batch API;
- batch + dedupe (`mode="batch"`, `dedupe=True`, the default): identical rows sent once;
- auto (`mode="auto"`, `deadline=`, `dedupe=True`): when this build's `batchdb.submission.JOB_MODES`
  has "auto"; otherwise the row says "not available in this build". Its lane gets a batch window,
  a margin and a batch queue of half the job's prompt tokens (`AutoLane`), so part goes online.

Every run sends the same prompts to the same simulator config: the simulator draws a reply's
length from (seed, model, prompt), so a row's output tokens are the same in every run, and the
prompts are too short for the prompt cache (1,024 tokens), so no run is cheaper by chance.

For each run: the **simulator's bill** (`batchdb.simulator.recorder.bill_usd`: what the simulator
served, priced from batchdb/price_list.json as the provider's price page lists it, online and
batch, with no use of batchdb's rows or pricing code); **batchdb's recorded cost** (the job's
`cost_usd + wasted_usd`); their difference; wall time (submit until the job is finished, workers
already running); provider calls (online calls + batch lines + batches created); rows answered.

Targets (issue 12): batch <= 50% of online, batch + dedupe <= 36% of online (both from the bills),
recorded cost = the bill to the cent in every run. Exit status 1 when one is missed.

The workers are `python -m bench.batch_worker`: batchdb's worker with the batch driver's polling
scaled to the simulator's compressed batch window (seconds, not hours).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from typing import Any

import numpy as np
import openai
import pandas as pd
import psycopg

import batchdb
from batchdb import submission
from batchdb.simulator.config import Distribution, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator
from batchdb.simulator.recorder import TokenPrices, bill_usd
from batchdb.tokens import count_openai_messages
from batchdb.workers.processes import start_workers
from bench._common import (
    DEFAULT_ADMIN_DSN,
    MODEL,
    background_load,
    environment_line,
    headlines_table,
    print_table,
    progress,
    scratch_database,
)

PROMPT = "Classify the sentiment of this headline as positive, negative or neutral: {headline}"
API_KEY = "sk-bench-cost"
MAX_TOKENS = 100
WORKER_COMMAND = (sys.executable, "-m", "bench.batch_worker")
CENT = Decimal("0.01")
TARGET_BATCH = Decimal("0.50")
TARGET_BATCH_DEDUPE = Decimal("0.36")
NOT_AVAILABLE = "not available in this build"


def simulator_config(batch_window_s: float) -> SimulatorConfig:
    """No limits and no latency (the cost paths are measured, not the pacing); output lengths
    20-60 tokens, drawn per prompt, under MAX_TOKENS so no reply is cut."""
    return SimulatorConfig(
        seed=12,
        output_tokens=Distribution(kind="uniform", low=20, high=60),
        batch_validation_s=0.1,
        batch_duration_s=Distribution(kind="uniform", low=1.0, high=2.0),
        batch_finalizing_s=0.1,
        batch_window_s=batch_window_s,
    )


# -- the rows ----------------------------------------------------------------------------------------


def dataset(rows: int, duplicate_share: float = 0.3, *, seed: int = 12) -> pd.DataFrame:
    """`rows` headlines of which round(rows x duplicate_share) are exact copies of an earlier row.

    The distinct headlines are made unique (a numbered suffix where two coincide); each copy
    repeats a distinct row picked uniformly, and the whole is shuffled. Of a group of equal rows,
    dedupe sends the first and answers the others from it: exactly round(rows x duplicate_share)
    rows are answered without a call of their own.
    """
    n_duplicates = round(rows * duplicate_share)
    n_distinct = rows - n_duplicates
    headlines = headlines_table(n_distinct, seed=seed).column("headline").to_pylist()
    seen: set[str] = set()
    for i, text in enumerate(headlines):
        if text in seen:
            headlines[i] = text = f"{text} ({i})"
        seen.add(text)
    rng = np.random.default_rng(seed)
    sources = rng.integers(0, n_distinct, size=n_duplicates)
    texts = headlines + [headlines[s] for s in sources]
    order = rng.permutation(rows)
    shuffled = [texts[i] for i in order]
    frame = pd.DataFrame({"id": [f"row-{i}" for i in range(rows)], "headline": shuffled})
    assert int(frame["headline"].duplicated().sum()) == n_duplicates
    return frame


# -- one run -----------------------------------------------------------------------------------------


@dataclass
class Run:
    """One way of sending the rows and what it cost; `available` is False for a mode this build lacks."""

    label: str
    options: dict[str, Any]
    available: bool = True
    bill: Decimal = Decimal(0)
    recorded: Decimal = Decimal(0)
    recorded_rows: Decimal = Decimal(0)
    wasted: Decimal = Decimal(0)
    # Of recorded - bill: what storing each row's cost in numeric(18,8) added (rounded vs exact).
    rounding: Decimal = Decimal(0)
    wall_s: float = 0.0
    online_calls: int = 0
    batch_lines: int = 0
    batches: int = 0
    rows_answered: int = 0
    rows: int = 0
    duplicates: int = 0
    status: str = ""
    note: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return self.online_calls + self.batch_lines + self.batches

    @property
    def difference(self) -> Decimal:
        return self.recorded - self.bill

    @property
    def agrees(self) -> bool:
        return abs(self.difference) < CENT / 2


def token_prices(model: str = MODEL) -> TokenPrices:
    """The model's prices from the price map batchdb ships (the migrations seed the same)."""
    price_map = json.loads(resources.files("batchdb").joinpath("price_list.json").read_text())
    return TokenPrices.from_price_map(price_map[model])


def batches_created(sim: SimulatorProcess) -> int:
    """Batches the simulator holds for the bench's key (every one created, whatever its end)."""
    with openai.OpenAI(base_url=sim.openai_base_url, api_key=API_KEY, max_retries=2) as client:
        return sum(1 for _ in client.batches.list(limit=100))


def wait_for_workers(dsn: str, n: int, timeout: float = 60.0) -> None:
    """Until `n` workers have registered, so a run's wall time is the job's, not Python's start-up."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM batchdb.workers WHERE stopped_at IS NULL").fetchone()[0] < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {n} workers registered within {timeout:.0f} s")
            time.sleep(0.1)


def settle(dsn: str, timeout: float = 10.0) -> None:
    """Until no worker holds a call in flight, so the simulator's counters are final for this run."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute(
            "SELECT coalesce(sum(in_flight), 0) FROM batchdb.workers WHERE stopped_at IS NULL"
        ).fetchone()[0]:
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
    time.sleep(0.5)  # a heartbeat's worth: in_flight is reported, not live


# Each called row's cost as stored (numeric(18,8)) minus the same cost unrounded, from its own tokens
# and batchdb's own price rule; a duplicate row carries no call (its leader's answer, cost 0).
ROUNDING_SQL = """
SELECT coalesce(sum(r.cost_usd - batchdb.call_cost_usd(p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok,
                                                    p.batch_discount, r.prompt_tokens, r.cached_tokens,
                                                    r.completion_tokens, r.batch_id IS NOT NULL)), 0)
  FROM batchdb.requests r
  JOIN batchdb.jobs j ON j.id = r.job_id
  JOIN batchdb.prices p ON p.provider = j.provider AND p.model = j.model
 WHERE r.job_id = %s AND r.duplicate_of IS NULL AND r.status = 'succeeded'
"""


def row_rounding(dsn: str, job_id: int) -> Decimal:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return Decimal(conn.execute(ROUNDING_SQL, (job_id,)).fetchone()[0])


@dataclass(frozen=True)
class AutoLane:
    """How the auto run's lane is set (rate_limits, 0022), in the simulator's compressed seconds.

    The lane's batch queue holds `queue_share` of the job's distinct prompt tokens, so the first
    batch takes about that share of the rows; the rest find the queue full while no open batch is
    sure to end (created + `window_s`) before the cutoff (deadline - window - margin), which sends
    them online until the first batch ends and frees the queue. The simulator's batches take
    `batch_duration_s` in this run (real batches are slower than the online path; the other runs
    keep 1-2 s), long enough for the online path to answer a good part. The deadline is far enough
    for every row to be answered in time either way.
    """

    deadline_s: float = 60.0
    window_s: float = 30.0
    margin_s: float = 5.0
    queue_share: float = 0.5
    batch_duration_s: float = 15.0

    def describe(self, queue_tokens: int) -> str:
        return (
            f"lane: batch window {self.window_s:g} s, margin {self.margin_s:g} s, batch queue {queue_tokens:,} tokens "
            f"({self.queue_share:.0%} of the job's distinct prompt tokens); the simulator's batches take "
            f"{self.batch_duration_s:g} s in this run"
        )


def prompt_tokens_of_distinct_rows(frame: pd.DataFrame) -> int:
    """What the distinct rows' prompts count, as batchdb and the simulator count them."""
    return sum(
        count_openai_messages([{"role": "user", "content": PROMPT.format(headline=text)}])[0]
        for text in frame["headline"].unique()
    )


@contextlib.contextmanager
def lane_for_auto(dsn: str, lane: AutoLane, queue_tokens: int) -> Iterator[None]:
    """The lane's batch window, margin and queue limit set for the auto run; as they were after it."""
    columns = ("batch_window_seconds", "batch_margin_seconds", "batch_queue_tokens")
    key = ("openai", "default", MODEL)
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.execute(
            f"SELECT {', '.join(columns)} FROM batchdb.rate_limits WHERE (provider, key_alias, model) = (%s, %s, %s)",
            key,
        ).fetchone()
        conn.execute(
            f"INSERT INTO batchdb.rate_limits (provider, key_alias, model, {', '.join(columns)}) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (provider, key_alias, model) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in columns),
            (*key, lane.window_s, lane.margin_s, queue_tokens),
        )
    try:
        yield
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            if before is None:
                conn.execute("DELETE FROM batchdb.rate_limits WHERE (provider, key_alias, model) = (%s, %s, %s)", key)
            else:
                conn.execute(
                    "UPDATE batchdb.rate_limits SET "
                    + ", ".join(f"{c} = %s" for c in columns)
                    + " WHERE (provider, key_alias, model) = (%s, %s, %s)",
                    (*before, *key),
                )


def run_one(dsn: str, run: Run, frame: pd.DataFrame, sim: SimulatorProcess, *, timeout: float) -> Run:
    """Submit the rows as `run` says on a freshly reset simulator; fill in the figures."""
    sim.reset()  # fresh counters, no files or batches, the same seed: every run starts alike
    started = time.perf_counter()
    job = batchdb.submit(
        frame,
        prompt=PROMPT,
        id_column="id",
        model=MODEL,
        provider="openai",
        max_tokens=MAX_TOKENS,
        name=f"bench.cost {run.label}",
        dsn=dsn,
        **run.options,
    )
    status = job.wait(timeout=timeout)
    run.wall_s = time.perf_counter() - started
    settle(dsn)
    totals = sim.stats(series=False)["totals"]
    run.batches = batches_created(sim)
    run.bill = bill_usd(totals, token_prices())
    run.online_calls = totals["requests"]
    run.batch_lines = totals["batch_requests"]
    run.status = status.status
    run.rows = status.n_total
    run.rows_answered = status.n_succeeded
    run.duplicates = status.n_duplicates
    run.recorded_rows = status.cost_usd
    run.wasted = status.wasted_usd
    run.recorded = status.cost_usd + status.wasted_usd
    run.rounding = row_rounding(dsn, job.id)
    if status.status != "completed" or status.n_succeeded != status.n_total:
        run.problems.append(f"job {status.status}: {status.n_succeeded}/{status.n_total} rows answered")
    return run


def auto_available() -> bool:
    """Whether this build's submit() takes mode="auto" (with a deadline)."""
    return "auto" in submission.JOB_MODES


def runs_for(lane: AutoLane) -> list[Run]:
    auto = auto_available()
    return [
        Run("online", {"mode": "online", "dedupe": False}),
        Run("batch", {"mode": "batch", "dedupe": False}),
        Run("batch + dedupe", {"mode": "batch", "dedupe": True}),
        Run(
            "auto",
            {"mode": "auto", "dedupe": True, "deadline": dt.timedelta(seconds=lane.deadline_s)} if auto else {},
            available=auto,
        ),
    ]


# -- the report --------------------------------------------------------------------------------------


HEADERS = (
    "run",
    "options",
    "simulator's bill",
    "batchdb recorded (rows + wasted)",
    "difference",
    "% of online (bills)",
    "wall time",
    "provider calls (online + batch lines + batches)",
    "rows answered (of which duplicates)",
    "target",
)


def usd(value: Decimal) -> str:
    return f"${value:,.4f}"


def ratio(run: Run, online: Run, *, recorded: bool = False) -> Decimal | None:
    """`run`'s cost as a share of the online run's: of the bills, or of batchdb's recorded costs."""
    if not run.available or run.problems or online.problems:
        return None
    mine, theirs = (run.recorded, online.recorded) if recorded else (run.bill, online.bill)
    return mine / theirs if theirs else None


def share_text(run: Run, online: Run) -> str:
    share, recorded = ratio(run, online), ratio(run, online, recorded=True)
    if share is None or recorded is None:
        return "-"
    return f"{share:.2%}" if run is online else f"{share:.3%} (recorded: {recorded:.3%})"


def options_text(run: Run) -> str:
    parts = []
    for key, value in run.options.items():
        shown = f"{value.total_seconds():g} s" if isinstance(value, dt.timedelta) else repr(value)
        parts.append(f"{key}={shown}")
    return ", ".join(parts) or "-"


def verdicts(runs: list[Run]) -> tuple[list[list[object]], list[str]]:
    """The table's rows and the missed targets (empty when every target is met)."""
    by_label = {r.label: r for r in runs}
    online = by_label["online"]
    targets = {"batch": TARGET_BATCH, "batch + dedupe": TARGET_BATCH_DEDUPE}
    rows: list[list[object]] = []
    missed: list[str] = []
    for run in runs:
        if not run.available:
            rows.append([run.label, "mode='auto'", NOT_AVAILABLE, "-", "-", "-", "-", "-", "-", "-"])
            continue
        share = ratio(run, online)
        checks = []
        if run.problems:
            checks.append("FAILED: " + "; ".join(run.problems))
            missed.append(f"{run.label}: " + "; ".join(run.problems))
        if run.agrees:
            checks.append("recorded = bill: PASS")
        else:
            checks.append("recorded = bill: MISS")
            missed.append(f"{run.label}: recorded {run.recorded} != bill {run.bill}")
        deadline = run.options.get("deadline")
        if isinstance(deadline, dt.timedelta) and not run.problems:
            within = run.wall_s <= deadline.total_seconds()
            checks.append(f"answered within the deadline: {'yes' if within else 'NO'} (no target)")
        if run.label in targets:
            target = targets[run.label]
            if share is not None and share <= target:
                checks.append(f"<= {target:.0%} of online: PASS")
            else:
                checks.append(f"<= {target:.0%} of online: MISS")
                missed.append(f"{run.label}: {'-' if share is None else f'{share:.2%}'} of online, target {target:.0%}")
        rows.append(
            [
                run.label,
                options_text(run),
                usd(run.bill),
                usd(run.recorded) + (f" (incl. wasted {usd(run.wasted)})" if run.wasted else ""),
                f"${run.difference:+.8f} (per-row rounding ${run.rounding:+.8f})",
                share_text(run, online),
                f"{run.wall_s:.1f} s",
                f"{run.calls:,} ({run.online_calls:,} + {run.batch_lines:,} + {run.batches:,})",
                f"{run.rows_answered:,} of {run.rows:,} ({run.duplicates:,})",
                "; ".join(checks),
            ]
        )
    return rows, missed


# -- main --------------------------------------------------------------------------------------------


def run_benchmark(
    dsn: str,
    rows: int,
    *,
    duplicate_share: float = 0.3,
    workers: int = 2,
    concurrency: int = 64,
    batch_window_s: float = 60.0,
    auto: AutoLane = AutoLane(),
    timeout: float = 900.0,
    only: list[str] | None = None,
    on_run: Callable[[Run], None] = lambda _run: None,
) -> list[Run]:
    """Every run on `dsn` (a migrated database); the online run always, as the others' yardstick."""
    frame = dataset(rows, duplicate_share)
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-cost-") as log_dir,
        start_simulator(simulator_config(batch_window_s)) as sim,
        start_workers(
            workers,
            dsn,
            env={"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": API_KEY},
            args=("--concurrency", str(concurrency)),
            command=WORKER_COMMAND,
            log_dir=log_dir,
        ) as fleet,
    ):
        wait_for_workers(dsn, workers)
        for run in runs_for(auto):
            if only and run.label not in only and run.label != "online":
                continue
            if run.available:
                progress(f"{run.label}: {rows:,} rows, {workers} workers x {concurrency}")
                try:
                    if run.label == "auto":
                        queue_tokens = max(1, round(prompt_tokens_of_distinct_rows(frame) * auto.queue_share))
                        run.note = auto.describe(queue_tokens)
                        sim.set_config(batch_duration_s=Distribution(kind="fixed", value=auto.batch_duration_s))
                        try:
                            with lane_for_auto(dsn, auto, queue_tokens):
                                run_one(dsn, run, frame, sim, timeout=timeout)
                        finally:
                            sim.set_config(batch_duration_s=simulator_config(batch_window_s).batch_duration_s)
                    else:
                        run_one(dsn, run, frame, sim, timeout=timeout)
                except Exception as exc:  # noqa: BLE001 - one broken run must not hide the others' figures
                    run.problems.append(f"raised {type(exc).__name__}: {exc}")
                    progress(f"{run.label} raised {exc!r}; worker logs:\n{fleet.log_text()[-4000:]}")
                progress(f"{run.label}: bill {usd(run.bill)}, recorded {usd(run.recorded)}, {run.wall_s:.1f} s")
            on_run(run)
            results.append(run)
        codes = fleet.stop()
    if any(code != 0 for code in codes):
        for run in results:
            run.problems.append(f"worker exit codes {codes}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--duplicates", type=float, default=0.3, help="share of rows that copy an earlier row")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-window", type=float, default=60.0, help="the simulator's compressed 24 h, seconds")
    defaults = AutoLane()
    parser.add_argument("--auto-deadline", type=float, default=defaults.deadline_s, help="auto: seconds after submit")
    parser.add_argument("--auto-window", type=float, default=defaults.window_s, help="auto: the lane's batch window")
    parser.add_argument("--auto-margin", type=float, default=defaults.margin_s, help="auto: the lane's margin")
    parser.add_argument(
        "--auto-queue-share",
        type=float,
        default=defaults.queue_share,
        help="auto: the lane's batch queue, as a share of the job's distinct prompt tokens",
    )
    parser.add_argument(
        "--auto-batch-seconds", type=float, default=defaults.batch_duration_s, help="auto: how long a batch runs"
    )
    parser.add_argument("--only", action="append", choices=["batch", "batch + dedupe", "auto"])
    parser.add_argument("--dsn", default=os.environ.get("BATCHDB_TEST_DSN", DEFAULT_ADMIN_DSN))
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally blocks stop workers and drop the database.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with scratch_database(args.dsn, "cost", keep=args.keep_db) as dsn:
        environment = environment_line(dsn)
        load = background_load(dsn)
        runs = run_benchmark(
            dsn,
            args.rows,
            duplicate_share=args.duplicates,
            workers=args.workers,
            concurrency=args.concurrency,
            batch_window_s=args.batch_window,
            auto=AutoLane(
                args.auto_deadline, args.auto_window, args.auto_margin, args.auto_queue_share, args.auto_batch_seconds
            ),
            only=args.only,
        )
    rows, missed = verdicts(runs)
    print_table(
        f"Cost: {args.rows:,} rows, {args.duplicates:.0%} exact duplicates, {MODEL} on the simulator, "
        f"{args.workers} workers x {args.concurrency}",
        HEADERS,
        rows,
        notes=[
            "simulator's bill: its own counters (accepted online calls, succeeded batch lines) priced from "
            "batchdb/price_list.json; recorded: the job's cost_usd + wasted_usd; % of online: of the bills. "
            "Wall time: submit() until the job is finished, workers already running.",
            *(f"{run.label}: {run.note}" for run in runs if run.note),
            f"Environment: {environment}",
            f"Background before the run: {load}",
        ],
    )
    for line in missed:
        print(f"MISS {line}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
