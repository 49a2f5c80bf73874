"""Every statement the runtime runs, loaded by name from `sql/queries.sql`.

Blocks in that file start with a `-- name --` line (as procrastinate does), so
the SQL lives in one reviewed file and Python refers to it by name. Every
statement takes its values as parameters.
"""

from __future__ import annotations

import re
from functools import cache

from batchdb._sqlfiles import sql_dir

_BLOCK_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


@cache
def _load() -> dict[str, str]:
    text = (sql_dir() / "queries.sql").read_text()
    parts = _BLOCK_HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    blocks: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in blocks:
            raise ValueError(f"sql/queries.sql defines {name!r} twice")
        blocks[name] = body.strip()
    return blocks


def query(name: str) -> str:
    """The SQL text of the named block."""
    try:
        return _load()[name]
    except KeyError:
        raise KeyError(f"sql/queries.sql has no block named {name!r}") from None


def names() -> list[str]:
    return sorted(_load())
