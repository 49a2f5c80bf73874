"""Known failures, told in one or two lines: what happened, and the command that fixes it.

The SDK raises these stories as BatchDBErrors (batchdb/errors.py translates a psycopg
error through `explain`), and every `batchdb` command runs inside `explain`'s net
(cli.py's root group), so a
database that was never upgraded, a database that does not exist or a server
that is not running gives a sentence instead of a 30-line traceback. Anything
not recognised here keeps its traceback: it is a bug to report. `batchdb -v`
prints the traceback of a known failure too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from batchdb.errors import BatchDBError, SchemaNotReady

UPGRADE = "batchdb db upgrade"


@dataclass(frozen=True, slots=True)
class Explanation:
    what: str
    fix: str | None = None

    def text(self) -> str:
        return self.what if self.fix is None else f"{self.what}\n  run: {self.fix}"


_MISSING_DB = re.compile(r'database "([^"]+)" does not exist')
_SERVER_AT = re.compile(r'connection to server (?:at "([^"]+)"(?: \([^)]*\))?, port (\d+)|on socket "([^"]+)")')


def explain(exc: BaseException, *, dsn_flag: str = "") -> Explanation | None:
    """The short story of a known failure, or None for an unexpected one.

    `dsn_flag` is what to add to a suggested command (" --dsn ...") when the user
    named the database on the command line rather than in BATCHDB_DSN.
    """
    if isinstance(exc, SchemaNotReady):
        return Explanation(str(exc), UPGRADE + dsn_flag)
    if isinstance(exc, BatchDBError) and isinstance(exc.__cause__, psycopg.Error):
        return explain(exc.__cause__, dsn_flag=dsn_flag)  # the SDK's translation, told again for this command
    if isinstance(exc, BatchDBError):
        return Explanation(str(exc).strip())
    if isinstance(
        exc,
        psycopg.errors.UndefinedTable
        | psycopg.errors.UndefinedFunction
        | psycopg.errors.UndefinedColumn
        | psycopg.errors.InvalidSchemaName,
    ) and "batchdb" in str(exc):
        first = str(exc).strip().splitlines()[0]
        return Explanation(f"the database has no batchdb schema, or an older one ({first})", UPGRADE + dsn_flag)
    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        return _connection_failure(str(exc), dsn_flag)
    if isinstance(
        exc,
        psycopg.errors.InsufficientPrivilege
        | psycopg.errors.CheckViolation
        | psycopg.errors.RaiseException
        | psycopg.errors.InvalidParameterValue
        | psycopg.errors.NoDataFound
        | psycopg.errors.UniqueViolation
        | psycopg.errors.ForeignKeyViolation,
    ):
        return Explanation(str(exc).strip().splitlines()[0])
    return None


def _connection_failure(message: str, dsn_flag: str) -> Explanation:
    """psycopg's 'connection failed: connection to server at ... failed: FATAL: ...', shortened."""
    where = _where(message)
    missing = _MISSING_DB.search(message)
    if missing:
        return Explanation(
            f"database {missing.group(1)!r} does not exist on {where}", f"{UPGRADE}{dsn_flag}   (creates it)"
        )
    reason = message.rsplit("failed:", 1)[-1].replace("FATAL:", "").strip().splitlines()[0].strip()
    lower = message.lower()
    if "connection refused" in lower or "no such file or directory" in lower or "could not translate" in lower:
        return Explanation(
            f"cannot connect to PostgreSQL at {where}: {reason}",
            "start the server, or point BATCHDB_DSN (or --dsn) at a running one; "
            "without either, batchdb starts its embedded server",
        )
    if (
        "password authentication failed" in lower
        or ("role" in lower and "does not exist" in lower)
        or "no password supplied" in lower
        or "pg_hba.conf" in lower
    ):
        return Explanation(
            f"PostgreSQL at {where} refused the login: {reason}",
            "check the user and password in BATCHDB_DSN (or --dsn)",
        )
    return Explanation(f"cannot connect to PostgreSQL at {where}: {reason}")


def _where(message: str) -> str:
    match = _SERVER_AT.search(message)
    if match is None:
        return "the configured server"
    if match.group(3):
        return f"socket {match.group(3)}"
    return f"{match.group(1)}:{match.group(2)}"
