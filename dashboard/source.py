"""Where the dashboard's data comes from: read-only PostgreSQL, fetched into Arrow, and DuckDB.

PostgreSQL answers the selective questions (one job's partition, a lane's last
minutes, the job counters) with its indexes; the answers are small and come
back as Arrow tables. DuckDB then shapes them (filters, joins, cost by day)
and reads finished jobs' Parquet outputs directly.

Why not DuckDB's postgres extension: `bench/dashboard.py --compare` ran every page both
ways on a 1,000,000-row job, the paths taking turns. Every question is answered inside
PostgreSQL either way, so only overhead differs: a reused psycopg connection was fastest on 5
of 6 pages, the extension with one attached connection was within 10-40 ms of a connection
per load (faster only on pages that fetch thousands of rows), and an ATTACH per page load
made pages 3-5x slower. The extension also sends each query through `COPY (...) TO STDOUT`,
where PostgreSQL neither parallelises nor takes bind parameters, and would need a process-wide
attached database shared by Streamlit's script threads plus two exactly-pinned wheels at run
time. `PostgresViaDuckDB` keeps that path runnable for the comparison (bench/README.md).

Every PostgreSQL connection opened here is read-only
(`default_transaction_read_only=on`), named `batchdb-dashboard` in
`pg_stat_activity`, and bounded by a statement timeout. The dashboard's two
writes, cancel and retry, go through `batchdb.Job` instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Union

import duckdb
import pandas as pd
import psycopg
import pyarrow as pa
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from batchdb import pooler
from batchdb.db import SESSION_OPTIONS, resolve_dsn, with_options

APPLICATION_NAME = "batchdb-dashboard"
STATEMENT_TIMEOUT_MS = 15_000

# PostgreSQL type OIDs -> Arrow types, so an empty answer still has typed columns.
_ARROW_TYPES: dict[int, pa.DataType] = {
    16: pa.bool_(),
    20: pa.int64(),
    21: pa.int64(),
    23: pa.int64(),
    700: pa.float64(),
    701: pa.float64(),
    1700: pa.float64(),
    25: pa.string(),
    1043: pa.string(),
    19: pa.string(),
    18: pa.string(),
    # timestamptz arrives as naive UTC: the dashboard shows every time in UTC.
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us"),
    1082: pa.date32(),
    114: pa.string(),
    3802: pa.string(),  # json / jsonb arrive decoded; kept as text
    1009: pa.list_(pa.string()),
    1015: pa.list_(pa.string()),  # text[], varchar[]
}


def read_only_dsn(dsn: str | None = None) -> str:
    """The DSN with read-only, application-name and statement-timeout options added."""
    params = conninfo_to_dict(
        with_options(
            resolve_dsn(dsn),
            f"{SESSION_OPTIONS} -c default_transaction_read_only=on -c statement_timeout={STATEMENT_TIMEOUT_MS}",
        )
    )
    params.setdefault("application_name", APPLICATION_NAME)
    return make_conninfo("", **params)


# "psycopg" (what the dashboard uses), "duckdb" (the postgres extension, attached per call), or an
# open connection to reuse: a read-only psycopg one, or a PostgresViaDuckDB (start-up paid once).
Engine = Union[str, psycopg.Connection, "PostgresViaDuckDB"]


@contextlib.contextmanager
def read_connection(dsn: str | None = None, *, engine: Engine = "psycopg") -> Iterator[Any]:
    """A short-lived read-only connection (about 4 ms to open on localhost).

    Other engines give the measured alternative instead (`PostgresViaDuckDB`); every loader in
    dashboard/queries.py runs unchanged on either, which is how the benchmark compares them.
    """
    if isinstance(engine, PostgresViaDuckDB | psycopg.Connection):  # an open one, reused by the caller
        yield engine
        return
    if engine == "duckdb":
        via = PostgresViaDuckDB(dsn)
        try:
            yield via
        finally:
            via.close()
        return
    with pooler.connect(read_only_dsn(dsn), autocommit=True) as conn:
        yield conn


def fetch(conn: Any, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
    """Run one PostgreSQL query and return its rows as an Arrow table (typed even when empty)."""
    if isinstance(conn, PostgresViaDuckDB):
        return conn.fetch(sql, params)
    cur = conn.execute(sql, params)
    description = cur.description or []
    rows = cur.fetchall()
    names = [d.name for d in description]
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = []
    for d, values in zip(description, columns, strict=True):
        arrow_type = _ARROW_TYPES.get(d.type_code, pa.string())
        arrays.append(pa.array([_plain(v, arrow_type) for v in values], type=arrow_type))
    return pa.Table.from_arrays(arrays, names=names)


def fetch_df(conn: Any, sql: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
    return fetch(conn, sql, params).to_pandas()


def fetch_rows(conn: Any, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows as dicts with JSON columns decoded (for the few answers used in Python, not in tables)."""
    if isinstance(conn, PostgresViaDuckDB):
        return [{k: _json_or_value(v) for k, v in row.items()} for row in conn.fetch(sql, params).to_pylist()]
    with conn.cursor(row_factory=dict_row) as cur:
        rows: list[dict[str, Any]] = cur.execute(sql, params).fetchall()
        return rows


def _json_or_value(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _plain(value: Any, arrow_type: pa.DataType) -> Any:
    if value is None:
        return None
    if isinstance(value, decimal.Decimal):
        return float(value)
    if pa.types.is_string(arrow_type) and not isinstance(value, str):
        return json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


# -- DuckDB -------------------------------------------------------------------------------------

_duck: duckdb.DuckDBPyConnection | None = None
_duck_lock = threading.Lock()


def duck() -> duckdb.DuckDBPyConnection:
    """A DuckDB cursor of the process's in-memory database (a new cursor per caller: thread-safe)."""
    global _duck
    with _duck_lock:
        if _duck is None:
            _duck = duckdb.connect(":memory:", config={"threads": 2})
        return _duck.cursor()


def duck_df(
    sql: str,
    tables: Mapping[str, pa.Table | pd.DataFrame] | None = None,
    params: Mapping[str, Any] | list[Any] | None = None,
) -> pd.DataFrame:
    """Run DuckDB SQL over the given Arrow tables / DataFrames (registered under their names)."""
    cur = duck()
    try:
        for name, table in (tables or {}).items():
            cur.register(name, table)
        return cur.execute(sql, params if params is not None else []).df()
    finally:
        cur.close()


def attach_postgres(con: duckdb.DuckDBPyConnection, dsn: str | None = None, *, alias: str = "pg") -> None:
    """ATTACH PostgreSQL READ_ONLY through the pip-packaged postgres extension (works offline).

    Needs `duckdb-extension-postgres` and `duckdb-extensions` of exactly DuckDB's version.
    """
    import duckdb_extensions

    con.execute("SET extension_directory = ?", [tempfile.gettempdir() + "/batchdb-duckdb-extensions"])
    duckdb_extensions.import_extension("postgres", con=con)
    con.execute("LOAD postgres")
    params = conninfo_to_dict(resolve_dsn(dsn))
    params.setdefault("application_name", APPLICATION_NAME)
    conninfo = make_conninfo("", **params).replace("'", "''")
    con.execute(f"ATTACH '{conninfo}' AS {alias} (TYPE postgres, READ_ONLY)")


class PostgresViaDuckDB:
    """The alternative the benchmark measures: each PostgreSQL query run by DuckDB's postgres extension.

    `postgres_query` sends the query inside `COPY (...) TO STDOUT (FORMAT binary)`, which takes
    no bind parameters, so they are rendered client-side by psycopg (with its quoting).
    """

    def __init__(self, dsn: str | None = None) -> None:
        self._render = pooler.connect(read_only_dsn(dsn), autocommit=True)
        self._duck = duckdb.connect(":memory:", config={"threads": 2})
        attach_postgres(self._duck, pooler.connect_kwargs(read_only_dsn(dsn))["conninfo"])

    def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        text = psycopg.ClientCursor(self._render).mogrify(sql, params)
        table = self._duck.execute("SELECT * FROM postgres_query('pg', ?)", [text]).to_arrow_table()
        # Same shape as the psycopg path: times as naive UTC.
        fields = [pa.field(f.name, pa.timestamp("us")) if pa.types.is_timestamp(f.type) else f for f in table.schema]
        return table.cast(pa.schema(fields))

    def close(self) -> None:
        self._duck.close()
        self._render.close()
