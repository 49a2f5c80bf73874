"""The simulator's tests share tests/conftest.py's simulator subprocess, reconfigured and reset for each test.

`simulator(SimulatorConfig(...))` or `simulator(field=value, ...)` (tests/conftest.py) gives a test
exactly that config on a clean run: `POST /_sim/config` with the whole config, then `POST /_sim/reset`
(fresh buckets, counters and seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from batchdb.simulator import SimulatorProcess

ConfigureSimulator = Callable[..., SimulatorProcess]


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
