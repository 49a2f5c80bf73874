"""Fixtures for the Dagster integration tests: the provider simulator and worker processes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from batchdb.simulator.config import Distribution, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator
from batchdb.workers.processes import start_workers as start_worker_processes
from batchdb.workers.processes import stop_processes


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    config = SimulatorConfig(
        seed=3,
        latency_s=Distribution(kind="uniform", low=0.01, high=0.05),
        output_tokens=Distribution(kind="uniform", low=8, high=16),
    )
    with start_simulator(config) as sim:
        yield sim


@pytest.fixture
def start_workers() -> Iterator[Callable[..., list[subprocess.Popen[bytes]]]]:
    """`start_workers(dsn, sim, n=2)` starts `python -m batchdb.workers` processes, stopped with SIGTERM at teardown;
    `args` go to each worker's command line."""
    started: list[subprocess.Popen[bytes]] = []

    def start(dsn: str, sim: SimulatorProcess, n: int = 2, args: tuple[str, ...] = ()) -> list[subprocess.Popen[bytes]]:
        workers = start_worker_processes(
            n,
            dsn,
            args=("--concurrency", "32", *args),
            env={"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": "sk-test"},
        )
        started.extend(workers.processes)
        return workers.processes

    yield start
    stop_processes(started)
