"""`batchdb demo`: the whole system on one machine, with nothing installed but batchdb.

Database (embedded unless BATCHDB_DSN is set; a database holding other jobs
only with --yes) -> schema upgrade -> the provider
simulator (a real HTTP server enforcing RPM/TPM) -> worker processes calling it
through the official openai SDK -> a sentiment job over synthetic headlines,
with a progress bar -> a Parquet results file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click
import pandas as pd
import psycopg
from psycopg.rows import DictRow

from batchdb import ledger, migrations, settings
from batchdb.db import connect, one_row, resolve_dsn
from batchdb.queries import query
from batchdb.secrets import alias_env
from batchdb.submission import submit

SENTIMENT_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "headline_sentiment",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number"},
            },
            "required": ["sentiment", "confidence"],
            "additionalProperties": False,
        },
    },
}

_COMPANIES = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark Industries",
    "Wayne Enterprises",
    "Soylent",
    "Cyberdyne",
    "Tyrell",
    "Wonka",
    "Vandelay",
    "Oscorp",
    "Gringotts",
    "Monarch",
]
_EVENTS = [
    "beats third-quarter earnings estimates",
    "misses revenue forecast",
    "announces share buyback",
    "faces regulatory probe",
    "names new chief executive",
    "cuts full-year guidance",
    "raises dividend by 10%",
    "recalls flagship product",
    "wins major government contract",
    "reports flat quarterly sales",
    "expands into Asian markets",
    "settles patent lawsuit",
]


def demo_headlines(rows: int) -> pd.DataFrame:
    """Deterministic synthetic financial headlines, one per day per company."""
    days = pd.date_range("2024-01-01", periods=rows // len(_COMPANIES) + 1, freq="D")
    records = []
    for i in range(rows):
        company = _COMPANIES[i % len(_COMPANIES)]
        event = _EVENTS[(i * 7 + i // len(_COMPANIES)) % len(_EVENTS)]
        records.append(
            {
                "headline_id": f"h{i:06d}",
                "day": days[i // len(_COMPANIES)].date().isoformat(),
                "company": company,
                "headline": f"{company} {event}",
            }
        )
    return pd.DataFrame.from_records(records)


# The demo's own lane: its limits and its key alias are the demo's, so running it on a
# team's database (BATCHDB_DSN) never changes the limits real workers pace to.
DEMO_LANE = ledger.Lane("openai", "batchdb-demo", "gpt-4o-mini")


def run_demo(
    *, rows: int, n_workers: int, rpm: int, tpm: int, output: Path, dsn: str | None, yes: bool = False
) -> None:
    from batchdb.simulator.config import Distribution, Limits, SimulatorConfig
    from batchdb.simulator.process import start_simulator
    from batchdb.workers.processes import start_workers

    say = click.echo
    dsn = resolve_dsn(dsn)
    say(f"database: {_describe(dsn)}")
    with connect(dsn) as conn:
        if not yes:
            _refuse_a_database_in_use(conn, dsn)
        migrations.upgrade(conn)
        # The shared ledger paces every worker to the key's limits (see docs/ratelimits.md).
        ledger.set_limits(conn, DEMO_LANE, rpm=rpm, tpm=tpm)

    config = SimulatorConfig(
        seed=7,
        default_limits=Limits(rpm=rpm, tpm=tpm),
        latency_s=Distribution(kind="lognormal", median=0.25, sigma=0.5, cap=3.0),
        output_tokens=Distribution(kind="uniform", low=8, high=16),
    )
    with start_simulator(config) as simulator:
        say(f"provider simulator: {simulator.openai_base_url} (limits {rpm} RPM, {tpm:,} TPM)")
        output.parent.mkdir(parents=True, exist_ok=True)
        # The simulator's URL and key under the demo's alias only: the default alias keeps pointing
        # wherever the user's environment points it.
        env = {
            alias_env("ENDPOINT", DEMO_LANE.provider, DEMO_LANE.key_alias): simulator.openai_base_url,
            alias_env("KEY", DEMO_LANE.provider, DEMO_LANE.key_alias): "sk-batchdb-demo",
        }
        workers = start_workers(n_workers, dsn, args=("--concurrency", "32"), log_dir=output.parent, env=env)
        say(
            f"workers: {n_workers} processes (pids {', '.join(str(w.pid) for w in workers.processes)}), "
            f"logs in {output.parent}/worker-*.log"
        )
        try:
            data = demo_headlines(rows)
            job = submit(
                data,
                prompt="Classify the market sentiment of this headline: {headline}",
                system="You are a financial analyst. Answer in JSON.",
                id_column="headline_id",
                model=DEMO_LANE.model,
                provider=DEMO_LANE.provider,
                key_alias=DEMO_LANE.key_alias,
                name=f"demo sentiment ({rows} headlines)",
                max_tokens=20,
                temperature=0,
                response_format=SENTIMENT_SCHEMA,
                dsn=dsn,
            )
            say(f"submitted job {job.id}: {rows} headlines")
            started = time.monotonic()
            final = job.wait(progress=True)
            elapsed = time.monotonic() - started
        finally:
            workers.stop()
        served = simulator.stats()

    written = job.to_parquet(output)
    say("")
    say(final.summary())
    say(f"wall time {elapsed:.1f}s, {final.n_done / max(elapsed, 1e-9):.1f} rows/s")
    say(_served_line(served, rpm))
    say(f"results: {written} rows -> {output}")
    sample = job.results().head(5)
    for _, row in sample.iterrows():
        say(f"  {row['custom_id']}  {row['headline'][:48]:<48}  {row['response']}")


def _refuse_a_database_in_use(conn: psycopg.Connection[DictRow], dsn: str) -> None:
    """A database with jobs other than the demo's is someone's: the demo's workers would run those jobs too."""
    if not _has_jobs_table(conn):
        return
    others = int(one_row(conn.execute(query("demo_other_jobs"), {"key_alias": DEMO_LANE.key_alias}))["n"])
    if others:
        raise click.ClickException(
            f"{_describe(dsn)} already holds {others} job(s) that are not the demo's; its workers would run them "
            "too. Unset BATCHDB_DSN to use the embedded server, or run: batchdb demo --yes"
        )


def _has_jobs_table(conn: psycopg.Connection[DictRow]) -> bool:
    return bool(one_row(conn.execute(query("jobs_table_exists")))["present"])


def _served_line(stats: dict[str, Any], rpm: int) -> str:
    """What the provider saw: calls, 429s, and the steady call rate against the key's limit."""
    totals = stats["totals"]
    per_second: dict[int, int] = {}
    for point in stats["series"]:
        per_second[point["t"]] = per_second.get(point["t"], 0) + point["admitted"]
    seconds = [per_second.get(t, 0) for t in range(max(per_second, default=-1) + 1)]
    steady = seconds[1:-1] or seconds or [0]  # the first and last seconds are partial
    return (
        f"provider side: {totals['requests']} requests, {totals['accepted']} accepted, "
        f"{totals['rate_limited']} rejected with 429; steady rate {sum(steady) / len(steady):.1f} calls/s "
        f"against the key's {rpm} RPM ({rpm / 60:.1f}/s)"
    )


def _describe(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    where = f"{parts.get('host', 'local socket')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
    return f"{where}" + ("" if os.environ.get(settings.DSN) else " (embedded; `batchdb db stop` stops it)")
