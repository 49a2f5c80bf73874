"""What every benchmark shares: scratch databases, test data, the environment line, the result table.

Each run creates its own `bench_*` database on the server named by the admin DSN,
migrates it with batchdb's own migrations and drops it at the end, so a benchmark
never touches anyone else's data and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from batchdb import migrations

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PROMPT = "Classify the sentiment of: {headline}"
MODEL = "gpt-4o-mini"


# -- databases ---------------------------------------------------------------------------------


def with_dbname(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


@contextlib.contextmanager
def scratch_database(admin_dsn: str, label: str, *, migrate: bool = True, keep: bool = False) -> Iterator[str]:
    """A fresh database `bench_<label>_<random>` (migrated for batchdb); dropped on exit."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_dbname(admin_dsn, name)
    try:
        if migrate:
            with psycopg.connect(dsn, autocommit=True) as conn:
                migrations.upgrade(conn)
        yield dsn
    finally:
        if keep:
            print(f"kept database {name}", file=sys.stderr)
        else:
            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def libpq_env(dsn: str) -> dict[str, str]:
    """The DSN as PG* environment variables, for tools that take no DSN argument."""
    names = {
        "host": "PGHOST",
        "port": "PGPORT",
        "user": "PGUSER",
        "password": "PGPASSWORD",
        "dbname": "PGDATABASE",
        "sslmode": "PGSSLMODE",
    }
    return {names[k]: str(v) for k, v in conninfo_to_dict(dsn).items() if k in names and v is not None}


def server_settings(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("fsync", "synchronous_commit", "shared_buffers", "autovacuum_naptime")
        }
    return {"postgres": version, **settings}


def background_load(dsn: str, seconds: float = 2.0) -> str:
    """What else is using the machine and the server right now (the machine may be shared)."""
    import psutil

    busy = psutil.cpu_percent(interval=seconds)
    with psycopg.connect(dsn, autocommit=True) as conn:
        others = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'active'), count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine CPU {busy:.0f}% busy over {seconds:.0f} s with no benchmark process running, load average "
        f"{load}; {others[1]} other client connection(s) on the server, {others[0]} active"
    )


def environment_line(dsn: str) -> str:
    s = server_settings(dsn)
    return (
        f"{dt.date.today().isoformat()} | {os.cpu_count()} cores, {platform.machine()} | PostgreSQL {s['postgres']} "
        f"(fsync={s['fsync']}, synchronous_commit={s['synchronous_commit']}, shared_buffers={s['shared_buffers']}) "
        f"| Python {platform.python_version()}"
    )


# -- data --------------------------------------------------------------------------------------

_WORDS = (  # noqa: SIM905 - one readable paragraph of words
    "shares stock profit loss quarter revenue guidance beats misses analysts expectations surge slump "
    "rally falls rises record outlook merger acquisition deal lawsuit regulator approval launch product "
    "chip demand supply chain forecast dividend buyback layoffs hiring expansion market investors bond "
    "yields inflation rates central bank earnings report strong weak sales growth decline upgrade downgrade "
    "target price cloud software retail energy oil prices electric vehicles battery factory China Europe"
).split()


def headlines_table(rows: int, *, seed: int = 7) -> pa.Table:
    """`rows` news-like rows: id, headline (60-100 chars), ticker, date."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    tickers = np.array(["".join(rng.choice(letters, size=rng.integers(3, 5))) for _ in range(500)])
    words = np.array(_WORDS)
    picks = rng.integers(0, len(words), size=(rows, 16))
    targets = rng.integers(60, 101, size=rows)
    ticker_idx = rng.integers(0, len(tickers), size=rows)
    headlines = []
    for i in range(rows):
        text = tickers[ticker_idx[i]] + " " + " ".join(words[picks[i]])
        while len(text) < targets[i]:  # 16 words are nearly always enough; pad the rare short one
            text += " " + text
        headlines.append(text[: targets[i] - 1] + ".")
    start = np.datetime64("2015-01-01")
    dates = start + rng.integers(0, 3650, size=rows).astype("timedelta64[D]")
    return pa.table(
        {
            "id": pa.array(np.arange(1, rows + 1, dtype=np.int64)),
            "headline": pa.array(headlines, pa.string()),
            "ticker": pa.array(tickers[ticker_idx], pa.string()),
            "date": pa.array(dates.astype("datetime64[D]"), pa.date32()),
        }
    )


# -- measuring and reporting -------------------------------------------------------------------


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0-100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, int(np.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], notes: Sequence[str] = ()
) -> None:
    """The benchmark's figures as one Markdown table (pastes straight into bench/README.md)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print()
    print(f"### {title}")
    print()
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    for note in notes:
        print()
        print(note)
    sys.stdout.flush()


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"
