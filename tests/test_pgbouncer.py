"""batchdb through PgBouncer in transaction pooling mode, end to end (issue 13).

A PostgreSQL of its own with max_connections=40 (batchdb's embedded server in a temporary home)
behind Debian's PgBouncer 1.18 (pool_mode=transaction, default_pool_size=10, `options` refused),
16 worker processes with --concurrency 64 and the SDK all connecting through the pooler, nothing
configured on batchdb's side (BATCHDB_POOLER=auto finds the pooler by its refusal of `options`).
20,000 rows drain exactly once; the server never holds more than the pool's connections; no
prepared statement goes astray.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pandas as pd
import psycopg
import pytest
from pgbouncer_support import Pooled, pgbouncer_binary, pooled_database
from test_worker_processes import assert_exactly_once

import batchdb
from batchdb import db, migrations, pooler, settings
from batchdb.simulator.config import Distribution, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator
from batchdb.workers.processes import start_workers
from bench import write_audit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        pgbouncer_binary() is None, reason="pgbouncer is not installed (apt-get install -y pgbouncer; .ci/run does)"
    ),
]

MAX_CONNECTIONS = 40
POOL_SIZE = 10
WORKERS = 16
ROWS = 20_000


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pooled]:
    for name in (settings.POOLER, settings.LISTEN_DSN, settings.DSN):
        monkeypatch.delenv(name, raising=False)
    with pooled_database(max_connections=MAX_CONNECTIONS, pool_size=POOL_SIZE) as found:
        with psycopg.connect(found.direct_dsn, autocommit=True) as conn:
            # What README "Through PgBouncer" asks of the operator: options cannot pass the pooler.
            conn.execute("ALTER DATABASE batchdb SET jit = off")
        yield found


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    config = SimulatorConfig(
        seed=1,
        latency_s=Distribution(kind="uniform", low=0.01, high=0.05),
        output_tokens=Distribution(kind="uniform", low=3, high=12),
    )
    with start_simulator(config) as sim:
        yield sim


class ConnectionPeak:
    """The most client connections the server held at once, sampled from a direct connection."""

    def __init__(self, dsn: str, interval: float = 0.1) -> None:
        self._dsn = dsn
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                ).fetchone()
                assert row is not None
                self.peak = max(self.peak, int(row[0]))
                self.samples += 1
                self._stop.wait(self._interval)


@pytest.mark.timeout(900)
def test_sixteen_workers_through_pgbouncer_drain_20000_rows_exactly_once(
    pooled: Pooled, simulator: SimulatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The schema goes in through the pooler too: one transaction, a transaction-scoped lock.
    with db.connect(pooled.pooled_dsn) as conn:
        migrations.upgrade(conn)
    assert pooler.is_pooled(pooled.pooled_dsn)  # told by PgBouncer's refusal of `options`
    write_audit.install(pooled.direct_dsn)
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(ROWS)], "text": [f"headline number {i}" for i in range(ROWS)]})
    began = time.monotonic()
    job = batchdb.submit(  # COPY into an ON COMMIT DROP staging table, through the pooler
        frame,
        prompt="Sentiment: {text}",
        id_column="key",
        model="gpt-4o-mini",
        provider="openai",
        max_tokens=16,
        dsn=pooled.pooled_dsn,
    )
    submitted = time.monotonic() - began
    logs = tmp_path_factory.mktemp("pgbouncer-workers")
    with ConnectionPeak(pooled.direct_dsn) as peak:
        workers = start_workers(
            WORKERS,
            pooled.pooled_dsn,
            env={"OPENAI_BASE_URL": simulator.openai_base_url, "OPENAI_API_KEY": "sk-test"},
            args=("--concurrency", "64"),
            log_dir=logs,
        )
        try:
            final = job.wait(timeout=780)  # through the pooler: it polls
        finally:
            codes = workers.stop()
    drained = time.monotonic() - began - submitted
    print(f"submitted {ROWS} rows in {submitted:.1f}s, drained in {drained:.1f}s; peak {peak.peak} connections")
    log_text = workers.log_text()
    assert codes == [0] * WORKERS, log_text[-3000:]
    assert final.status == "completed"

    job = batchdb.Job(job.id, dsn=pooled.direct_dsn)
    assert_exactly_once(pooled.direct_dsn, job, ROWS)
    # Every accepted provider call became exactly one recorded result: no duplicate calls.
    assert simulator.stats(series=False)["totals"]["accepted"] == ROWS
    with psycopg.connect(pooled.direct_dsn) as conn:
        per_worker = [n for (n,) in conn.execute("SELECT n_completed FROM batchdb.workers ORDER BY id")]
    assert len(per_worker) == WORKERS and sum(per_worker) == ROWS

    # PgBouncer held at most its pool; with our sampler (and the submit's / wait's server
    # connections, which share that pool) the server never came near its limit.
    assert peak.samples > 0
    assert peak.peak <= POOL_SIZE + 1 <= MAX_CONNECTIONS
    server_log = pooled.server_log.read_text(errors="replace")
    everything = "\n".join((log_text, server_log, pooled.pooler_log.read_text(errors="replace")))
    assert "prepared statement" not in everything
    assert "too many clients" not in everything and "remaining connection slots" not in everything
    assert "unsupported startup parameter" not in log_text  # told once to the pooler, retried without
    assert "no LISTEN through a transaction pooler" in log_text  # workers poll instead
    assert "jit=off cannot be set" not in log_text  # the database has it
