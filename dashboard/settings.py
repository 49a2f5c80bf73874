"""The dashboard's settings, read from the environment that `batchdb.dashboard.run` gives the Streamlit process.

Kept free of Streamlit imports so `batchdb dashboard` can start the server without loading it.
"""

from __future__ import annotations

import os

from batchdb import settings

REFRESH_ENV = settings.DASHBOARD_REFRESH
OUTPUTS_ENV = settings.DASHBOARD_OUTPUTS
DEFAULT_REFRESH_SECONDS = 5.0


def refresh_seconds() -> float:
    """How often live sections re-query (st.fragment run_every); also the cache TTL."""
    try:
        return max(1.0, float(os.environ.get(REFRESH_ENV, DEFAULT_REFRESH_SECONDS)))
    except ValueError:
        return DEFAULT_REFRESH_SECONDS


def outputs_dir() -> str:
    """Where finished jobs' Parquet outputs are looked for (default: the working directory)."""
    return os.environ.get(OUTPUTS_ENV) or os.getcwd()
