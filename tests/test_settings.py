"""Environment variables are named once (batchdb/settings.py) and documented in the README."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

from batchdb import settings

ROOT = Path(__file__).parent.parent
NAME = re.compile(r"\bBATCHDB_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
# Patterns, not names: per-alias keys (batchdb/secrets.py) and the README's own prefixes.
PATTERNS = re.compile(r"BATCHDB_(KEY|ENDPOINT|SMTP)$|BATCHDB_KEY_|BATCHDB_ENDPOINT_")


def declared() -> set[str]:
    return {v.name for v in settings.ENVIRONMENT}


def test_every_name_in_the_code_is_declared_once() -> None:
    found: dict[str, set[str]] = {}
    for folder in ("batchdb", "workers", "assets", "dashboard"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "settings.py" and path.parent.name == "batchdb":
                continue
            for name in NAME.findall(path.read_text()):
                if not PATTERNS.match(name):
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert found, "the scan found no variable at all"
    undeclared = {name: where for name, where in found.items() if name not in declared()}
    assert not undeclared, f"read but not in batchdb/settings.py: {undeclared}"
    names = [v.name for v in settings.ENVIRONMENT]
    assert len(names) == len(set(names))


def test_the_readme_lists_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(BATCHDB_[A-Z0-9_]+)` \|", section, re.MULTILINE))
    assert listed == declared()


def test_the_modules_example_runs() -> None:
    result = doctest.testmod(settings)
    assert result.attempted >= 2 and result.failed == 0


def test_a_value_batchdb_cannot_use_is_named_with_what_it_expects() -> None:
    env = {
        settings.SMTP_PORT: "5x87",
        settings.SMTP_STARTTLS: "maybe",
        settings.DASHBOARD_REFRESH: "0",
        settings.DSN: "anything goes here",
        settings.SMTP_HOST: "mail",
    }
    assert settings.environment_problems(env) == [
        "BATCHDB_SMTP_PORT: expected a port number (1-65535), got '5x87'",
        "BATCHDB_SMTP_STARTTLS: expected true or false, got 'maybe'",
        "BATCHDB_DASHBOARD_REFRESH: expected a number of seconds above 0, got '0'",
    ]
    good = {settings.SMTP_PORT: "2525", settings.SMTP_STARTTLS: "off", settings.DASHBOARD_REFRESH: "2.5"}
    assert settings.environment_problems(good) == []
    assert settings.environment_problems({}) == []


def test_every_command_refuses_a_bad_value_in_one_line() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, settings.SMTP_PORT: "smtp"}
    done = subprocess.run(
        [sys.executable, "-m", "batchdb", "--version"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0  # --version answers before any check
    done = subprocess.run(
        [sys.executable, "-m", "batchdb", "status"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1, done
    assert done.stderr.strip() == "Error: BATCHDB_SMTP_PORT: expected a port number (1-65535), got 'smtp'"


def test_a_worker_started_from_python_refuses_a_bad_value(monkeypatch) -> None:
    import asyncio

    import pytest

    from batchdb import BatchDBError
    from batchdb.workers.worker import Worker, WorkerConfig

    monkeypatch.setenv(settings.DASHBOARD_REFRESH, "-1")
    with pytest.raises(BatchDBError, match="BATCHDB_DASHBOARD_REFRESH: expected a number of seconds above 0"):
        asyncio.run(Worker(WorkerConfig(dsn="postgresql://nowhere.invalid/x")).run())
