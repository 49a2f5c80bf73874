"""Run the simulator as a real subprocess, for tests, benchmarks and the demo.

A real process (not an in-process server) keeps the simulator's CPU off the
caller's event loop and makes the client side see genuine sockets, resets and
timeouts. `start_simulator` returns once `/_sim/health` answers; the returned
`SimulatorProcess` talks to the control endpoints with the standard library, so
it needs no event loop and leaves no client sessions open.

    with start_simulator(SimulatorConfig(default_limits=Limits(rpm=600))) as sim:
        client = AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-test", max_retries=0)
        ...
        print(sim.stats()["totals"])
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from batchdb._source_root import SOURCE_ROOT as _SOURCE_ROOT
from batchdb.simulator.config import SimulatorConfig

# `_SOURCE_ROOT` (the directory that holds the `batchdb` package) goes on the child's PYTHONPATH
# so `python -m batchdb.simulator` runs this very code whatever the caller's cwd.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SimulatorError(RuntimeError):
    """The simulator failed to start or a control request failed."""


class SimulatorProcess:
    """A running ``python -m batchdb.simulator`` child process."""

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int, workdir: Path) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.workdir = workdir
        self.log_path = workdir / "simulator.log"
        self._finalizer = weakref.finalize(self, _terminate, process, workdir)

    # -- URLs ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:P``: the Gemini base URL and the Azure endpoint."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def azure_endpoint(self) -> str:
        return self.base_url

    @property
    def gemini_base_url(self) -> str:
        return self.base_url

    # -- Control ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_sim/health"))

    def stats(self, *, series: bool = True) -> dict[str, Any]:
        """`/_sim/stats` parsed; ``series=False`` skips the per-second series."""
        return dict(self._call("GET", "/_sim/stats" if series else "/_sim/stats?series=0"))

    def reset(self) -> None:
        self._call("POST", "/_sim/reset")

    def config(self) -> SimulatorConfig:
        return SimulatorConfig.from_dict(self._call("GET", "/_sim/config"))

    def set_config(self, changes: SimulatorConfig | Mapping[str, Any] | None = None, **fields: Any) -> SimulatorConfig:
        """Replace config fields at runtime; a whole `SimulatorConfig` replaces everything.

        ``sim.set_config(outage=Outage(duration_s=2))`` starts a 2 s outage now;
        ``sim.set_config(outage=None)`` ends it. Changing limits refills all buckets.
        """
        if isinstance(changes, SimulatorConfig):
            payload: dict[str, Any] = changes.to_dict()
        else:
            payload = dict(changes or {})
        payload.update(fields)
        payload = {name: _jsonable(value) for name, value in payload.items()}
        return SimulatorConfig.from_dict(self._call("POST", "/_sim/config", payload))

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with _NO_PROXY.open(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            exc.close()
            raise SimulatorError(f"{method} {path} answered {exc.code}: {detail}") from None

    # -- Lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code. Idempotent."""
        returncode = _stop_process(self.process, timeout)
        self._finalizer()
        return returncode

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatorProcess(pid={self.process.pid}, base_url={self.base_url!r}, running={self.running})"


def start_simulator(
    config: SimulatorConfig | None = None,
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    startup_timeout: float = 20.0,
    log_level: str = "WARNING",
) -> SimulatorProcess:
    """Start ``python -m batchdb.simulator`` on ``host`` (a free port if ``port`` is None).

    Returns once `/_sim/health` answers. The child exits by itself if this
    process dies, so a crashed test run leaves no simulator behind.
    """
    config = config or SimulatorConfig()
    workdir = Path(tempfile.mkdtemp(prefix="batchdb-sim-"))
    config_path = workdir / "config.json"
    config_path.write_text(config.to_json())
    ready_file = workdir / "port"
    command = [
        sys.executable, "-m", "batchdb.simulator",
        "--host", host,
        "--port", str(port or 0),
        "--config", str(config_path),
        "--ready-file", str(ready_file),
        "--exit-with-parent",
        "--log-level", log_level,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(workdir / "simulator.log", "wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
        )

    deadline = time.monotonic() + startup_timeout
    try:
        while not ready_file.exists():
            if process.poll() is not None:
                raise SimulatorError(f"simulator exited with {process.returncode}:\n{_read(workdir / 'simulator.log')}")
            if time.monotonic() > deadline:
                raise SimulatorError(
                    f"simulator did not start in {startup_timeout}s:\n{_read(workdir / 'simulator.log')}"
                )
            time.sleep(0.02)
        sim = SimulatorProcess(process, host, int(ready_file.read_text()), workdir)
        while True:
            try:
                sim.health()
                return sim
            except (OSError, SimulatorError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    except BaseException:
        _terminate(process, workdir)
        raise


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except OSError:
        return ""


def _stop_process(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except ProcessLookupError:
            pass
    return process.returncode


def _terminate(process: subprocess.Popen[bytes], workdir: Path) -> None:
    _stop_process(process, 5.0)
    shutil.rmtree(workdir, ignore_errors=True)
