"""The `batchdb` command line: the same operations as the SDK, for shells and cron."""

from __future__ import annotations

import datetime
import json
import logging
import re
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from batchdb import __version__, pooler, settings
from batchdb import db as dbmod

if TYPE_CHECKING:
    from batchdb.jobs import JobProgress  # the CLI imports the SDK lazily, in each command

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


def _remember_dsn(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Note a DSN typed on the command line, so a suggested fix command can carry it."""
    if value and ctx.get_parameter_source(param.name or "dsn") == click.core.ParameterSource.COMMANDLINE:
        ctx.find_root().ensure_object(dict)["dsn_flag"] = f" --dsn '{_mask_password(value)}'"
    return value


def _mask_password(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - an unparsable DSN fails later with its own message
        return "<your DSN>"
    return dsn if "password" not in parts else make_conninfo("", **{**parts, "password": "****"})


def _dsn_option(func: _F) -> _F:
    return click.option(
        "--dsn",
        envvar=settings.DSN,
        default=None,
        callback=_remember_dsn,
        help="PostgreSQL DSN (default: $BATCHDB_DSN, else the embedded server).",
    )(func)


class _Commands(click.Group):
    """The root group: every known failure of every command becomes one or two lines (batchdb/explanations.py)."""

    def invoke(self, ctx: click.Context) -> object:
        from batchdb.explanations import explain

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            options = ctx.ensure_object(dict)
            explanation = explain(exc, dsn_flag=options.get("dsn_flag", ""))
            if explanation is None:
                raise
            if options.get("verbose"):
                traceback.print_exc()
            raise click.ClickException(explanation.text()) from None


@click.group(cls=_Commands)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug); tracebacks for known errors.")
@click.version_option(__version__, "--version", prog_name="batchdb", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Run millions of LLM requests through a PostgreSQL queue."""
    from batchdb.secrets import mask_keys_in_root_handlers

    ctx.ensure_object(dict)["verbose"] = verbose
    if problems := settings.environment_problems():
        raise click.ClickException("; ".join(problems))
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every API key this process resolves is masked in whatever any library logs.
    mask_keys_in_root_handlers()


# -- database ------------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """Create, upgrade, find and stop the database."""


@db_group.command("upgrade")
@_dsn_option
def db_upgrade(dsn: str | None) -> None:
    """Apply the schema migrations in sql/ (idempotent, safe to run concurrently)."""
    from batchdb import migrations

    created = dbmod.create_database_if_missing(dsn)
    if created:
        click.echo(f"created database {created}")
    with dbmod.connect(dsn) as conn:
        applied = migrations.upgrade(conn)
    if applied:
        for m in applied:
            click.echo(f"applied {m.version:04d}_{m.name}")
    else:
        click.echo("schema is up to date")


@db_group.command("status")
@_dsn_option
def db_status(dsn: str | None) -> None:
    """Show the database batchdb uses: $BATCHDB_DSN's (or --dsn) if set, else the embedded server.

    Exits 0 when the database answers and its schema is up to date, 1 otherwise.
    """
    from batchdb import embedded, migrations
    from batchdb.explanations import UPGRADE

    if not dsn:
        server = embedded.server_status()
        if server is None:
            click.echo(
                f"embedded PostgreSQL: not running (data directory {embedded.batchdb_home() / 'pg'}); "
                "any batchdb command starts it"
            )
            sys.exit(1)
        click.echo(f"embedded PostgreSQL: running, pid {server.pid}, port {server.port}")
        click.echo(f"  dsn:      {server.dsn}")
        click.echo(f"  data dir: {server.data_dir}")
        click.echo(f"  log:      {server.log_file}")
        dsn = server.dsn
    else:
        click.echo(f"database: {_describe_dsn(dsn)}")
    with dbmod.connect(dsn) as conn:
        version = dbmod.one_row(conn.execute("SHOW server_version"))["server_version"]
        missing = migrations.pending(conn)
    click.echo(f"  server:   PostgreSQL {version}")
    if missing:
        state = (
            "not set up (no batchdb migrations applied)"
            if len(missing) == len(migrations.available())
            else f"missing {', '.join(f'{m.version:04d}_{m.name}' for m in missing)}"
        )
        click.echo(f"  schema:   {state}")
        click.echo(f"  run: {UPGRADE}")
        sys.exit(1)
    click.echo(f"  schema:   up to date ({len(migrations.available())} migrations)")


def _describe_dsn(dsn: str) -> str:
    """host:port/dbname as user, never the password."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    user = parts.get("user")
    return f"{parts.get('host', 'local socket')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}" + (
        f" as {user}" if user else ""
    )


@db_group.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server."""
    from batchdb import embedded

    click.echo("stopped" if embedded.stop_server() else "embedded PostgreSQL was not running")


# -- jobs ----------------------------------------------------------------------------------------


_JOB_OPTIONS = [
    click.option("--model", required=True, help="Model (or Azure deployment) name, e.g. gpt-4o-mini."),
    click.option("--prompt", default=None, help="Template over the file's columns, e.g. 'Classify: {headline}'."),
    click.option("--system", default=None, help="System message (may also use {column} fields)."),
    click.option("--messages-column", default=None, help="A column holding ready chat messages instead of --prompt."),
    click.option("--id-column", default=None, help="A column with a unique id per row."),
    click.option(
        "--provider", default="openai", show_default=True, help="openai, azure, gemini, vertex or instant (no network)."
    ),
    click.option("--key-alias", default="default", show_default=True, help="Which of the provider's API keys to use."),
    click.option("--name", default=None, help="A name for the job, shown by status."),
    click.option(
        "--priority",
        default=1,
        show_default=True,
        type=int,
        help="Weight in the fair claim: 2 gets twice the share of 1.",
    ),
    click.option("--max-attempts", default=5, show_default=True, type=int, help="Attempts per row before it is dead."),
    click.option("--max-tokens", default=None, type=int, help="Most tokens in each answer."),
    click.option("--temperature", default=None, type=float, help="Sampling temperature, 0 to 2."),
    click.option(
        "--budget",
        "budget_usd",
        default=None,
        type=float,
        help="Spending cap in USD: the job pauses when it is reached.",
    ),
    click.option("--budget-usd", "budget_usd_alias", default=None, type=float, hidden=True),  # the old spelling
    click.option(
        "--idempotency-key",
        default=None,
        help="Submitting again with this key returns the same job (and is refused for different data or options).",
    ),
    click.option(
        "--webhook-url",
        default=None,
        help="POST a signed JSON event here when the job completes, fails, is cancelled or paused.",
    ),
    click.option(
        "--webhook-secret",
        envvar=settings.WEBHOOK_SECRET,
        default=None,
        help="HMAC key signing the webhook (default: $BATCHDB_WEBHOOK_SECRET, else generated and printed).",
    ),
    click.option(
        "--notify-email",
        "notify_emails",
        multiple=True,
        help="Email this address on the same events (repeatable; workers need BATCHDB_SMTP_HOST).",
    ),
    click.option(
        "--dedupe/--no-dedupe",
        default=True,
        show_default=True,
        help="Send rows asking the same thing once and give each the answer (--no-dedupe: send every row).",
    ),
    click.option(
        "--mode",
        type=click.Choice(["online", "batch", "auto"]),
        default="online",
        show_default=True,
        help="online: a call per row now; batch: through the provider's Batch API (about half the price, "
        "answers within 24 h; openai, azure, gemini); auto: batch while a batch can end before --deadline, "
        "online for the rest.",
    ),
    click.option(
        "--deadline",
        default=None,
        metavar="WHEN",
        help="With --mode auto: when every row must be answered, a time (2026-12-08T09:00Z) or a span from "
        "now (6h, 90m, 2d).",
    ),
    click.option(
        "--allow-unknown-model",
        is_flag=True,
        help="Submit even when the model has no price in batchdb.prices (its cost shows as unknown).",
    ),
    click.option(
        "--reuse",
        is_flag=True,
        help="Answer rows from stored successful answers to the same requests (earlier jobs) at $0 instead of "
        "calling the provider. Off by default: an answer at a temperature above 0 is one sample of many.",
    ),
    click.option(
        "--reuse-scope",
        type=click.Choice(["user", "team"]),
        default="user",
        show_default=True,
        help="Whose answers --reuse takes: yours, or your team's (batchdb users set NAME --team T).",
    ),
    click.option(
        "--reuse-max-age",
        default=None,
        metavar="AGE",
        help="Oldest answer --reuse takes, e.g. 30d, 12h, 90m, 2w (default: any age).",
    ),
]


def _job_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options of a job, shared by `submit` and `estimate` (which takes what submit takes)."""
    for option in reversed(_JOB_OPTIONS):
        command = option(command)
    return command


@cli.command("submit")
@click.argument("path", type=click.Path(path_type=Path))
@_job_options
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what the job would cost and take (as `batchdb estimate`) and queue nothing.",
)
@click.option(
    "--wait/--no-wait",
    default=False,
    help="Show progress until the job ends; the exit code tells how (see `batchdb wait --help`).",
)
@_dsn_option
def submit_command(path: Path, dsn: str | None, wait: bool, dry_run: bool, **options: object) -> None:
    """Queue one request per row of a CSV, JSONL or Parquet file."""
    from batchdb.ingest import InputError
    from batchdb.submission import submit

    _merge_job_options(options)
    if dry_run:
        _print_estimate(path, dsn, options, pilot_rows=0, pilot_timeout_s=0)
        return
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
        sys.exit(_wait_and_report(job, timeout=None))


@cli.command("estimate")
@click.argument("path", type=click.Path(path_type=Path))
@_job_options
@click.option(
    "--pilot",
    "pilot_rows",
    default=0,
    show_default=True,
    type=int,
    help="Run the first N rows as a real (paid) pilot job and measure answer length from it.",
)
@click.option(
    "--pilot-timeout", "pilot_timeout_s", default=600.0, show_default=True, type=float, help="Seconds to wait for it."
)
@_dsn_option
def estimate_command(path: Path, dsn: str | None, pilot_rows: int, pilot_timeout_s: float, **options: object) -> None:
    """What submitting this file would queue, cost and take; queues nothing (but a --pilot job)."""
    _merge_job_options(options)
    _print_estimate(path, dsn, options, pilot_rows=pilot_rows, pilot_timeout_s=pilot_timeout_s)


def _merge_job_options(options: dict[str, object]) -> None:
    options["notify_emails"] = list(options["notify_emails"]) or None  # type: ignore[call-overload]
    if options.get("deadline") is not None:
        options["deadline"] = _parse_deadline(str(options["deadline"]))
    options["reuse"] = "exact" if options["reuse"] else None
    given_age = options["reuse_max_age"]
    options["reuse_max_age"] = None if given_age is None else _duration("--reuse-max-age", str(given_age))
    alias = options.pop("budget_usd_alias")
    if options["budget_usd"] is None:
        options["budget_usd"] = alias


# Spans on the command line: 30s, 90m, 24h, 2d, 2w (--deadline, --reuse-max-age, --batch-window ...).
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _span(text: str) -> datetime.timedelta | None:
    """'30s', '90m', '24h', '2d', '2w' as a timedelta; None when `text` is not such a span."""
    match = _SPAN.fullmatch(text.strip())
    return None if match is None else datetime.timedelta(seconds=float(match.group(1)) * _SPAN_UNITS[match.group(2)])


def _span_seconds(text: str, option: str) -> float:
    """A span such as 30s, 90m, 24h, 2d (or a bare number of seconds) in seconds."""
    bare = re.fullmatch(r"\d+(?:\.\d+)?", text.strip())
    span = datetime.timedelta(seconds=float(text)) if bare else _span(text)
    if span is None:
        raise click.BadParameter(f"expected a span such as 30s, 90m, 24h or 2d, got {text!r}", param_hint=option)
    return span.total_seconds()


def _parse_deadline(text: str) -> datetime.datetime | datetime.timedelta:
    """--deadline: a span from now ('6h', '90m', '2d', '30s') or an ISO 8601 time with a zone
    ('2026-12-08T09:00Z', '2026-12-08 09:00+01:00')."""
    value = text.strip()
    span = _span(value)
    if span is not None:
        return span
    try:
        at = datetime.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise click.BadParameter(
            f"expected a time such as 2026-12-08T09:00Z or a span such as 6h, 90m, 2d; got {text!r}",
            param_hint="--deadline",
        ) from None
    if at.tzinfo is None:
        raise click.BadParameter(
            f"give the time zone (2026-12-08T09:00Z, or +01:00), got {text!r}", param_hint="--deadline"
        )
    return at


def _duration(option: str, text: str) -> datetime.timedelta:
    """'30d', '12h', '90m', '2w', '45s' as a timedelta; refused naming the option otherwise."""
    span = _span(text)
    if span is None or span <= datetime.timedelta(0):
        raise click.BadParameter(
            f"expected a positive age such as 30d, 12h, 90m or 2w; got {text!r}", param_hint=f"'{option}'"
        )
    return span


def _print_estimate(
    path: Path, dsn: str | None, options: dict[str, object], *, pilot_rows: int, pilot_timeout_s: float
) -> None:
    from batchdb.estimation import estimate
    from batchdb.ingest import InputError

    try:
        result = estimate(path, dsn=dsn, pilot_rows=pilot_rows, pilot_timeout_s=pilot_timeout_s, **options)  # type: ignore[arg-type]
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(result.text())
    click.echo("nothing was queued" + (f" but pilot job {result.pilot_job_id}" if result.pilot_job_id else ""))


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
            if progress.mode == "auto":
                _print_lanes(get_job(job_id, dsn=dsn).lanes(), finished=progress.finished)
            if progress.mode in ("batch", "auto"):
                _print_batches(get_job(job_id, dsn=dsn).batches())
        return
    jobs = list_jobs(dsn=dsn)
    if as_json:
        click.echo(json.dumps([_jsonable(j) for j in jobs], indent=2))
        return
    click.echo(f"{'job':>6} {'status':<10} {'done':>15} {'dead+failed':>11} {'cost $':>10}  model / name")
    for j in jobs:
        click.echo(
            f"{j.job_id:>6} {j.status:<10} {f'{j.n_done}/{j.n_total}':>15} {j.n_dead + j.n_failed:>11} "
            f"{(f'{j.cost_usd:.4f}' if j.priced else 'unknown'):>10}  {j.model} / {j.name or ''}"
        )


def _print_lanes(lanes: dict[str, Any], *, finished: bool) -> None:
    """An auto job: rows answered by batch and online, and where its rows go now."""
    click.echo(f"  answered: {lanes['n_by_batch']} by batch, {lanes['n_by_online']} online")
    if finished or "lane" not in lanes:
        return
    cutoff = lanes["batch_cutoff"].isoformat(timespec="seconds")
    cancel = lanes["cancel_at"].isoformat(timespec="seconds")
    click.echo(
        f"  now: rows go {lanes['lane']}; no batch is created after {cutoff}, open ones are cancelled at {cancel}"
    )


def _print_batches(chunks: list[dict[str, Any]]) -> None:
    """A batch-mode job's open chunks, one line each, and how many are done."""
    done = [c for c in chunks if c["state"] == "collected"]
    click.echo(f"  batches: {len(chunks) - len(done)} open, {len(done)} collected")
    for c in chunks:
        if c["state"] == "collected":
            continue
        at_provider = f" {c['batch_id']} {c['provider_status'] or ''}".rstrip() if c["batch_id"] else ""
        counts = f", {c['n_completed'] or 0} answered" if c["n_completed"] is not None else ""
        error = f" ({c['last_error']})" if c["last_error"] else ""
        click.echo(f"    chunk {c['id']}: {c['n_requests']} rows, {c['state']}{at_provider}{counts}{error}")


@cli.command("results")
@click.argument("job_id", type=int)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="File to write; its extension picks the format: .parquet, .csv or .jsonl.",
)
@_dsn_option
def results_command(job_id: int, output: Path, dsn: str | None) -> None:
    """Write a job's results (input columns + response, status, usage, error)."""
    from batchdb.jobs import Job
    from batchdb.results import writer_for

    _run_db_op(lambda: writer_for(output))  # refuse an unknown extension before touching anything
    job = Job(job_id, dsn=dsn)
    progress = _run_db_op(job.status)
    if not progress.finished:
        click.echo(
            f"warning: job {job_id} is {progress.status} ({progress.n_done}/{progress.n_total} rows done): "
            f"the file holds only the rows finished so far",
            err=True,
        )
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


# Exit codes of `wait` and `submit --wait` (README, "Exit codes").
EXIT_COMPLETED = 0
EXIT_ROWS_FAILED = 3
EXIT_PAUSED = 4
EXIT_CANCELLED = 5
EXIT_TIMEOUT = 6


def _wait_and_report(job: object, *, timeout: float | None) -> int:
    """Wait with a progress bar, print the outcome, and return the exit code that tells it."""
    from batchdb.models import JobStatus

    try:
        final = job.wait(progress=True, until="paused", timeout=timeout)  # type: ignore[attr-defined]
    except TimeoutError as exc:
        click.echo(f"timed out: {exc}", err=True)
        return EXIT_TIMEOUT
    click.echo(final.summary())
    if final.status == JobStatus.PAUSED:
        click.echo(
            f"paused: {final.status_reason or 'no reason given'}; continue with `batchdb resume {final.job_id}`",
            err=True,
        )
        return EXIT_PAUSED
    if final.status == JobStatus.CANCELLED:
        return EXIT_CANCELLED
    return EXIT_ROWS_FAILED if final.n_failed + final.n_dead else EXIT_COMPLETED


@cli.command("wait")
@click.argument("job_id", type=int)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Give up after this many seconds (exit code 6); the job keeps running.",
)
@_dsn_option
def wait_command(job_id: int, timeout: float | None, dsn: str | None) -> None:
    """Show a job's progress until it ends; the exit code tells how.

    0 completed, every row succeeded; 3 completed with failed or dead rows;
    4 paused (needs `batchdb resume`); 5 cancelled; 6 --timeout passed; 1 error.
    """
    from batchdb.jobs import get_job

    sys.exit(_wait_and_report(get_job(job_id, dsn=dsn), timeout=timeout))


@cli.command("watch")
@click.argument("job_ids", nargs=-1, type=int)
@click.option("--job", "job_option", type=int, multiple=True, hidden=True)  # the old spelling
@_dsn_option
def watch_command(job_ids: tuple[int, ...], job_option: tuple[int, ...], dsn: str | None) -> None:
    """Stream job events (completed, paused, cancelled ...) as JSON lines until Ctrl-C.

    With JOB_IDS, only those jobs' events (each must exist, as for `status`).
    """
    from psycopg.rows import dict_row

    from batchdb import events  # not batchdb.jobs: pandas would delay the LISTEN by a second or more

    wanted = set(job_ids) | set(job_option)
    listening = pooler.listen_connect(
        dbmod.with_options(dbmod.resolve_dsn(dsn), dbmod.SESSION_OPTIONS), autocommit=True, row_factory=dict_row
    )
    if listening is None:
        raise click.ClickException(
            f"watch needs LISTEN, which a transaction pooler loses: set {settings.LISTEN_DSN} "
            "to a direct connection to the server"
        )
    with listening as conn, dbmod.connect(dsn) as lookups:
        for job_id in sorted(wanted):
            if not events.visible(lookups, job_id):
                raise click.ClickException(f"job {job_id} does not exist")  # as `status N` says
        try:
            for event in events.stream(conn):
                if wanted and event.get("job_id") not in wanted:
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
@click.option("--key-alias", default="default", show_default=True, help="Which of the provider's API keys.")
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="Requests per minute.")
@click.option(
    "--tpm", type=click.IntRange(min=1), default=None, help="Tokens per minute (OpenAI: prompt + max_tokens)."
)
@click.option("--rpd", type=click.IntRange(min=1), default=None, help="Requests per day (Gemini).")
@click.option(
    "--batch-queue-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Batch API queue limit: prompt tokens in open batches at once (batch-mode jobs).",
)
@click.option(
    "--batch-window",
    default=None,
    metavar="SPAN",
    help="The longest a batch may take (30s, 90m, 24h; default the provider's window: 24h, Gemini 48h). "
    "Auto-mode jobs plan with it.",
)
@click.option(
    "--batch-margin",
    default=None,
    metavar="SPAN",
    help="Time auto-mode jobs keep before their deadline to collect batches and answer the rest online "
    "(default: window/24).",
)
@click.option(
    "--clear",
    multiple=True,
    type=click.Choice(["rpm", "tpm", "rpd", "batch_queue_tokens", "batch_window_seconds", "batch_margin_seconds"]),
    help="Remove this limit (repeatable).",
)
@_dsn_option
def limits_set(
    provider: str,
    model: str,
    key_alias: str,
    rpm: int | None,
    tpm: int | None,
    rpd: int | None,
    batch_queue_tokens: int | None,
    batch_window: str | None,
    batch_margin: str | None,
    clear: tuple[str, ...],
    dsn: str | None,
) -> None:
    """Set the limits of one provider key for one model; limits not given keep their value."""
    from batchdb import ledger

    window_s = None if batch_window is None else _span_seconds(batch_window, "--batch-window")
    margin_s = None if batch_margin is None else _span_seconds(batch_margin, "--batch-margin")
    given = (rpm, tpm, rpd, batch_queue_tokens, window_s, margin_s)
    if all(value is None for value in given) and not clear:
        raise click.UsageError(
            "nothing to set: give --rpm, --tpm, --rpd, --batch-queue-tokens, --batch-window and/or --batch-margin "
            "(or --clear)"
        )
    with dbmod.connect(dsn) as conn:
        now = _run_db_op(
            lambda: ledger.set_limits(
                conn,
                ledger.Lane(provider, key_alias, model),
                rpm=rpm,
                tpm=tpm,
                rpd=rpd,
                batch_queue_tokens=batch_queue_tokens,
                batch_window_seconds=window_s,
                batch_margin_seconds=margin_s,
                clear=clear,
            )
        )
    batch = f" batch_queue_tokens={now['batch_queue_tokens']}" if now["batch_queue_tokens"] else ""
    if now["batch_window_seconds"] is not None:
        batch += f" batch_window={now['batch_window_seconds']:g}s"
    if now["batch_margin_seconds"] is not None:
        batch += f" batch_margin={now['batch_margin_seconds']:g}s"
    click.echo(
        f"{provider}/{key_alias}/{model}: rpm={now['rpm'] or '-'} tpm={now['tpm'] or '-'} rpd={now['rpd'] or '-'}"
        + batch
    )


@limits_group.command("show")
@_dsn_option
def limits_show(dsn: str | None) -> None:
    """Limits, current pacing and totals per provider key and model."""
    from batchdb import ledger

    with dbmod.connect(dsn) as conn:
        rows = ledger.list_limits(conn)
        circuits = ledger.open_circuits(conn)
    click.echo(
        f"{'provider/key/model':<40} {'rpm':>8} {'tpm':>10} {'rpd':>7} {'pace':>5} {'granted':>9} {'429s':>6}  state"
    )
    for r in rows:
        # pace_now: the pace reserve_capacity would use now (it recovers 2%/s after a 429).
        click.echo(
            f"{r['provider'] + '/' + r['key_alias'] + '/' + r['model']:<40} {r['rpm'] or '-':>8} "
            f"{r['tpm'] or '-':>10} {r['rpd'] or '-':>7} {r['pace_now']:>5.2f} {r['requests_granted']:>9} "
            f"{r['rate_limited']:>6}  {r['state_text']}"
        )
    for r in rows:
        if r["batch_queue_tokens"] or r["batch_enqueued_tokens"]:
            limit = f"{r['batch_queue_tokens']:,}" if r["batch_queue_tokens"] else "no limit set"
            click.echo(
                f"{r['provider'] + '/' + r['key_alias'] + '/' + r['model']:<40} batch queue: "
                f"{r['batch_enqueued_tokens']:,} tokens enqueued ({limit})"
            )
    # A lane whose provider is down (circuit open) waits whatever its limits say: say so, limits or not.
    for c in circuits:
        click.echo(f"{c['provider'] + '/' + c['key_alias'] + '/' + c['model']:<40} {c['state_text']}")


@cli.group("prices")
def prices_group() -> None:
    """Model prices and limits (batchdb.prices): what costs and estimates are computed with."""


@prices_group.command("update")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option(
    "--as-of",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="The date of the prices in FILE (default: the map's own date, else the file's).",
)
@click.option("--yes", is_flag=True, help="Write the additions and changes shown (without it nothing is written).")
@_dsn_option
def prices_update(path: Path | None, as_of: datetime.datetime | None, yes: bool, dsn: str | None) -> None:
    """Compare a price map (LiteLLM's model_prices_and_context_window.json, downloaded by you; default: the
    dated map shipped with batchdb) with batchdb.prices, and with --yes write it."""
    from batchdb import price_list

    price_map = _run_db_op(
        lambda: price_list.read_price_map(
            path or price_list.packaged_price_map(), as_of=as_of.date() if as_of else None
        )
    )
    with dbmod.connect(dsn) as conn:
        planned = _run_db_op(lambda: price_list.plan(conn, price_map))
        click.echo(planned.text())
        if not yes:
            if planned.changes or planned.unchanged:
                again = ["batchdb prices update"]
                again += [str(path)] if path else []
                again += [f"--as-of {as_of.date()}"] if as_of else []
                again += [f"--dsn {shlex.quote(dsn)}"] if dsn else []
                click.echo(f"nothing written; to write it, run: {' '.join(again)} --yes")
            return
        written = _run_db_op(lambda: price_list.apply(conn, planned))
    click.echo(f"wrote {written} price row(s); {len(planned.unchanged)} confirmed as of {price_map.as_of}")


@prices_group.command("show")
@_dsn_option
def prices_show(dsn: str | None) -> None:
    """Every model's prices (USD per million tokens), limits, and where and when they came from."""
    from batchdb.queries import query

    with dbmod.connect(dsn) as conn:
        rows = conn.execute(query("prices_all")).fetchall()
    click.echo(
        f"{'provider/model':<34} {'input':>9} {'cached':>9} {'output':>9} {'batch':>6} {'max in':>9} "
        f"{'max out':>8}  as of"
    )
    for r in rows:
        source = f" ({r['source']})" if r["source"] else ""
        click.echo(
            f"{r['provider'] + '/' + r['model']:<34} {_num(r['input_per_mtok']):>9} "
            f"{_num(r['cached_input_per_mtok']):>9} {_num(r['output_per_mtok']):>9} {_num(r['batch_discount']):>6} "
            f"{r['max_input_tokens'] or r['context_window'] or '-':>9} {r['max_output_tokens'] or '-':>8}  "
            f"{r['as_of'] or 'not recorded'}{source}"
        )


def _num(value: object) -> str:
    from decimal import Decimal

    return "-" if value is None else format(Decimal(str(value)).normalize(), "f")


# -- users ---------------------------------------------------------------------------------------


@cli.group("users")
def users_group() -> None:
    """Users of a shared database: PostgreSQL roles that see only their own jobs."""


def _user_options(func: _F) -> _F:
    for option in reversed(
        [
            click.option(
                "--weight", type=float, default=None, help="Share of contended provider capacity (default 1)."
            ),
            click.option("--budget-day", "budget_usd_day", type=float, default=None, help="USD per UTC day."),
            click.option(
                "--budget-month", "budget_usd_month", type=float, default=None, help="USD per calendar month."
            ),
            click.option("--email", default=None, help="Where job notifications go."),
            click.option(
                "--team",
                default=None,
                help="The user's team: its members may reuse one another's answers (submit --reuse --reuse-scope "
                "team); '' takes the user out of their team.",
            ),
        ]
    ):
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
        _run_db_op(
            lambda: users.add_user(
                conn,
                name,
                kind=users.UserKind(kind or "user"),
                password=password,
                **settings,  # type: ignore[arg-type]
            )
        )
    click.echo(f"user {name} ({kind or 'user'}) ready; connect as role {name!r}")


@users_group.command("set")
@click.argument("name")
@_user_options
@_dsn_option
def users_set(name: str, dsn: str | None, **settings: object) -> None:
    """Change a user's weight, budgets, email or team."""
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
    click.echo(
        f"{'user':<24} {'kind':<8} {'weight':>6} {'$/day':>10} {'$/month':>10} {'today $':>10} {'month $':>10} team"
    )
    for u in rows:
        click.echo(
            f"{u.name:<24} {u.kind:<8} {u.weight:>6g} {_usd(u.budget_usd_day):>10} "
            f"{_usd(u.budget_usd_month):>10} {u.spent_today_usd:>10.4f} {u.spent_month_usd:>10.4f} {u.team or '-'}"
        )


def _usd(value: object) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- processes -----------------------------------------------------------------------------------


@cli.command("worker")
@click.option("--concurrency", "-c", default=64, show_default=True, help="Requests in flight at once.")
@click.option(
    "--lease-seconds",
    default=60.0,
    show_default=True,
    help="How long a claimed row stays this worker's without a heartbeat.",
)
@click.option("--request-timeout", default=120.0, show_default=True, help="Seconds one provider call may take.")
@click.option(
    "--poll-interval", default=2.0, show_default=True, help="Seconds between looks for work when no NOTIFY arrives."
)
@click.option("--exit-when-idle", is_flag=True, help="Exit once nothing is left to claim.")
@click.option(
    "--circuit-threshold",
    default=5,
    show_default=True,
    help="Connection errors, timeouts or 5xx in a row that open a lane's circuit.",
)
@click.option(
    "--circuit-max-backoff",
    default=60.0,
    show_default=True,
    help="Longest wait (s) between probe calls while a lane's circuit is open.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line, for log shippers.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    envvar=settings.METRICS_PORT,
    show_envvar=True,
    default=None,
    help="Serve Prometheus metrics on http://HOST:PORT/metrics and a health check on /healthz "
    "(200 while claiming, 503 while stopping or the database is unreachable). Default: off.",
)
@click.option(
    "--metrics-host",
    default="0.0.0.0",
    show_default=True,
    help="Address the --metrics-port server listens on (127.0.0.1: this machine only).",
)
@_dsn_option
def worker_command(
    concurrency: int,
    lease_seconds: float,
    request_timeout: float,
    poll_interval: float,
    exit_when_idle: bool,
    circuit_threshold: int,
    circuit_max_backoff: float,
    log_format: str,
    metrics_port: int | None,
    metrics_host: str,
    dsn: str | None,
) -> None:
    """Run a worker process until SIGTERM/SIGINT (a second one: hand back every row at once)."""
    from batchdb.workers.breaker import BreakerConfig
    from batchdb.workers.logs import configure_worker_logging
    from batchdb.workers.metrics import MetricsConfig
    from batchdb.workers.worker import WorkerConfig, run_worker

    _require_schema(dsn)
    # The worker's own state changes at INFO; never a line per request (workers/logs.py).
    configure_worker_logging(log_format)
    run_worker(
        WorkerConfig(
            dsn=dsn,
            concurrency=concurrency,
            lease_seconds=lease_seconds,
            request_timeout=request_timeout,
            poll_interval=poll_interval,
            exit_when_idle=exit_when_idle,
            breaker=BreakerConfig(
                threshold=max(1, circuit_threshold),
                max_backoff=max(0.1, circuit_max_backoff),
                base_backoff=min(BreakerConfig().base_backoff, max(0.1, circuit_max_backoff)),
            ),
            metrics=MetricsConfig(metrics_port, metrics_host) if metrics_port is not None else None,
        )
    )


@cli.command("workers")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_dsn_option
def workers_command(as_json: bool, dsn: str | None) -> None:
    """List live workers: host, pid, rows in flight, rows done, last heartbeat, lanes of the rows they hold."""
    from batchdb.fleet import live_workers

    with dbmod.connect(dsn) as conn:
        found = _run_db_op(lambda: live_workers(conn))
    if as_json:
        click.echo(
            json.dumps(
                [
                    {**vars(w), "started_at": w.started_at.isoformat(), "heartbeat_at": w.heartbeat_at.isoformat()}
                    for w in found
                ],
                indent=2,
            )
        )
        return
    if not found:
        click.echo("no live workers (start one with `batchdb worker`)")
        return
    click.echo(f"{'host':<24} {'pid':>7} {'in flight':>11} {'rows done':>10} {'heartbeat':>10}  lanes")
    for w in found:
        click.echo(
            f"{w.hostname:<24} {w.pid:>7} {f'{w.in_flight}/{w.concurrency}':>11} {w.n_completed:>10} "
            f"{f'{w.heartbeat_age_s:.0f}s ago':>10}  {', '.join(w.lanes) or '-'}"
        )


@cli.command(
    "simulator", context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
)
@click.pass_context
def simulator_command(ctx: click.Context) -> None:
    """Run the provider simulator (OpenAI / Azure / Gemini / Vertex AI wire formats); --help for its options."""
    from batchdb.simulator.__main__ import main as simulator_main

    # Its options are argparse's: --help goes to it, so they are listed.
    sys.exit(simulator_main(ctx.args, prog="batchdb simulator"))


def _require_extra(extra: str, *modules: str) -> None:
    """The optional parts install with an extra (pyproject.toml); without it, say the one command to run."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise click.ClickException(f'`batchdb {extra}` needs {", ".join(missing)}: pip install "batchdb[{extra}]"')


@cli.command("dashboard")
@click.option("--port", default=8501, show_default=True, help="Port to listen on.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 in a container (deploy/), behind your own access control.",
)
@click.option(
    "--outputs",
    "outputs_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Folder of finished jobs' Parquet outputs to read with DuckDB.",
)
@click.option("--refresh", "refresh_seconds", default=None, type=float, help="Live refresh period in seconds.")
@_dsn_option
def dashboard_command(
    port: int, host: str, outputs_dir: Path | None, refresh_seconds: float | None, dsn: str | None
) -> None:
    """Start the Streamlit dashboard, on 127.0.0.1 unless --host (read-only, except cancel/retry)."""
    _require_extra("dashboard", "streamlit", "altair", "duckdb")
    from batchdb.dashboard.run import run_dashboard

    run_dashboard(dsn, port, host=host, outputs_dir=outputs_dir, refresh_seconds=refresh_seconds)


@cli.command(
    "dagster", context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
)
@click.pass_context
def dagster_command(ctx: click.Context) -> None:
    """Open the example in the Dagster UI with workers and the provider simulator; --help for its options."""
    _require_extra("dagster", "dagster", "dagster_webserver", "dagster_postgres")
    from batchdb.dagster.dev import dagster_command as command

    command.main(args=ctx.args, prog_name="batchdb dagster")


@cli.command("demo")
@click.option("--rows", default=3000, show_default=True, help="Synthetic headlines to classify.")
@click.option("--workers", "n_workers", default=2, show_default=True, help="Worker processes to start.")
@click.option("--rpm", default=6000, show_default=True, help="Simulated provider requests/minute limit.")
@click.option("--tpm", default=600_000, show_default=True, help="Simulated provider tokens/minute limit.")
@click.option(
    "--output",
    default="demo-output/results.parquet",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the results go (Parquet).",
)
@click.option("--yes", is_flag=True, help="Run even on a database that holds other jobs (its workers run them too).")
@_dsn_option
def demo_command(rows: int, n_workers: int, rpm: int, tpm: int, output: Path, dsn: str | None, yes: bool) -> None:
    """Run a demo job end to end against the local provider simulator.

    It uses a lane of its own (key alias batchdb-demo), so it never changes the
    limits, keys or users of a database it shares.
    """
    from batchdb.demo import run_demo

    run_demo(rows=rows, n_workers=n_workers, rpm=rpm, tpm=tpm, output=output, dsn=dsn, yes=yes)


def _require_schema(dsn: str | None) -> None:
    """Refuse to start a long-running process on a database that was never upgraded."""
    import psycopg

    from batchdb import migrations
    from batchdb.errors import SchemaNotReady

    try:
        conn = dbmod.connect(dsn)
    except psycopg.OperationalError as exc:
        if not dbmod.is_unreachable(exc):
            raise  # a missing database or a refused login: the one-line error says what to run
        # Down or not up yet (a server starting beside its workers): the worker waits for it in its
        # reconnect loop, which logs the outage and honours SIGTERM/SIGINT meanwhile.
        return
    with conn:
        try:
            missing = migrations.pending(conn)
        except psycopg.errors.InsufficientPrivilege:
            return  # a role that may not read the migrations table (before 0009): cannot tell, so do not block
        where = _describe_dsn(conn.info.dsn)
    if missing:
        raise SchemaNotReady([f"{m.version:04d}_{m.name}" for m in missing], where)


def _run_db_op(operation: Callable[[], _T]) -> _T:
    """Run `operation`; a refusal from the database or the SDK becomes a one-line error."""
    import psycopg

    from batchdb.errors import BatchDBError
    from batchdb.explanations import explain

    try:
        return operation()
    except (psycopg.Error, BatchDBError, ValueError) as exc:
        options = click.get_current_context().find_root().ensure_object(dict)
        explanation = explain(exc, dsn_flag=options.get("dsn_flag", ""))
        if options.get("verbose"):
            traceback.print_exc()
        raise click.ClickException(explanation.text() if explanation else str(exc).strip().splitlines()[0]) from None


def _jsonable(progress: JobProgress) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: (v if isinstance(v, int | str | type(None)) else str(v)) for k, v in asdict(progress).items()}


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="batchdb")
