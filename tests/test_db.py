"""batchdb.db: which database, and how its connections are set up."""

from __future__ import annotations

import socket
import uuid

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from batchdb import db


def test_connections_turn_jit_off_and_keep_the_dsns_own_options(dsn: str) -> None:
    with db.connect(make_conninfo(dsn, options="-c work_mem=7MB")) as conn:
        rows = conn.execute("SELECT name, setting FROM pg_settings WHERE name IN ('jit', 'work_mem')").fetchall()
    settings = {r["name"]: r["setting"] for r in rows}
    assert settings == {"jit": "off", "work_mem": str(7 * 1024)}


def test_with_options_appends(dsn: str) -> None:
    assert conninfo_to_dict(db.with_options(dsn, "-c jit=off"))["options"] == "-c jit=off"
    both = db.with_options(make_conninfo(dsn, options="-c a.b=1"), "-c jit=off")
    assert conninfo_to_dict(both)["options"] == "-c a.b=1 -c jit=off"


def test_an_explicit_dsn_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(db.DSN_ENV, "postgresql://from-env/db")
    assert db.resolve_dsn("postgresql://explicit/db") == "postgresql://explicit/db"
    assert db.resolve_dsn(None) == "postgresql://from-env/db"


def connect_error(dsn: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as failed:
        psycopg.connect(dsn, connect_timeout=10).close()
    return failed.value


def test_refusals_are_fatal_and_a_silent_server_is_unreachable(admin_dsn: str) -> None:
    """The CLI's schema check and the workers' reconnect loop ask the same question of a failed
    connect, with what libpq and the server really say (a failed connect carries no SQLSTATE)."""
    role = f"batchdb_nologin_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" NOLOGIN')
    try:
        refused = {
            "missing database": make_conninfo(admin_dsn, dbname=f"batchdb_missing_{uuid.uuid4().hex[:8]}"),
            "missing role": make_conninfo(admin_dsn, user=f"batchdb_missing_{uuid.uuid4().hex[:8]}"),
            "NOLOGIN role": make_conninfo(admin_dsn, user=role),
        }
        for what, dsn in refused.items():
            exc = connect_error(dsn)
            assert db.is_fatal_connect_error(exc) and not db.is_unreachable(exc), (what, str(exc))
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    exc = connect_error(make_conninfo(admin_dsn, host="127.0.0.1", port=port))
    assert db.is_unreachable(exc) and not db.is_fatal_connect_error(exc), str(exc)
