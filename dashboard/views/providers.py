"""Providers: per provider, key and model — limits, usage over time against them, 429s, current pacing."""

from __future__ import annotations

import streamlit as st

from batchdb.dashboard import settings, ui

st.title("Providers")
dsn = ui.dsn()
WINDOWS = {"15 minutes": 15, "1 hour": 60, "6 hours": 360, "24 hours": 1440}
window = st.segmented_control("Window", list(WINDOWS), default="1 hour") or "1 hour"


@st.fragment(run_every=settings.refresh_seconds())
def live() -> None:
    with ui.database_guard():
        data = ui.providers(dsn, WINDOWS[window])
        lanes = data["lanes"]
        if lanes.empty:
            st.info(
                "No provider key in use yet. Configure one with "
                "`batchdb limits set openai gpt-4o-mini --rpm 5000 --tpm 2000000`, or submit a job."
            )
            return
        st.subheader("Now")
        # A lane whose provider is down waits for its probe (workers/breaker.py), limits or not.
        for r in data["circuits"].itertuples():
            st.warning(f"{r.provider}/{r.key_alias}/{r.model}: {r.state_text}")
        # A lane that is not moving (for 5 s or more) says why: waiting for tokens, held by a 429, daily quota.
        if not data["limits"].empty:
            for r in data["limits"].itertuples():
                if r.stalled:
                    st.warning(f"{r.provider}/{r.key_alias}/{r.model}: {r.state_text}")
        ui.table(
            lanes,
            hide_index=True,
            width="stretch",
            column_config={
                "key_alias": "key",
                "tokens_per_min": st.column_config.NumberColumn("tokens/min now", format="%.0f"),
                "requests_per_min": st.column_config.NumberColumn("requests/min now", format="%.0f"),
                "tpm_used_pct": ui.percent_column("TPM used"),
                "rpm_used_pct": ui.percent_column("RPM used"),
                "rate_limited_5m": st.column_config.NumberColumn("429s (5 min)", format="%d"),
                "pace_now": st.column_config.NumberColumn("pace now", format="%.2f"),
                "state": "state",
            },
        )
        limits = data["limits"]
        st.subheader("Limits and pacing")
        if limits.empty:
            st.info("No limits configured or learnt: calls are not paced.")
        else:
            ui.table(
                limits[
                    [
                        "provider",
                        "key_alias",
                        "model",
                        "rpm",
                        "tpm",
                        "rpd",
                        "source",
                        "target_fraction",
                        "burst_seconds",
                        "pace_now",
                        "state_text",
                        "blocked",
                        "blocked_until",
                        "day_requests",
                        "requests_granted",
                        "tokens_granted",
                        "rate_limited",
                        "updated_at",
                    ]
                ],
                hide_index=True,
                width="stretch",
                column_config={
                    "key_alias": "key",
                    "pace_now": st.column_config.NumberColumn("pace now", format="%.2f"),
                    "state_text": "state",
                    "rate_limited": st.column_config.NumberColumn("429s (total)", format="%d"),
                },
            )
            st.caption(
                "Pace: the share of the limit the ledger grants now (x0.7 after a 429, +2%/s after). "
                "Blocked: waiting out a provider's retry-after."
            )

        series = data["series"]
        st.subheader(f"Usage per minute, last {window}")
        if series.empty:
            st.info("No usage recorded in this window (the ledger records paced keys' calls and every 429).")
            return
        for lane, part in series.groupby("lane", sort=True):
            st.markdown(f"**{lane}**")
            cols = st.columns(3)
            with cols[0]:
                tokens = part.rename(columns={"tpm": "TPM limit"})
                ui.time_chart(
                    tokens,
                    "minute",
                    ["tokens", "TPM limit"] if tokens["TPM limit"].notna().any() else ["tokens"],
                    y_title="tokens/min",
                    height=220,
                    colors={"tokens": "#1c83e1", "TPM limit": "#ff4b4b"},
                )
            with cols[1]:
                requests = part.rename(columns={"rpm": "RPM limit"})
                ui.time_chart(
                    requests,
                    "minute",
                    ["requests", "RPM limit"] if requests["RPM limit"].notna().any() else ["requests"],
                    y_title="requests/min",
                    height=220,
                    colors={"requests": "#1c83e1", "RPM limit": "#ff4b4b"},
                )
            with cols[2]:
                if part["rate_limited"].sum() > 0:
                    ui.time_chart(
                        part.rename(columns={"rate_limited": "429s"}),
                        "minute",
                        ["429s"],
                        kind="bar",
                        y_title="429s per minute",
                        height=220,
                        colors={"429s": "#ffa421"},
                    )
                else:  # an all-zero bar chart is an empty frame with a "NaN" axis
                    st.caption(f"No 429s in the last {window}.")


live()
