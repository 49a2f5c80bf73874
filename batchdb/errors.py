"""The exceptions batchdb raises to its users, under one base class.

A script that submits jobs can catch `batchdb.BatchDBError` for every failure
batchdb knows how to explain: bad input (the row and column named), a job that
does not exist or paused, a database that is down, missing or not upgraded.
Database driver errors (psycopg's) never reach SDK users raw: the public
functions turn them into `DatabaseUnavailable`, `SchemaNotReady` or
`DatabaseError`, whose message says what happened and what to run, and whose
`__cause__` keeps the driver's error for debugging.

Each class also derives from the built-in a caller would have caught before
(`InputError` is a `ValueError`, `JobNotFound` a `LookupError`, ...).

Example:

    import batchdb

    try:
        job = batchdb.get_job(42)
    except batchdb.JobNotFound:
        print("no job 42")
    except batchdb.BatchDBError as exc:  # database down, not upgraded, ...
        print(f"batchdb: {exc}")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import psycopg

P = ParamSpec("P")
T = TypeVar("T")


class BatchDBError(Exception):
    """Base of every error batchdb raises on purpose."""


class DatabaseUnavailable(BatchDBError, ConnectionError):
    """The PostgreSQL server could not be reached, or refused the login."""


class DatabaseMissing(BatchDBError, RuntimeError):
    """The DSN's database does not exist and this role may not create it; the message says what to run."""


class SchemaNotReady(BatchDBError, RuntimeError):
    """The database lacks some of this batchdb's migrations (or has none)."""

    def __init__(self, missing: list[str], where: str) -> None:
        self.missing = missing
        self.where = where
        state = (
            "has no batchdb schema"
            if missing and missing[0].startswith("0001_")
            else (f"lacks migration(s) {', '.join(missing)}")
        )
        super().__init__(f"database {where} {state}")


class DatabaseError(BatchDBError):
    """The database refused a statement (a constraint, a permission); `sqlstate` says which."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def from_database_error(exc: psycopg.Error) -> BatchDBError:
    """The BatchDBError that tells `exc`'s story (see batchdb/explanations.py for the wording)."""
    from batchdb.explanations import explain

    explanation = explain(exc)
    text = explanation.text() if explanation is not None else " ".join(str(exc).split())
    if isinstance(exc, psycopg.OperationalError):  # refused, dropped, shutting down: the server, not the query
        return DatabaseUnavailable(text)
    return DatabaseError(text, exc.sqlstate)


@contextmanager
def database_errors() -> Iterator[None]:
    """Turn psycopg errors raised inside into BatchDBErrors (the driver's error as `__cause__`)."""
    try:
        yield
    except psycopg.Error as exc:
        raise from_database_error(exc) from exc


def translates_database_errors(function: Callable[P, T]) -> Callable[P, T]:
    """Decorator for public SDK functions: no psycopg error escapes them raw."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with database_errors():
            return function(*args, **kwargs)

    return wrapper
