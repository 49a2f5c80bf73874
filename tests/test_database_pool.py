"""The per-test databases made ahead and dropped behind (tests/database_pool.py) stay isolated."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import psycopg
import pytest
from database_pool import PREFIX, TestDatabases

import batchdb

_seen: list[str] = []  # the databases the two ordered tests below were given


def _exists(admin_dsn: str, name: str) -> bool:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


@pytest.fixture
def pool(admin_dsn: str, template_db: str) -> Iterator[TestDatabases]:
    databases = TestDatabases(admin_dsn, template_db, ahead=1)
    yield databases
    databases.close()


def test_each_clone_is_fresh_and_nothing_survives_its_drop(admin_dsn: str, pool: TestDatabases) -> None:
    first, second = pool.take(), pool.take()
    assert first != second and first.startswith(PREFIX) and second.startswith(PREFIX)
    with psycopg.connect(pool.dsn(first), autocommit=True) as conn:
        conn.execute("LISTEN batchdb_events")
        job = batchdb.submit(
            pd.DataFrame({"text": ["a"]}), prompt="{text}", model="m", provider="instant", dsn=pool.dsn(first)
        )
        conn.execute(f"ALTER DATABASE \"{first}\" SET statement_timeout = '7s'")
        # The first is still connected when it is given back: the drop goes through anyway (WITH FORCE).
        pool.give_back(first)
        pool.settle()
    assert not _exists(admin_dsn, first)
    with psycopg.connect(pool.dsn(second), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM batchdb.jobs").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM batchdb.requests").fetchone() == (0,)
        assert conn.execute("SHOW statement_timeout").fetchone() != ("7s",)
        assert conn.execute("SELECT nextval(pg_get_serial_sequence('batchdb.jobs', 'id'))").fetchone() == (job.id,)
    pool.give_back(second)
    pool.settle()  # the clone ordered by the last take() is made ahead: nobody takes it
    assert len(pool.made) == 3
    pool.close()  # drops it
    assert not any(_exists(admin_dsn, name) for name in pool.made)


def test_a_clone_that_cannot_be_made_fails_the_test_that_takes_it(admin_dsn: str) -> None:
    pool = TestDatabases(admin_dsn, "batchdb_tpl_does_not_exist", ahead=0)
    try:
        with pytest.raises(psycopg.errors.InvalidCatalogName):
            pool.take()
    finally:
        pool.close()


def test_dsn_gives_this_test_its_own_database_first(dsn: str) -> None:
    _seen.append(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    batchdb.submit(pd.DataFrame({"text": ["a"]}), prompt="{text}", model="m", provider="instant", dsn=dsn)


def test_dsn_gives_this_test_its_own_database_second(dsn: str, admin_dsn: str) -> None:
    """Runs after the one above (pytest keeps file order): a new clone, empty, while the other's is dropped."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert _seen and name not in _seen
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM batchdb.jobs").fetchone() == (0,)
