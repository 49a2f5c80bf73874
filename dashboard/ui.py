"""What every page shares: settings, cached loaders, formatting, empty states, the database guard.

Loaders are `dashboard.queries` functions wrapped in `st.cache_data(ttl=...)`, so a
page that refreshes every few seconds, or many people watching one job, cost
the database one set of queries per TTL. Settings come from the environment
that `dashboard.run.run_dashboard` sets for the Streamlit process.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import pandas as pd
import psycopg
import streamlit as st
from psycopg.conninfo import conninfo_to_dict

from batchdb.db import resolve_dsn
from dashboard import queries

REFRESH_ENV = "BATCHDB_DASHBOARD_REFRESH"
OUTPUTS_ENV = "BATCHDB_DASHBOARD_OUTPUTS"
DEFAULT_REFRESH_SECONDS = 5.0


def refresh_seconds() -> float:
    """How often live sections re-query (st.fragment run_every); also the cache TTL."""
    try:
        return max(1.0, float(os.environ.get(REFRESH_ENV, DEFAULT_REFRESH_SECONDS)))
    except ValueError:
        return DEFAULT_REFRESH_SECONDS


CACHE_TTL = refresh_seconds()


def dsn() -> str:
    """The database the workers use: $BATCHDB_DSN, else the embedded server."""
    return resolve_dsn(None)


def outputs_dir() -> str:
    return os.environ.get(OUTPUTS_ENV) or os.getcwd()


def describe_dsn(value: str) -> str:
    """host:port/dbname as user, never the password."""
    params = conninfo_to_dict(value)
    host = params.get("host") or "local socket"
    port = params.get("port") or "5432"
    where = host if host.startswith("/") else f"{host}:{port}"
    return f"{params.get('user') or 'default user'}@{where}/{params.get('dbname') or ''}"


# -- cached loaders ---------------------------------------------------------------------------

@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def overview(dsn: str) -> dict[str, Any]:
    return queries.load_overview(dsn)


@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def jobs_table(dsn: str) -> pd.DataFrame:
    return queries.load_jobs(dsn)


@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def job_detail(dsn: str, job_id: int) -> dict[str, Any] | None:
    return queries.load_job_detail(dsn, job_id)


@st.cache_data(ttl=60, show_spinner=False)
def job_samples(dsn: str, job_id: int, n_succeeded: int, seed: int) -> pd.DataFrame:
    return queries.load_job_samples(dsn, job_id, n_succeeded=n_succeeded, seed=seed)


@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def providers(dsn: str, minutes: int) -> dict[str, Any]:
    return queries.load_providers(dsn, minutes=minutes)


@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def workers(dsn: str) -> pd.DataFrame:
    return queries.load_workers(dsn)


@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def cost(dsn: str) -> dict[str, Any]:
    return queries.load_cost(dsn)


@st.cache_data(ttl=30, show_spinner=False)
def output_files(root: str) -> list[str]:
    return [str(p) for p in queries.find_outputs(root)]


@st.cache_data(ttl=30, show_spinner=False)
def parquet_output(path: str, mtime: float, seed: int) -> dict[str, Any]:  # mtime: a rewritten file is read again
    return queries.load_parquet_output(path, seed=seed)


def clear_caches() -> None:
    st.cache_data.clear()


# -- guard ------------------------------------------------------------------------------------

@contextlib.contextmanager
def database_guard() -> Iterator[None]:
    """A database that is down or refuses a query is a message on the page, not a traceback."""
    try:
        yield
    except psycopg.OperationalError as exc:
        st.error(f"Cannot reach the database ({describe_dsn(dsn())}): {_first_line(exc)}")
    except psycopg.Error as exc:
        st.error(f"The database refused a dashboard query: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- formatting -------------------------------------------------------------------------------

def fmt_int(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{round(float(value)):,}"


def fmt_rate(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):,.1f}"


def fmt_usd(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    value = float(value)
    return f"${value:,.2f}" if abs(value) >= 100 else f"${value:,.4f}"


def fmt_duration(seconds: Any) -> str:
    if seconds is None or pd.isna(seconds):
        return "—"
    seconds = int(round(float(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {m:02d}m"
    days, h = divmod(hours, 24)
    return f"{days}d {h:02d}h"


def job_label(job_id: int, name: Any) -> str:
    return f"#{job_id} {name}" if isinstance(name, str) and name else f"#{job_id}"


PROGRESS = st.column_config.ProgressColumn("progress", min_value=0, max_value=100, format="%.1f%%")
USD = st.column_config.NumberColumn(format="$%.4f")


def sidebar(current_dsn: str) -> None:
    with st.sidebar:
        st.caption(f"Database: `{describe_dsn(current_dsn)}` (read-only)")
        st.caption(f"Live sections refresh every {refresh_seconds():g} s. Times are UTC.")
