"""Lint, types and layers run with the suite, so the README's one test command checks them too.

The rules live in pyproject.toml: ruff's rule set and format ([tool.ruff]), mypy strict on batchdb's core,
workers, Dagster integration and dashboard ([tool.mypy]), and import-linter's layer contracts
([tool.importlinter]: the core imports nothing from workers, Dagster or the dashboard; those two stay
independent of each other; the Dagster integration uses only batchdb's public names; the dashboard
never imports a module that writes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    executable = BIN / tool
    if not executable.exists():
        pytest.fail(f"{tool} is not installed in this venv: pip install -c constraints.txt -e '.[test]'")
    return subprocess.run([str(executable), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    done = run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_the_tree_is_formatted() -> None:
    done = run("ruff", "format", "--check", ".")
    assert done.returncode == 0, "run: ruff format .\n" + done.stdout[-5000:] + done.stderr[-2000:]


def test_mypy_finds_nothing() -> None:
    done = run("mypy")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert "Success" in done.stdout


def test_import_layers_are_kept() -> None:
    done = run("lint-imports")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


# What the dashboard may import from the core: its read side (everything else writes, or is the CLI).
DASHBOARD_READS = {
    "batchdb._source_root", "batchdb._sqlfiles", "batchdb.context_window", "batchdb.db", "batchdb.errors",
    "batchdb.models", "batchdb.pooler", "batchdb.pricing", "batchdb.prompts", "batchdb.queries", "batchdb.results",
    "batchdb.settings", "batchdb.tokens", "batchdb.validation",
}  # fmt: skip


def test_every_core_module_is_in_the_layer_contracts() -> None:
    """A new module of the core is held to the contracts only when listed: a module left out could
    import the workers, be used by the Dagster integration, or write from the dashboard, unseen."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    by_name = {c["name"]: c for c in contracts}
    core = {f"batchdb.{p.stem}" for p in (ROOT / "batchdb").glob("*.py") if p.stem not in ("__init__", "__main__")} | {
        "batchdb.providers"
    }
    layered = set(
        by_name["The core imports nothing from workers, Dagster, the dashboard or the simulator"]["source_modules"]
    )
    assert core - layered == set(), "add these to the core contract's source_modules"
    public_only = set(
        by_name["The Dagster resource, asset and checks use only batchdb's public API"]["forbidden_modules"]
    )
    assert core - public_only == set(), "add these to the Dagster contract's forbidden_modules"
    writes = set(by_name["The dashboard writes nothing but through the public API"]["forbidden_modules"])
    assert core - writes == DASHBOARD_READS, "a new module: forbid it to the dashboard, or add it to DASHBOARD_READS"
