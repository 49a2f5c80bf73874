"""`submit`: data in, a `Job` out.

The job row is created in its own short transaction (which creates its
partitions), then every row goes in with COPY in a second transaction and the
job turns 'running' at its end, so workers see all of a job's rows or none.
If anything in the data is refused, the job is deleted: nothing is left
behind. With an idempotency key, submitting the same job again returns it;
submitting different data or options with that key is refused.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from batchdb import context_window
from batchdb.db import connect, one_row
from batchdb.errors import translates_database_errors
from batchdb.ingest import (
    DataSource,
    InputError,
    InputSchema,
    InputSpec,
    RowName,
    check_schema,
    copy_rows,
    open_source,
)
from batchdb.jobs import Job
from batchdb.notifications import (
    CHANNEL_EMAIL,
    CHANNEL_WEBHOOK,
    check_emails,
    check_secret,
    check_webhook_url,
    new_secret,
)
from batchdb.prompts import PromptError, build_request
from batchdb.providers import KNOWN_PROVIDERS
from batchdb.providers.compat import UnsupportedRequest, check_request
from batchdb.queries import query
from batchdb.tokens import estimate_prompt_tokens
from batchdb.validation import check_response_schema

log = logging.getLogger(__name__)

# How a job's rows are sent (jobs.mode, 0020, 0022): one call per row, chunks through a Batch API,
# or batch where a batch can make the job's deadline and online for the rest.
JOB_MODES = ("online", "batch", "auto")
BATCH_PROVIDERS = ("openai", "azure", "gemini")
# Cross-job reuse of stored answers (jobs.reuse, 0021): what may be reused, and whose.
REUSE_KINDS = ("exact",)
REUSE_SCOPES = ("user", "team")


@translates_database_errors
def submit(
    data: DataSource,
    *,
    model: str,
    prompt: str | None = None,
    system: str | None = None,
    messages_column: str | None = None,
    id_column: str | None = None,
    provider: str = "openai",
    key_alias: str = "default",
    name: str | None = None,
    owner: str | None = None,
    priority: int = 1,
    max_attempts: int = 5,
    budget_usd: float | None = None,
    idempotency_key: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    response_format: dict[str, Any] | None = None,
    response_schema: Any = None,
    validation_retries: int | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    notify_emails: str | Iterable[str] | None = None,
    allow_unknown_model: bool = False,
    dedupe: bool = True,
    mode: str = "online",
    deadline: datetime | timedelta | None = None,
    reuse: str | None = None,
    reuse_scope: str = "user",
    reuse_max_age: timedelta | None = None,
    dsn: str | None = None,
) -> Job:
    """Queue one request per row of `data` and return its job.

    `prompt` and `system` are templates over the data's columns
    ("Classify this headline: {headline}"); or give `messages_column`, a column
    of ready chat messages. `id_column` names a unique id per row (default: the
    row's position). Every column comes back with the results.
    `response_schema` (a JSON schema dict or a pydantic model class) asks for
    JSON answers, validates each one and re-asks up to `validation_retries`
    times with the validation error. `key_alias`
    names which of the provider's API keys the workers use (the key itself
    never reaches the database).
    `webhook_url` gets a signed POST when the job completes, fails, is cancelled or
    paused (`webhook_secret` signs it; without one a secret is generated and returned
    as `job.webhook_secret`); `notify_emails` get an email for the same events.
    A model with no row in `batchdb.prices` (a typo, or a model batchdb does not
    know) is refused with the closest known names, unless `allow_unknown_model=True`;
    its cost then shows as unknown.
    Rows asking the same thing (the same values in the columns the templates use, or the
    same messages) are sent once and the answer given to each (`dedupe=False`: every row
    is sent, e.g. to sample several answers at a temperature above 0).
    `mode="batch"` sends the rows through the provider's Batch API (OpenAI, Azure OpenAI, Gemini): about
    half the price, a quota apart from the online rate limits, answers within the provider's
    completion window (24 h) rather than at once.
    `mode="auto"` with a `deadline` (a timezone-aware datetime, or a timedelta from now) sends rows
    through the Batch API while a batch created now would end before the deadline, and online (a quota
    of its own) when it would not: past the last moment a batch can make it, or while the lane's batch
    queue is full and no room frees in time. Both quotas work on the job at once; docs/design.md has
    the rule. A deadline that leaves no time for a batch sends every row online.

        >>> import datetime, pandas as pd, batchdb
        >>> job = batchdb.submit(pd.DataFrame({"q": ["2+2?"]}), prompt="{q}", model="gpt-4o-mini",
        ...                      mode="auto", deadline=datetime.timedelta(hours=6))  # doctest: +SKIP

    `reuse="exact"` answers a row from a stored successful answer to the same request (same
    provider, model, parameters and prompt) at $0 instead of calling the provider: the owner's own
    answers (`reuse_scope="user"`) or their team's (`"team"`), answered at most `reuse_max_age`
    ago (None: any age). Off by default: an answer at a temperature above 0 is one sample of many.

        >>> from datetime import timedelta
        >>> job = batchdb.submit(df, prompt="Label: {headline}", model="gpt-4o-mini",
        ...                      reuse="exact", reuse_max_age=timedelta(days=30))  # doctest: +SKIP
        >>> job.wait().n_reused  # doctest: +SKIP
    """
    deadline_at = check_deadline(mode, deadline)
    check_options(
        model=model,
        provider=provider,
        priority=priority,
        max_attempts=max_attempts,
        budget_usd=budget_usd,
        max_tokens=max_tokens,
        temperature=temperature,
        mode=mode,
    )
    check_reuse(reuse, reuse_scope, reuse_max_age, dedupe=dedupe)
    targets = notification_targets(webhook_url, webhook_secret, notify_emails)
    spec = InputSpec(prompt=prompt, system=system, messages_column=messages_column, id_column=id_column)
    schema, batches, row_name = open_source(data)
    input_schema = check_schema(schema, spec)
    params = job_params(
        provider,
        model,
        input_schema,
        system=system,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        response_format=response_format,
        response_schema=response_schema,
        validation_retries=validation_retries,
    )
    if not dedupe:
        params["dedupe"] = False  # shown with the job, and part of what an idempotency key compares

    with connect(dsn) as conn:
        limits = context_window.load(conn, provider, model)
        too_many = limits.max_tokens_problem(max_tokens)
        if too_many:
            raise InputError(f"max_tokens: {too_many}")
        if not allow_unknown_model:
            refuse_unknown_model(conn, provider, model)
        job_id = _create_job(
            conn,
            name=name,
            owner=owner,
            provider=provider,
            key_alias=key_alias,
            model=model,
            params=params,
            priority=priority,
            max_attempts=max_attempts,
            budget_usd=budget_usd,
            idempotency_key=idempotency_key,
            allow_unknown_model=allow_unknown_model,
            mode=mode,
            deadline=deadline_at,
            reuse=reuse,
            reuse_scope=reuse_scope,
            reuse_max_age=reuse_max_age,
        )
        if job_id is None:
            assert idempotency_key is not None
            existing = conn.execute(
                query("job_by_idempotency_key"), {"idempotency_key": idempotency_key, "owner": owner}
            ).fetchone()
            assert existing is not None
            _refuse_a_different_job(
                existing,
                idempotency_key,
                batches,
                spec,
                input_schema.columns,
                row_name,
                provider=provider,
                model=model,
                params=params,
            )
            log.info("idempotency key %r already submitted as job %s", idempotency_key, existing["id"])
            return _with_secret(Job(existing["id"], dsn=dsn), _existing_secret(conn, existing["id"], webhook_url))
        try:
            # Before any row: a job that completes at once still notifies.
            secret = _add_targets(conn, job_id, targets)
            fit = _FitCheck(provider, model, params, spec, limits)
            rows = _copy_all(conn, job_id, batches, spec, input_schema.columns, row_name, fit, dedupe=dedupe)
        except BaseException:
            conn.execute(query("delete_job"), {"job_id": job_id})
            raise
        if rows == 0:
            conn.execute(query("delete_job"), {"job_id": job_id})
            raise InputError("the data has no rows")
    return _with_secret(Job(job_id, dsn=dsn), secret)


def job_params(
    provider: str,
    model: str,
    input_schema: InputSchema,
    *,
    system: str | None = None,
    prompt: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    response_format: dict[str, Any] | None = None,
    response_schema: Any = None,
    validation_retries: int | None = None,
) -> dict[str, Any]:
    """A job's `params` as workers read them (submit stores them; estimate renders with them),
    refused with the option named when the provider cannot take them."""
    if response_schema is not None:
        if response_format is not None:
            raise InputError("give either response_format= or response_schema=, not both")
        response_format = schema_response_format(response_schema)
    if validation_retries is not None and (not isinstance(validation_retries, int) or validation_retries < 0):
        raise InputError(f"validation_retries: expected an integer >= 0, got {validation_retries!r}")
    params: dict[str, Any] = {
        "system": system,
        "prompt": prompt,
        "input_columns": input_schema.columns,
        "input_types": input_schema.types,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "response_format": response_format,
        "validation_retries": validation_retries,
    }
    params = {k: v for k, v in params.items() if v is not None}
    try:
        check_request(provider, model, params)
    except UnsupportedRequest as exc:
        raise InputError(f"{provider}: {exc}") from None
    return params


def notification_targets(
    webhook_url: str | None, webhook_secret: str | None, notify_emails: str | Iterable[str] | None
) -> list[tuple[str, str, str | None]]:
    """(channel, target, secret) rows for the job, checked before anything is written."""
    targets: list[tuple[str, str, str | None]] = []
    if webhook_url is not None:
        try:
            url = check_webhook_url(webhook_url)
        except ValueError as exc:
            raise InputError(f"webhook_url: {exc}") from None
        try:
            secret = new_secret() if webhook_secret is None else check_secret(webhook_secret)
        except ValueError as exc:
            raise InputError(f"webhook_secret: {exc}") from None
        targets.append((CHANNEL_WEBHOOK, url, secret))
    elif webhook_secret is not None:
        raise InputError("webhook_secret: given without a webhook_url")
    if notify_emails is not None:
        try:
            targets += [(CHANNEL_EMAIL, address, None) for address in check_emails(notify_emails)]
        except ValueError as exc:
            raise InputError(f"notify_emails: {exc}") from None
    return targets


def _add_targets(
    conn: psycopg.Connection[DictRow], job_id: int, targets: list[tuple[str, str, str | None]]
) -> str | None:
    """Store the job's webhook and email targets; returns the webhook's secret."""
    secret = None
    for channel, target, given in targets:
        row = conn.execute(
            query("notify_add_target"), {"job_id": job_id, "channel": channel, "target": target, "secret": given}
        ).fetchone()
        if channel == CHANNEL_WEBHOOK and row is not None:
            secret = row["secret"]
    return secret


def _existing_secret(conn: psycopg.Connection[DictRow], job_id: int, webhook_url: str | None) -> str | None:
    if webhook_url is None:
        return None
    row = conn.execute(query("notify_webhook_secret"), {"job_id": job_id, "target": webhook_url}).fetchone()
    return None if row is None else row["secret"]


def _with_secret(job: Job, secret: str | None) -> Job:
    # The webhook's signing secret, for the caller to give its receiver (None without a webhook).
    job.webhook_secret = secret  # type: ignore[attr-defined]
    return job


def check_options(
    *,
    model: str,
    provider: str,
    priority: int = 1,
    max_attempts: int = 5,
    budget_usd: float | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    mode: str = "online",
) -> None:
    """Refuse an option `submit` cannot use, naming it and what it expects."""
    if not isinstance(model, str) or not model.strip():
        raise InputError("model: expected a model name such as 'gpt-4o-mini'")
    if provider not in KNOWN_PROVIDERS:
        raise InputError(f"provider: {provider!r} is not one of {', '.join(KNOWN_PROVIDERS)}")
    if not isinstance(priority, int) or priority < 1:
        raise InputError(f"priority: expected an integer >= 1, got {priority!r}")
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise InputError(f"max_attempts: expected an integer >= 1, got {max_attempts!r}")
    if budget_usd is not None and not budget_usd > 0:
        raise InputError(f"budget_usd: expected a positive amount in USD, got {budget_usd!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise InputError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
    if temperature is not None and not (0 <= temperature <= 2):
        raise InputError(f"temperature: expected a number from 0 to 2, got {temperature!r}")
    if mode not in JOB_MODES:
        raise InputError(f"mode: expected one of {', '.join(JOB_MODES)}, got {mode!r}")
    if mode in ("batch", "auto") and provider not in BATCH_PROVIDERS:
        raise InputError(
            f"mode: {mode} mode sends rows through the Batch APIs of {', '.join(BATCH_PROVIDERS)}; "
            f"provider {provider!r} has none in batchdb yet (use mode='online')"
        )
    if mode in ("batch", "auto") and budget_usd is not None:
        # Batch calls are paid when the batch ends, for a whole chunk at once: a per-call
        # reservation, which is how budgets stop spending, does not apply.
        raise InputError(f"budget_usd: not supported with mode={mode!r} yet; see the cost first with batchdb.estimate")


def check_deadline(mode: str, deadline: datetime | timedelta | None) -> datetime | None:
    """The deadline as a timezone-aware time: given with mode="auto" (and only with it), in the future."""
    if deadline is None:
        if mode == "auto":
            raise InputError(
                "deadline: mode='auto' needs a deadline, a datetime with a timezone or a timedelta from now "
                "(e.g. deadline=timedelta(hours=6))"
            )
        return None
    if mode != "auto":
        raise InputError(f"deadline: only mode='auto' takes a deadline (mode is {mode!r})")
    now = datetime.now(UTC)
    if isinstance(deadline, timedelta):
        at = now + deadline
    elif isinstance(deadline, datetime):
        if deadline.tzinfo is None or deadline.utcoffset() is None:
            raise InputError(
                "deadline: expected a datetime with a timezone (e.g. datetime(..., tzinfo=timezone.utc)), "
                f"got {deadline!r}"
            )
        at = deadline
    else:
        raise InputError(f"deadline: expected a datetime or a timedelta, got {type(deadline).__name__}")
    if at <= now:
        raise InputError(f"deadline: expected a time in the future, got {at.isoformat()} (now is {now.isoformat()})")
    return at


def check_reuse(reuse: str | None, scope: str, max_age: timedelta | None, *, dedupe: bool = True) -> None:
    """Refuse reuse options the database would refuse, naming the option (as jobs_validate_reuse does)."""
    if reuse is not None and reuse not in REUSE_KINDS:
        raise InputError(f"reuse: expected 'exact' or None (off), got {reuse!r}")
    if scope not in REUSE_SCOPES:
        raise InputError(f"reuse_scope: expected one of {', '.join(REUSE_SCOPES)}, got {scope!r}")
    if max_age is not None and (not isinstance(max_age, timedelta) or max_age <= timedelta(0)):
        raise InputError(f"reuse_max_age: expected a positive datetime.timedelta or None (any age), got {max_age!r}")
    if reuse is not None and not dedupe:
        # Reuse finds answers by the rows' request keys, which dedupe=False leaves out; and
        # dedupe=False asks for a fresh answer per row, which reuse would not give.
        raise InputError("reuse: cannot be combined with dedupe=False (reuse looks answers up by request key)")


def refuse_unknown_model(conn: psycopg.Connection[DictRow], provider: str, model: str) -> None:
    """A model without a price is most often a typo ('gpt-4o-mni'), which would run at an unknown cost."""
    if provider == "instant":
        return  # no network, no cost: any model name will do
    known = [row["model"] for row in conn.execute(query("known_models"), {"provider": provider}).fetchall()]
    if model in known:
        return
    close = difflib.get_close_matches(model, known, n=3, cutoff=0.6)
    hint = (
        f"did you mean {' or '.join(repr(m) for m in close)}?"
        if close
        else (f"known {provider} models: {', '.join(known) or '(none)'}")
    )
    raise InputError(
        f"model {model!r}: no price for {provider}/{model} in batchdb.prices; {hint} "
        "(for a model batchdb does not know, add its price (docs/sql.md) or pass allow_unknown_model=True / "
        "--allow-unknown-model)"
    )


def _create_job(conn: psycopg.Connection[DictRow], *, params: dict[str, Any], **fields: Any) -> int | None:
    row = conn.execute(query("insert_job"), {**fields, "params": Jsonb(params)}).fetchone()
    return None if row is None else int(row["id"])


def _refuse_a_different_job(
    existing: dict[str, Any],
    key: str,
    batches: Any,
    spec: InputSpec,
    input_columns: list[str],
    row_name: RowName,
    **given: Any,
) -> None:
    """A key given again must come with the same job, as Stripe and OpenAI require; else say what differs.

    What decides the answers is compared: provider, model, every request parameter and
    template, the columns and the rows. How the job runs (budget, priority, attempts, key
    alias) is not: a relaunch may change those and still get its job back (assets/_resource.py
    keys Dagster jobs the same way).
    """
    differs = [name for name in ("provider", "model") if existing[name] != given[name]]
    before, now = existing["params"] or {}, given["params"]
    differs += [
        name
        for name in sorted(set(before) | set(now))
        if name not in ("input_columns", "input_types") and before.get(name) != now.get(name)
    ]
    if before.get("input_columns") != now.get("input_columns") or before.get("input_types") != now.get("input_types"):
        differs.append("columns")
    if not differs and existing["input_sha256"] is not None:
        # The same options: compare the rows themselves, exactly as they would have been copied in.
        digest = hashlib.sha256()
        rows, seen_ids = 0, dict[str, int]()
        for batch in batches:
            if batch.num_rows:
                digest.update(
                    copy_rows(
                        batch,
                        job_id=existing["id"],
                        first_row=rows,
                        spec=spec,
                        input_columns=input_columns,
                        seen_ids=seen_ids,
                        name=row_name,
                        dedupe=False,  # the keys are not part of the fingerprint
                    ).fingerprint
                )
                rows += batch.num_rows
        if digest.hexdigest() != existing["input_sha256"]:
            differs.append("data")
    if differs:
        raise InputError(
            f"idempotency key {key!r} was used for job {existing['id']} with different {', '.join(differs)}; "
            f"submit with a new key for a new job, or with the same data and options to get job {existing['id']} "
            "back"
        )


def _copy_all(
    conn: psycopg.Connection[DictRow],
    job_id: int,
    batches: Any,
    spec: InputSpec,
    input_columns: list[str],
    row_name: RowName,
    fit: _FitCheck | None = None,
    *,
    dedupe: bool = True,
) -> int:
    rows = 0
    seen_ids: dict[str, int] = {}
    # What the rows were, for a later submit with the same idempotency key to compare against.
    digest = hashlib.sha256()
    with conn.transaction():
        # COPY cannot write through row-level security: a user role (not the owner)
        # copies into a private staging table and moves the rows in one INSERT.
        staged = bool(one_row(conn.execute(query("requests_rls_active")))["active"])
        if staged:
            conn.execute(query("create_requests_staging"))
        with conn.cursor().copy(query("copy_requests_staging" if staged else "copy_requests")) as copy:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                if fit is not None:
                    fit.check(batch, first_row=rows)
                chunk = copy_rows(
                    batch,
                    job_id=job_id,
                    first_row=rows,
                    spec=spec,
                    input_columns=input_columns,
                    seen_ids=seen_ids,
                    name=row_name,
                    dedupe=dedupe,
                )
                digest.update(chunk.fingerprint)
                copy.write(chunk.csv)
                rows += batch.num_rows
        if staged:
            conn.execute(query("insert_staged_requests"))
        conn.execute(query("mark_job_loaded"), {"job_id": job_id, "input_sha256": digest.hexdigest()})
    if rows >= 10_000:
        # Fresh statistics keep the claim's plan on its index for a big backlog.
        conn.execute(query("analyze_job_requests"), {"job_id": job_id})
    return rows


class _FitCheck:
    """Refuse, before any row is stored, a row whose prompt cannot fit the model's context window.

    Only rows long enough to possibly not fit are rendered and counted (tokens are
    at least a byte each), so ordinary rows cost one vectorised length per column.
    """

    def __init__(
        self, provider: str, model: str, params: dict[str, Any], spec: InputSpec, limits: context_window.ModelLimits
    ) -> None:
        self.provider, self.model, self.params, self.spec, self.limits = provider, model, params, spec, limits
        self.template_bytes = sum(len(str(params.get(k) or "").encode()) for k in ("prompt", "system"))

    def check(self, batch: pa.RecordBatch, *, first_row: int) -> None:
        if self.limits.smallest_prompt_limit is None:
            return
        sizes = np.zeros(batch.num_rows, dtype=np.int64)
        for column in batch.columns:
            if (
                pa.types.is_string(column.type)
                or pa.types.is_large_string(column.type)
                or pa.types.is_binary(column.type)
                or pa.types.is_large_binary(column.type)
            ):
                sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
            else:
                sizes += 64  # a number, date or small nested value rendered as text
        sure = self.limits.max_sure_bytes(2, self.params.get("max_tokens"))
        if sure is None:
            return
        for i in np.flatnonzero(sizes + self.template_bytes > sure):
            self._count(batch, int(i), first_row)

    def _count(self, batch: pa.RecordBatch, i: int, first_row: int) -> None:
        values = batch.slice(i, 1).to_pylist()[0]
        payload = None
        if self.spec.messages_column is not None:
            messages = values.pop(self.spec.messages_column)
            payload = {"messages": json.loads(messages) if isinstance(messages, str) else messages}
        try:
            request = build_request(model=self.model, params=self.params, payload=payload, input=values)
        except PromptError:
            return  # refused with its reason by the row checks, or failed by the worker
        problem = self.limits.problem(estimate_prompt_tokens(self.provider, request.messages), request.max_tokens)
        if problem:
            row_id = values.get(self.spec.id_column) if self.spec.id_column else first_row + i
            raise InputError(
                f"row {first_row + i} (id {str(row_id)!r}): {problem}. Shorten it, drop it, or "
                "choose a model with a larger context window; nothing was submitted"
            )


def schema_response_format(schema: Any) -> dict[str, Any]:
    """`response_format` for a JSON schema dict or a pydantic model class, checked now, not at row 400,000."""
    name = "response"
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        name = schema.__name__
        schema = schema.model_json_schema()
    if not isinstance(schema, dict):
        raise InputError(
            f"response_schema: expected a JSON schema (dict) or a pydantic model class, got {type(schema).__name__}"
        )
    try:
        check_response_schema(schema)
    except ValueError as exc:
        raise InputError(f"response_schema: {exc}") from None
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
