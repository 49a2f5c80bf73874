"""The `batchdb` command line: the same operations as the SDK, for shells and cron."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from batchdb import db as dbmod


def _dsn_option(func):  # type: ignore[no-untyped-def]
    return click.option(
        "--dsn", envvar="BATCHDB_DSN", default=None,
        help="PostgreSQL DSN (default: $BATCHDB_DSN, else the embedded server).",
    )(func)


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """Run millions of LLM requests through a PostgreSQL queue."""
    from batchdb.secrets import RedactingFilter

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        # Every API key this process resolves is masked in whatever any library logs.
        handler.addFilter(RedactingFilter())


# -- database ------------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """Create, upgrade, find and stop the database."""


@db_group.command("upgrade")
@_dsn_option
def db_upgrade(dsn: str | None) -> None:
    """Apply the schema migrations in sql/ (idempotent, safe to run concurrently)."""
    from batchdb import migrations

    with dbmod.connect(dsn) as conn:
        applied = migrations.upgrade(conn)
    if applied:
        for m in applied:
            click.echo(f"applied {m.version:04d}_{m.name}")
    else:
        click.echo("schema is up to date")


@db_group.command("status")
def db_status() -> None:
    """Show the embedded PostgreSQL server, if one is running."""
    from batchdb import embedded

    server = embedded.server_status()
    if server is None:
        click.echo(f"embedded PostgreSQL: not running (data directory {embedded.batchdb_home() / 'pg'})")
        sys.exit(1)
    click.echo(f"embedded PostgreSQL: running, pid {server.pid}, port {server.port}")
    click.echo(f"  dsn:      {server.dsn}")
    click.echo(f"  data dir: {server.data_dir}")
    click.echo(f"  log:      {server.log_file}")


@db_group.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server."""
    from batchdb import embedded

    click.echo("stopped" if embedded.stop_server() else "embedded PostgreSQL was not running")


# -- jobs ----------------------------------------------------------------------------------------


@cli.command("submit")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--model", required=True)
@click.option("--prompt", default=None, help="Template over the file's columns, e.g. 'Classify: {headline}'.")
@click.option("--system", default=None, help="System message (may also use {column} fields).")
@click.option("--messages-column", default=None, help="A column holding ready chat messages instead of --prompt.")
@click.option("--id-column", default=None, help="A column with a unique id per row.")
@click.option("--provider", default="openai", show_default=True)
@click.option("--key-alias", default="default", show_default=True, help="Which of the provider's API keys to use.")
@click.option("--name", default=None)
@click.option("--priority", default=1, show_default=True, type=int)
@click.option("--max-attempts", default=5, show_default=True, type=int)
@click.option("--max-tokens", default=None, type=int)
@click.option("--temperature", default=None, type=float)
@click.option("--budget-usd", default=None, type=float)
@click.option("--idempotency-key", default=None)
@click.option("--webhook-url", default=None, help="POST a signed JSON event here when the job completes, fails, "
              "is cancelled or paused.")
@click.option("--webhook-secret", envvar="BATCHDB_WEBHOOK_SECRET", default=None,
              help="HMAC key signing the webhook (default: $BATCHDB_WEBHOOK_SECRET, else generated and printed).")
@click.option("--notify-email", "notify_emails", multiple=True, help="Email this address on the same events "
              "(repeatable; workers need BATCHDB_SMTP_HOST).")
@click.option("--wait/--no-wait", default=False, help="Show progress until the job finishes.")
@_dsn_option
def submit_command(path: Path, dsn: str | None, wait: bool, **options: object) -> None:
    """Queue one request per row of a CSV, JSONL or Parquet file."""
    from batchdb.ingest import InputError
    from batchdb.submission import submit

    options["notify_emails"] = list(options["notify_emails"]) or None  # type: ignore[call-overload]
    try:
        job = submit(path, dsn=dsn, **options)  # type: ignore[arg-type]
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    status = job.status()
    click.echo(f"job {job.id}: {status.n_total} rows queued")
    if options["webhook_url"] and not options["webhook_secret"]:
        # Generated: shown once so the receiver can verify X-Batchdb-Signature.
        click.echo(f"webhook secret: {job.webhook_secret}")  # type: ignore[attr-defined]
    if wait:
        click.echo(job.wait(progress=True).summary())


@cli.command("status")
@click.argument("job_id", required=False, type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_dsn_option
def status_command(job_id: int | None, as_json: bool, dsn: str | None) -> None:
    """Progress of one job, or a table of recent jobs."""
    from batchdb.jobs import JobNotFound, get_job, list_jobs

    if job_id is not None:
        try:
            progress = get_job(job_id, dsn=dsn).status()
        except JobNotFound as exc:
            raise click.ClickException(str(exc)) from None
        if as_json:
            click.echo(json.dumps(_jsonable(progress), indent=2))
        else:
            click.echo(progress.summary())
            if progress.status_reason:
                click.echo(f"  reason: {progress.status_reason}")
        return
    jobs = list_jobs(dsn=dsn)
    if as_json:
        click.echo(json.dumps([_jsonable(j) for j in jobs], indent=2))
        return
    click.echo(f"{'job':>6} {'status':<10} {'done':>15} {'dead+failed':>11} {'cost $':>10}  model / name")
    for j in jobs:
        click.echo(f"{j.job_id:>6} {j.status:<10} {f'{j.n_done}/{j.n_total}':>15} {j.n_dead + j.n_failed:>11} "
                   f"{j.cost_usd:>10.4f}  {j.model} / {j.name or ''}")


@cli.command("results")
@click.argument("job_id", type=int)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="File to write; its extension picks the format: .parquet, .csv or .jsonl.")
@_dsn_option
def results_command(job_id: int, output: Path, dsn: str | None) -> None:
    """Write a job's results (input columns + response, status, usage, error)."""
    from batchdb.jobs import Job
    from batchdb.results import writer_for

    _run_db_op(lambda: writer_for(output))  # refuse an unknown extension before touching anything
    job = Job(job_id, dsn=dsn)
    progress = _run_db_op(job.status)
    if not progress.finished:
        click.echo(f"warning: job {job_id} is {progress.status} ({progress.n_done}/{progress.n_total} rows done): "
                   f"the file holds only the rows finished so far", err=True)
    rows = _run_db_op(lambda: job.to_file(output))
    click.echo(f"wrote {rows} rows to {output}")


@cli.command("cancel")
@click.argument("job_id", type=int)
@_dsn_option
def cancel_command(job_id: int, dsn: str | None) -> None:
    """Stop a job: queued rows never run, in-flight results are discarded."""
    from batchdb.jobs import Job

    n = _run_db_op(lambda: Job(job_id, dsn=dsn).cancel())
    click.echo(f"job {job_id} cancelled ({n} rows)")


@cli.command("retry")
@click.argument("job_id", type=int)
@click.option("--dead", is_flag=True, help="Replay dead rows (retries exhausted).")
@click.option("--failed", is_flag=True, help="Replay failed rows (refused by the provider).")
@click.option("--cancelled", is_flag=True, help="Replay cancelled rows.")
@_dsn_option
def retry_command(job_id: int, dead: bool, failed: bool, cancelled: bool, dsn: str | None) -> None:
    """Queue a job's final rows again (default: --dead and --failed)."""
    from batchdb.jobs import Job

    if not (dead or failed or cancelled):
        dead = failed = True
    n = _run_db_op(lambda: Job(job_id, dsn=dsn).retry(failed=failed, dead=dead, cancelled=cancelled))
    click.echo(f"job {job_id}: {n} rows queued again")


@cli.command("resume")
@click.argument("job_id", type=int)
@click.option("--budget", "budget_usd", type=float, default=None, help="New budget in USD.")
@_dsn_option
def resume_command(job_id: int, budget_usd: float | None, dsn: str | None) -> None:
    """Continue a paused job (after a budget stop or quota exhaustion)."""
    from batchdb.jobs import Job

    if _run_db_op(lambda: Job(job_id, dsn=dsn).resume(budget_usd=budget_usd)):
        click.echo(f"job {job_id} resumed")
    else:
        raise click.ClickException(f"job {job_id} is not paused")


@cli.command("watch")
@click.option("--job", "job_id", type=int, default=None, help="Only this job's events.")
@_dsn_option
def watch_command(job_id: int | None, dsn: str | None) -> None:
    """Stream job events (completed, paused, cancelled ...) as JSON lines until Ctrl-C."""
    from batchdb import events

    with dbmod.connect(dsn) as conn, dbmod.connect(dsn) as lookups:
        try:
            for event in events.stream(conn):
                if job_id is not None and event.get("job_id") != job_id:
                    continue
                if events.visible(lookups, int(event["job_id"])):
                    click.echo(json.dumps(event), nl=True)
        except KeyboardInterrupt:
            return


# -- rate limits ---------------------------------------------------------------------------------


@cli.group("limits")
def limits_group() -> None:
    """Provider rate limits shared by every worker (the ledger)."""


@limits_group.command("set")
@click.argument("provider")
@click.argument("model")
@click.option("--key-alias", default="default", show_default=True)
@click.option("--rpm", type=int, default=None, help="Requests per minute.")
@click.option("--tpm", type=int, default=None, help="Tokens per minute (OpenAI: prompt + max_tokens).")
@click.option("--rpd", type=int, default=None, help="Requests per day (Gemini).")
@_dsn_option
def limits_set(provider: str, model: str, key_alias: str, rpm: int | None, tpm: int | None, rpd: int | None,
               dsn: str | None) -> None:
    """Set the limits of one provider key for one model."""
    from batchdb import ledger

    with dbmod.connect(dsn) as conn:
        _run_db_op(lambda: ledger.set_limits(conn, ledger.Lane(provider, key_alias, model), rpm=rpm, tpm=tpm,
                                             rpd=rpd))
    click.echo(f"{provider}/{key_alias}/{model}: rpm={rpm or '-'} tpm={tpm or '-'} rpd={rpd or '-'}")


@limits_group.command("show")
@_dsn_option
def limits_show(dsn: str | None) -> None:
    """Limits, current pacing and totals per provider key and model."""
    from batchdb import ledger

    with dbmod.connect(dsn) as conn:
        rows = ledger.list_limits(conn)
    click.echo(f"{'provider/key/model':<40} {'rpm':>8} {'tpm':>10} {'rpd':>7} {'pace':>5} {'granted':>9} {'429s':>6}")
    for r in rows:
        click.echo(f"{r['provider'] + '/' + r['key_alias'] + '/' + r['model']:<40} {r['rpm'] or '-':>8} "
                   f"{r['tpm'] or '-':>10} {r['rpd'] or '-':>7} {r['pace']:>5.2f} {r['requests_granted']:>9} "
                   f"{r['rate_limited']:>6}")


# -- users ---------------------------------------------------------------------------------------


@cli.group("users")
def users_group() -> None:
    """Users of a shared database: PostgreSQL roles that see only their own jobs."""


def _user_options(func):  # type: ignore[no-untyped-def]
    for option in reversed([
        click.option("--weight", type=float, default=None, help="Share of contended provider capacity (default 1)."),
        click.option("--budget-day", "budget_usd_day", type=float, default=None, help="USD per UTC day."),
        click.option("--budget-month", "budget_usd_month", type=float, default=None, help="USD per calendar month."),
        click.option("--email", default=None, help="Where job notifications go."),
    ]):
        func = option(func)
    return func


@users_group.command("add")
@click.argument("name")
@click.option("--admin", "kind", flag_value="admin", help="Sees and changes every job.")
@click.option("--worker", "kind", flag_value="worker", help="The role worker processes connect as.")
@click.option("--password", default=None, help="Login password (else your server's auth decides).")
@_user_options
@_dsn_option
def users_add(name: str, kind: str | None, password: str | None, dsn: str | None, **settings: object) -> None:
    """Create a user role NAME (or update its settings)."""
    from batchdb import users

    with dbmod.connect(dsn) as conn:
        _run_db_op(lambda: users.add_user(conn, name, kind=users.UserKind(kind or "user"), password=password,
                                          **settings))  # type: ignore[arg-type]
    click.echo(f"user {name} ({kind or 'user'}) ready; connect as role {name!r}")


@users_group.command("set")
@click.argument("name")
@_user_options
@_dsn_option
def users_set(name: str, dsn: str | None, **settings: object) -> None:
    """Change a user's weight, budgets or email."""
    from batchdb import users

    with dbmod.connect(dsn) as conn:
        known = {u.name: u for u in users.list_users(conn)}
        if name not in known:
            raise click.ClickException(f"no batchdb user {name!r}; create it with `batchdb users add {name}`")
        kind = users.UserKind(known[name].kind.split(",")[0] or "user")
        _run_db_op(lambda: users.add_user(conn, name, kind=kind, **settings))  # type: ignore[arg-type]
    click.echo(f"user {name} updated")


@users_group.command("list")
@_dsn_option
def users_list(dsn: str | None) -> None:
    """Users with their weight, budgets and spend (today, this month; UTC)."""
    from batchdb import users

    with dbmod.connect(dsn) as conn:
        rows = users.list_users(conn)
    click.echo(f"{'user':<24} {'kind':<8} {'weight':>6} {'$/day':>10} {'$/month':>10} {'today $':>10} {'month $':>10}")
    for u in rows:
        click.echo(f"{u.name:<24} {u.kind:<8} {u.weight:>6g} {_usd(u.budget_usd_day):>10} "
                   f"{_usd(u.budget_usd_month):>10} {u.spent_today_usd:>10.4f} {u.spent_month_usd:>10.4f}")


def _usd(value: object) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- processes -----------------------------------------------------------------------------------


@cli.command("worker")
@click.option("--concurrency", "-c", default=64, show_default=True, help="Requests in flight at once.")
@click.option("--lease-seconds", default=60.0, show_default=True)
@click.option("--request-timeout", default=120.0, show_default=True)
@click.option("--poll-interval", default=2.0, show_default=True)
@click.option("--exit-when-idle", is_flag=True, help="Exit once nothing is left to claim.")
@_dsn_option
def worker_command(concurrency: int, lease_seconds: float, request_timeout: float, poll_interval: float,
                   exit_when_idle: bool, dsn: str | None) -> None:
    """Run a worker process until SIGTERM/SIGINT."""
    from workers.worker import WorkerConfig, run_worker

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    for chatty in ("httpx", "httpcore", "openai", "google_genai"):
        # One log line per HTTP request would drown the worker's own messages.
        logging.getLogger(chatty).setLevel(max(logging.getLogger().level, logging.WARNING))
    run_worker(WorkerConfig(
        dsn=dsn, concurrency=concurrency, lease_seconds=lease_seconds, request_timeout=request_timeout,
        heartbeat_interval=max(0.5, min(10.0, lease_seconds / 3)), poll_interval=poll_interval,
        exit_when_idle=exit_when_idle,
    ))


@cli.command("simulator", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                            "help_option_names": []})
@click.pass_context
def simulator_command(ctx: click.Context) -> None:
    """Run the provider simulator (OpenAI / Azure / Gemini wire formats); --help for its options."""
    from batchdb.simulator.__main__ import main as simulator_main

    # Its options are argparse's: --help goes to it, so they are listed.
    sys.exit(simulator_main(ctx.args, prog="batchdb simulator"))


@cli.command("dashboard")
@click.option("--port", default=8501, show_default=True)
@click.option("--outputs", "outputs_dir", default=None, type=click.Path(path_type=Path),
              help="Folder of finished jobs' Parquet outputs to read with DuckDB.")
@click.option("--refresh", "refresh_seconds", default=None, type=float, help="Live refresh period in seconds.")
@_dsn_option
def dashboard_command(port: int, outputs_dir: Path | None, refresh_seconds: float | None, dsn: str | None) -> None:
    """Start the Streamlit dashboard on 127.0.0.1 (read-only, except cancel/retry)."""
    from dashboard.run import run_dashboard

    run_dashboard(dsn, port, host="127.0.0.1", outputs_dir=outputs_dir, refresh_seconds=refresh_seconds)


@cli.command("dagster", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []})
@click.pass_context
def dagster_command(ctx: click.Context) -> None:
    """Open the example in the Dagster UI with workers and the provider simulator; --help for its options."""
    from assets.dev import dagster_command as command

    command.main(args=ctx.args, prog_name="batchdb dagster")


@cli.command("demo")
@click.option("--rows", default=3000, show_default=True)
@click.option("--workers", "n_workers", default=2, show_default=True)
@click.option("--rpm", default=6000, show_default=True, help="Simulated provider requests/minute limit.")
@click.option("--tpm", default=600_000, show_default=True, help="Simulated provider tokens/minute limit.")
@click.option("--output", default="demo-output/results.parquet", show_default=True, type=click.Path(path_type=Path))
@_dsn_option
def demo_command(rows: int, n_workers: int, rpm: int, tpm: int, output: Path, dsn: str | None) -> None:
    """Run a demo job end to end against the local provider simulator."""
    from batchdb.demo import run_demo

    run_demo(rows=rows, n_workers=n_workers, rpm=rpm, tpm=tpm, output=output, dsn=dsn)


def _run_db_op(operation):  # type: ignore[no-untyped-def]
    import psycopg

    from batchdb.jobs import JobNotFound

    try:
        return operation()
    except (psycopg.Error, JobNotFound, ValueError) as exc:
        raise click.ClickException(str(exc).strip()) from None


def _jsonable(progress: object) -> dict:
    from dataclasses import asdict

    return {k: (v if isinstance(v, int | str | type(None)) else str(v)) for k, v in asdict(progress).items()}


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="batchdb")
