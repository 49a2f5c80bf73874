"""Jobs: every job with its progress, status, owner, model, rows by status, cost, rates and ETA."""

from __future__ import annotations

import streamlit as st

from batchdb.dashboard import queries, ui

st.title("Jobs")
dsn = ui.dsn()

with ui.database_guard():
    everything = ui.jobs_table(dsn)
    if everything.empty:
        st.info("No jobs yet. Submit one with `batchdb submit` or `batchdb.submit(...)`; it appears here at once.")
        st.stop()

    f = st.columns(3)
    owners = f[0].multiselect("Owner", sorted(everything["owner"].dropna().unique()), placeholder="all owners")
    statuses = f[1].multiselect("Status", list(queries.JOB_STATUSES), placeholder="all statuses")
    models = f[2].multiselect("Model", sorted(everything["model"].dropna().unique()), placeholder="all models")
    shown = queries.filter_jobs(everything, owners=owners, statuses=statuses, models=models)

    st.caption(
        f"{len(shown):,} of {len(everything):,} jobs · "
        f"{shown['n_done'].sum() if 'n_done' in shown else 0:,.0f} rows done · "
        f"cost {ui.fmt_usd(shown['cost_usd'].sum())}"
    )
    if shown.empty:
        st.info("No job matches these filters.")
    else:
        table = shown.assign(
            eta=shown["eta_seconds"].map(ui.fmt_duration),
            detail="job?job=" + shown["job_id"].astype(str),
        )
        ui.table(
            table[
                [
                    "job_id",
                    "detail",
                    "name",
                    "status",
                    "pct_done",
                    "owner",
                    "model",
                    "n_total",
                    "n_queued",
                    "n_running",
                    "n_succeeded",
                    "n_failed",
                    "n_dead",
                    "n_cancelled",
                    "cost_usd",
                    "rows_per_second_now",
                    "avg_rows_per_second",
                    "eta",
                    "created_at",
                    "status_reason",
                ]
            ],
            hide_index=True,
            width="stretch",
            keys=["job_id", "name"],
            column_config={
                "job_id": st.column_config.NumberColumn("job", format="%d"),
                "detail": st.column_config.LinkColumn("open", display_text="details"),
                "pct_done": ui.PROGRESS,
                "n_total": "rows",
                "n_queued": "queued",
                "n_running": "running",
                "n_succeeded": "succeeded",
                "n_failed": "failed",
                "n_dead": "dead",
                "n_cancelled": "cancelled",
                "cost_usd": ui.USD,
                "rows_per_second_now": st.column_config.NumberColumn("rows/s now", format="%.1f"),
                "avg_rows_per_second": st.column_config.NumberColumn("rows/s avg", format="%.1f"),
                "eta": "ETA",
                "created_at": st.column_config.DatetimeColumn("created (UTC)", format="YYYY-MM-DD HH:mm:ss"),
                "status_reason": "reason",
            },
        )
