"""batchdb.db: which database, and how its connections are set up."""

from __future__ import annotations

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
