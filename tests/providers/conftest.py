"""Provider adapter tests: one simulator subprocess per session, a clean key environment per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from batchdb.simulator import SimulatorConfig, SimulatorProcess, start_simulator

ConfigureSimulator = Callable[..., SimulatorProcess]

_KEY_ENVS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "GEMINI_API_KEY",
             "GOOGLE_API_KEY", "GEMINI_BASE_URL", "BATCHDB_SECRETS_FILE", "BATCHDB_AZURE_API_VERSION")


@pytest.fixture(autouse=True)
def clean_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key or endpoint from the machine leaks into a test."""
    for name in list(os.environ):
        if name in _KEY_ENVS or name.startswith(("BATCHDB_KEY_", "BATCHDB_ENDPOINT_")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def provider_simulator() -> Iterator[SimulatorProcess]:
    with start_simulator(SimulatorConfig()) as sim:
        yield sim


@pytest.fixture
def simulator(provider_simulator: SimulatorProcess) -> ConfigureSimulator:
    """``simulator(field=value, ...)``: the shared simulator with exactly that config, freshly reset."""

    def configure(**fields: Any) -> SimulatorProcess:
        provider_simulator.set_config(SimulatorConfig(**fields))
        provider_simulator.reset()
        return provider_simulator

    return configure
