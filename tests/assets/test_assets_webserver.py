"""End to end, the way a user does it: dagster-webserver and dagster-daemon processes on the example
workspace, backfills launched and runs terminated through the webserver's GraphQL API, worker processes
draining the jobs from the provider simulator. Dagster's storage is a Postgres database next to the
test's batchdb database (dagster-postgres), as `batchdb dagster` sets it up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dagster_test_support import REPOSITORY_ROOT, assert_parquet_matches_input, stop_processes, wait_until
from psycopg.conninfo import make_conninfo

from batchdb.dagster.dev import write_instance_yaml
from batchdb.dagster.example import sample_headlines
from batchdb.simulator.config import Distribution, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename ... on PartitionBackfill { status } ... on PythonError { message }
  }
}"""
BACKFILL_RUNS = """
query($id: String!) {
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status tags { key value } } }
  }
}"""
TERMINATE_RUN = """
mutation($runId: String!) {
  terminateRun(runId: $runId) {
    __typename ... on TerminateRunFailure { message } ... on PythonError { message }
  }
}"""
MATERIALIZATIONS = """
query($partitions: [String!]) {
  assetOrError(assetKey: {path: ["headline_sentiment"]}) {
    ... on Asset {
      assetMaterializations(partitions: $partitions) {
        partition
        metadataEntries {
          label
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
          ... on UrlMetadataEntry { url }
        }
      }
    }
  }
}"""


@dataclass
class DagsterStack:
    url: str
    dsn: str
    output_root: Path
    simulator: SimulatorProcess

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"query": query, "variables": variables}).encode(),
        )
        with _NO_PROXY.open(request, timeout=60) as response:
            body = json.loads(response.read())
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def launch_backfill(self, partitions: list[str]) -> str:
        params = {
            "assetSelection": [{"path": ["headlines"]}, {"path": ["headline_sentiment"]}],
            "partitionNames": partitions,
        }
        launched = self.graphql(LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        return str(launched["backfillId"])

    def backfill_status(self, backfill_id: str) -> str:
        return str(self.graphql(BACKFILL_STATUS, id=backfill_id)["partitionBackfillOrError"]["status"])

    def runs(self, backfill_id: str) -> list[dict[str, Any]]:
        runs = self.graphql(BACKFILL_RUNS, id=backfill_id)["runsOrError"]["results"]
        return [{**run, "tags": {t["key"]: t["value"] for t in run["tags"]}} for run in runs]


@pytest.fixture(scope="module")
def stack(admin_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterStack]:
    name = f"batchdb_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        admin.execute(f'CREATE DATABASE "{name}_dagster"')
    dsn = make_conninfo(admin_dsn, dbname=name)
    home = tmp_path_factory.mktemp("dagster_home")
    write_instance_yaml(
        home, storage_dsn=make_conninfo(admin_dsn, dbname=f"{name}_dagster"), max_concurrent_runs=6, pool_limit=4
    )
    output_root = tmp_path_factory.mktemp("results")
    config = SimulatorConfig(
        seed=5,
        latency_s=Distribution(kind="uniform", low=0.01, high=0.05),
        output_tokens=Distribution(kind="uniform", low=8, high=16),
    )
    env = {
        **os.environ,
        "BATCHDB_DSN": dsn,
        "DAGSTER_HOME": str(home),
        "BATCHDB_OUTPUT_ROOT": str(output_root),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    port = _free_port()
    workspace = str(REPOSITORY_ROOT / "workspace.yaml")
    logs = [(home / "webserver.log").open("wb"), (home / "daemon.log").open("wb")]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with start_simulator(config) as simulator:
            with _default_signal_handlers():
                # Own sessions: a Ctrl-C on the test run does not reach them; the teardown's SIGTERM stops them.
                processes.append(
                    subprocess.Popen(
                        [str(BIN / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(port)],
                        env=env,
                        cwd=REPOSITORY_ROOT,
                        stdout=logs[0],
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
                processes.append(
                    subprocess.Popen(
                        [str(BIN / "dagster-daemon"), "run", "-w", workspace],
                        env=env,
                        cwd=REPOSITORY_ROOT,
                        stdout=logs[1],
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _answers(f"{url}/server_info") or _died(processes, home), 120, "dagster-webserver")
            yield DagsterStack(url=url, dsn=dsn, output_root=output_root, simulator=simulator)
    finally:
        codes = stop_processes(processes, timeout=60)
        for log in logs:
            log.close()
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}_dagster" WITH (FORCE)')
    assert codes == [0, 0], f"dagster processes exited with {codes}"


def test_backfill_through_the_webserver_materializes_every_partition(stack: DagsterStack, start_workers) -> None:
    partitions = ["2024-04-01", "2024-04-02", "2024-04-03"]
    start_workers(stack.dsn, stack.simulator, 2)
    backfill_id = stack.launch_backfill(partitions)
    status = wait_until(
        lambda: (s := stack.backfill_status(backfill_id)) not in ("REQUESTED", "CANCELING") and s,
        150,
        "the backfill to finish",
        interval=1.0,
    )
    assert status == "COMPLETED_SUCCESS", [
        (r["status"], r["tags"].get("dagster/partition")) for r in stack.runs(backfill_id)
    ]

    found = stack.graphql(MATERIALIZATIONS, partitions=partitions)["assetOrError"]["assetMaterializations"]
    metadata = {
        m["partition"]: {
            e["label"]: e.get("intValue", e.get("floatValue", e.get("text"))) for e in m["metadataEntries"]
        }
        for m in found
    }
    assert sorted(metadata) == partitions
    with psycopg.connect(stack.dsn) as conn:
        job_rows = conn.execute(
            "SELECT id, idempotency_key, status, n_succeeded FROM batchdb.jobs "
            "WHERE idempotency_key LIKE 'dagster:headline_sentiment:2024-04-0%' "
            "ORDER BY id"
        ).fetchall()
    assert len(job_rows) == 3 and {(status, n) for _, _, status, n in job_rows} == {("completed", 15)}
    for day in partitions:
        path = stack.output_root / "headline_sentiment" / f"{day}.parquet"
        assert_parquet_matches_input(path, sample_headlines(day))
        meta = metadata[day]
        assert meta["dagster/partition_row_count"] == 15 and meta["rows_succeeded"] == 15
        assert meta["cost_usd"] > 0 and meta["prompt_tokens"] > 0
        assert meta["batchdb/job_id"] in {job_id for job_id, *_ in job_rows}


def test_terminating_a_run_cancels_its_batchdb_job(stack: DagsterStack) -> None:
    # No workers in this test: the job stays queued until the run is terminated.
    backfill_id = stack.launch_backfill(["2024-05-01"])
    run = wait_until(
        lambda: next((r for r in stack.runs(backfill_id) if "batchdb/job_id" in r["tags"]), None),
        120,
        "the run to submit its batchdb job",
        interval=1.0,
    )
    job_id = int(run["tags"]["batchdb/job_id"])
    assert _job_status(stack.dsn, job_id) == "running"

    terminated = stack.graphql(TERMINATE_RUN, runId=run["runId"])["terminateRun"]
    assert terminated["__typename"] == "TerminateRunSuccess", terminated
    wait_until(lambda: _job_status(stack.dsn, job_id) == "cancelled", 60, "the batchdb job to be cancelled")
    wait_until(
        lambda: next(r for r in stack.runs(backfill_id) if r["runId"] == run["runId"])["status"] == "CANCELED",
        60,
        "the run to be cancelled",
        interval=1.0,
    )
    with psycopg.connect(stack.dsn) as conn:
        cancelled = conn.execute("SELECT n_cancelled FROM batchdb.jobs WHERE id = %s", (job_id,)).fetchone()[0]
    assert cancelled == 15
    assert not (stack.output_root / "headline_sentiment" / "2024-05-01.parquet").exists()


def _job_status(dsn: str, job_id: int) -> str:
    with psycopg.connect(dsn) as conn:
        return str(conn.execute("SELECT status FROM batchdb.jobs WHERE id = %s", (job_id,)).fetchone()[0])


@contextmanager
def _default_signal_handlers() -> Iterator[None]:
    """Children start with SIGINT and SIGTERM at their defaults, even when this run inherited SIGINT ignored
    (dagster maps SIGTERM to its SIGINT handler, so an ignored SIGINT would make it ignore SIGTERM too)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=2):
            return True
    except OSError:
        return False


def _died(processes: list[subprocess.Popen[bytes]], home: Path) -> bool:
    for process in processes:
        if process.poll() is not None:
            logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in home.glob("*.log"))
            raise AssertionError(f"{process.args[0]} exited with {process.returncode}:\n{logs}")
    return False
