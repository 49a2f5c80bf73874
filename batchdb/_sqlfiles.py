"""Locate the `sql/` folder: the repo's own in a checkout, `batchdb/_sql` in a wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).parent / "_sql"
_CHECKOUT = Path(__file__).parent.parent / "sql"


def sql_dir() -> Path:
    for candidate in (_PACKAGED, _CHECKOUT):
        if (candidate / "migrations").is_dir():
            return candidate
    raise FileNotFoundError("batchdb's sql/ folder is missing from this installation")
