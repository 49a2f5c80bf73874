"""Which database batchdb talks to, and connections to it.

`BATCHDB_DSN` (or an explicit `dsn=`) names any PostgreSQL >= 14. Without
one, batchdb starts (or finds) its embedded PostgreSQL, so a fresh machine
needs nothing installed.
"""

from __future__ import annotations

import os

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
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


# batchdb's statements are short and selective. Under row-level security, and with a queue's
# churned statistics, their cost estimates pass jit_above_cost: JIT then spent ~200 ms compiling a
# read that runs in 1 ms (bench/rls.py). Every batchdb connection turns it off.
SESSION_OPTIONS = "-c jit=off"


def with_options(dsn: str, options: str) -> str:
    """`dsn` with server settings (`-c name=value ...`) added to whatever options it already has."""
    params = conninfo_to_dict(dsn)
    params["options"] = f"{params['options']} {options}" if params.get("options") else options
    return make_conninfo(**params)


def connect(dsn: str | None = None, *, autocommit: bool = True) -> psycopg.Connection[dict]:
    return psycopg.connect(with_options(resolve_dsn(dsn), SESSION_OPTIONS), autocommit=autocommit,
                           row_factory=dict_row)


async def connect_async(dsn: str | None = None, *, autocommit: bool = True) -> psycopg.AsyncConnection[dict]:
    return await psycopg.AsyncConnection.connect(with_options(resolve_dsn(dsn), SESSION_OPTIONS),
                                                 autocommit=autocommit, row_factory=dict_row)
