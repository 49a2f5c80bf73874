"""The wheel creates one top-level import name, `batchdb` (issue 11), and works as installed.

The old wheel installed `workers`, `assets` and `dashboard` next to `batchdb`: `assets` collided with
users' Dagster projects, and child processes started in a user's folder imported same-named folders
from there. These tests build the wheel from this checkout, install it into a fresh virtualenv and
run a worker, the dashboard and a Dagster materialization from a working directory holding decoy
`assets/`, `workers/` and `dashboard/` packages that record it when they are imported.

The fresh virtualenv gets the dependencies from the virtualenv running the tests through a .pth
line (offline and quick): that adds the folder to sys.path without processing its .pth files, so
that environment's editable batchdb (an import hook) does not come along; the probe checks that
`batchdb` is the wheel's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

import batchdb
from batchdb.dashboard.run import free_port
from batchdb.simulator import SimulatorProcess

REPO = Path(__file__).resolve().parents[1]
DECOYS = ("assets", "workers", "dashboard")
# Environment variables that would put a checkout on the children's path or change how Python starts.
_PYTHON_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "PYTHONUSERBASE")


@dataclass
class Installed:
    wheel: Path
    python: Path
    site_packages: Path
    decoy_dir: Path  # a working directory with decoy packages

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PYTHON_ENV}
        return {**env, "PYTHONNOUSERSITE": "1", **extra}

    def decoys_imported(self) -> list[str]:
        return sorted(p.name for p in self.decoy_dir.glob("DECOY-IMPORTED-*"))


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{cmd} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(REPO)])
    [wheel] = dist.glob("batchdb-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "_batchdb_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ]
    )

    decoy_dir = root / "user-project"
    for name in DECOYS:
        (decoy_dir / name).mkdir(parents=True)
        (decoy_dir / name / "__init__.py").write_text(
            "import pathlib\n"
            f"pathlib.Path(__file__).resolve().parents[1].joinpath('DECOY-IMPORTED-{name}').touch()\n"
            f"print('DECOY {name} imported', flush=True)\n"
            f"raise ImportError('the decoy {name} package was imported instead of batchdb code')\n"
        )
    return Installed(wheel, python, site_packages, decoy_dir)


@pytest.mark.slow
def test_the_wheel_holds_only_batchdb_with_the_linked_folders(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"batchdb", "batchdb-0.1.0.dist-info"}
    assert not [n for n in names if n.endswith(".pth")]
    for path in (
        "batchdb/workers/worker.py",
        "batchdb/workers/__main__.py",
        "batchdb/dashboard/app.py",
        "batchdb/dashboard/views/overview.py",
        "batchdb/dagster/__init__.py",
        "batchdb/dagster/example.py",
        "batchdb/_sql/queries.sql",
        "batchdb/price_list.json",
        "batchdb/_sql/schema.sql",
    ):
        assert path in names, path
    migrations = sorted(p.name for p in (REPO / "sql" / "migrations").glob("*.sql"))
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("batchdb/_sql/migrations/")) == migrations


# What a core install (`pip install batchdb`, no extras) must not pull in: the Dagster and dashboard stacks.
EXTRAS_ONLY = ("dagster", "dagster-webserver", "dagster-postgres", "streamlit", "altair", "pydeck", "grpcio", "duckdb")


@pytest.mark.slow
def test_the_core_install_requires_no_dagster_or_dashboard_package(installed: Installed) -> None:
    """Only through the extras (`batchdb[dagster]`, `batchdb[dashboard]`); the constraints file pins them all."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(installed.wheel) as wheel:
        metadata = wheel.read("batchdb-0.1.0.dist-info/METADATA").decode()
    requires = [
        Requirement(line.split(":", 1)[1].strip())
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    core = {r.name.lower() for r in requires if r.marker is None}
    by_extra: dict[str, set[str]] = {}
    for r in requires:
        for extra in ("dagster", "dashboard"):
            if r.marker is not None and r.marker.evaluate({"extra": extra}):
                by_extra.setdefault(extra, set()).add(r.name.lower())
    assert {"psycopg", "pandas", "pyarrow", "openai", "google-genai"} <= core
    assert not core & set(EXTRAS_ONLY), core & set(EXTRAS_ONLY)
    assert {"dagster", "dagster-webserver", "dagster-postgres"} <= by_extra["dagster"]
    assert {"streamlit", "altair", "duckdb"} <= by_extra["dashboard"]
    # Version ranges in the metadata, exact pins only in constraints.txt.
    assert not [r for r in requires if any(s.operator == "==" for s in r.specifier)], requires


PROBE = """
import importlib.util, json
import batchdb, batchdb.dagster, batchdb.dagster.dev, batchdb.dashboard.run, batchdb.workers.processes
from batchdb._sqlfiles import sql_dir
print(json.dumps({
    "batchdb": batchdb.__file__,
    "top_level": {n: importlib.util.find_spec(n) is not None for n in ("workers", "assets", "dashboard")},
    "migrations": sorted(p.name for p in sql_dir().glob("migrations/*.sql")),
    "source_root": str(batchdb.workers.processes.SOURCE_ROOT),
    "app": str(batchdb.dashboard.run.APP),
    "dagster_command": batchdb.dagster.dev.dagster_command_line(host="127.0.0.1", port=1)[0],
}))
"""


def test_this_checkout_installed_editable_maps_only_batchdb(tmp_path: Path) -> None:
    """`pip install -e .` (dev-mode-exact) maps `batchdb` alone: the repository root is not on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in _PYTHON_ENV}
    where = _run(
        [sys.executable, "-c", "import batchdb; print(batchdb.__file__)"], cwd=tmp_path, env=env
    ).stdout.strip()
    if Path(where).resolve() != REPO / "batchdb" / "__init__.py":
        pytest.skip(f"this virtualenv's batchdb is {where}, not an editable install of {REPO}")
    found = json.loads(_run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env).stdout)
    assert found["top_level"] == {"workers": False, "assets": False, "dashboard": False}
    assert found["source_root"] == str(REPO)
    assert found["app"] == str(REPO / "batchdb" / "dashboard" / "app.py")
    assert Path(found["app"]).resolve() == REPO / "dashboard" / "app.py"  # through the symlink
    assert found["migrations"] == sorted(p.name for p in (REPO / "sql" / "migrations").glob("*.sql"))
    assert found["dagster_command"][-2:] == ["-w", str(REPO / "workspace.yaml")]


@pytest.mark.slow
def test_installed_batchdb_finds_its_files_and_creates_no_other_top_level_name(
    installed: Installed, tmp_path: Path
) -> None:
    probe = json.loads(_run([str(installed.python), "-c", PROBE], cwd=tmp_path, env=installed.env()).stdout)
    site = installed.site_packages
    assert probe["batchdb"] == str(site / "batchdb" / "__init__.py")  # the wheel's, not the checkout's
    assert probe["top_level"] == {"workers": False, "assets": False, "dashboard": False}
    assert probe["migrations"] == sorted(p.name for p in (REPO / "sql" / "migrations").glob("*.sql"))
    assert probe["source_root"] == str(site)  # what the children get on PYTHONPATH
    assert probe["app"] == str(site / "batchdb" / "dashboard" / "app.py")
    assert probe["dagster_command"][-2:] == ["-m", "batchdb.dagster.example"]  # no workspace.yaml outside a checkout


@pytest.mark.slow
def test_worker_from_a_folder_with_decoys_runs_batchdb_code(installed: Installed, dsn: str) -> None:
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(20)]})
    job = batchdb.submit(frame, prompt="{text}", model="m", provider="instant", dsn=dsn)
    result = subprocess.run(
        [str(installed.python), "-m", "batchdb.workers", "--exit-when-idle", "--poll-interval", "0.3"],
        cwd=installed.decoy_dir,
        env=installed.env(BATCHDB_DSN=dsn),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DECOY" not in result.stdout + result.stderr
    assert installed.decoys_imported() == []
    status = job.status()
    assert (status.status, status.n_succeeded) == ("completed", 20)


@pytest.fixture
def stopped_at_exit() -> Iterator[Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]]]:
    """Processes handed to it get SIGTERM (their group), then SIGKILL, when the test ends."""
    started: list[subprocess.Popen[bytes]] = []
    yield lambda process: started.append(process) or process  # type: ignore[func-returns-value]
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_for(
    condition: Callable[[], object], process: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"{what}: exited {process.returncode}\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


APP_PROBE = """
from streamlit.testing.v1 import AppTest
from batchdb.dashboard.run import APP
at = AppTest.from_file(str(APP), default_timeout=90).run()
assert not at.exception, [e.value for e in at.exception]
print("METRICS", sorted(m.label for m in at.metric))
"""


@pytest.mark.slow
def test_dashboard_from_a_folder_with_decoys_serves_batchdb_pages(
    installed: Installed,
    dsn: str,
    tmp_path: Path,
    stopped_at_exit: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    log = tmp_path / "dashboard.log"
    with log.open("wb") as out:
        process = stopped_at_exit(
            subprocess.Popen(
                [str(installed.python), "-m", "batchdb", "dashboard", "--port", str(port)],
                cwd=installed.decoy_dir,
                env=installed.env(BATCHDB_DSN=dsn),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    _wait_for(lambda: f"batchdb dashboard on http://127.0.0.1:{port}" in log.read_text(), process, log, "the dashboard")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=10) as reply:
        assert reply.read().strip() == b"ok"
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    # The health answer comes before any page runs: run the app itself too, as Streamlit would, there.
    page = _run([str(installed.python), "-c", APP_PROBE], cwd=installed.decoy_dir, env=installed.env(BATCHDB_DSN=dsn))
    assert "METRICS [" in page.stdout and "METRICS []" not in page.stdout, page.stdout
    assert "DECOY" not in log.read_text() + page.stdout + page.stderr
    assert installed.decoys_imported() == []


@pytest.mark.slow
def test_dagster_materializes_the_example_from_a_folder_with_decoys(
    installed: Installed,
    dsn: str,
    tmp_path: Path,
    simulator: Callable[..., SimulatorProcess],
    stopped_at_exit: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    sim = simulator()
    home, output_root = tmp_path / "dagster_home", tmp_path / "out"
    home.mkdir()
    env = installed.env(
        BATCHDB_DSN=dsn,
        DAGSTER_HOME=str(home),
        BATCHDB_OUTPUT_ROOT=str(output_root),
        OPENAI_BASE_URL=sim.openai_base_url,
        OPENAI_API_KEY="sk-test",
    )
    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        worker = stopped_at_exit(
            subprocess.Popen(
                [str(installed.python), "-m", "batchdb.workers", "--poll-interval", "0.3"],
                cwd=installed.decoy_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    result = subprocess.run(
        [
            str(installed.python),
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "batchdb.dagster.example",
            "--select",
            "headlines,headline_sentiment",
            "--partition",
            "2024-01-02",
        ],
        cwd=installed.decoy_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:] + worker_log.read_text()[-2000:]
    assert "RUN_SUCCESS" in output, output[-4000:]
    parquet = list(output_root.rglob("*.parquet"))
    assert len(parquet) == 1, (parquet, output[-2000:])
    answers = pd.read_parquet(parquet[0])
    assert len(answers) == 15 and answers["headline_id"].notna().all()
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, worker_log.read_text()[-3000:]
    assert "DECOY" not in output + worker_log.read_text()
    assert installed.decoys_imported() == []


# Made unimportable for the core-install test: the extras' packages (and grpc, which they bring).
_BLOCKER = """
import sys

BLOCKED = {blocked!r}


class BlockExtras:
    '''A core install has none of these: importing one fails as it would there.'''

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in a core install)", name=name)
        return None


sys.meta_path.insert(0, BlockExtras())
"""


def test_submit_the_cli_and_a_worker_need_no_extra_package(dsn: str, tmp_path: Path) -> None:
    """`pip install batchdb` without extras is enough to submit, run a worker and read results: every
    package only an extra brings (Dagster, Streamlit, DuckDB, Altair, ...) fails to import here."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    blocked = sorted(
        {"dagster", "dagster_webserver", "dagster_postgres", "streamlit", "altair", "pydeck", "grpc"} | {"duckdb"}
    )
    (blocker / "sitecustomize.py").write_text(_BLOCKER.format(blocked=blocked))
    env = {**os.environ, "PYTHONPATH": str(blocker), "BATCHDB_DSN": dsn}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
        )

    probe = run("-c", "import duckdb")
    assert probe.returncode == 1 and "not in a core install" in probe.stderr, probe.stderr  # the blocker works
    source = tmp_path / "rows.csv"
    source.write_text("h\nfirst\nsecond\nthird\n")
    submitted = run(
        "-m", "batchdb", "submit", str(source), "--prompt", "Say {h}", "--model", "gpt-4o-mini", "--provider", "instant"
    )
    assert submitted.returncode == 0, submitted.stderr
    worker = run("-m", "batchdb.workers", "--exit-when-idle", "--poll-interval", "0.2")
    assert worker.returncode == 0, worker.stderr[-3000:]
    out = tmp_path / "out.csv"
    job_id = submitted.stdout.split(":")[0].removeprefix("job ")  # "job 7: 3 rows queued"
    exported = run("-m", "batchdb", "results", job_id, "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    results = pd.read_csv(out)
    assert list(results["response"]) == ["echo: Say first", "echo: Say second", "echo: Say third"]
    assert set(results["status"]) == {"succeeded"}
