"""`batchdb dagster`: the example code location in the Dagster UI, with everything it needs running.

`run_dev` starts, in order: the batchdb database (the embedded PostgreSQL unless BATCHDB_DSN is set)
and its schema; Dagster's own storage, a database `<batchdb database>_dagster` on the same server
(dagster-postgres); the provider simulator; worker processes; and `dagster dev` (webserver + daemon)
on the repository's workspace.yaml. Ctrl-C (or SIGTERM) stops all of it.

DAGSTER_HOME is $DAGSTER_HOME, else `<batchdb home>/dagster` (~/.local/share/batchdb/dagster). Its
dagster.yaml is rewritten at each start (`write_instance_yaml`): Postgres storage, at most
`max_concurrent_runs` runs in progress, and a run-level limit on the `batchdb` concurrency pool.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from batchdb import embedded, ledger, migrations, settings
from batchdb._source_root import SOURCE_ROOT
from batchdb.db import connect, resolve_dsn

# The repository root in a checkout (where workspace.yaml is); site-packages in a wheel install.
REPOSITORY_ROOT = SOURCE_ROOT
EXAMPLE_MODULE = "batchdb.dagster.example"
EXAMPLE_MODEL = ("openai", "default", "gpt-4o-mini")


def default_dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or embedded.batchdb_home() / "dagster").expanduser().resolve()


def default_log_dir() -> Path:
    """Where the workers' logs go: `<batchdb home>/logs/dagster`, never under DAGSTER_HOME.

    Dagster's telemetry thread renames and deletes `$DAGSTER_HOME/logs` (even with telemetry
    disabled), which left the workers writing to deleted files.
    """
    return (embedded.batchdb_home() / "logs" / "dagster").expanduser().resolve()


def ensure_database(dsn: str, dbname: str) -> str:
    """Create database `dbname` on the server of `dsn` if it is missing; return its DSN."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if exists is None:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            except errors.DuplicateDatabase:
                pass  # another process created it meanwhile
    return make_conninfo(dsn, dbname=dbname)


def storage_url(dsn: str) -> str:
    """The SQLAlchemy URL dagster-postgres wants for a libpq DSN or URI."""
    parts = conninfo_to_dict(dsn)
    user = quote(str(parts.get("user") or os.environ.get("PGUSER") or "postgres"), safe="")
    password = parts.get("password")
    userinfo = f"{user}:{quote(str(password), safe='')}" if password else user
    host = str(parts.get("host") or "127.0.0.1")
    port = parts.get("port") or 5432
    dbname = quote(str(parts.get("dbname") or "postgres"), safe="")
    # The driver is named: SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, and dagster-postgres
    # writes psycopg2-style statements (NOTIFY with a client-side parameter) that psycopg 3 refuses.
    if host.startswith("/"):  # a Unix socket directory
        return f"postgresql+psycopg2://{userinfo}@/{dbname}?host={quote(host, safe='')}&port={port}"
    return f"postgresql+psycopg2://{userinfo}@{host}:{port}/{dbname}"


def write_instance_yaml(
    home: Path, *, storage_dsn: str | None, max_concurrent_runs: int = 8, pool_limit: int = 4
) -> Path:
    """Write `home/dagster.yaml`: Dagster's storage in Postgres (SQLite under `home` when `storage_dsn` is
    None), the run queue limit, and a run-level limit of `pool_limit` on every concurrency pool.

    With `granularity: run`, a queued run whose asset is in a full pool (`batchdb`) stays queued and
    takes no process; `max_concurrent_runs` bounds the runs in progress whatever they contain.
    """
    home.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by assets/dev.py (`batchdb dagster`); rewritten at each start.", ""]
    if storage_dsn is not None:
        lines += ["storage:", "  postgres:", f"    postgres_url: {_yaml_string(storage_url(storage_dsn))}", ""]
    lines += [
        # Launch queued runs from 4 threads: a backfill's runs start in parallel instead of one at a time.
        "run_coordinator:",
        "  module: dagster.core.run_coordinator",
        "  class: QueuedRunCoordinator",
        "  config:",
        "    dequeue_use_threads: true",
        "    dequeue_num_workers: 4",
        "",
        "concurrency:",
        "  runs:",
        f"    max_concurrent_runs: {max_concurrent_runs}",
        "  pools:",
        "    granularity: run",
        f"    default_limit: {pool_limit}",
        "",
        "telemetry:",
        "  enabled: false",
        "",
    ]
    path = home / "dagster.yaml"
    path.write_text("\n".join(lines))
    return path


def dagster_command_line(*, host: str, port: int) -> tuple[list[str], Path]:
    """`dagster dev` on the repository's workspace.yaml (or the example module when installed without it)."""
    workspace = REPOSITORY_ROOT / "workspace.yaml"
    command = [sys.executable, "-m", "dagster", "dev", "-h", host, "-p", str(port)]
    if workspace.exists():
        return [*command, "-w", str(workspace)], REPOSITORY_ROOT
    return [*command, "-m", EXAMPLE_MODULE], Path.cwd()


def run_dev(
    *,
    dsn: str | None = None,
    host: str = "127.0.0.1",
    port: int = 3000,
    n_workers: int = 2,
    concurrency: int = 32,
    rpm: int = 6000,
    tpm: int = 600_000,
    home: Path | None = None,
    output_root: Path | None = None,
    max_concurrent_runs: int = 8,
    pool_limit: int = 4,
    log_dir: Path | None = None,
) -> int:
    """Start everything the example needs and the Dagster UI; block until Ctrl-C; return dagster's exit code."""
    from batchdb.simulator.config import Distribution, Limits, SimulatorConfig
    from batchdb.simulator.process import start_simulator
    from batchdb.workers.process_groups import stop_process_groups
    from batchdb.workers.processes import WorkerProcesses

    say = click.echo
    dsn = resolve_dsn(dsn)
    with connect(dsn) as conn:
        migrations.upgrade(conn)
        # The ledger paces all workers to the (simulated) key's limits, whatever Dagster launches.
        ledger.set_limits(conn, ledger.Lane(*EXAMPLE_MODEL), rpm=rpm, tpm=tpm)
    dbname = str(conninfo_to_dict(dsn).get("dbname") or "postgres")
    storage_dsn = ensure_database(dsn, f"{dbname}_dagster")
    home = (home or default_dagster_home()).resolve()
    write_instance_yaml(home, storage_dsn=storage_dsn, max_concurrent_runs=max_concurrent_runs, pool_limit=pool_limit)
    output_root = (output_root or Path(os.environ.get(settings.OUTPUT_ROOT, settings.DEFAULT_OUTPUT_ROOT))).resolve()
    logs = (log_dir or default_log_dir()).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    say(f"batchdb database: {_where(dsn)}; Dagster storage: {_where(storage_dsn)}")
    say(f"DAGSTER_HOME: {home}; results: {output_root}")

    config = SimulatorConfig(
        seed=7,
        default_limits=Limits(rpm=rpm, tpm=tpm),
        latency_s=Distribution(kind="lognormal", median=0.25, sigma=0.5, cap=3.0),
        output_tokens=Distribution(kind="uniform", low=8, high=16),
    )
    previous_handlers = _interruptible()
    try:
        with start_simulator(config) as simulator:
            say(f"provider simulator: {simulator.openai_base_url} ({rpm} RPM, {tpm:,} TPM)")
            extra_env = {
                settings.OUTPUT_ROOT: str(output_root),
                "DAGSTER_HOME": str(home),
                "OPENAI_BASE_URL": simulator.openai_base_url,
                "OPENAI_API_KEY": "sk-batchdb-dagster-example",
            }
            workers = WorkerProcesses(
                dsn, env=extra_env, args=("--concurrency", str(concurrency)), log_dir=logs, append_logs=True
            )
            dagster: subprocess.Popen[bytes] | None = None
            command, cwd = dagster_command_line(host=host, port=port)
            try:
                workers.start(n_workers)
                say(f"workers: {n_workers} processes, logs in {logs}")
                # Its own session: a terminal's Ctrl-C reaches only us, and we stop dagster first.
                dagster = subprocess.Popen(
                    command, env={**os.environ, settings.DSN: dsn, **extra_env}, cwd=cwd, start_new_session=True
                )
                url = f"http://{host}:{port}"
                if _wait_for_webserver(url, dagster, timeout=120):
                    say(f"Dagster UI: {url}  (Ctrl-C stops Dagster, the workers and the simulator)")
                else:
                    say(f"dagster-webserver is not answering on {url}; its output is above")
                return dagster.wait()
            finally:
                # A second Ctrl-C must not leave half of the processes running.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if dagster is not None:  # its whole group: webserver, daemon, code servers and runs
                    stop_process_groups([dagster], grace=30)
                workers.stop()
    except KeyboardInterrupt:
        say("stopped")
        return 0
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _interruptible() -> dict[int, Any]:
    """SIGINT and SIGTERM raise KeyboardInterrupt here, and children start with default handlers.

    A process started in the background by a non-interactive shell inherits SIGINT ignored; dagster
    maps SIGTERM to its SIGINT handler, so `dagster dev` would then ignore both (see stack notes).
    """

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}


def _wait_for_webserver(url: str, process: subprocess.Popen[bytes], *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with opener.open(f"{url}/server_info", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    return False


def _where(dsn: str) -> str:
    parts = conninfo_to_dict(dsn)
    return f"{parts.get('host', 'local socket')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def _yaml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@click.command("dagster")
@click.option(
    "--dsn", envvar=settings.DSN, default=None, help="PostgreSQL DSN (default: $BATCHDB_DSN, else the embedded server)."
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True)
@click.option("--workers", "n_workers", default=2, show_default=True, help="Worker processes to start.")
@click.option("--rpm", default=6000, show_default=True, help="Simulated provider requests/minute limit.")
@click.option("--tpm", default=600_000, show_default=True, help="Simulated provider tokens/minute limit.")
@click.option(
    "--max-runs",
    "max_concurrent_runs",
    default=8,
    show_default=True,
    help="Dagster runs in progress at once (the rest of a backfill waits queued).",
)
@click.option(
    "--pool-limit",
    default=4,
    show_default=True,
    help="Runs at once that contain an asset of the `batchdb` pool (one batchdb job each).",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=None,
    help="DAGSTER_HOME (default: $DAGSTER_HOME, else <batchdb home>/dagster).",
)
@click.option(
    "--output-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the Parquet results go (default: $BATCHDB_OUTPUT_ROOT, else ./batchdb-output).",
)
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the workers' logs go (default: <batchdb home>/logs/dagster; never under DAGSTER_HOME, "
    "whose logs/ folder Dagster's telemetry deletes).",
)
def dagster_command(**options: Any) -> None:
    """Open the example Dagster code location in the Dagster UI, with workers and the provider simulator."""
    sys.exit(run_dev(**options))


if __name__ == "__main__":
    dagster_command()
