"""The `batchdb` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pandas as pd
import psycopg
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchdb import migrations
from batchdb.cli import cli


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_submit_status_results_retry_cancel(dsn: str, tmp_path: Path, drain) -> None:
    source = tmp_path / "headlines.csv"
    pd.DataFrame({"id": ["x1", "x2", "x3"], "headline": ["up", "down", "flat"]}).to_csv(source, index=False)
    out = invoke(
        "submit",
        str(source),
        "--model",
        "gpt-4o-mini",
        "--provider",
        "instant",
        "--prompt",
        "Rate: {headline}",
        "--id-column",
        "id",
        "--name",
        "cli job",
    )
    assert out.strip() == "job 1: 3 rows queued"
    assert "running" in invoke("status")
    drain()
    status = json.loads(invoke("status", "1", "--json"))
    assert (status["status"], status["n_succeeded"], status["name"]) == ("completed", 3, "cli job")
    target = tmp_path / "out.parquet"
    assert invoke("results", "1", "-o", str(target)).strip() == f"wrote 3 rows to {target}"
    table = pq.read_table(target).to_pandas()
    assert list(table["response"]) == ["echo: Rate: up", "echo: Rate: down", "echo: Rate: flat"]
    assert invoke("retry", "1").strip() == "job 1: 0 rows queued again"
    assert invoke("cancel", "1").strip() == "job 1 cancelled (0 rows)"


def test_submit_refusal_is_one_clear_line(dsn: str, tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"headline": "ok"}\nnot json\n')
    result = CliRunner().invoke(cli, ["submit", str(source), "--model", "m", "--prompt", "{headline}"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {source}: line 2 is not valid JSON (Expecting value at column 1)"


def test_unknown_job_is_an_error_not_a_traceback(dsn: str) -> None:
    result = CliRunner().invoke(cli, ["cancel", "424242"])
    assert result.exit_code == 1 and "job 424242 does not exist" in result.output
    result = CliRunner().invoke(cli, ["status", "424242"])
    assert result.exit_code == 1 and "job 424242 does not exist" in result.output


def test_db_upgrade_is_idempotent(dsn: str) -> None:
    assert invoke("db", "upgrade", "--dsn", dsn).strip() == "schema is up to date"


def test_concurrent_upgrades_apply_each_migration_once(admin_dsn: str) -> None:
    name = "batchdb_cli_upgrade_race"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    target = psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "batchdb", "db", "upgrade", "--dsn", target],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
        for migration in migrations.available():
            applied = f"applied {migration.version:04d}_{migration.name}"
            assert sum(applied in o for o in outputs) == 1, (applied, outputs)
        with psycopg.connect(target) as conn:
            versions = conn.execute("SELECT version FROM public.batchdb_migrations ORDER BY version").fetchall()
        assert versions == [(m.version,) for m in migrations.available()]
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_home() -> Iterator[Path]:
    """A BATCHDB_HOME the embedded server's OS user can traverse (pytest's tmp root is 0700)."""
    home = Path(tempfile.mkdtemp(prefix="batchdb-home-"))
    home.chmod(0o755)
    yield home
    subprocess.run(
        [sys.executable, "-m", "batchdb", "db", "stop"], env=_embedded_env(home), capture_output=True, timeout=60
    )
    shutil.rmtree(home, ignore_errors=True)


def _embedded_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHDB_DSN", "BATCHDB_TEST_DSN")}
    env["BATCHDB_HOME"] = str(home)
    return env


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_embedded_server(fresh_home: Path) -> None:
    env = _embedded_env(fresh_home)
    output = fresh_home / "demo" / "results.parquet"
    demo = subprocess.run(
        [sys.executable, "-m", "batchdb", "demo", "--rows", "300", "--workers", "1", "--output", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "(embedded; `batchdb db stop` stops it)" in demo.stdout
    assert "completed: 300/300 done (300 succeeded" in demo.stdout, demo.stdout
    results = pq.read_table(output).to_pandas()
    assert len(results) == 300 and set(results["status"]) == {"succeeded"}
    assert all(json.loads(r)["sentiment"] in ("positive", "negative", "neutral") for r in results["response"])

    status = subprocess.run(
        [sys.executable, "-m", "batchdb", "db", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and "embedded PostgreSQL: running" in status.stdout
    stop = subprocess.run(
        [sys.executable, "-m", "batchdb", "db", "stop"], env=env, capture_output=True, text=True, timeout=60
    )
    assert stop.stdout.strip() == "stopped"
    status = subprocess.run(
        [sys.executable, "-m", "batchdb", "db", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 1 and "not running" in status.stdout


def test_limits_set_changes_only_the_limits_given(conn: psycopg.Connection) -> None:
    invoke("limits", "set", "openai", "gpt-4o-mini", "--rpm", "600", "--tpm", "60000")
    assert (
        invoke("limits", "set", "openai", "gpt-4o-mini", "--tpm", "90000").strip()
        == "openai/default/gpt-4o-mini: rpm=600 tpm=90000 rpd=-"
    )

    def stored() -> tuple:
        row = conn.execute("SELECT rpm, tpm, rpd FROM batchdb.rate_limits WHERE model = 'gpt-4o-mini'").fetchone()
        return (row["rpm"], row["tpm"], row["rpd"])

    assert stored() == (600, 90_000, None)
    nothing = CliRunner().invoke(cli, ["limits", "set", "openai", "gpt-4o-mini"])
    assert nothing.exit_code == 2
    assert "Error: nothing to set: give --rpm, --tpm, --rpd, --batch-queue-tokens, --batch-window" in nothing.output
    zero = CliRunner().invoke(cli, ["limits", "set", "openai", "gpt-4o-mini", "--rpm", "0"])
    assert zero.exit_code == 2
    assert zero.output.strip().splitlines()[-1] == "Error: Invalid value for '--rpm': 0 is not in the range x>=1."
    assert "constraint" not in zero.output
    assert stored() == (600, 90_000, None)
    assert (
        invoke("limits", "set", "openai", "gpt-4o-mini", "--clear", "tpm").strip()
        == "openai/default/gpt-4o-mini: rpm=600 tpm=- rpd=-"
    )
    # The Batch API's queue limit is one more limit of the lane (batch mode, 0020).
    assert (
        invoke("limits", "set", "openai", "gpt-4o-mini", "--batch-queue-tokens", "2000000").strip()
        == "openai/default/gpt-4o-mini: rpm=600 tpm=- rpd=- batch_queue_tokens=2000000"
    )
    assert "batch queue: 0 tokens enqueued (2,000,000)" in invoke("limits", "show")
    assert (
        invoke("limits", "set", "openai", "gpt-4o-mini", "--clear", "batch_queue_tokens").strip()
        == "openai/default/gpt-4o-mini: rpm=600 tpm=- rpd=-"
    )
    # How long a batch may take, and the margin auto-mode jobs keep before their deadline (0022).
    assert (
        invoke("limits", "set", "openai", "gpt-4o-mini", "--batch-window", "30s", "--batch-margin", "0.5m").strip()
        == "openai/default/gpt-4o-mini: rpm=600 tpm=- rpd=- batch_window=30s batch_margin=30s"
    )
    assert (
        invoke("limits", "set", "openai", "gpt-4o-mini", "--batch-window", "24h").strip()
        == "openai/default/gpt-4o-mini: rpm=600 tpm=- rpd=- batch_window=86400s batch_margin=30s"
    )
    bad = CliRunner().invoke(cli, ["limits", "set", "openai", "gpt-4o-mini", "--batch-window", "a day"])
    assert bad.exit_code == 2 and "expected a span such as 30s, 90m, 24h or 2d" in bad.output
    assert (
        invoke(
            "limits",
            "set",
            "openai",
            "gpt-4o-mini",
            "--clear",
            "batch_window_seconds",
            "--clear",
            "batch_margin_seconds",
        ).strip()
        == "openai/default/gpt-4o-mini: rpm=600 tpm=- rpd=-"
    )


def test_set_limits_refuses_nothing_and_non_positive_values(conn: psycopg.Connection) -> None:
    from batchdb import ledger

    lane = ledger.Lane("openai", "default", "gpt-4o-mini")
    with pytest.raises(ValueError, match="nothing to set for openai/default/gpt-4o-mini"):
        ledger.set_limits(conn, lane)
    with pytest.raises(ValueError, match=r"^rpm: expected a positive integer, got 0$"):
        ledger.set_limits(conn, lane, rpm=0, tpm=100)


def _job_in_state(dsn: str, conn: psycopg.Connection, tmp_path: Path, state: str) -> int:
    """A 2-row job made to end (or stop) as `state` by hand, as a worker or a person would."""
    import batchdb

    job = batchdb.submit(pd.DataFrame({"h": ["a", "b"]}), prompt="{h}", model="m", provider="instant", dsn=dsn)
    if state == "paused":
        conn.execute("UPDATE batchdb.jobs SET status = 'paused', status_reason = 'quota' WHERE id = %s", (job.id,))
    elif state == "cancelled":
        job.cancel()
    else:
        statuses = {"succeeded": ("succeeded", "succeeded"), "failed": ("succeeded", "failed")}[state]
        for custom_id, status in zip(("0", "1"), statuses, strict=True):
            conn.execute(
                "UPDATE batchdb.requests SET status = %s, finished_at = now() WHERE job_id = %s AND custom_id = %s",
                (status, job.id, custom_id),
            )
    return job.id


@pytest.mark.parametrize(("state", "code"), [("succeeded", 0), ("failed", 3), ("paused", 4), ("cancelled", 5)])
def test_wait_exit_code_tells_how_the_job_ended(
    state: str, code: int, dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    job_id = _job_in_state(dsn, conn, tmp_path, state)
    result = CliRunner().invoke(cli, ["wait", str(job_id)])
    assert result.exit_code == code, result.output
    if state == "paused":
        assert f"paused: quota; continue with `batchdb resume {job_id}`" in result.output


def test_wait_and_watch_refuse_a_job_that_does_not_exist(dsn: str) -> None:
    result = CliRunner().invoke(cli, ["wait", "999"])
    assert (result.exit_code, result.output.strip()) == (1, "Error: job 999 does not exist")
    for args in (["watch", "999"], ["watch", "--job", "999"]):
        # A subprocess with a deadline: the old `watch --job 999` waited forever.
        watch = subprocess.run([sys.executable, "-m", "batchdb", *args], capture_output=True, text=True, timeout=60)
        assert (watch.returncode, watch.stderr.strip()) == (1, "Error: job 999 does not exist"), watch


def test_submit_wait_exits_4_when_the_job_pauses(dsn: str, tmp_path: Path) -> None:
    import threading
    import time

    source = tmp_path / "rows.csv"
    source.write_text("h\na\nb\n")

    def pause_once_running() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            for _ in range(600):
                if c.execute(
                    "UPDATE batchdb.jobs SET status = 'paused', status_reason = 'by hand' WHERE status = 'running'"
                ).rowcount:
                    return
                time.sleep(0.1)

    pauser = threading.Thread(target=pause_once_running)
    pauser.start()
    result = CliRunner().invoke(
        cli, ["submit", str(source), "--model", "m", "--provider", "instant", "--prompt", "{h}", "--wait"]
    )
    pauser.join()
    assert result.exit_code == 4, result.output
    assert "paused: by hand; continue with `batchdb resume 1`" in result.output


def _default_lane_limits(dsn: str) -> tuple:
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT rpm, tpm FROM batchdb.rate_limits WHERE (provider, key_alias, model) = "
            "('openai', 'default', 'gpt-4o-mini')"
        ).fetchone()


def test_demo_refuses_a_database_holding_other_jobs(dsn: str) -> None:
    import batchdb

    invoke("limits", "set", "openai", "gpt-4o-mini", "--rpm", "600", "--tpm", "60000")
    batchdb.submit(pd.DataFrame({"h": ["a"]}), prompt="{h}", model="m", provider="instant", dsn=dsn)
    demo = subprocess.run(
        [sys.executable, "-m", "batchdb", "demo", "--rows", "15", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 1, demo.stdout + demo.stderr
    assert "already holds 1 job(s) that are not the demo's" in demo.stderr
    assert "run: batchdb demo --yes" in demo.stderr
    assert _default_lane_limits(dsn) == (600, 60_000)


@pytest.mark.slow
def test_demo_on_a_shared_database_keeps_its_limits(dsn: str, tmp_path: Path) -> None:
    invoke("limits", "set", "openai", "gpt-4o-mini", "--rpm", "600", "--tpm", "60000")
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchdb",
            "demo",
            "--rows",
            "30",
            "--workers",
            "1",
            "--output",
            str(tmp_path / "out.parquet"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "completed: 30/30 done (30 succeeded" in demo.stdout
    assert _default_lane_limits(dsn) == (600, 60_000)
    with psycopg.connect(dsn) as c:
        lanes = c.execute("SELECT key_alias, rpm, tpm FROM batchdb.rate_limits ORDER BY key_alias").fetchall()
    assert lanes == [("batchdb-demo", 6000, 600_000), ("default", 600, 60_000)]


def test_submit_refuses_a_model_typo_unless_allowed(dsn: str, tmp_path: Path) -> None:
    source = tmp_path / "rows.csv"
    source.write_text("h\na\n")
    args = ["submit", str(source), "--model", "gpt-4o-mni", "--prompt", "{h}"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert "did you mean 'gpt-4o-mini'" in refused.output and "--allow-unknown-model" in refused.output
    assert invoke(*args, "--allow-unknown-model").strip() == "job 1: 1 rows queued"
    row = next(line for line in invoke("status").splitlines() if "gpt-4o-mni" in line)
    assert row.split()[4] == "unknown", row


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        yield " ".join((*path, name)), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


# These pass their arguments to programs with their own --help (the simulator, Dagster).
PASS_THROUGH = {"simulator", "dagster"}


def test_every_option_has_help_text() -> None:
    missing = [
        f"{name} {option.opts[0]}"
        for name, command in _commands(cli)
        if name not in PASS_THROUGH
        for option in command.params
        if isinstance(option, click.Option) and not option.hidden and not option.help
    ]
    assert missing == []


def test_budget_is_spelt_as_resume_spells_it_and_the_old_spelling_still_works(
    dsn: str, tmp_path: Path, conn: psycopg.Connection
) -> None:
    source = tmp_path / "rows.csv"
    source.write_text("h\na\n")
    base = ["submit", str(source), "--model", "gpt-4o-mini", "--prompt", "{h}"]
    invoke(*base, "--budget", "2.5")
    invoke(*base, "--budget-usd", "1.5")
    budgets = [r["budget_usd"] for r in conn.execute("SELECT budget_usd FROM batchdb.jobs ORDER BY id").fetchall()]
    assert [float(b) for b in budgets] == [2.5, 1.5]
    assert "--budget-usd" not in invoke("submit", "--help") and "--budget " in invoke("submit", "--help")
    assert "--budget " in invoke("resume", "--help")


def test_a_command_whose_extra_is_missing_says_what_to_install() -> None:
    """Without the dashboard/dagster extras (their packages made unfindable), one line says what to run."""
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n in ('streamlit', 'dagster') else real(n, *a)\n"
        "from batchdb.cli import main; sys.argv[0] = 'batchdb'; main(sys.argv[1:])"
    )
    for command, extra in (("dashboard", "dashboard"), ("dagster", "dagster")):
        done = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].endswith(f'pip install "batchdb[{extra}]"'), lines[0]
