"""One exception hierarchy: everything batchdb raises on purpose is a `batchdb.BatchDBError`,
and no psycopg error reaches an SDK user raw."""

from __future__ import annotations

import socket
import types

import pandas as pd
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import batchdb
from batchdb.embedded import EmbeddedServerError
from batchdb.prompts import PromptError
from batchdb.results import UnsupportedFormat
from batchdb.secrets import MissingSecret

PUBLIC_ERRORS = [
    batchdb.InputError,
    batchdb.JobNotFound,
    batchdb.JobPaused,
    batchdb.DatabaseError,
    batchdb.DatabaseMissing,
    batchdb.DatabaseUnavailable,
    batchdb.SchemaNotReady,
    EmbeddedServerError,
    UnsupportedFormat,
    MissingSecret,
]


def test_every_error_batchdb_raises_on_purpose_is_a_batchdb_error() -> None:
    for error in PUBLIC_ERRORS:
        assert issubclass(error, batchdb.BatchDBError), error
    # ... and still the built-in a caller caught before.
    assert issubclass(batchdb.InputError, ValueError) and issubclass(batchdb.JobNotFound, LookupError)
    assert issubclass(batchdb.DatabaseUnavailable, ConnectionError)
    assert not issubclass(PromptError, batchdb.BatchDBError)  # a row's failure inside workers, not raised to users


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_not_running_is_a_batchdb_error_with_the_fix(dsn: str) -> None:
    nowhere = make_conninfo(dsn, host="127.0.0.1", port=closed_port(), connect_timeout=5)
    frame = pd.DataFrame({"text": ["a"]})
    calls = {
        "submit": lambda: batchdb.submit(frame, prompt="{text}", model="m", provider="instant", dsn=nowhere),
        "get_job": lambda: batchdb.get_job(1, dsn=nowhere),
        "list_jobs": lambda: batchdb.list_jobs(dsn=nowhere),
        "Job.cancel": lambda: batchdb.Job(1, dsn=nowhere).cancel(),
    }
    for name, call in calls.items():
        with pytest.raises(batchdb.DatabaseUnavailable) as raised:
            call()
        message = str(raised.value)
        assert message.startswith("cannot connect to PostgreSQL at 127.0.0.1:"), (name, message)
        assert "start the server, or point BATCHDB_DSN" in message, (name, message)
        assert isinstance(raised.value.__cause__, psycopg.OperationalError), name  # kept for debugging


def test_a_database_without_the_schema_says_to_upgrade(admin_dsn: str) -> None:
    name = "batchdb_errors_empty"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        empty = make_conninfo(admin_dsn, dbname=name)
        with pytest.raises(batchdb.DatabaseError) as raised:
            batchdb.get_job(1, dsn=empty)
        assert "run: batchdb db upgrade" in str(raised.value)
        assert raised.value.sqlstate == "42P01"  # undefined_table, from the driver's error
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_missing_job_is_still_job_not_found(dsn: str) -> None:
    with pytest.raises(batchdb.JobNotFound, match="job 424242 does not exist"):
        batchdb.get_job(424242, dsn=dsn)
    with pytest.raises(batchdb.JobNotFound):
        batchdb.Job(424242, dsn=dsn).cancel()


# The names users may import from `batchdb`; anything else is private (an underscore or a submodule).
EXPORTED = {
    "BatchDBError",
    "DatabaseError",
    "DatabaseMissing",
    "DatabaseUnavailable",
    "DataSource",
    "Estimate",
    "InputError",
    "Job",
    "JobNotFound",
    "JobPaused",
    "JobProgress",
    "JobStatus",
    "RequestStatus",
    "SchemaNotReady",
    "estimate",
    "get_job",
    "list_jobs",
    "submit",
}


def test_public_api_is_pinned() -> None:
    assert set(batchdb.__all__) == EXPORTED
    assert len(batchdb.__all__) == len(EXPORTED)  # no duplicates
    for name in batchdb.__all__:
        member = getattr(batchdb, name)
        # A type alias (DataSource) is a typing union, whose __module__ is "types": ask where it is defined.
        home = batchdb._HOME[name] if isinstance(member, types.UnionType) else member.__module__
        assert home.startswith("batchdb."), (name, home)
    assert set(dir(batchdb)) >= EXPORTED
