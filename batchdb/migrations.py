"""Apply the numbered files in `sql/migrations/` exactly once each.

Safe to run from several processes at once: every run takes the same
transaction-level advisory lock, then applies what is missing in one
transaction per file, recording each version in `public.batchdb_migrations`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from batchdb._sqlfiles import sql_dir
from batchdb.db import one_row
from batchdb.queries import query

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text()


def available() -> list[Migration]:
    found = []
    for path in sorted((sql_dir() / "migrations").iterdir()):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {sql_dir() / 'migrations'}")
    return found


def applied(conn: psycopg.Connection[Any]) -> set[int]:
    with conn.transaction():
        conn.execute(query("migrations_lock"))
        conn.execute(query("migrations_table"))
        return _versions(conn)


def _versions(conn: psycopg.Connection[Any]) -> set[int]:
    with conn.cursor(row_factory=tuple_row) as cur:
        return {version for (version,) in cur.execute(query("migrations_applied")).fetchall()}


def pending(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Migrations this database lacks, read without creating or locking anything."""
    with conn.cursor(row_factory=tuple_row) as cur:
        (present,) = one_row(cur.execute(query("migrations_table_exists")))
    if not present:
        return available()
    done = _versions(conn)
    return [m for m in available() if m.version not in done]


def upgrade(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Apply every missing migration; returns those applied by this call."""
    done: list[Migration] = []
    for migration in available():
        with conn.transaction():
            conn.execute(query("migrations_lock"))
            conn.execute(query("migrations_table"))
            if migration.version in _versions(conn):
                continue
            conn.execute(migration.sql())
            conn.execute(query("migration_record"), {"version": migration.version, "name": migration.name})
            done.append(migration)
    return done
