"""Rate-limit benchmark: N processes sharing one provider key, through batchdb's ledger or on their own.

    .venv/bin/python -m bench.ratelimit [--seconds 300] [--workers 1,4,8] [--baseline-workers 4]

One provider simulator (`batchdb.simulator`) with the key's limits (default 3,000 RPM /
300,000 TPM), latency uniform in 0.2-2 s and lognormal answer lengths serves every run;
it is reset (fresh counters, full buckets, same random streams) right before each run
starts its processes, so its second 0 is the run's start.

- batchdb: a fresh database, the same limits set in the ledger
  (`batchdb.ledger.set_limits`), enough rows submitted that the run never drains,
  then N `python -m batchdb.workers` processes for `--seconds`, then SIGTERM.
- baseline: N processes of the plain client at the end of this file. Each paces its
  calls with its own in-process token bucket (requests and tokens), as single-process
  tools do, and retries a 429 after its retry-after. "naive": every process is
  configured with the key's full limits (they do not know about each other); "static
  split": each gets limits / N.

Everything is measured on the simulator's side, from its per-second series for the
benchmark's key and model: share of the binding limit used in steady state (seconds
`--warmup` to end - 5), 429s as a share of all provider requests, time until the
trailing 5-s average first reaches 90% of the limit, provider requests per finished
row, and whether any 60-s window went over a limit. Worker CPU comes from the kernel
(RUSAGE_CHILDREN across the run), peak RSS from psutil polled every 0.25 s.

This file is also the baseline client (`python -m bench.ratelimit client ...`). The
client must carry only what a plain client carries (openai and a tokenizer), so its
RSS compares fairly with a worker's: that is why the orchestration's imports (numpy,
pyarrow, psycopg, batchdb) are made inside the functions that use them.
"""

from __future__ import annotations

if not __package__:  # run as a file: bench/ on sys.path would shadow the standard library's `queue`
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from batchdb.simulator.process import SimulatorProcess

API_KEY = "sk-bench"
PROMPT = (
    "Summarise this news item about {ticker} in two sentences, then label its sentiment as positive, "
    "negative or neutral.\n\nHeadline: {headline}\n\n{body}"
)
TARGET_UTILISATION = 0.97
TARGET_429_SHARE = 0.005
TARGET_RAMP_SECONDS = 10.0
TARGET_ATTEMPTS_PER_ROW = 1.01
RAMP_FRACTION = 0.90
RAMP_WINDOW = 5  # seconds averaged for the time to 90%
TAIL = 5  # seconds before SIGTERM left out of steady state
SAMPLE_INTERVAL = 0.25
SHUTDOWN_TIMEOUT = 90.0


# -- the scenario ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    rpm: int
    tpm: int
    max_tokens: int
    latency: tuple[float, float]
    seconds: float
    warmup: float
    mean_prompt_tokens: float
    in_flight_factor: float

    @property
    def mean_charge(self) -> float:
        """Tokens the provider counts per call on arrival: prompt + max_tokens (OpenAI)."""
        return self.mean_prompt_tokens + self.max_tokens

    @property
    def binding(self) -> str:
        return "TPM" if self.tpm / self.mean_charge < self.rpm else "RPM"

    @property
    def calls_per_second(self) -> float:
        return min(self.rpm / 60, self.tpm / 60 / self.mean_charge)

    def in_flight(self, processes: int) -> int:
        """Calls each process may have going: `in_flight_factor` x (limit's calls/s x mean latency), split."""
        total = self.in_flight_factor * self.calls_per_second * sum(self.latency) / 2
        return max(2, math.ceil(total / processes))

    def rows_needed(self, margin: float) -> int:
        return math.ceil(self.calls_per_second * (self.seconds + 30) * margin)


# -- data --------------------------------------------------------------------------------------


def articles_table(rows: int, *, seed: int = 11) -> pa.Table:
    """`headlines_table` plus a `body` of 4-20 other headlines: prompts of about 100-400 tokens."""
    import numpy as np
    import pyarrow as pa

    from bench._common import headlines_table

    table = headlines_table(rows, seed=seed)
    headlines = np.array(table.column("headline").to_pylist(), dtype=object)
    rng = np.random.default_rng(seed + 1)
    sizes = rng.integers(4, 21, size=rows)
    bodies = [" ".join(headlines[rng.integers(0, rows, size=k)]) for k in sizes]
    return table.append_column("body", pa.array(bodies, pa.string()))


def requests_of(table: pa.Table, max_tokens: int) -> Iterator[list[dict[str, Any]]]:
    """Each row's chat messages, rendered by batchdb's own prompt code, as a worker renders them."""
    from batchdb.prompts import build_request

    params = {"prompt": PROMPT, "max_tokens": max_tokens}
    for row in table.select(["ticker", "headline", "body"]).to_pylist():
        yield build_request(model="m", params=params, payload=None, input=row).messages


def prompt_token_stats(table: pa.Table, max_tokens: int, sample: int = 2000) -> dict[str, float]:
    """Prompt tokens by batchdb's counter (what workers reserve and the simulator charges), on a sample.

    Also checks that the baseline client's own count (`count_prompt_tokens`) agrees on every sampled row.
    """
    from batchdb.tokens import count_openai_messages, encoding

    counts = []
    for messages in requests_of(table.slice(0, sample), max_tokens):
        n = count_openai_messages(messages)[0]
        if count_prompt_tokens(encoding(), messages) != n:
            raise SystemExit("the baseline client's prompt token count disagrees with batchdb.tokens")
        counts.append(n)
    counts.sort()
    return {
        "mean": sum(counts) / len(counts),
        "min": counts[0],
        "max": counts[-1],
        "p5": counts[len(counts) // 20],
        "p95": counts[len(counts) * 19 // 20],
    }


# -- running a group of processes --------------------------------------------------------------


@dataclass
class Usage:
    processes: int
    cpu_seconds: float  # all of the group's processes, user + system, from the kernel
    peak_rss: list[int]  # per process, bytes (psutil, polled)
    shutdown_seconds: float  # SIGTERM -> every process exited
    machine_busy_pct: float
    logs: list[str]


def run_group(
    commands: Sequence[list[str]],
    env: dict[str, str],
    seconds: float,
    workdir: Path,
    on_sample: Callable[[float], None] | None = None,
) -> Usage:
    """Start the processes, poll their RSS, SIGTERM them after `seconds`, wait for them to exit.

    `on_sample(seconds since start)` is called at every poll until SIGTERM.

    CPU is RUSAGE_CHILDREN over the group's lifetime: only these processes are reaped in
    between (the simulator, also a child, keeps running), so it is exactly their CPU,
    including start-up and shutdown.
    """
    import psutil

    from bench._common import REPO

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    psutil.cpu_percent(interval=None)
    logs = [workdir / f"process-{i}.log" for i in range(len(commands))]
    procs: list[subprocess.Popen[bytes]] = []
    peaks = [0] * len(commands)
    try:
        for cmd, log in zip(commands, logs, strict=True):
            with log.open("wb") as handle:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT))
        handles = [psutil.Process(p.pid) for p in procs]
        started = time.monotonic()
        deadline = started + seconds
        stop_at: float | None = None
        while any(p.poll() is None for p in procs):
            for i, h in enumerate(handles):
                try:
                    peaks[i] = max(peaks[i], h.memory_info().rss)
                except psutil.Error:
                    pass
            if stop_at is None and on_sample is not None:
                on_sample(time.monotonic() - started)
            if stop_at is None and time.monotonic() >= deadline:
                stop_at = time.monotonic()
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            if stop_at is not None and time.monotonic() - stop_at > SHUTDOWN_TIMEOUT:
                raise SystemExit(f"processes did not exit within {SHUTDOWN_TIMEOUT:.0f} s of SIGTERM")
            time.sleep(SAMPLE_INTERVAL if stop_at is None else 0.05)
        shutdown = time.monotonic() - stop_at if stop_at is not None else 0.0
        if stop_at is None:
            first = next(i for i, p in enumerate(procs) if p.returncode is not None)
            raise SystemExit(f"{procs[first].args} exited before the run's end:\n" + logs[first].read_text()[-2000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    busy = psutil.cpu_percent(interval=None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    texts = [log.read_text(errors="replace") for log in logs]
    for p, text in zip(procs, texts, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"process {p.args} exited with {p.returncode}:\n{text[-3000:]}")
    return Usage(len(procs), cpu, peaks, shutdown, busy, texts)


# -- what the simulator saw --------------------------------------------------------------------


@dataclass
class Figures:
    label: str
    processes: int
    in_flight: int
    rows_done: int
    requests: int  # every provider request, 429s included
    rate_limited: int
    utilisation_requests: float  # steady state, share of RPM
    utilisation_tokens: float  # steady state, share of TPM
    ramp_seconds: float | None  # None: never reached 90%
    late_use: float | None  # binding-limit use from second 60 to end - 5 (None for short runs)
    first_call: int | None  # first second with a call admitted by the simulator
    max_window_requests: int
    max_window_tokens: int
    usage: Usage
    notes: list[str] = field(default_factory=list)


def series_of(stats: dict[str, Any], model: str) -> dict[str, list[int]]:
    """Per-second counters for the benchmark's key and model, indexed by second (missing seconds are 0)."""
    rows = [r for r in stats["series"] if r["key"] == API_KEY and r["model"] == model]
    length = max([r["t"] for r in rows] + [int(stats["second"])]) + 1
    columns = {name: [0] * length for name in ("requests", "admitted", "rate_limited", "charged_tokens")}
    for r in rows:
        if r["t"] >= 0:
            for name, values in columns.items():
                values[r["t"]] += r[name]
    return columns


def measure(
    label: str,
    processes: int,
    in_flight: int,
    stats: dict[str, Any],
    scenario: Scenario,
    rows_done: int,
    usage: Usage,
    model: str,
) -> Figures:
    s = series_of(stats, model)
    lo, hi = int(scenario.warmup), int(scenario.seconds) - TAIL
    span = hi - lo
    util_req = sum(s["admitted"][lo:hi]) / (span * scenario.rpm / 60)
    util_tok = sum(s["charged_tokens"][lo:hi]) / (span * scenario.tpm / 60)
    binding, per_second = (
        (s["charged_tokens"], scenario.tpm / 60) if scenario.binding == "TPM" else (s["admitted"], scenario.rpm / 60)
    )
    ramp = None
    for t in range(len(binding)):
        window = binding[max(0, t - RAMP_WINDOW + 1) : t + 1]
        if sum(window) / RAMP_WINDOW >= RAMP_FRACTION * per_second:
            ramp = float(t + 1)
            break
    late = sum(binding[60:hi]) / ((hi - 60) * per_second) if hi - 60 >= 30 else None
    first_call = next((t for t, n in enumerate(s["admitted"]) if n), None)
    windows = range(max(1, len(binding) - 59))
    max_req = max(sum(s["admitted"][t : t + 60]) for t in windows)
    max_tok = max(sum(s["charged_tokens"][t : t + 60]) for t in windows)
    return Figures(
        label,
        processes,
        in_flight,
        rows_done,
        sum(s["requests"]),
        sum(s["rate_limited"]),
        util_req,
        util_tok,
        ramp,
        late,
        first_call,
        max_req,
        max_tok,
        usage,
    )


# -- batchdb -----------------------------------------------------------------------------------


class LedgerProbe:
    """The lane's row in batchdb.rate_limits, read at every poll of a run: its pace and first grant."""

    def __init__(self, dsn: str, model: str) -> None:
        import psycopg

        self._conn = psycopg.connect(dsn, autocommit=True)
        self._model = model
        self.samples: list[tuple[float, float, int]] = []  # (seconds since start, pace, requests granted)

    def __call__(self, t: float) -> None:
        pace, granted = self._conn.execute(
            "SELECT pace, requests_granted FROM batchdb.rate_limits WHERE provider = 'openai' AND model = %s",
            [self._model],
        ).fetchone()
        self.samples.append((t, pace, granted))

    def close(self) -> None:
        self._conn.close()

    def summary(self) -> str:
        if not self.samples:
            return "ledger not sampled"
        low = min(self.samples, key=lambda x: x[1])
        slowed = sum(b[0] - a[0] for a, b in zip(self.samples, self.samples[1:], strict=False) if a[1] < 0.99)
        first = next((t for t, _, granted in self.samples if granted), None)
        return (
            f"ledger pace (sampled every {SAMPLE_INTERVAL:g} s): lowest {low[1]:.2f} at {low[0]:.0f} s, below "
            f"0.99 for {slowed:.0f} s in all; first grant seen at {'-' if first is None else f'{first:.1f}'} s"
        )


def run_batchdb(
    admin_dsn: str,
    sim: SimulatorProcess,
    scenario: Scenario,
    table: pa.Table,
    processes: int,
    model: str,
    workdir: Path,
) -> Figures:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    import batchdb
    from batchdb import ledger
    from bench._common import REPO, progress, scratch_database

    in_flight = scenario.in_flight(processes)
    with scratch_database(admin_dsn, "ratelimit") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ledger.set_limits(conn, ledger.Lane("openai", "default", model), rpm=scenario.rpm, tpm=scenario.tpm)
            # Count the ledger's calls and their server time in pg_stat_user_functions (this database only).
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET track_functions = 'pl'").format(
                    sql.Identifier(conninfo_to_dict(dsn)["dbname"])
                )
            )
        job = batchdb.submit(
            table, prompt=PROMPT, model=model, provider="openai", max_tokens=scenario.max_tokens, dsn=dsn
        )
        progress(
            f"batchdb: {table.num_rows:,} rows queued as job {job.id}; {processes} worker(s) x "
            f"{in_flight} in flight for {scenario.seconds:.0f} s"
        )
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "BATCHDB_DSN": dsn,
            "OPENAI_BASE_URL": sim.openai_base_url,
            "OPENAI_API_KEY": API_KEY,
        }
        cmd = [sys.executable, "-m", "batchdb.workers", "--concurrency", str(in_flight)]
        probe = LedgerProbe(dsn, model)
        try:
            sim.reset()
            usage = run_group([cmd] * processes, env, scenario.seconds, workdir, on_sample=probe)
        finally:
            probe.close()
        stats = sim.stats()
        with psycopg.connect(dsn, autocommit=True) as conn:
            done, retried, multi = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'queued' "
                "AND attempts > 0), count(*) FILTER (WHERE status = 'succeeded' AND attempts > 1) "
                "FROM batchdb.requests WHERE job_id = %s",
                [job.id],
            ).fetchone()
            lane = conn.execute(
                "SELECT pace, rate_limited, requests_granted, tokens_granted FROM batchdb.rate_limits "
                "WHERE provider = 'openai' AND model = %s",
                [model],
            ).fetchone()
            calls = conn.execute(
                "SELECT funcname, calls, total_time FROM pg_stat_user_functions "
                "WHERE schemaname = 'batchdb' AND funcname IN ('reserve_capacity', "
                "'record_rate_limited') ORDER BY funcname"
            ).fetchall()
            per_worker = [n for (n,) in conn.execute("SELECT n_completed FROM batchdb.workers ORDER BY id")]
    figures = measure("batchdb ledger", processes, in_flight, stats, scenario, done, usage, model)
    ledger_calls = (
        "; ".join(
            f"{name}: {n:,} calls ({n / scenario.seconds:.0f}/s), {t / max(n, 1):.2f} ms each in the server"
            for name, n, t in calls
        )
        or "no ledger function statistics"
    )
    figures.notes.append(
        f"batchdb x{processes}: rows succeeded {done:,} ({multi:,} of them after more than one attempt, {retried:,} "
        f"waiting to retry at the end); per worker {per_worker}; ledger at the end: pace {lane[0]:.2f}, 429s "
        f"recorded {lane[1]:,}, requests granted {lane[2]:,} ({lane[3]:,} tokens); {probe.summary()}; first call "
        f"at the simulator in second {figures.first_call}; {ledger_calls}; {late_note(figures, scenario)}; "
        f"shutdown {usage.shutdown_seconds:.1f} s after SIGTERM"
    )
    progress(f"batchdb x{processes}: {summary_line(figures, scenario)}")
    return figures


# -- baseline: plain clients, one token bucket each --------------------------------------------


def write_rows(path: Path, table: pa.Table, max_tokens: int) -> None:
    with path.open("w") as out:
        for messages in requests_of(table, max_tokens):
            out.write(json.dumps(messages) + "\n")


def run_baseline(
    sim: SimulatorProcess,
    scenario: Scenario,
    rows_file: Path,
    processes: int,
    variant: str,
    burst_seconds: float,
    model: str,
    workdir: Path,
) -> Figures:
    from bench._common import REPO, progress

    in_flight = scenario.in_flight(processes)
    share = 1 if variant == "naive" else processes
    rpm, tpm = scenario.rpm / share, scenario.tpm / share
    label = (
        "baseline: naive (full limits per process)"
        if variant == "naive"
        else "baseline: static split (limits / N per process)"
    )
    progress(
        f"{label}: {processes} process(es) x {in_flight} in flight, each {rpm:,.0f} RPM / {tpm:,.0f} TPM, "
        f"bucket of {burst_seconds:g} s, for {scenario.seconds:.0f} s"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": API_KEY}
    summaries = [workdir / f"{variant}-{processes}-{i}.json" for i in range(processes)]
    commands = [
        [
            sys.executable,
            "-m",
            "bench.ratelimit",
            "client",
            "--rows-file",
            str(rows_file),
            "--slice",
            f"{i}/{processes}",
            "--rpm",
            str(rpm),
            "--tpm",
            str(tpm),
            "--burst-seconds",
            str(burst_seconds),
            "--concurrency",
            str(in_flight),
            "--max-tokens",
            str(scenario.max_tokens),
            "--model",
            model,
            "--summary",
            str(summaries[i]),
        ]
        for i in range(processes)
    ]
    sim.reset()
    usage = run_group(commands, env, scenario.seconds, workdir)
    stats = sim.stats()
    clients = [json.loads(p.read_text()) for p in summaries]
    done = sum(c["rows_done"] for c in clients)
    figures = measure(label, processes, in_flight, stats, scenario, done, usage, model)
    figures.notes.append(
        f"{label} x{processes}: rows done per process {[c['rows_done'] for c in clients]}, 429s seen per process "
        f"{[c['rate_limited'] for c in clients]}, other errors {sum(c['errors'] for c in clients)}; "
        f"{late_note(figures, scenario)}; shutdown {usage.shutdown_seconds:.1f} s after SIGTERM"
    )
    progress(f"{label} x{processes}: {summary_line(figures, scenario)}")
    return figures


# -- report ------------------------------------------------------------------------------------


def late_note(f: Figures, scenario: Scenario) -> str:
    if f.late_use is None:
        return "run too short for a second-60-onwards figure"
    return f"{scenario.binding} use from second 60 to {scenario.seconds - TAIL:.0f}: {f.late_use:.1%}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def binding_use(f: Figures, scenario: Scenario) -> float:
    return f.utilisation_tokens if scenario.binding == "TPM" else f.utilisation_requests


def summary_line(f: Figures, scenario: Scenario) -> str:
    ramp = "never" if f.ramp_seconds is None else f"{f.ramp_seconds:.0f} s"
    return (
        f"{scenario.binding} use {binding_use(f, scenario):.1%}, 429s {f.rate_limited:,}/{f.requests:,}, "
        f"90% after {ramp}, {f.requests / max(f.rows_done, 1):.3f} attempts/row, CPU {f.usage.cpu_seconds:.0f} s"
    )


def table_rows(figures: list[Figures], scenario: Scenario) -> list[list[str]]:
    rows = []
    for f in figures:
        use = binding_use(f, scenario)
        share = f.rate_limited / max(f.requests, 1)
        attempts = f.requests / max(f.rows_done, 1)
        ramp = f.ramp_seconds
        other = f"RPM {f.utilisation_requests:.1%}" if scenario.binding == "TPM" else f"TPM {f.utilisation_tokens:.1%}"
        over = f.max_window_requests > scenario.rpm or f.max_window_tokens > scenario.tpm
        rss = max(f.usage.peak_rss) / 2**20
        rows.append(
            [
                f.label,
                f"{f.processes} x {f.in_flight}",
                f"{use:.1%} {verdict(use >= TARGET_UTILISATION)} ({other})",
                f"{share:.2%} {verdict(share <= TARGET_429_SHARE)} ({f.rate_limited:,} of {f.requests:,})",
                "never MISS" if ramp is None else f"{ramp:.0f} s {verdict(ramp <= TARGET_RAMP_SECONDS)}",
                f"{attempts:.3f} {verdict(attempts <= TARGET_ATTEMPTS_PER_ROW)} ({f.rows_done:,} rows)",
                f"{f.usage.cpu_seconds:.1f} s ({1000 * f.usage.cpu_seconds / max(f.rows_done, 1):.1f} ms/row)",
                f"{rss:.0f} MiB (all {sum(f.usage.peak_rss) / 2**20:,.0f})",
                f"{f.max_window_requests / scenario.rpm:.1%} / {f.max_window_tokens / scenario.tpm:.1%}"
                + (" OVER" if over else ""),
            ]
        )
    return rows


def misses(figures: list[Figures], scenario: Scenario, batchdb_runs: int) -> list[str]:
    """Every target batchdb's runs missed and every run over a limit; the baselines may miss
    the targets (that is what they are there to show) but never go over the provider's limits."""
    found = []
    for i, f in enumerate(figures):
        if f.max_window_requests > scenario.rpm or f.max_window_tokens > scenario.tpm:
            found.append(f"{f.label}: a 60-s window OVER the limits")
        if i >= batchdb_runs:
            continue
        use, share = binding_use(f, scenario), f.rate_limited / max(f.requests, 1)
        attempts = f.requests / max(f.rows_done, 1)
        checks = [
            (use >= TARGET_UTILISATION, f"{scenario.binding} use {use:.1%}"),
            (share <= TARGET_429_SHARE, f"429s {share:.2%}"),
            (f.ramp_seconds is not None and f.ramp_seconds <= TARGET_RAMP_SECONDS, f"time to 90% {f.ramp_seconds}"),
            (attempts <= TARGET_ATTEMPTS_PER_ROW, f"attempts/row {attempts:.3f}"),
        ]
        found += [f"{f.label}: MISS {what}" for ok, what in checks if not ok]
    return found


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when a batchdb run misses a target or any run goes over a limit (as bench.drills)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        client_main(argv[1:])
        return 0
    from batchdb.simulator.config import Distribution, Limits, SimulatorConfig
    from batchdb.simulator.process import start_simulator
    from bench._common import (
        DEFAULT_ADMIN_DSN,
        MODEL,
        background_load,
        environment_line,
        print_table,
        progress,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn",
        default=DEFAULT_ADMIN_DSN,
        help="admin DSN; scratch databases are created on that server and dropped afterwards",
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="length of each run")
    parser.add_argument("--workers", default="1,4,8", help="batchdb worker process counts")
    parser.add_argument("--baseline-workers", default="4", help="process counts for the baseline clients ('' for none)")
    parser.add_argument("--baselines", default="naive,split", help="baseline variants: naive, split")
    parser.add_argument("--rpm", type=int, default=3000)
    parser.add_argument("--tpm", type=int, default=300_000)
    parser.add_argument("--max-tokens", type=int, default=200, help="max_tokens of every request")
    parser.add_argument("--latency", default="0.2,2.0", help="simulator latency, uniform LOW,HIGH seconds")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds left out of steady state")
    parser.add_argument(
        "--in-flight-factor",
        type=float,
        default=3.0,
        help="calls in flight over all processes = factor x limit's calls/s x mean latency",
    )
    parser.add_argument(
        "--baseline-burst-seconds",
        type=float,
        default=1.0,
        help="capacity of each baseline client's bucket, in seconds of its rate",
    )
    args = parser.parse_args(argv)
    if args.seconds < args.warmup + TAIL + 10:
        parser.error(f"--seconds must be at least --warmup + {TAIL + 10}")
    workers = [int(n) for n in args.workers.split(",") if n]
    baseline_workers = [int(n) for n in args.baseline_workers.split(",") if n]
    variants = [v for v in args.baselines.split(",") if v]
    if set(variants) - {"naive", "split"}:
        parser.error("--baselines takes naive and/or split")
    low, high = (float(x) for x in args.latency.split(","))

    env_line = environment_line(args.dsn)
    before = background_load(args.dsn)
    started = time.perf_counter()
    probe = articles_table(2000)
    tokens = prompt_token_stats(probe, args.max_tokens)
    scenario = Scenario(
        args.rpm,
        args.tpm,
        args.max_tokens,
        (low, high),
        args.seconds,
        args.warmup,
        tokens["mean"],
        args.in_flight_factor,
    )
    rows = scenario.rows_needed(margin=2.0)
    progress(
        f"prompts: {tokens['mean']:.0f} tokens on average (p5 {tokens['p5']}, p95 {tokens['p95']}); "
        f"{scenario.mean_charge:.0f} charged per call with max_tokens {args.max_tokens}: {scenario.binding} "
        f"binds at {scenario.calls_per_second:.1f} calls/s; generating {rows:,} rows"
    )
    table = articles_table(rows)
    config = SimulatorConfig(
        seed=1,
        default_limits=Limits(rpm=args.rpm, tpm=args.tpm),
        api_keys=(API_KEY,),
        latency_s=Distribution(kind="uniform", low=low, high=high),
    )
    figures: list[Figures] = []
    with start_simulator(config) as sim, tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as tmp:
        workdir = Path(tmp)
        for n in workers:
            figures.append(run_batchdb(args.dsn, sim, scenario, table, n, MODEL, workdir))
        if baseline_workers and variants:
            rows_file = workdir / "rows.jsonl"
            write_rows(rows_file, table, args.max_tokens)
            for n in baseline_workers:
                for variant in variants:
                    figures.append(
                        run_baseline(sim, scenario, rows_file, n, variant, args.baseline_burst_seconds, MODEL, workdir)
                    )
    total = time.perf_counter() - started
    after = background_load(args.dsn)

    notes = [
        f"Simulator: {args.rpm:,} RPM / {args.tpm:,} TPM for key and model, burst window "
        f"{config.burst_window_s:g} s, 429s count against the bucket; latency uniform {low:g}-{high:g} s; answer "
        f"length lognormal (median {config.output_tokens.median:g} tokens, sigma {config.output_tokens.sigma:g}) "
        f"capped by max_tokens {args.max_tokens}. Prompts: {tokens['mean']:.0f} tokens on average (p5 "
        f"{tokens['p5']}, p95 {tokens['p95']}, {tokens['min']}-{tokens['max']}), so a call is charged "
        f"{scenario.mean_charge:.0f} tokens on arrival and **{scenario.binding} binds** at "
        f"{scenario.calls_per_second:.1f} calls/s. Each run: {args.seconds:.0f} s, steady state = seconds "
        f"{args.warmup:.0f}-{args.seconds - TAIL:.0f}; in flight per process = {args.in_flight_factor:g} x calls/s x "
        f"mean latency / N. Baseline buckets hold {args.baseline_burst_seconds:g} s of their rate.",
        f"Targets: binding-limit use >= {TARGET_UTILISATION:.0%}, 429s <= {TARGET_429_SHARE:.1%} of requests, "
        f"time to {RAMP_FRACTION:.0%} <= {TARGET_RAMP_SECONDS:.0f} s (trailing {RAMP_WINDOW}-s average, counted from "
        f"the processes' start, so {RAMP_WINDOW - 1} s is the floor), attempts per row <= "
        f"{TARGET_ATTEMPTS_PER_ROW}. Last column: the busiest 60-s window of the simulator's record as a share of "
        f"RPM / TPM (must stay <= 100%).",
        *[note for f in figures for note in f.notes],
        f"Total run time {total / 60:.1f} min. Environment: {env_line}",
        f"Background before the run: {before}. After: {after}.",
    ]
    print_table(
        f"Rate limits: {args.rpm:,} RPM / {args.tpm:,} TPM shared by N processes",
        [
            "client",
            "processes x in flight",
            f"{scenario.binding} used, steady state",
            "429s / requests",
            "time to 90%",
            "attempts / row",
            "CPU (all processes)",
            "peak RSS per process",
            "max 60-s window RPM / TPM",
        ],
        table_rows(figures, scenario),
        notes=notes,
    )
    missed = misses(figures, scenario, batchdb_runs=len(workers))
    for line in missed:
        print(line, file=sys.stderr)
    return 1 if missed else 0


# -- the baseline client (stdlib, openai and the tokenizer only) -------------------------------


def count_prompt_tokens(enc: Any, messages: Sequence[dict[str, Any]]) -> int:
    """OpenAI's published recipe for chat prompts, as a client counts them with its tokenizer."""
    total = 3  # every reply is primed with 3 tokens
    for m in messages:
        total += 3 + len(enc.encode_ordinary(m["role"])) + len(enc.encode_ordinary(m["content"]))
    return total


class TokenBucket:
    """Requests and tokens, refilled continuously at the configured per-minute rates, full at start.

    Capacity is `burst_seconds` of each rate. A call larger than the token bucket goes
    when the bucket is full and leaves it in debt. Callers are served first come, first served.
    """

    def __init__(self, rpm: float, tpm: float, burst_seconds: float) -> None:
        self.request_rate, self.token_rate = rpm / 60, tpm / 60
        self.request_cap = max(1.0, self.request_rate * burst_seconds)
        self.token_cap = self.token_rate * burst_seconds
        self.requests, self.tokens = self.request_cap, self.token_cap
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                elapsed, self.updated = now - self.updated, now
                self.requests = min(self.request_cap, self.requests + elapsed * self.request_rate)
                self.tokens = min(self.token_cap, self.tokens + elapsed * self.token_rate)
                need = min(tokens, self.token_cap)
                if self.requests >= 1 and self.tokens >= need:
                    self.requests -= 1
                    self.tokens -= tokens
                    return
                await asyncio.sleep(
                    max((1 - self.requests) / self.request_rate, (need - self.tokens) / self.token_rate, 0.001)
                )


def retry_after(exc: Any) -> float:
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        if headers.get(name) is not None:
            try:
                return max(0.0, float(headers[name]) * scale)
            except ValueError:
                pass
    return 1.0


async def run_client(args: argparse.Namespace) -> dict[str, int]:
    import bpe_openai
    import openai

    enc = bpe_openai.get_encoding("o200k_base")
    bucket = TokenBucket(args.rpm, args.tpm, args.burst_seconds)
    client = openai.AsyncOpenAI(max_retries=0, timeout=120.0)  # OPENAI_BASE_URL / OPENAI_API_KEY from the env
    index, count = (int(x) for x in args.slice.split("/"))
    counts = {"rows_done": 0, "attempts": 0, "rate_limited": 0, "errors": 0}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def rows() -> Iterator[list[dict[str, Any]]]:
        with open(args.rows_file) as f:
            for i, line in enumerate(f):
                if i % count == index:
                    yield json.loads(line)

    source = rows()

    async def lane() -> None:
        while not stop.is_set():
            messages = next(source, None)
            if messages is None:
                return
            charge = count_prompt_tokens(enc, messages) + args.max_tokens
            while True:
                await bucket.acquire(charge)
                counts["attempts"] += 1
                try:
                    await client.chat.completions.create(
                        model=args.model, messages=messages, max_tokens=args.max_tokens
                    )
                except openai.RateLimitError as exc:
                    counts["rate_limited"] += 1
                    await asyncio.sleep(retry_after(exc))
                    continue
                except openai.APIError:
                    counts["errors"] += 1
                    await asyncio.sleep(1.0)
                    continue
                counts["rows_done"] += 1
                break

    lanes = [asyncio.create_task(lane()) for _ in range(args.concurrency)]
    await stop.wait()
    _, pending = await asyncio.wait(lanes, timeout=30.0)  # let calls in flight finish, as a worker does
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await client.close()
    return counts


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="baseline client: one in-process token bucket per process")
    parser.add_argument("--rows-file", required=True)
    parser.add_argument("--slice", required=True, help="I/N: this process takes rows i, i+N, ...")
    parser.add_argument("--rpm", type=float, required=True)
    parser.add_argument("--tpm", type=float, required=True)
    parser.add_argument("--burst-seconds", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--summary", required=True, help="where to write the counts as JSON")
    args = parser.parse_args(argv)
    counts = asyncio.run(run_client(args))
    Path(args.summary).write_text(json.dumps(counts))


if __name__ == "__main__":
    sys.exit(main())
