"""Which database batchdb talks to, and connections to it.

`BATCHDB_DSN` (or an explicit `dsn=`) names any PostgreSQL >= 14. Without
one, batchdb starts (or finds) its embedded PostgreSQL, so a fresh machine
needs nothing installed.
"""

from __future__ import annotations

import os

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, Row, dict_row

from batchdb import pooler, settings
from batchdb.errors import DatabaseMissing

DSN_ENV = settings.DSN


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
    return make_conninfo("", **params)


def connect(dsn: str | None = None, *, autocommit: bool = True) -> psycopg.Connection[DictRow]:
    """A connection with batchdb's session options (without them through PgBouncer: batchdb/pooler.py)."""
    conn: psycopg.Connection[DictRow] = pooler.connect(
        with_options(resolve_dsn(dsn), SESSION_OPTIONS), autocommit=autocommit, row_factory=dict_row
    )
    return conn


async def connect_async(dsn: str | None = None, *, autocommit: bool = True) -> psycopg.AsyncConnection[DictRow]:
    conn: psycopg.AsyncConnection[DictRow] = await pooler.connect_async(
        with_options(resolve_dsn(dsn), SESSION_OPTIONS), autocommit=autocommit, row_factory=dict_row
    )
    return conn


def one_row(cursor: psycopg.Cursor[Row]) -> Row:
    """The row of a statement that always returns exactly one (an aggregate, SHOW, a function call).

    psycopg types fetchone() as optional; no row here would be a bug, so it says so instead of
    failing later on indexing None.
    """
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("no row from a statement that always returns one")
    return row


# A failed connection that waiting will not mend: the server (or libpq) refused us. psycopg gives a
# failed connect no SQLSTATE (it carries libpq's text), so the messages are matched as well.
# invalid_catalog_name (database missing or dropped), invalid_authorization_specification, invalid_password
REFUSED_SQLSTATES = frozenset({"3D000", "28000", "28P01"})
REFUSED_MESSAGES = (
    "does not exist",  # database or role
    "password",  # password authentication failed; fe_sendauth: no password supplied
    "authentication",  # peer, ident, SCRAM ... failed or not supported
    "pg_hba.conf",  # no pg_hba.conf entry; pg_hba.conf rejects connection
    "permission denied",  # no CONNECT privilege on the database
    "not permitted to log in",  # a NOLOGIN role
)


def is_fatal_connect_error(exc: psycopg.Error) -> bool:
    """The server or libpq refused us (a missing database or role, a refused login): retrying
    cannot help, so the caller says so instead of waiting."""
    if exc.sqlstate in REFUSED_SQLSTATES:
        return True
    text = str(exc).lower()
    return any(message in text for message in REFUSED_MESSAGES)


def is_unreachable(exc: psycopg.Error) -> bool:
    """A failed connect where the server did not answer, or not yet (refused, timed out, no route,
    starting up, out of connection slots), as opposed to refusing us: worth waiting for."""
    return not is_fatal_connect_error(exc)


def create_database_if_missing(dsn: str | None = None) -> str | None:
    """Create the DSN's database when the server says it does not exist; returns its name if created.

    Used by `batchdb db upgrade`, so the first command a user types on a new
    server is enough. Connects to the server's `postgres` maintenance database
    (then `template1`) as the same role.
    """
    from psycopg import sql

    dsn = resolve_dsn(dsn)
    try:
        pooler.connect(with_options(dsn, SESSION_OPTIONS), connect_timeout=10).close()
        return None
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc) or "database" not in str(exc):
            raise
    params = conninfo_to_dict(dsn)
    name = str(params.get("dbname") or params.get("user") or os.environ.get("PGDATABASE") or "")
    last: psycopg.OperationalError | None = None
    for maintenance in ("postgres", "template1"):
        try:
            with psycopg.connect(make_conninfo(dsn, dbname=maintenance), autocommit=True, connect_timeout=10) as admin:
                role = one_row(admin.execute("SELECT current_user"))[0]
                try:
                    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except psycopg.errors.DuplicateDatabase:
                    return None  # created by someone else meanwhile
                except psycopg.errors.InsufficientPrivilege:
                    raise DatabaseMissing(
                        f"database {name!r} does not exist and role {role!r} may not create it; "
                        f'ask an administrator to run: CREATE DATABASE "{name}" OWNER "{role}"; '
                        "then run: batchdb db upgrade"
                    ) from None
                return name
        except psycopg.OperationalError as exc:
            last = exc
    assert last is not None
    raise last
