"""Fault drills: a real job through real worker processes while something breaks.

    python -m bench.drills [--rows 5000] [--workers 4] [--only NAME] [--admin-dsn DSN]

Each drill submits a job, starts `--workers` worker processes (`python -m batchdb.workers`) against
the provider simulator (lognormal latency, median 0.25 s), injects one fault and checks:

- every row ends final and no row is lost (a succeeded row has exactly one result; the only
  rows allowed to fail are the drill's poison rows);
- no row was completed twice, counted from the writes (bench/write_audit.py: a test-only
  trigger logs every final-state write of a request and every write of a result, which the
  results table's primary key would otherwise fold into one row), and no result was
  overwritten (`results.writes`);
- the job's token and cost totals equal the sum of its rows;
- duplicate provider calls (simulator `accepted` minus rows that succeeded) are at most the
  drill's bound: the rows in flight at the fault.

It prints one table: drill, rows, rows lost, duplicate calls, bound, time to recover (from
the fault's end until throughput is back to >= 80% of the pre-fault rate) and wall time.
`tests/test_drills.py` runs smaller versions of the same drills.

The database-restart drill runs on an embedded PostgreSQL in a temporary BATCHDB_HOME
(`batchdb.embedded`), never on the server named by --admin-dsn; the others use a scratch
database on that server (bench/_common.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psycopg

import batchdb
from batchdb.simulator.config import Distribution, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator
from batchdb.workers.processes import WORKER_COMMAND, WorkerProcesses, start_workers
from bench import write_audit
from bench._common import DEFAULT_ADMIN_DSN, print_table, progress, scratch_database

LATENCY = Distribution(kind="lognormal", median=0.25, sigma=0.5, cap=3.0)
OUTPUT_TOKENS = Distribution(kind="uniform", low=3, high=12)
POISON_CONTEXT_WINDOW = 1_000  # tokens; poison rows' prompts are far longer, the others far shorter
# batchdb.submit's default: the drills run with what users get unless their note says otherwise.
DEFAULT_MAX_ATTEMPTS: int = inspect.signature(batchdb.submit).parameters["max_attempts"].default


def simulator_config(**changes: object) -> SimulatorConfig:
    return SimulatorConfig(seed=1, latency_s=LATENCY, output_tokens=OUTPUT_TOKENS).updated(
        {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in changes.items()}
    )


# -- the job and its invariants ----------------------------------------------------------------------


def submit_rows(
    dsn: str,
    rows: int,
    *,
    poison_every: int = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    webhook_url: str | None = None,
) -> batchdb.Job:
    """`rows` short prompts; with `poison_every`, every n-th row's prompt overflows the context window.
    `max_attempts` is what a user gets without asking unless a drill says otherwise (its note does)."""
    texts = [f"headline number {i}: shares rise after a strong quarter" for i in range(rows)]
    if poison_every:
        for i in range(0, rows, poison_every):
            # ~3,000 tokens > POISON_CONTEXT_WINDOW; each its own request (identical ones are sent once)
            texts[i] = f"very long input {i} " * 1_000
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(rows)], "text": texts})
    return batchdb.submit(
        frame,
        prompt="Sentiment: {text}",
        id_column="key",
        model="gpt-4o-mini",
        provider="openai",
        max_tokens=16,
        max_attempts=max_attempts,
        webhook_url=webhook_url,
        dsn=dsn,
    )


@dataclass
class Check:
    """What the invariants found; `violations` is empty when the drill passed."""

    rows: int
    succeeded: int
    lost: int
    failed: int
    duplicates: int
    violations: list[str] = field(default_factory=list)


def check_invariants(dsn: str, job: batchdb.Job, rows: int, accepted: int, bound: int, *, poison: int = 0) -> Check:
    status = job.status()
    with psycopg.connect(dsn) as conn:
        by_status = dict(
            conn.execute(
                "SELECT status, count(*) FROM batchdb.requests WHERE job_id = %s GROUP BY status", (job.id,)
            ).fetchall()
        )
        audited = write_audit.writes(conn, job.id)
        overwritten = conn.execute(
            "SELECT count(*) FROM batchdb.results WHERE job_id = %s AND writes > 1", (job.id,)
        ).fetchone()[0]
        answered = conn.execute(
            "SELECT count(*) FROM batchdb.requests q WHERE q.job_id = %s AND q.status = 'succeeded' AND "
            "(SELECT count(*) FROM batchdb.results r WHERE r.job_id = q.job_id AND r.request_id = q.id) = 1",
            (job.id,),
        ).fetchone()[0]
        sums = conn.execute(
            "SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0) "
            "FROM batchdb.requests WHERE job_id = %s",
            (job.id,),
        ).fetchone()
        poison_ok = conn.execute(
            "SELECT count(*) FROM batchdb.requests WHERE job_id = %s AND status = 'failed' "
            "AND error_class = 'permanent' AND attempts = 1 AND error ILIKE '%%context%%'",
            (job.id,),
        ).fetchone()[0]
    succeeded = by_status.get("succeeded", 0)
    failed = by_status.get("failed", 0) + by_status.get("dead", 0)
    lost = rows - answered - min(poison, poison_ok)
    check = Check(rows=rows, succeeded=succeeded, lost=lost, failed=failed, duplicates=accepted - succeeded)
    v = check.violations
    if status.status != "completed" or sum(by_status.values()) != rows:
        v.append(f"job {status.status}, rows by status {by_status}")
    if any(s not in ("succeeded", "failed", "dead") for s in by_status):
        v.append(f"rows not final: {by_status}")
    if lost:
        v.append(
            f"{lost} row(s) lost (succeeded with one result: {answered}; poison failed as expected: "
            f"{poison_ok}/{poison}; by status {by_status})"
        )
    v.extend(audited.violations)
    if overwritten:
        v.append(f"{overwritten} result(s) overwritten by a second completion")
    if (status.prompt_tokens, status.completion_tokens, status.cost_usd) != tuple(sums):
        v.append(
            f"job totals {(status.prompt_tokens, status.completion_tokens, status.cost_usd)} "
            f"!= sum of rows {tuple(sums)}"
        )
    if not 0 <= check.duplicates <= bound:
        v.append(f"{check.duplicates} duplicate provider call(s), bound {bound}")
    return check


# -- throughput and recovery ---------------------------------------------------------------------------


class Sampler:
    """Samples the job's finished-row count every 0.25 s (surviving a database restart)."""

    def __init__(self, dsn: str, job_id: int) -> None:
        self.dsn, self.job_id = dsn, job_id
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                n = conn.execute(
                    "SELECT n_succeeded + n_failed + n_dead + n_cancelled FROM batchdb.jobs WHERE id = %s",
                    (self.job_id,),
                ).fetchone()[0]
                self.samples.append((time.monotonic(), n))
            except psycopg.Error:
                conn = None
            self._stop.wait(0.25)
        if conn is not None:
            conn.close()

    def done(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _at(self, t: float) -> int:
        before = [n for (s, n) in self.samples if s <= t]
        return before[-1] if before else 0

    def recovery(self, fault_start: float, fault_end: float, window: float = 2.0) -> str:
        """Seconds from `fault_end` until a `window` of throughput >= 80% of the rate before the fault."""
        pre_from = max(self.samples[0][0] if self.samples else fault_start, fault_start - 5.0)
        if fault_start - pre_from < 1.0:
            return "n/a (no pre-fault rate)"
        pre_rate = (self._at(fault_start) - self._at(pre_from)) / (fault_start - pre_from)
        total = self.done()
        end = self.samples[-1][0]
        t = fault_end
        while t + window <= end:
            rate = (self._at(t + window) - self._at(t)) / window
            if rate >= 0.8 * pre_rate:
                return f"{t - fault_end:.1f}"
            if self._at(t + window) >= total:  # the job ran out of rows inside this window
                break
            t += 0.25
        finished = next((s for (s, n) in self.samples if n >= total), end)
        return f"n/a (job ended {max(0.0, finished - fault_end):.1f} s after)"


def in_flight(dsn: str, job_id: int, owner_pid: int | None = None) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if owner_pid is None:
            return conn.execute(
                "SELECT count(*) FROM batchdb.requests WHERE job_id = %s AND status = 'running'", (job_id,)
            ).fetchone()[0]
        return conn.execute(
            "SELECT count(*) FROM batchdb.requests WHERE job_id = %s AND status = 'running' AND lease_owner LIKE %s",
            (job_id, f"%:{owner_pid}:%"),
        ).fetchone()[0]


# -- the drills ------------------------------------------------------------------------------------------


@dataclass
class DrillResult:
    name: str
    rows: int
    check: Check
    bound: int
    recovery: str
    wall_s: float
    note: str = ""
    # Drill-specific measurements (the outage drill: dead rows, attempts per row ...).
    figures: dict[str, float] = field(default_factory=dict)
    # The clock-skew drill: each worker's measured wall-clock offset, in seconds.
    clock_offsets: list[float | None] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.check.violations

    def cells(self) -> list[object]:
        return [
            self.name,
            f"{self.rows:,}",
            self.check.lost,
            self.check.duplicates,
            self.bound,
            self.recovery,
            f"{self.wall_s:.1f}",
            "ok" if self.ok else "FAILED: " + "; ".join(self.check.violations),
            self.note,
        ]


@dataclass
class Setup:
    dsn: str
    rows: int
    workers: int
    concurrency: int = 16
    # Longer than the database-restart downtime and than the event-loop stalls of workers on a
    # loaded 2-core machine; the SIGKILL drill shortens it so killed workers' rows return quickly.
    lease_seconds: float = 10.0
    outage_s: float = 60.0

    def worker_args(self, *extra: str) -> tuple[str, ...]:
        return (
            "--concurrency",
            str(self.concurrency),
            "--lease-seconds",
            str(self.lease_seconds),
            "--poll-interval",
            "0.5",
            *extra,
        )


@contextlib.contextmanager
def running(
    setup: Setup,
    *,
    sim_config: SimulatorConfig | None = None,
    poison_every: int = 0,
    worker_args: tuple[str, ...] = (),
    python_prefix: tuple[str, ...] = (),
    max_attempts: int = 10,
    command: tuple[str, ...] | None = None,
    log_dir: str | None = None,
) -> Iterator[tuple[batchdb.Job, SimulatorProcess, WorkerProcesses, Sampler]]:
    """A submitted job, the simulator, the workers and a throughput sampler; all stopped on exit.

    The workers run `python -m batchdb.workers`, or `python *python_prefix`, or `command` when given; each
    keeps its log (worker-<i>.log) in `log_dir`, else in DRILLS_WORKER_LOGS when set, for post-mortems.
    """
    write_audit.install(setup.dsn)  # before any worker writes: completions are counted from the writes
    job = submit_rows(setup.dsn, setup.rows, poison_every=poison_every, max_attempts=max_attempts)
    command = command or ((sys.executable, *python_prefix) if python_prefix else WORKER_COMMAND)
    with start_simulator(sim_config or simulator_config()) as sim:
        workers = start_workers(
            setup.workers,
            setup.dsn,
            args=worker_args or setup.worker_args(),
            command=command,
            env={"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": "sk-test"},
            log_dir=log_dir or os.environ.get("DRILLS_WORKER_LOGS"),
            append_logs=True,
            grace=40,
        )
        sampler = Sampler(setup.dsn, job.id)
        try:
            yield job, sim, workers, sampler
        finally:
            sampler.stop()
            workers.stop()


def _finish(
    name: str,
    setup: Setup,
    job: batchdb.Job,
    sim: SimulatorProcess,
    bound: int,
    recovery: str,
    began: float,
    *,
    poison: int = 0,
    note: str = "",
    timeout: float = 300,
) -> DrillResult:
    final = job.wait(timeout=timeout)
    wall = time.monotonic() - began
    accepted = sim.stats(series=False)["totals"]["accepted"]
    check = check_invariants(setup.dsn, job, setup.rows, accepted, bound, poison=poison)
    if final.status != "completed":
        check.violations.append(f"job.wait() returned {final.status}")
    return DrillResult(name, setup.rows, check, bound, recovery, wall, f"{note}; {_attempts_setting(setup.dsn, job)}")


def _attempts_setting(dsn: str, job: batchdb.Job) -> str:
    """Every drill row states the max_attempts it ran with, and whether that is the default."""
    with psycopg.connect(dsn) as conn:
        n = conn.execute("SELECT max_attempts FROM batchdb.jobs WHERE id = %s", (job.id,)).fetchone()[0]
    return f"max_attempts {n}" + (
        " (the default)" if n == DEFAULT_MAX_ATTEMPTS else f" (default {DEFAULT_MAX_ATTEMPTS})"
    )


def drill_sigkill(
    setup: Setup, *, every_s: float = 3.0, lease_s: float = 5.0, max_kills: int | None = None
) -> DrillResult:
    """SIGKILL a random worker every `every_s` seconds until 70% of rows are done (or `max_kills`
    kills: on a busy machine a replacement may not finish starting before the next kill, and the
    drill's work must not grow with the machine's slowness); start a replacement each time."""
    began = time.monotonic()
    setup = dataclasses.replace(setup, lease_seconds=lease_s)
    with running(setup) as (job, sim, workers, sampler):
        sampler.wait_for(setup.rows // 10)
        fault_start = time.monotonic()
        bound = kills = 0
        while sampler.done() < setup.rows * 0.7 and (max_kills is None or kills < max_kills):
            time.sleep(every_s)
            victim = workers.kill()
            bound += in_flight(setup.dsn, job.id, victim.pid)
            kills += 1
            workers.start()
        fault_end = time.monotonic()
        job.wait(timeout=300)
        recovery = sampler.recovery(fault_start, fault_end)
        return _finish(
            "sigkill a random worker",
            setup,
            job,
            sim,
            bound,
            recovery,
            began,
            note=f"{kills} kills every {every_s:.0f} s, lease {setup.lease_seconds:.0f} s",
        )


def _restart_embedded(down_s: float) -> tuple[int, int]:
    """Stop the embedded server (fast shutdown), wait `down_s`, start it again on the same port."""
    from batchdb import embedded

    home = embedded.batchdb_home()
    before = embedded.server_status()
    assert before is not None
    state = (home / "server.json").read_text()
    embedded.stop_server()
    time.sleep(down_s)
    # stop_server() deletes server.json, and _start() only reuses the port recorded there: put the
    # record back so the server comes back on the port every worker's DSN names.
    (home / "server.json").write_text(state)
    after = embedded.ensure_server()
    return before.port, after.port


@contextlib.contextmanager
def embedded_database() -> Iterator[str]:
    """An embedded PostgreSQL in a temporary BATCHDB_HOME, migrated; stopped and deleted on exit."""
    from batchdb import embedded, migrations

    home = Path(tempfile.mkdtemp(prefix="batchdb-drill-"))
    os.chmod(home, 0o755)
    saved = os.environ.get("BATCHDB_HOME")
    os.environ["BATCHDB_HOME"] = str(home)
    try:
        server = embedded.ensure_server()
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            migrations.upgrade(conn)
        yield server.dsn
    finally:
        try:
            embedded.stop_server()
        finally:
            if saved is None:
                os.environ.pop("BATCHDB_HOME", None)
            else:
                os.environ["BATCHDB_HOME"] = saved
            subprocess.run(["rm", "-rf", str(home)], check=False)


def drill_db_restart(setup: Setup, *, down_s: float = 3.0) -> DrillResult:
    """Stop the (embedded) PostgreSQL mid-job for `down_s` seconds and start it again; job.wait() runs throughout."""
    began = time.monotonic()
    with running(setup) as (job, sim, workers, sampler):
        waited: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: waited.update(final=job.wait(timeout=300)), daemon=True)
        waiter.start()
        sampler.wait_for(setup.rows // 3)
        bound = in_flight(setup.dsn, job.id)
        fault_start = time.monotonic()
        port_before, port_after = _restart_embedded(down_s)
        fault_end = time.monotonic()
        waiter.join(timeout=300)
        recovery = sampler.recovery(fault_start, fault_end)
        result = _finish(
            "database restart",
            setup,
            job,
            sim,
            bound,
            recovery,
            began,
            note=f"down {fault_end - fault_start:.1f} s (stop_server + ensure_server)",
        )
        final = waited.get("final")
        if port_after != port_before:
            result.check.violations.append(f"server came back on port {port_after}, not {port_before}")
        if final is None or getattr(final, "status", None) != "completed":
            result.check.violations.append(f"job.wait() across the restart returned {final!r}")
        exited = [p.returncode for p in workers.processes if p.poll() is not None]
        if exited:
            result.check.violations.append(f"{len(exited)} worker(s) exited during the job: {exited}")
        return result


def _simulator_fault(
    name: str,
    setup: Setup,
    fault: dict[str, object],
    heal: dict[str, object],
    fault_s: float,
    *,
    sim_config: SimulatorConfig | None = None,
    worker_args: tuple[str, ...] = (),
    bound_includes_accepted: bool = False,
    settle_s: float = 0.0,
    note: str = "",
) -> DrillResult:
    """Apply `fault` to the simulator at 1/4 of the job for `fault_s` seconds, then `heal`."""
    began = time.monotonic()
    with running(setup, sim_config=sim_config, worker_args=worker_args, max_attempts=20) as (
        job,
        sim,
        _workers,
        sampler,
    ):
        sampler.wait_for(setup.rows // 4)
        bound = in_flight(setup.dsn, job.id)
        accepted_before = sim.stats(series=False)["totals"]["accepted"]
        fault_start = time.monotonic()
        sim.set_config(fault)
        time.sleep(fault_s)
        sim.set_config(heal)
        fault_end = time.monotonic()
        if bound_includes_accepted:
            # Every call started during the fault may time out; the simulator counts a call as
            # accepted when it answers, up to `settle_s` after the fault.
            time.sleep(settle_s)
            bound += sim.stats(series=False)["totals"]["accepted"] - accepted_before
        job.wait(timeout=600)
        recovery = sampler.recovery(fault_start, fault_end)
        outcomes = sim.stats(series=False)["outcomes"]
        seen = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()) if k != "accepted")
        return _finish(name, setup, job, sim, bound, recovery, began, note=f"{note}; simulator: {seen}", timeout=600)


# Nothing listens here: the job's webhook deliveries are written (and counted), never received.
UNHEARD_WEBHOOK = "http://127.0.0.1:9/batchdb-drill"


def drill_outage(setup: Setup, *, refused_share: float = 0.5, max_backoff: float = 60.0) -> DrillResult:
    """A provider outage of `setup.outage_s` seconds in the middle of the job, with the users' defaults.

    The simulator answers 503 for the first part, then its process is stopped (connection
    refused) for the last `refused_share`, then it starts again on the same port. Beyond the
    common invariants: no row dead, attempts per row <= 1.02 (the breaker hands rows back
    without spending attempts), the job still running when the provider returns and then
    completing with no command typed, and job.provider_unavailable written once.
    """
    began = time.monotonic()
    s = setup.outage_s
    refused_s, failing_s = s * refused_share, s * (1 - refused_share)
    write_audit.install(setup.dsn)  # before any worker writes: completions are counted from the writes
    job = submit_rows(setup.dsn, setup.rows, webhook_url=UNHEARD_WEBHOOK)
    config = simulator_config()
    sim = start_simulator(config)
    workers = start_workers(
        setup.workers,
        setup.dsn,
        args=setup.worker_args("--circuit-max-backoff", str(max_backoff)),
        env={"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": "sk-test"},
        log_dir=os.environ.get("DRILLS_WORKER_LOGS"),
        append_logs=True,
        grace=40,
    )
    sampler = Sampler(setup.dsn, job.id)
    try:
        sampler.wait_for(setup.rows // 2)
        bound = in_flight(setup.dsn, job.id)
        fault_start = time.monotonic()
        sim.set_config({"outage": {"start_s": 0, "duration_s": None, "status": 503}})
        time.sleep(failing_s)
        stats = sim.stats(series=False)
        accepted_before, answered_503 = stats["totals"]["accepted"], _outcome(stats, "outage")
        port = sim.port
        sim.stop()
        time.sleep(refused_s)
        status_at_end = job.status()
        sim = start_simulator(config, port=port)
        fault_end = time.monotonic()
        done_at_end = sampler.done()
        final = job.wait(timeout=s + 600)
        wall = time.monotonic() - began
        recovery = sampler.recovery(fault_start, fault_end)
        resumed = next((t - fault_end for (t, n) in sampler.samples if t > fault_end and n > done_at_end), None)
        accepted = accepted_before + sim.stats(series=False)["totals"]["accepted"]
        check = check_invariants(setup.dsn, job, setup.rows, accepted, bound)
        with psycopg.connect(setup.dsn) as conn:
            dead, attempts = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'dead'), coalesce(sum(attempts), 0) FROM batchdb.requests "
                "WHERE job_id = %s",
                (job.id,),
            ).fetchone()
            events = conn.execute(
                "SELECT count(*) FROM batchdb.notification_deliveries WHERE job_id = %s "
                "AND event = 'job.provider_unavailable'",
                (job.id,),
            ).fetchone()[0]
            opened = conn.execute("SELECT coalesce(sum(n_opened), 0) FROM batchdb.circuits").fetchone()[0]
    finally:
        sampler.stop()
        workers.stop()
        sim.stop()
    per_row = attempts / setup.rows
    v = check.violations
    if final.status != "completed":
        v.append(f"job.wait() returned {final.status}")
    if status_at_end.status != "running" or not (status_at_end.status_reason or "").startswith(
        "waiting: provider unavailable"
    ):
        v.append(
            f"at the outage's end the job was {status_at_end.status} ({status_at_end.status_reason!r}), "
            "not running and waiting for the provider"
        )
    if dead:
        v.append(f"{dead} row(s) dead")
    if per_row > 1.02:
        v.append(f"{per_row:.3f} attempts per row (> 1.02)")
    if events != 1:
        v.append(f"job.provider_unavailable written {events} time(s), not once")
    if answered_503 == 0:
        v.append("no call met the outage: the drill tested nothing")
    figures = {
        "dead": float(dead),
        "attempts_per_row": per_row,
        "events": float(events),
        "resumed_s": -1.0 if resumed is None else resumed,
        "circuits_opened": float(opened),
        "outage_s": fault_end - fault_start,
    }
    note = (
        f"503 for {failing_s:.0f} s, then connection refused (simulator stopped) for {refused_s:.0f} s; "
        f"{dead} dead, {per_row:.3f} attempts/row, first row done {figures['resumed_s']:.1f} s after the "
        f"provider came back, job.provider_unavailable x{events}, circuit opened {opened}x; "
        f"--circuit-max-backoff {max_backoff:.0f}; {_attempts_setting(setup.dsn, job)}"
    )
    return DrillResult("provider outage", setup.rows, check, bound, recovery, wall, note, figures)


def drill_429_storm(setup: Setup, *, storm_s: float = 10.0) -> DrillResult:
    return _simulator_fault(
        "429 storm",
        setup,
        {"default_limits": {"rpm": 60, "tpm": None, "rpd": None}},
        # Back to a high limit the simulator announces in its x-ratelimit-* headers: healing
        # to "unlimited" sends no headers, and the ledger keeps the 60 RPM it learned.
        {"default_limits": {"rpm": 1_000_000, "tpm": None, "rpd": None}},
        storm_s,
        note=f"simulator limit 60 RPM for {storm_s:.0f} s, then 1,000,000 RPM",
    )


def drill_slow_responses(setup: Setup, *, slow_s: float = 8.0, timeout_s: float = 2.0) -> DrillResult:
    slow = {"kind": "fixed", "value": timeout_s * 2}
    return _simulator_fault(
        "slow responses > --request-timeout",
        setup,
        {"latency_s": slow},
        {"latency_s": {"kind": LATENCY.kind, "median": LATENCY.median, "sigma": LATENCY.sigma, "cap": LATENCY.cap}},
        slow_s,
        worker_args=setup.worker_args("--request-timeout", str(timeout_s)),
        bound_includes_accepted=True,
        settle_s=timeout_s * 2,
        note=f"latency {timeout_s * 2:.0f} s for {slow_s:.0f} s, --request-timeout {timeout_s:.0f}",
    )


def drill_connection_resets(setup: Setup, *, rate: float = 0.05) -> DrillResult:
    """Connection resets on `rate` of calls throughout the job; a reset call never counts as accepted."""
    began = time.monotonic()
    config = simulator_config(error_rates={"http_500": 0.0, "http_503": 0.0, "connection_reset": rate})
    with running(setup, sim_config=config, max_attempts=20) as (job, sim, _workers, _sampler):
        job.wait(timeout=300)
        resets = sim.stats(series=False)
        return _finish(
            "connection resets",
            setup,
            job,
            sim,
            0,
            "n/a (whole job)",
            began,
            note=f"{rate:.0%} of calls reset: {_outcome(resets, 'connection_reset')} resets",
        )


def _outcome(stats: dict[str, object], name: str) -> int:
    outcomes = stats.get("outcomes", {})
    assert isinstance(outcomes, dict)
    return int(outcomes.get(name, 0))


REFUSING_TRIGGER = """
CREATE SEQUENCE IF NOT EXISTS public.drill_refused_writes;
CREATE OR REPLACE FUNCTION public.drill_refuse_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.request_id % 5 = 0 THEN
        PERFORM nextval('public.drill_refused_writes');  -- not rolled back with the statement
        RAISE EXCEPTION 'drill: result write refused (SQLSTATE %)', TG_ARGV[0] USING ERRCODE = TG_ARGV[0];
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER drill_refuse_result BEFORE INSERT ON batchdb.results
    FOR EACH ROW EXECUTE FUNCTION public.drill_refuse_result('{sqlstate}');
"""


def _ddl(conn: psycopg.Connection, statement: str, attempts: int = 10) -> None:
    """Run the drill's own DDL; it can deadlock with a worker's complete_batch, so try again."""
    for attempt in range(attempts):
        try:
            with conn.transaction():
                conn.execute(statement)
            return
        except psycopg.errors.DeadlockDetected:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)


def drill_result_write_failures(setup: Setup, *, sqlstate: str = "P0001", fault_s: float = 4.0) -> DrillResult:
    """A trigger refuses every 5th result write with `sqlstate` for `fault_s` seconds, then is dropped.

    P0001 (a plain trigger error) takes the completer's split-and-requeue path: each refused
    row is sent back and called again, so the bound is the rows retried. 53100 (disk full) is
    an OperationalError, which the completer treats like a lost connection: it retries the
    whole batch with backoff until the write goes through, and no row is called twice.
    """
    began = time.monotonic()
    with running(setup) as (job, sim, _workers, sampler):
        sampler.wait_for(setup.rows // 4)
        with psycopg.connect(setup.dsn, autocommit=True) as conn:
            fault_start = time.monotonic()
            _ddl(conn, REFUSING_TRIGGER.replace("{sqlstate}", sqlstate))
            time.sleep(fault_s)
            _ddl(conn, "DROP TRIGGER drill_refuse_result ON batchdb.results")
            fault_end = time.monotonic()
            job.wait(timeout=300)
            # Each refusal sends its row back to be called again: the bound is the calls made again
            # (a row refused twice, when its second try also fell in the fault, counts twice).
            refused_rows, resent = conn.execute(
                "SELECT count(*), coalesce(sum(attempts - 1), 0) FROM batchdb.requests "
                "WHERE job_id = %s AND id %% 5 = 0 AND attempts > 1",
                (job.id,),
            ).fetchone()
            raised = conn.execute("SELECT last_value, is_called FROM public.drill_refused_writes").fetchone()
        recovery = sampler.recovery(fault_start, fault_end)
        raised_n = raised[0] if raised[1] else 0
        label = {"P0001": "trigger error", "53100": "disk full"}.get(sqlstate, sqlstate)
        result = _finish(
            f"result write fails ({label})",
            setup,
            job,
            sim,
            int(resent),
            recovery,
            began,
            note=f"every 5th row refused ({sqlstate}) for {fault_s:.0f} s: {raised_n} refusals, "
            f"{refused_rows} rows retried, {resent} calls made again",
        )
        if raised_n == 0:
            result.check.violations.append("the trigger never fired: the drill tested nothing")
        return result


def drill_poison_rows(setup: Setup, *, every: int = 50) -> DrillResult:
    """Every `every`-th row overflows the context window: it must fail at once with the reason."""
    began = time.monotonic()
    config = simulator_config(context_window=POISON_CONTEXT_WINDOW)
    poison = len(range(0, setup.rows, every))
    with running(setup, sim_config=config, poison_every=every) as (job, sim, _workers, _sampler):
        job.wait(timeout=300)
        return _finish(
            "poison rows (context too long)",
            setup,
            job,
            sim,
            0,
            "n/a (whole job)",
            began,
            poison=poison,
            note=f"{poison} poison rows failed on their first attempt",
        )


CLOCK_SKEW_S = 3600.0
# Run as `python -c CLOCK_PROBE <worker options>`: the worker process first prints its own wall
# clock (time.time and datetime.now, both read through libc's clock_gettime), then runs.
CLOCK_PROBE = (
    "import sys, time, datetime; "
    "print(f'worker clock {time.time():.3f} {datetime.datetime.now().timestamp():.3f}', flush=True); "
    "from batchdb.cli import main; main(['worker', *sys.argv[1:]])"
)
FAKETIME_LIBRARIES = ("/usr/lib/*/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1")


def faketime_library() -> str | None:
    """Debian's libfaketime (`apt-get install libfaketime`), which shifts a process's wall clock."""
    found = [path for pattern in FAKETIME_LIBRARIES for path in sorted(glob.glob(pattern))]
    return found[0] if found else None


def skewed_worker_command(skew_s: float) -> tuple[str, ...]:
    """A worker whose wall clock (time.time, datetime.now, anything through clock_gettime) is off by
    `skew_s`; its monotonic clock is left alone, as on a machine whose NTP is wrong."""
    library = faketime_library()
    if library is None:
        raise RuntimeError("the clock-skew drill needs libfaketime; run: apt-get install -y libfaketime")
    return (
        "env",
        f"LD_PRELOAD={library}",
        f"FAKETIME={skew_s:+.0f}",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        sys.executable,
        "-c",
        CLOCK_PROBE,
    )


def worker_clock_offsets(log_paths: list[Path], started_at: list[float]) -> list[float | None]:
    """Each worker's wall clock minus this process's, from the line CLOCK_PROBE printed first."""
    offsets: list[float | None] = []
    for path, started in zip(log_paths, started_at, strict=True):
        line = next((x for x in path.read_text(errors="replace").splitlines() if x.startswith("worker clock ")), "")
        readings = [float(v) for v in line.split()[2:4]]
        offsets.append(min(readings, key=lambda r: abs(r - started)) - started if len(readings) == 2 else None)
    return offsets


def drill_clock_skew(setup: Setup) -> DrillResult:
    """Workers whose wall clock is an hour ahead (half) or behind (half), through libfaketime: leases
    must follow database time, and the drill shows each worker's own clock really was off.

    If a lease were computed from a worker's clock, the fast workers' rows would look leased for
    an hour and the slow workers' rows would be expired at once and reclaimed (attempts > 1).
    """
    began = time.monotonic()
    ahead = max(1, setup.workers // 2)
    with tempfile.TemporaryDirectory(prefix="drill-clock-") as scratch:
        logs = os.environ.get("DRILLS_WORKER_LOGS") or scratch  # the clocks are read from the workers' logs
        spawned = [time.time()] * ahead
        with running(
            dataclasses.replace(setup, workers=ahead), command=skewed_worker_command(CLOCK_SKEW_S), log_dir=logs
        ) as (job, sim, workers, sampler):
            behind = max(1, setup.workers - ahead)
            spawned += [time.time()] * behind
            workers.start(behind, command=skewed_worker_command(-CLOCK_SKEW_S))
            sampler.wait_for(setup.rows // 3)
            with psycopg.connect(setup.dsn, autocommit=True) as conn:
                longest = conn.execute(
                    "SELECT coalesce(max(extract(epoch FROM lease_expires_at - now())), 0) FROM batchdb.requests "
                    "WHERE job_id = %s AND status = 'running'",
                    (job.id,),
                ).fetchone()[0]
            job.wait(timeout=300)
            offsets = worker_clock_offsets(workers.log_paths, spawned)
            with psycopg.connect(setup.dsn, autocommit=True) as conn:
                reclaimed = conn.execute(
                    "SELECT count(*) FROM batchdb.requests WHERE job_id = %s AND attempts > 1", (job.id,)
                ).fetchone()[0]
            clocks = ", ".join("?" if o is None else f"{o:+.0f} s" for o in offsets)
            result = _finish(
                "worker clocks +/- 1 h",
                setup,
                job,
                sim,
                0,
                "n/a (no outage)",
                began,
                note=f"libfaketime; worker clocks measured {clocks}; longest lease left "
                f"{float(longest):.1f} s (lease {setup.lease_seconds:.0f} s); "
                f"{reclaimed} rows reclaimed",
            )
    expected = [CLOCK_SKEW_S] * ahead + [-CLOCK_SKEW_S] * behind
    result.clock_offsets = offsets
    for i, (offset, want) in enumerate(zip(offsets, expected, strict=True)):
        # Within two minutes of the skew: process start-up on a loaded machine is the slack.
        if offset is None or abs(offset - want) > 120:
            result.check.violations.append(
                f"worker {i}'s clock was off by {offset} s, not {want:+.0f} s: the drill injected no skew"
            )
    if float(longest) > setup.lease_seconds + 1:
        result.check.violations.append(f"a lease runs {float(longest):.0f} s ahead of database time")
    if reclaimed:
        result.check.violations.append(f"{reclaimed} rows were claimed more than once")
    return result


DRILLS: dict[str, Callable[[Setup], DrillResult]] = {
    "sigkill": drill_sigkill,
    "db-restart": drill_db_restart,
    "outage": drill_outage,
    "429-storm": drill_429_storm,
    "slow": drill_slow_responses,
    "resets": drill_connection_resets,
    "write-failures": drill_result_write_failures,
    "disk-full": lambda setup: drill_result_write_failures(setup, sqlstate="53100"),
    "poison": drill_poison_rows,
    "clock": drill_clock_skew,
}

HEADERS = [
    "drill",
    "rows",
    "rows lost",
    "duplicate provider calls",
    "bound (in flight at fault)",
    "time to recover (s)",
    "wall (s)",
    "invariants",
    "fault",
]


def run_drill(name: str, admin_dsn: str, rows: int, workers: int, outage_s: float) -> DrillResult:
    if name == "db-restart":
        with embedded_database() as dsn:
            return DRILLS[name](Setup(dsn, rows, workers, outage_s=outage_s))
    with scratch_database(admin_dsn, "drill") as dsn:
        return DRILLS[name](Setup(dsn, rows, workers, outage_s=outage_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--only", choices=sorted(DRILLS), action="append")
    parser.add_argument(
        "--outage-seconds",
        type=float,
        default=600.0,
        help="length of the provider outage drill (503s, then connection refused)",
    )
    parser.add_argument("--admin-dsn", default=os.environ.get("BATCHDB_TEST_DSN", DEFAULT_ADMIN_DSN))
    args = parser.parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally blocks stop workers and drop databases.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results = []
    for name in args.only or list(DRILLS):
        progress(f"drill {name}: {args.rows:,} rows, {args.workers} workers")
        try:
            result = run_drill(name, args.admin_dsn, args.rows, args.workers, args.outage_seconds)
        except Exception as exc:  # noqa: BLE001 - one broken drill must not hide the others' figures
            progress(f"drill {name} raised {type(exc).__name__}: {exc}")
            result = DrillResult(name, args.rows, Check(args.rows, 0, -1, 0, 0, [f"raised {exc!r}"]), 0, "-", 0.0)
        progress(f"drill {name}: {'ok' if result.ok else result.check.violations} in {result.wall_s:.1f} s")
        results.append(result)
    print_table(
        f"Fault drills: {args.rows:,} rows, {args.workers} workers x 16 concurrency, simulator latency "
        f"lognormal median 0.25 s",
        HEADERS,
        [r.cells() for r in results],
        notes=["duplicate provider calls = simulator `accepted` - rows succeeded; rows lost must be 0."],
    )
    print(json.dumps({r.name: r.ok for r in results}), file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
