"""Fixtures for the Dagster integration tests: the provider simulator and worker processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from dagster_test_support import stop_processes, worker_env

from batchdb.simulator.config import Distribution, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    config = SimulatorConfig(seed=3, latency_s=Distribution(kind="uniform", low=0.01, high=0.05),
                             output_tokens=Distribution(kind="uniform", low=8, high=16))
    with start_simulator(config) as sim:
        yield sim


@pytest.fixture
def start_workers() -> Iterator[Callable[..., list[subprocess.Popen[bytes]]]]:
    """`start_workers(dsn, sim, n=2)` starts `python -m workers` processes, stopped with SIGTERM at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(dsn: str, sim: SimulatorProcess, n: int = 2) -> list[subprocess.Popen[bytes]]:
        workers = [subprocess.Popen([sys.executable, "-m", "workers", "--concurrency", "32"], env=worker_env(dsn, sim),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
        started.extend(workers)
        return workers

    yield start
    stop_processes(started)
