"""sql/schema.sql is the schema the migrations build: one database from each, described identically."""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from schema_dump import comparable

SCHEMA = Path(__file__).parent.parent / "sql" / "schema.sql"


@pytest.fixture
def from_schema_file(admin_dsn: str) -> Iterator[str]:
    name = f"batchdb_s_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(admin_dsn, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA.read_text())
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_schema_file_and_migrations_build_the_same_database(dsn: str, from_schema_file: str) -> None:
    migrated = comparable(dsn)  # the per-test database: a copy of the template the migrations built
    written = comparable(from_schema_file)
    assert "CREATE TABLE batchdb.requests" in migrated and "INSERT INTO batchdb.prices" in migrated
    if written != migrated:
        diff = "".join(
            difflib.unified_diff(
                written.splitlines(True),
                migrated.splitlines(True),
                "built from sql/schema.sql",
                "built by the migrations",
                n=2,
            )
        )
        pytest.fail(
            "sql/schema.sql and the migrations disagree (update schema.sql; see tests/schema_dump.py):\n" + diff[:6000]
        )


def test_the_comparison_sees_a_difference(dsn: str, from_schema_file: str) -> None:
    """Not vacuous: one changed default, one dropped grant and one changed price each show up."""
    before = comparable(from_schema_file)
    with psycopg.connect(from_schema_file, autocommit=True) as conn:
        conn.execute("ALTER TABLE batchdb.jobs ALTER COLUMN priority SET DEFAULT 7")
    changed_default = comparable(from_schema_file)
    with psycopg.connect(from_schema_file, autocommit=True) as conn:
        conn.execute(
            "REVOKE EXECUTE ON FUNCTION"
            " batchdb.call_cost_usd(numeric, numeric, numeric, numeric, bigint, bigint, bigint, boolean) FROM PUBLIC"
        )
    dropped_grant = comparable(from_schema_file)
    with psycopg.connect(from_schema_file, autocommit=True) as conn:
        conn.execute("UPDATE batchdb.prices SET input_per_mtok = input_per_mtok + 1 WHERE model = 'gpt-4o-mini'")
    changed_price = comparable(from_schema_file)
    assert len({before, changed_default, dropped_grant, changed_price}) == 4
