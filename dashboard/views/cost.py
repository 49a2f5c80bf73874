"""Cost: by day, by user, by model, by job; and the estimated cost of the work still queued."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from batchdb.dashboard import ui

st.title("Cost")
dsn = ui.dsn()

with ui.database_guard():
    data = ui.cost(dsn)
    jobs, by_day, queued = data["jobs"], data["by_day"], data["queued"]
    if jobs.empty:
        st.info("No jobs yet, so nothing has cost anything.")
        st.stop()
    today = pd.Timestamp(jobs["db_now"].iloc[0]).normalize()
    m = st.columns(4)
    m[0].metric("Total cost", ui.fmt_usd(jobs["cost_usd"].sum()))
    m[1].metric("Today (UTC)", ui.fmt_usd(by_day.loc[pd.to_datetime(by_day["day"]) == today, "cost_usd"].sum()))
    m[2].metric("Queued work (estimate)", ui.fmt_usd(queued["estimated_usd"].sum() if not queued.empty else 0.0))
    m[3].metric("Tokens", ui.fmt_int(jobs["prompt_tokens"].sum() + jobs["completion_tokens"].sum()))

    st.subheader("By day")
    if by_day.empty:
        st.info("No cost recorded yet.")
    else:
        per_day = by_day.pivot_table(
            index="day", columns="model", values="cost_usd", aggfunc="sum", fill_value=0.0
        ).reset_index()
        per_day["day"] = pd.to_datetime(per_day["day"]).dt.strftime("%Y-%m-%d")  # one bar per UTC day
        st.bar_chart(
            per_day,
            x="day",
            y=[c for c in per_day.columns if c != "day"],
            x_label="day (UTC)",
            y_label="USD",
            stack=True,
        )
        st.caption(
            "A job's cost is spread evenly over the time it ran: exact for jobs that ran within one UTC "
            "day, an estimate for jobs that crossed midnight."
        )

    left, right = st.columns(2)
    with left:
        st.subheader("By user")
        ui.table(data["by_owner"], share=0.5, column_config={"cost_usd": ui.USD})
    with right:
        st.subheader("By model")
        ui.table(data["by_model"], share=0.5, column_config={"cost_usd": ui.USD})
        st.caption(
            "List prices in batchdb.prices (" + "; ".join(data["price_dates"]) + ") price the estimate "
            "of queued work; recorded costs used the price at each completion. `batchdb prices update FILE` "
            "refreshes them from a price map (LiteLLM's format)."
        )

    st.subheader("By job")
    ui.table(data["by_job"], hide_index=True, width="stretch", column_config={"cost_usd": ui.USD, "budget_usd": ui.USD})

    st.subheader("Estimated cost of queued work")
    if queued.empty:
        st.info("Nothing is queued.")
    else:
        ui.table(
            queued,
            hide_index=True,
            width="stretch",
            column_config={"usd_per_row": st.column_config.NumberColumn(format="$%.6f"), "estimated_usd": ui.USD},
        )
