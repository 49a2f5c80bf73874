"""Setup mistakes told in one or two lines with the fixing command (batchdb/explanations.py), as a user meets them."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg.conninfo import make_conninfo

import batchdb
from batchdb.cli import cli


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def short_error(result: Result) -> str:
    """The output of a refused command, checked to be a short message and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.output
    return result.output


@pytest.fixture
def empty_dsn(admin_dsn: str) -> Iterator[str]:
    """A database that exists but was never upgraded."""
    name = f"batchdb_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(admin_dsn, dbname=name)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_commands_before_db_upgrade_say_to_run_it(empty_dsn: str, tmp_path: Path) -> None:
    source = tmp_path / "rows.csv"
    source.write_text("headline\nup\n")
    env = {"BATCHDB_DSN": empty_dsn}
    for args in (
        ["status"],
        ["status", "1"],
        ["limits", "show"],
        ["worker", "--exit-when-idle"],
        ["submit", str(source), "--model", "gpt-4o-mini", "--prompt", "{headline}"],
    ):
        output = short_error(run(*args, env=env))
        assert output.rstrip().endswith("run: batchdb db upgrade"), (args, output)
    # With the DSN on the command line, the fix carries it.
    output = short_error(run("status", "--dsn", empty_dsn))
    assert f"run: batchdb db upgrade --dsn '{empty_dsn}'" in output


def test_a_missing_database_is_named_and_db_upgrade_creates_it(admin_dsn: str) -> None:
    name = f"batchdb_missing_{uuid.uuid4().hex[:10]}"
    target = make_conninfo(admin_dsn, dbname=name)
    try:
        output = short_error(run("status", env={"BATCHDB_DSN": target}))
        assert f"database '{name}' does not exist" in output and "FATAL" not in output
        assert "run: batchdb db upgrade" in output
        result = run("db", "upgrade", "--dsn", target)
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[0] == f"created database {name}"
        assert run("status", "--dsn", target).exit_code == 0
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_db_upgrade_says_what_to_run_when_the_role_may_not_create_the_database(admin_dsn: str) -> None:
    role = f"batchdb_nocreate_{uuid.uuid4().hex[:8]}"
    name = f"batchdb_missing_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
    try:
        output = short_error(run("db", "upgrade", "--dsn", make_conninfo(admin_dsn, dbname=name, user=role)))
        assert f"role '{role}' may not create it" in output
        assert f'CREATE DATABASE "{name}" OWNER "{role}"' in output
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_a_server_that_is_not_running_is_one_line(admin_dsn: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    output = short_error(run("status", env={"BATCHDB_DSN": f"postgresql://postgres@127.0.0.1:{port}/x"}))
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}" in output and "Connection refused" in output


def test_verbose_shows_the_traceback_of_a_known_error(empty_dsn: str) -> None:
    result = run("-v", "status", env={"BATCHDB_DSN": empty_dsn})
    assert result.exit_code == 1
    assert "Traceback" in result.output and "UndefinedTable" in result.output
    assert "run: batchdb db upgrade" in result.output


def test_db_status_reports_the_database_of_batchdb_dsn(dsn: str, empty_dsn: str) -> None:
    result = run("db", "status", env={"BATCHDB_DSN": dsn})
    assert result.exit_code == 0, result.output
    assert "embedded" not in result.output
    first = result.output.splitlines()[0]
    assert first.startswith("database: ") and "/batchdb_t_" in first
    assert "schema:   up to date" in result.output
    result = run("db", "status", env={"BATCHDB_DSN": empty_dsn})
    assert result.exit_code == 1
    assert "schema:   not set up" in result.output and result.output.rstrip().endswith("run: batchdb db upgrade")


def test_version() -> None:
    result = run("--version")
    assert (result.exit_code, result.output.strip()) == (0, f"batchdb {batchdb.__version__}")


def test_a_worker_role_passes_the_schema_check(dsn: str, conn: psycopg.Connection) -> None:
    from batchdb import users

    name = f"wrk_{uuid.uuid4().hex[:8]}"
    users.add_user(conn, name, kind=users.UserKind.WORKER)
    try:
        worker_dsn = make_conninfo(dsn, user=name)
        result = run("worker", "--exit-when-idle", "--dsn", worker_dsn)
        assert result.exit_code == 0, (result.output, result.exception)
        assert run("db", "status", "--dsn", worker_dsn).exit_code == 0
    finally:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')
