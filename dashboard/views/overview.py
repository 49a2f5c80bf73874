"""Overview: what is running, how fast, against which limits, what is failing, what it costs today."""

from __future__ import annotations

import streamlit as st

from batchdb.dashboard import settings, ui

st.title("Overview")
dsn = ui.dsn()


@st.fragment(run_every=settings.refresh_seconds())
def live() -> None:
    with ui.database_guard():
        data = ui.overview(dsn)
        m = st.columns(6)
        m[0].metric(
            "Active jobs", ui.fmt_int(data["n_active"]), help=f"{data['n_running']} running, {data['n_paused']} paused"
        )
        m[1].metric(
            "Rows/s now",
            ui.fmt_rate(data["rows_per_second_now"]),
            help="Rows finished in the last 60 s of running jobs, per second",
        )
        m[2].metric(
            "429s (5 min)",
            ui.fmt_int(data["rate_limited_5m"]),
            help="Rate-limited calls recorded by the ledger (batchdb.rate_usage)",
        )
        m[3].metric(
            "Errors (5 min)",
            ui.fmt_int(data["errors_5m"]),
            help="Rows of running jobs that failed, died or are waiting for a retry after an error",
        )
        m[4].metric("Cost today (UTC)", ui.fmt_usd(data["cost_today"]))
        alive = data["workers"]
        m[5].metric(
            "Workers alive",
            ui.fmt_int(alive["alive"]),
            help=f"{alive['in_flight']} calls in flight of {alive['capacity']} slots",
        )
        if not data["rows_exact"]:
            st.caption("Rows/s and errors of jobs above 100,000 rows are estimated from a page sample of their rows.")

        st.subheader("Provider keys: usage now vs limits")
        lanes = data["lanes"]
        if lanes.empty:
            st.info("No provider key in use yet: limits appear here after `batchdb limits set` or a first job.")
        else:
            ui.table(
                lanes[
                    [
                        "provider",
                        "key_alias",
                        "model",
                        "tokens_per_min",
                        "tpm",
                        "tpm_used_pct",
                        "requests_per_min",
                        "rpm",
                        "rpm_used_pct",
                        "rate_limited_5m",
                        "pace_now",
                        "blocked",
                    ]
                ],
                hide_index=True,
                width="stretch",
                column_config={
                    "key_alias": "key",
                    "tokens_per_min": st.column_config.NumberColumn("tokens/min now", format="%.0f"),
                    "tpm": st.column_config.NumberColumn("TPM limit", format="%d"),
                    "tpm_used_pct": st.column_config.ProgressColumn(
                        "TPM used", min_value=0, max_value=100, format="%.1f%%"
                    ),
                    "requests_per_min": st.column_config.NumberColumn("requests/min now", format="%.0f"),
                    "rpm": st.column_config.NumberColumn("RPM limit", format="%d"),
                    "rpm_used_pct": st.column_config.ProgressColumn(
                        "RPM used", min_value=0, max_value=100, format="%.1f%%"
                    ),
                    "rate_limited_5m": st.column_config.NumberColumn("429s (5 min)", format="%d"),
                    "pace_now": st.column_config.NumberColumn(
                        "pace", format="%.2f", help="1.0 = full limit; lowered after 429s"
                    ),
                },
            )
            st.caption("A key without a limit is not paced: its row shows usage only.")

        st.subheader("Active jobs")
        active = data["active_jobs"]
        if active.empty:
            st.info("No active jobs. Submit one with `batchdb submit` or `batchdb.submit(...)`.")
        else:
            for job in active.head(8).itertuples():
                st.progress(
                    min(1.0, job.pct_done / 100.0),
                    text=f"{ui.job_label(job.job_id, job.name)} · {job.status} · "
                    f"{ui.fmt_int(job.n_done)} / {ui.fmt_int(job.n_total)} rows · "
                    f"{ui.fmt_usd(job.cost_usd)} · ETA {ui.fmt_duration(job.eta_seconds)}",
                )
            ui.table(
                active[
                    [
                        "job_id",
                        "name",
                        "status",
                        "owner",
                        "model",
                        "pct_done",
                        "n_done",
                        "n_total",
                        "n_failed",
                        "n_dead",
                        "cost_usd",
                        "eta_seconds",
                    ]
                ].assign(eta_seconds=active["eta_seconds"].map(ui.fmt_duration)),
                hide_index=True,
                width="stretch",
                column_config={
                    "pct_done": ui.PROGRESS,
                    "cost_usd": ui.USD,
                    "eta_seconds": "ETA",
                    "n_done": "done",
                    "n_total": "rows",
                    "n_failed": "failed",
                    "n_dead": "dead",
                },
            )

        errors = data["errors_by_class"]
        if not errors.empty:
            st.subheader("Errors in the last 5 minutes, by class")
            ui.table(
                errors,
                hide_index=True,
                width="stretch",
                column_config={"errors_5m": st.column_config.NumberColumn("rows", format="%.0f")},
            )


live()

with st.expander("Workers"), ui.database_guard():
    workers = ui.workers(dsn)
    if workers.empty:
        st.info("No worker has registered yet. Start one with `batchdb worker`.")
    else:
        ui.table(workers, hide_index=True, width="stretch")
