"""One simulator subprocess per test session, reconfigured and reset for each test.

Starting a simulator costs about a second (interpreter, aiohttp, tokenizer), so the
tests share one and give each test a clean run: `POST /_sim/config` with the
test's whole config, then `POST /_sim/reset` (fresh buckets, counters and seeds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from batchdb.simulator import SimulatorConfig, SimulatorProcess, start_simulator

ConfigureSimulator = Callable[..., SimulatorProcess]


@pytest.fixture(scope="session")
def shared_simulator() -> Iterator[SimulatorProcess]:
    with start_simulator(SimulatorConfig()) as sim:
        yield sim


@pytest.fixture
def simulator(shared_simulator: SimulatorProcess) -> ConfigureSimulator:
    """``simulator(SimulatorConfig(...))`` or ``simulator(field=value, ...)``: the configured, reset simulator."""

    def configure(config: SimulatorConfig | None = None, **fields: Any) -> SimulatorProcess:
        shared_simulator.set_config(config if config is not None else SimulatorConfig(**fields))
        shared_simulator.reset()
        return shared_simulator

    return configure


@pytest.fixture
def sim(simulator: ConfigureSimulator) -> SimulatorProcess:
    """The shared simulator with the default config (no limits, no faults)."""
    return simulator()


def sliding_maximum(series: list[dict[str, Any]], field: str, window: int = 60) -> int:
    """The largest sum of ``field`` over ``window`` consecutive seconds of a stats series."""
    per_second: dict[int, int] = {}
    for entry in series:
        per_second[entry["t"]] = per_second.get(entry["t"], 0) + entry[field]
    if not per_second:
        return 0
    last = max(per_second)
    return max(
        sum(per_second.get(s, 0) for s in range(start, start + window)) for start in range(min(per_second), last + 1)
    )
