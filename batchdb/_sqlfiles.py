"""Locate the `sql/` folder, reached as `batchdb/_sql` in a checkout (a symlink to ../sql) and
in a wheel (hatchling copies the files it points to)."""

from __future__ import annotations

from pathlib import Path

_SQL = Path(__file__).parent / "_sql"


def sql_dir() -> Path:
    if (_SQL / "migrations").is_dir():
        return _SQL
    raise FileNotFoundError("batchdb's sql/ folder is missing from this installation")
