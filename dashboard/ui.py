"""What every page shares: settings, cached loaders, formatting, empty states, the database guard.

Loaders are `batchdb.dashboard.queries` functions wrapped in `st.cache_data(ttl=...)`, so a
page that refreshes every few seconds, or many people watching one job, cost
the database one set of queries per TTL.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import streamlit as st
from psycopg.conninfo import conninfo_to_dict

from batchdb.dashboard import queries
from batchdb.dashboard.settings import refresh_seconds
from batchdb.db import resolve_dsn
from batchdb.errors import BatchDBError, DatabaseUnavailable

CACHE_TTL = refresh_seconds()


def dsn() -> str:
    """The database the workers use: $BATCHDB_DSN, else the embedded server."""
    return resolve_dsn(None)


def describe_dsn(value: str) -> str:
    """host:port/dbname as user, never the password."""
    params = conninfo_to_dict(value)
    host = str(params.get("host") or "local socket")
    port = params.get("port") or "5432"
    where = host if host.startswith("/") else f"{host}:{port}"
    return f"{params.get('user') or 'default user'}@{where}/{params.get('dbname') or ''}"


# -- cached loaders ---------------------------------------------------------------------------


@st.cache_data(ttl=600, show_spinner=False)
def viewer(dsn: str) -> dict[str, Any]:
    return queries.load_viewer(dsn)


@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def overview(dsn: str) -> dict[str, Any]:
    return queries.load_overview(dsn)


@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def jobs_table(dsn: str) -> pd.DataFrame:
    return queries.load_jobs(dsn)


@st.cache_data(ttl=CACHE_TTL, show_spinner=False)
def job_choices(dsn: str) -> pd.DataFrame:
    return queries.load_job_choices(dsn)


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
def output_for_job(root: str, job_id: int) -> str | None:
    match = queries.output_for_job([Path(p) for p in output_files(root)], job_id)
    return None if match is None else str(match)


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
    except (psycopg.OperationalError, DatabaseUnavailable) as exc:
        st.error(f"Cannot reach the database ({describe_dsn(dsn())}): {_first_line(exc)}")
    except BatchDBError as exc:  # the SDK's own refusals (job not found, database refused)
        st.error(_first_line(exc))
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
    seconds = round(float(seconds))
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


def percent_column(label: str) -> object:
    return st.column_config.ProgressColumn(label, min_value=0, max_value=100, format="%.1f%%")


PROGRESS = percent_column("progress")
USD = st.column_config.NumberColumn(format="$%.4f")


def sidebar(current_dsn: str) -> None:
    with st.sidebar:
        st.caption(f"Database: `{describe_dsn(current_dsn)}` (read-only)")
        with contextlib.suppress(psycopg.Error):
            who = viewer(current_dsn)
            if who["own_jobs_only"]:
                st.caption(f"Signed in as `{who['name']}`: you see your own jobs only.")
        st.caption(f"Live sections refresh every {refresh_seconds():g} s. Times are UTC.")


# The main column's width at a 1,400 px window (sidebar open, the padding `app.py` sets); the widest
# screen most people use the dashboard on, so tables are fitted to it (tables.fit_columns).
FRAME_PX = 1000


def table(
    data: pd.DataFrame,
    *,
    column_config: dict[str, Any] | None = None,
    share: float = 1.0,
    keys: list[str] | None = None,
    **options: Any,
) -> None:
    """`st.dataframe` whose every column shows at a 1,400 px window (`share`: of the page's width):
    fitted widths, and parts one under the other (repeating the `keys` columns) when too many."""
    from batchdb.dashboard.tables import fit_columns, split_columns

    options.setdefault("hide_index", True)
    options.setdefault("width", "stretch")
    frame = FRAME_PX * share - (24 if share < 1 else 0)
    for part in split_columns(data, column_config, frame, options.pop("column_order", None), keys):
        # The whole frame each time (column_order picks the part): sorting and copying see every column.
        st.dataframe(data, column_config=fit_columns(data, column_config, frame, part), column_order=part, **options)


def time_chart(
    data: pd.DataFrame,
    x: str,
    series: list[str],
    *,
    y_title: str,
    kind: str = "line",
    time_format: str = "%H:%M",
    height: int = 260,
    colors: dict[str, str] | None = None,
) -> None:
    """A chart over UTC time. Altair with a UTC scale: Streamlit's own charts would show the naive
    UTC times in the browser's time zone."""
    import altair as alt

    long = data[[x, *series]].melt(id_vars=[x], value_vars=series, var_name="series", value_name="value")
    long["when"] = pd.to_datetime(long[x]).dt.strftime(f"%Y-%m-%d {time_format} UTC")
    base = alt.Chart(long)
    mark = base.mark_bar() if kind == "bar" else base.mark_line(interpolate="monotone")
    # All zero (or nothing): a [0, 0] domain has no ticks and Vega labels the axis "NaN".
    flat = not (pd.to_numeric(long["value"], errors="coerce").fillna(0) != 0).any()
    y_scale = alt.Scale(domain=[0, 1]) if flat else alt.Undefined
    scale = alt.Scale(domain=list(colors), range=list(colors.values())) if colors else alt.Undefined
    chart = mark.encode(
        x=alt.X(f"{x}:T", title="UTC", scale=alt.Scale(type="utc"), axis=alt.Axis(format=time_format)),
        y=alt.Y(
            "value:Q", title=y_title, stack=True if kind == "bar" else None, axis=alt.Axis(format="~s"), scale=y_scale
        ),
        color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom"), scale=scale),
        tooltip=[
            alt.Tooltip("when:N", title="time"),
            alt.Tooltip("series:N", title="series"),
            alt.Tooltip("value:Q", title="value", format=",.2~f"),
        ],
    ).properties(height=height)
    st.altair_chart(chart, width="stretch")
