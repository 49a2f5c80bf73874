"""Lint, types and layers run with the suite, so the README's one test command checks them too.

The rules live in pyproject.toml: ruff's rule set and format ([tool.ruff]), mypy strict on batchdb's core and
workers ([tool.mypy]), and import-linter's layer contracts ([tool.importlinter]: the core imports
nothing from workers, Dagster or the dashboard; those two stay independent of each other).
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
