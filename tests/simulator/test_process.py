"""Starting and controlling the simulator process, its command line and its public API."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import batchdb.simulator
from batchdb.simulator import (
    LimitRule,
    Limits,
    Outage,
    SimulatorConfig,
    SimulatorError,
    SimulatorProcess,
    start_simulator,
)
from batchdb.simulator.process import _SOURCE_ROOT


def test_public_api_is_pinned() -> None:
    assert batchdb.simulator.__all__ == [
        "Distribution",
        "ErrorRates",
        "LimitRule",
        "Limits",
        "Outage",
        "SimulatorConfig",
        "SimulatorError",
        "SimulatorProcess",
        "start_simulator",
    ]


def test_config_round_trips_through_json() -> None:
    config = SimulatorConfig(
        seed=3,
        default_limits=Limits(rpm=500, tpm=200_000),
        limits=(LimitRule(key="sk-a", model="gpt-4o", rpm=60),),
        context_windows={"gemini-2.0-flash": 1_048_576},
        outage=Outage(start_s=5, duration_s=10),
        quota_exhausted_keys=("sk-broke",),
    )
    assert SimulatorConfig.from_dict(json.loads(config.to_json())) == config


def test_config_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown"):
        SimulatorConfig.from_dict({"rpm": 60})
    with pytest.raises(ValueError, match="unknown"):
        SimulatorConfig.from_dict({"default_limits": {"rpn": 60}})
    with pytest.raises(ValueError):
        SimulatorConfig.from_dict({"default_limits": {"rpm": 0}})


def test_start_stop_and_control_endpoints() -> None:
    with start_simulator(SimulatorConfig(default_limits=Limits(rpm=42))) as sim:
        assert isinstance(sim, SimulatorProcess) and sim.running
        assert sim.openai_base_url == f"http://127.0.0.1:{sim.port}/v1"
        assert sim.health()["status"] == "ok"
        assert sim.config().default_limits == Limits(rpm=42)
        updated = sim.set_config(default_limits=Limits(rpm=7), outage=Outage(duration_s=3))
        assert updated.default_limits.rpm == 7 and updated.outage == Outage(duration_s=3)
        with pytest.raises(SimulatorError, match="400"):
            sim.set_config({"default_limits": {"rpm": -1}})
        stats = sim.stats()
        assert set(stats) == {"started_at", "elapsed_s", "second", "totals", "outcomes", "by_key_model", "series"}
        assert "series" not in sim.stats(series=False)
        sim.reset()
        assert sim.stats()["totals"]["requests"] == 0
    assert not sim.running and sim.process.returncode == 0


def test_explicit_port() -> None:
    with start_simulator(port=0) as first:  # 0 asks for a free port too
        port = first.port
    with start_simulator(port=port) as second:
        assert second.base_url == f"http://127.0.0.1:{port}"


def test_command_line(tmp_path: Path) -> None:
    ready = tmp_path / "port"
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"seed": 9, "default_limits": {"tpm": 1000}}))
    process = subprocess.Popen(
        [sys.executable, "-m", "batchdb.simulator", "--port", "0", "--config", str(config), "--rpm", "5",
         "--ready-file", str(ready)],
        cwd=_SOURCE_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        url = f"http://127.0.0.1:{ready.read_text()}/_sim/config"
        with urllib.request.urlopen(url, timeout=10) as response:
            served = json.loads(response.read())
        assert served["seed"] == 9 and served["default_limits"] == {"rpm": 5, "tpm": 1000, "rpd": None}
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr


def test_bad_config_file_fails_fast(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"default_limits": {"rpm": "lots"}}))
    result = subprocess.run(
        [sys.executable, "-m", "batchdb.simulator", "--config", str(config)],
        cwd=_SOURCE_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "invalid simulator config" in result.stderr
