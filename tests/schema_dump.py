"""Dump batchdb's schema as text, for sql/schema.sql and for the test that holds it to the migrations.

    python tests/schema_dump.py postgresql://postgres@127.0.0.1:5432/DB > sql/schema.sql

writes a fresh sql/schema.sql from a database that `batchdb db upgrade` built
(the starting point when a migration changed many objects; small changes are
easier made by hand). `comparable(dsn)` is what tests/test_schema.py compares:
pg_dump's schema and seed data of the batchdb schema, without the lines that
differ between two identical catalogs (dump headers, restrict keys).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

# The tables migrations fill with reference data; everything else starts empty.
SEEDED_TABLES = ("batchdb.prices", "batchdb.request_params")

_HEADER = """-- batchdb's schema as it stands after the last migration: every table, view,
-- function, trigger, policy and grant of the `batchdb` schema, each defined once,
-- and the reference data the migrations seed. Read this file to see what the
-- database looks like today; read sql/migrations/ for how it got there and why.
--
-- Databases are built and upgraded by the migrations (`batchdb db upgrade`).
-- tests/test_schema.py builds one database from this file and one from the
-- migrations and requires pg_dump to describe them identically: a migration
-- that changes an object changes it here too (by hand, or start from
-- `python tests/schema_dump.py DSN > sql/schema.sql` on an upgraded database).

-- The group roles are cluster-wide (see 0005_users.sql, 0025_queue_depth.sql): create them when missing.
DO $$
DECLARE
    group_role text;
BEGIN
    FOREACH group_role IN ARRAY ARRAY['batchdb_user', 'batchdb_admin', 'batchdb_worker', 'batchdb_monitor'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = group_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', group_role);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END;
$$;

-- Functions come before the tables their bodies read: create them unchecked.
SET check_function_bodies = false;
"""

_NOISE = re.compile(
    r"^(SET |SELECT pg_catalog\.set_config|\\restrict|\\unrestrict|-- Dumped |"
    r"-- PostgreSQL database dump)"
)
_NAME_COMMENT = re.compile(r"^--\n-- (?:Data for )?Name: ([^;]+); Type: ([^;]+);[^\n]*\n--\n", re.MULTILINE)


def _pg_dump(dsn: str, *args: str) -> str:
    params = conninfo_to_dict(dsn)
    command = [
        shutil.which("pg_dump") or "pg_dump",
        "--no-owner",
        "-n",
        "batchdb",
        *args,
        "-h",
        str(params.get("host", "127.0.0.1")),
        "-p",
        str(params.get("port", 5432)),
        "-U",
        str(params.get("user", "postgres")),
        str(params["dbname"]),
    ]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


_COLUMN_GRANT = re.compile(r"^-- acl COLUMN \S+\n\nGRANT ([^ ]+) ON TABLE (\S+) TO (\S+);\n\n", re.MULTILINE)
_PRIVILEGE = re.compile(r"([A-Z]+)\(([a-z0-9_]+)\)")


def _column_grants(text: str) -> str:
    """pg_dump writes one GRANT per column; one statement per table, privilege and role reads better."""
    grants: dict[tuple[str, str, str], list[str]] = {}
    first = None
    for match in _COLUMN_GRANT.finditer(text):
        first = match.start() if first is None else first
        privileges, table, role = match.groups()
        for privilege, column in _PRIVILEGE.findall(privileges):
            grants.setdefault((table, privilege, role), []).append(column)
    if first is None:
        return text
    combined = "".join(
        f"GRANT {privilege} ({', '.join(columns)}) ON TABLE {table} TO {role};\n"
        for (table, privilege, role), columns in grants.items()
    )
    rest = _COLUMN_GRANT.sub("", text)
    return rest[:first] + "-- column privileges\n\n" + combined + "\n" + rest[first:]


def _clean(text: str) -> str:
    text = _NAME_COMMENT.sub(lambda m: f"-- {m.group(2).lower()} {m.group(1)}\n", text)
    lines = [line for line in text.splitlines() if not _NOISE.match(line)]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    text = re.sub(r"\A(--\n)+", "", text.lstrip("\n"))
    return _column_grants(text.strip() + "\n")


def seed_inserts(dsn: str) -> str:
    """The reference rows as INSERTs, in primary-key order, without the columns that record
    when a row was written (they take their default, now())."""
    out = []
    with psycopg.connect(dsn) as conn:
        for table in SEEDED_TABLES:
            schema, name = table.split(".")
            columns = [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                    "AND column_name NOT IN ('updated_at', 'created_at') ORDER BY ordinal_position",
                    (schema, name),
                )
            ]
            listed = ", ".join(columns)  # batchdb's column names are plain lowercase words
            values = sql.SQL(" || ', ' || ").join(
                sql.SQL("quote_nullable({}::text)").format(sql.Identifier(c)) for c in columns
            )
            rows = conn.execute(
                sql.SQL("SELECT {} FROM {} ORDER BY 1").format(values, sql.Identifier(schema, name))
            ).fetchall()
            out.append(f"-- {table}\n")
            out.extend(f"INSERT INTO {table} ({listed}) VALUES ({row[0]});\n" for row in rows)
            out.append("\n")
    return "".join(out)


def schema_text(dsn: str) -> str:
    """The body of sql/schema.sql: DDL and grants, then the seed data as INSERTs."""
    ddl = _clean(_pg_dump(dsn, "--schema-only"))
    return f"{_HEADER}\n{ddl}\n-- Reference data.\n\n{seed_inserts(dsn)}"


def comparable(dsn: str) -> str:
    """What two databases with the same batchdb schema and seed data dump identically."""
    return _clean(_pg_dump(dsn, "--schema-only")) + "\n" + seed_inserts(dsn)


if __name__ == "__main__":
    sys.stdout.write(schema_text(sys.argv[1]))
