"""Which database batchdb talks to, and connections to it.

`BATCHDB_DSN` (or an explicit `dsn=`) names any PostgreSQL >= 14. Without
one, batchdb starts (or finds) its embedded PostgreSQL, so a fresh machine
needs nothing installed.
"""

from __future__ import annotations

import os

import psycopg
from psycopg.rows import dict_row

DSN_ENV = "BATCHDB_DSN"


def resolve_dsn(dsn: str | None = None) -> str:
    """The DSN to use: explicit, then `BATCHDB_DSN`, then the embedded server."""
    if dsn:
        return dsn
    from_env = os.environ.get(DSN_ENV)
    if from_env:
        return from_env
    from batchdb import embedded

    return embedded.ensure_server().dsn


def connect(dsn: str | None = None, *, autocommit: bool = True) -> psycopg.Connection[dict]:
    return psycopg.connect(resolve_dsn(dsn), autocommit=autocommit, row_factory=dict_row)


async def connect_async(dsn: str | None = None, *, autocommit: bool = True) -> psycopg.AsyncConnection[dict]:
    return await psycopg.AsyncConnection.connect(resolve_dsn(dsn), autocommit=autocommit, row_factory=dict_row)
