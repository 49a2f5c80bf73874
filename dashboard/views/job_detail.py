"""Job detail: progress over time, throughput, latency, errors, sample answers, cost; cancel and retry."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import streamlit as st

import batchdb
from batchdb.dashboard import settings, ui

dsn = ui.dsn()
PENDING = "job_detail_pending_action"
FLASH = "job_detail_flash"


def pick_job() -> int | None:
    jobs = ui.job_choices(dsn)
    if jobs.empty:
        st.title("Job detail")
        st.info("No jobs yet. Submit one with `batchdb submit` or `batchdb.submit(...)`.")
        return None
    ids = [int(i) for i in jobs["job_id"]]
    labels = {int(r.job_id): ui.job_label(int(r.job_id), r.name) for r in jobs.itertuples()}
    wanted = st.query_params.get("job")
    index = ids.index(int(wanted)) if wanted and wanted.isdigit() and int(wanted) in ids else 0
    job_id = st.sidebar.selectbox("Job", ids, index=index, format_func=labels.__getitem__)
    if st.query_params.get("job") != str(job_id):
        st.query_params["job"] = str(job_id)
    return int(job_id)


def header(job: dict[str, Any]) -> None:
    st.title(ui.job_label(job["job_id"], job["name"]))
    reason = f" — {job['status_reason']}" if isinstance(job["status_reason"], str) else ""
    mode = " · **batch mode** (the provider's Batch API)" if job.get("mode") == "batch" else ""
    if job.get("mode") == "auto":
        deadline = pd.Timestamp(job["deadline"]).strftime("%Y-%m-%d %H:%M:%S %Z") if pd.notna(job["deadline"]) else "?"
        mode = f" · **auto mode**, deadline **{deadline}** (batch while a batch can end before it, online for the rest)"
    st.markdown(
        f"**{job['status']}**{reason} · owner **{job['owner']}** · "
        f"{job['provider']}/{job['key_alias']} · model **{job['model']}** · priority {job['priority']}{mode}"
    )
    st.progress(
        min(1.0, float(job["pct_done"]) / 100.0),
        text=f"{ui.fmt_int(job['n_done'])} of {ui.fmt_int(job['n_total'])} rows done ({job['pct_done']:.1f}%)",
    )
    m = st.columns(6)
    m[0].metric("Succeeded", ui.fmt_int(job["n_succeeded"]))
    m[1].metric("Failed / dead", f"{ui.fmt_int(job['n_failed'])} / {ui.fmt_int(job['n_dead'])}")
    m[2].metric("Queued / running", f"{ui.fmt_int(job['n_queued'])} / {ui.fmt_int(job['n_running'])}")
    m[3].metric("Rows/s (average)", ui.fmt_rate(job["avg_rows_per_second"]))
    m[4].metric("ETA", ui.fmt_duration(job["eta_seconds"]))
    budget = f" of {ui.fmt_usd(job['budget_usd'])} budget" if pd.notna(job["budget_usd"]) else ""
    m[5].metric("Cost", ui.fmt_usd(job["cost_usd"]), help=f"recorded row by row{budget}; retries: {job['n_retries']}")


def body(detail: dict[str, Any]) -> None:
    job, est = detail["job"], detail["estimate"]
    if not est.exact:
        st.caption(
            f"Charts, latency and error counts: {est.label()} of this job's "
            f"{ui.fmt_int(job['n_total'])} rows. Totals above are exact counters."
        )
    timeline = detail["timeline"]
    left, right = st.columns(2)
    with left:
        st.subheader("Progress over time")
        if timeline.empty:
            st.info("No row has finished yet.")
        else:
            ui.time_chart(
                timeline.rename(columns={"done_cumulative": "rows done"}),
                "bucket",
                ["rows done"],
                y_title="rows done",
                colors={"rows done": "#1c83e1"},
            )
    with right:
        st.subheader("Throughput")
        if timeline.empty:
            st.info("No throughput yet.")
        else:
            ui.time_chart(
                timeline,
                "bucket",
                ["succeeded", "failed"],
                kind="bar",
                y_title=f"rows per {ui.fmt_duration(detail['bucket_seconds'])}",
                colors={"succeeded": "#21c354", "failed": "#ff4b4b"},
            )
    lat = detail["latency"]
    st.subheader("Latency of succeeded calls")
    if not lat["n"]:
        st.info("No succeeded call yet.")
    else:
        c = st.columns(5)
        for col, key, label in zip(
            c, ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"), ("p50", "p90", "p99", "mean", "max"), strict=True
        ):
            col.metric(f"{label} (ms)", ui.fmt_int(lat[key]))

    st.subheader("Errors by class")
    errors = detail["errors"]
    if errors.empty:
        st.success("No row of this job has an error.")
    else:
        ui.table(
            errors.assign(examples=errors["examples"].map(lambda e: " | ".join(e) if e is not None else "")),
            hide_index=True,
            width="stretch",
            column_config={
                "n": st.column_config.NumberColumn("rows", format="%.0f"),
                "last_seen": st.column_config.DatetimeColumn("last finished (UTC)"),
            },
        )

    lanes = detail.get("lanes")
    if lanes is not None:
        st.subheader("Batch and online")
        cols = st.columns(3)
        cols[0].metric("Answered by batch", ui.fmt_int(lanes["n_by_batch"]), help="at the batch price")
        cols[1].metric("Answered online", ui.fmt_int(lanes["n_by_online"]), help="a call each, at the online price")
        if lanes.get("lane") and job["status"] == "running":
            cols[2].metric("Rows go now", str(lanes["lane"]))
            st.caption(
                f"No batch is created after {pd.Timestamp(lanes['batch_cutoff']):%Y-%m-%d %H:%M:%S %Z} (deadline "
                "minus the lane's batch window and margin); open batches are cancelled at "
                f"{pd.Timestamp(lanes['cancel_at']):%Y-%m-%d %H:%M:%S %Z} and their unanswered rows go online."
            )

    batches = detail.get("batches")
    if batches is not None:
        st.subheader("Batches")
        if batches.empty:
            st.info("No batch yet: workers gather the rows into chunks and send one batch per chunk.")
        else:
            still_open = int((batches["state"] != "collected").sum())
            st.caption(
                f"{still_open} open, {len(batches) - still_open} collected; the provider's status as last polled."
            )
            shown = [
                "id",
                "state",
                "provider_status",
                "n_requests",
                "n_completed",
                "n_failed",
                "batch_id",
                "last_error",
            ]
            names = {"id": "chunk", "n_requests": "rows", "n_completed": "answered", "n_failed": "failed"}
            ui.table(batches[shown].rename(columns=names), hide_index=True, width="stretch")

    st.subheader("Cost by token type")
    ui.table(
        detail["cost_by_token_type"],
        hide_index=True,
        column_config={"cost_usd": ui.USD, "usd per 1M tokens": st.column_config.NumberColumn(format="$%.3f")},
    )
    batch = " less the batch discount" if job.get("mode") == "batch" else ""
    st.caption(
        f"Recorded cost: {ui.fmt_usd(job['cost_usd'])} (priced row by row when each row completed; "
        f"the split uses today's list prices{batch})."
    )
    discount = job.get("batch_discount")
    if job.get("mode") == "batch" and pd.notna(discount) and 0 < float(discount) < 1:
        online = float(job["cost_usd"]) / (1 - float(discount))
        st.caption(
            f"Saved by batch mode: {ui.fmt_usd(online - float(job['cost_usd']))} "
            f"({float(discount):.0%} off the {ui.fmt_usd(online)} the same calls cost online)."
        )

    st.subheader("Money saved")
    saved = detail["savings"]
    ui.table(saved, hide_index=True, column_config={"usd": ui.USD})
    st.caption(
        f"Saved in all: {ui.fmt_usd(float(saved['usd'].sum()))} next to the {ui.fmt_usd(job['cost_usd'])} paid. "
        "Dedupe counts each duplicate at what its first row's answer cost; reuse, each reused answer at what it "
        "cost when first paid for; cached input, at today's input price less the cached-input price."
    )


def samples(job: dict[str, Any]) -> None:
    st.subheader("Sample of prompts and responses")
    if not job["n_succeeded"]:
        st.info("No answered row yet.")
        return
    seed_key = f"sample_seed_{job['job_id']}"
    if st.button("Another sample", key="another_sample"):
        st.session_state[seed_key] = st.session_state.get(seed_key, 0) + 1
    seed = st.session_state.get(seed_key, 0)
    pairs = ui.job_samples(dsn, int(job["job_id"]), int(job["n_succeeded"]), seed)
    ui.table(pairs, hide_index=True, width="stretch", column_config={"cost_usd": ui.USD})


def parquet_output(job: dict[str, Any]) -> None:
    with st.expander("Output file (Parquet, read with DuckDB)"):
        root = settings.outputs_dir()
        files = ui.output_files(root)
        if not files:
            st.info(
                f"No Parquet file under `{root}`. Write one with `batchdb results {job['job_id']} -o "
                f"job-{job['job_id']}.parquet` there, or start the dashboard with `--outputs DIR`."
            )
            return
        match = ui.output_for_job(root, int(job["job_id"]))
        if match is None:
            st.info(
                f"No output file of job {job['job_id']} under `{root}` (none carries its id or name); "
                "pick one to inspect."
            )
        index = files.index(match) if match in files else None
        path = st.selectbox(
            "File", files, index=index, format_func=lambda p: os.path.relpath(p, root), placeholder="Choose a file"
        )
        if path is None:
            return
        out = ui.parquet_output(path, os.path.getmtime(path), 0)
        ui.table(out["status"], hide_index=True, column_config={"cost_usd": ui.USD})
        lat = out["latency"]
        if lat["n"]:
            st.caption(
                f"latency p50 {ui.fmt_int(lat['p50_ms'])} ms · p90 {ui.fmt_int(lat['p90_ms'])} ms · "
                f"p99 {ui.fmt_int(lat['p99_ms'])} ms over {ui.fmt_int(lat['n'])} succeeded rows"
            )
        if not out["errors"].empty:
            ui.table(out["errors"], hide_index=True, width="stretch")
        ui.table(out["sample"], hide_index=True, width="stretch")


def actions(job: dict[str, Any]) -> None:
    st.subheader("Actions")
    job_id = int(job["job_id"])
    retryable = {"failed": int(job["n_failed"]), "dead": int(job["n_dead"])}
    c = st.columns([1, 1, 1, 2])
    if c[0].button("Cancel job…", disabled=job["status"] in ("cancelled", "completed"), key="cancel"):
        st.session_state[PENDING] = {"action": "cancel", "job_id": job_id}
    use_failed = c[1].checkbox(f"failed rows ({retryable['failed']:,})", value=True, key="retry_failed")
    use_dead = c[1].checkbox(f"dead rows ({retryable['dead']:,})", value=True, key="retry_dead")
    n_retry = retryable["failed"] * use_failed + retryable["dead"] * use_dead
    if c[2].button("Retry…", disabled=n_retry == 0, key="retry"):
        st.session_state[PENDING] = {"action": "retry", "job_id": job_id, "failed": use_failed, "dead": use_dead}

    pending = st.session_state.get(PENDING)
    if not pending or pending["job_id"] != job_id:
        return
    with st.container(border=True):
        if pending["action"] == "cancel":
            st.warning(
                f"Cancel job {ui.job_label(job_id, job['name'])}? Its {job['n_queued']:,} queued rows will "
                f"never run and the results of its {job['n_running']:,} rows in flight are not recorded."
            )
        else:
            which = " and ".join(s for s, on in (("failed", pending["failed"]), ("dead", pending["dead"])) if on)
            st.warning(
                f"Queue the {which} rows of job {ui.job_label(job_id, job['name'])} again "
                f"({n_retry:,} rows, attempts counted afresh)?"
            )
        yes, no = st.columns([1, 4])
        if yes.button(f"Yes, {pending['action']}", type="primary", key="confirm"):
            handle = batchdb.Job(job_id, dsn=dsn)  # the SDK call the CLI makes
            if pending["action"] == "cancel":
                n = handle.cancel()
                st.session_state[FLASH] = f"Job {job_id} cancelled ({n:,} rows)."
            else:
                n = handle.retry(failed=pending["failed"], dead=pending["dead"])
                st.session_state[FLASH] = f"Job {job_id}: {n:,} rows queued again."
            del st.session_state[PENDING]
            ui.clear_caches()
            st.rerun()
        if no.button("Back", key="abort"):
            del st.session_state[PENDING]
            st.rerun()


with ui.database_guard():
    job_id = pick_job()
    if job_id is not None:
        flash = st.session_state.pop(FLASH, None)
        if flash:
            st.success(flash)

        @st.fragment(run_every=settings.refresh_seconds())
        def live(job_id: int) -> None:
            with ui.database_guard():
                detail = ui.job_detail(dsn, job_id)
                if detail is None:
                    st.warning(f"Job {job_id} no longer exists.")
                    return
                header(detail["job"])
                body(detail)

        live(job_id)
        job = ui.job_detail(dsn, job_id)
        if job is not None:
            samples(job["job"])
            parquet_output(job["job"])
            actions(job["job"])
