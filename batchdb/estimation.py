"""What a job will cost and how long it will take, before anything is queued.

`batchdb.estimate(...)` (the arguments of `submit`), `batchdb estimate FILE ...` and
`batchdb submit --dry-run` read the data as `submit` does, render
every row's prompt as a worker will (from the same JSON the database would hold) and count
its tokens offline. What cannot be known before the calls is the length of the answers;
the estimate takes, in order of preference:

- a pilot: `pilot_rows=N` submits the first N rows as a real job (named "pilot: ..."), waits
  for the workers to answer them and measures output tokens per row (the pilot is paid for);
- history: the mean output tokens per answered row of earlier jobs with the same provider,
  model, templates, max_tokens and response format;
- the bound: `max_tokens`, or the 4,096 tokens the ledger charges a call without one.

Costs follow the one cost rule (batchdb/pricing.py): online, at the provider's batch price,
and online with identical requests sent once (rows whose rendered request is the same).
Prompt-cache discounts are not predicted: the estimate prices every prompt token in full.
The online duration is what the lane's configured limits (batchdb.rate_limits) allow: rows
per minute and the tokens each call is charged against TPM (prompt + max_tokens for
OpenAI/Azure, the prompt for Gemini), whichever binds.

Example:

    >>> import pandas as pd, batchdb
    >>> frame = pd.DataFrame({"headline": ["Acme beats estimates", "Globex fined", "Acme beats estimates"]})
    >>> estimate = batchdb.estimate(frame, prompt="Sentiment of: {headline}", model="gpt-4o-mini",
    ...                             max_tokens=5)  # doctest: +SKIP
    >>> estimate.rows, estimate.distinct_requests  # doctest: +SKIP
    (3, 2)
    >>> print(estimate.text())  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pyarrow as pa

from batchdb import context_window
from batchdb.db import connect, one_row
from batchdb.errors import BatchDBError
from batchdb.ingest import DataSource, InputError, InputSpec, check_schema, custom_ids, open_source, request_parts
from batchdb.ledger import charged_tokens
from batchdb.pricing import Price, output_charge
from batchdb.prompts import PromptError, build_request
from batchdb.queries import query
from batchdb.tokens import estimate_prompt_tokens

# Rows over the context window named in the estimate (the count covers all of them).
_NAMED_PROBLEMS = 5
# The provider's Batch API completion window (OpenAI and Azure: 24 h; Gemini targets 24 h, expires at 48 h).
BATCH_WINDOW_HOURS = 24


class PilotFailed(BatchDBError):
    """The pilot job did not finish in time or answered no row: nothing to measure."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """What submitting this data would queue, cost and take. Figures in USD and seconds."""

    provider: str
    model: str
    rows: int
    distinct_requests: int  # rows whose rendered request differs from every earlier row's
    prompt_tokens: int  # over all rows, counted offline as workers count them
    distinct_prompt_tokens: int  # over the distinct requests only
    output_tokens_per_row: float
    output_basis: str  # where output_tokens_per_row comes from
    max_output_tokens_per_row: int  # max_tokens, or the ledger's charge without one
    price: Price | None
    rpm: int | None
    tpm: int | None
    rpd: int | None
    charged_tpm_tokens: int  # what all rows' calls are charged against TPM
    distinct_charged_tpm_tokens: int  # ... the distinct requests' calls only
    rows_over_context_window: int
    rows_over_context_window_named: list[str] = field(default_factory=list)
    sample_messages: list[dict[str, Any]] = field(default_factory=list)
    pilot_job_id: int | None = None
    key_alias: str = "default"
    # Why submit would refuse the model (no price, with the closest names), or None.
    model_problem: str | None = None
    # submit's dedupe: identical rows are sent once (the default), so costs and durations count calls.
    dedupe: bool = True
    # submit's mode: 'auto' costs between the batch price (every row by batch) and the online price.
    mode: str = "online"

    @property
    def calls(self) -> int:
        """Provider calls the job makes (retries aside): one per distinct request with dedupe."""
        return self.distinct_requests if self.dedupe else self.rows

    def cost_usd(self, *, batch: bool = False, dedupe: bool | None = None, ceiling: bool = False) -> Decimal | None:
        """Expected cost (or, with `ceiling`, the most it can cost); None when the model has no price.
        `dedupe` (default: as the job would run) counts each distinct request once."""
        if self.price is None:
            return None
        dedupe = self.dedupe if dedupe is None else dedupe
        rows = self.distinct_requests if dedupe else self.rows
        prompt = self.distinct_prompt_tokens if dedupe else self.prompt_tokens
        per_row = self.max_output_tokens_per_row if ceiling else self.output_tokens_per_row
        output = round(Decimal(str(per_row)) * rows)
        return self.price.cost_usd(prompt, int(output), batch=batch)

    def online_seconds(self) -> float | None:
        """How long the online path takes at the lane's configured limits; None without limits."""
        spans = []
        if self.rpm:
            spans.append(self.calls / self.rpm * 60)
        if self.tpm:
            spans.append(self._charged() / self.tpm * 60)
        if self.rpd:
            spans.append((self.calls - 1) // self.rpd * 86_400)  # whole days wait for the daily quota
        return max(spans) if spans else None

    def _charged(self) -> int:
        return self.distinct_charged_tpm_tokens if self.dedupe else self.charged_tpm_tokens

    def text(self) -> str:
        """The estimate as `batchdb estimate` prints it."""
        lines = [f"{self.provider}/{self.model}: {self.rows:,} rows"]
        if self.model_problem:
            lines.append(f"  model: {self.model_problem}")
        duplicates = self.rows - self.distinct_requests
        lines.append(
            f"  distinct requests: {self.distinct_requests:,}"
            + (f" ({duplicates:,} rows repeat an earlier row's request)" if duplicates else "")
            + ("" if self.dedupe or not duplicates else "; dedupe=False sends every row")
        )
        lines.append(f"  prompt tokens:     {self.prompt_tokens:,} (counted offline)")
        lines.append(
            f"  output tokens:     {self.output_tokens_per_row:,.1f} per row ({self.output_basis}); "
            f"at most {self.max_output_tokens_per_row:,} per row"
        )
        if self.price is None:
            lines.append(f"  cost:              unknown: no price for {self.provider}/{self.model} in batchdb.prices")
        else:
            lines.append(f"  cost online:       {_usd(self.cost_usd())} (at most {_usd(self.cost_usd(ceiling=True))})")
            if duplicates and self.dedupe:
                lines.append(f"  with every row sent (dedupe=False): {_usd(self.cost_usd(dedupe=False))}")
            if self.price.batch_discount:
                lines.append(
                    f"  at the batch price: {_usd(self.cost_usd(batch=True))} "
                    f"(-{self.price.batch_discount:.0%}; mode='batch' sends every row at it)"
                )
            if self.mode == "auto":
                lines.append(
                    f"  mode auto:         from {_usd(self.cost_usd(batch=True))} (every row by batch: the deadline "
                    f"leaves a batch window) to {_usd(self.cost_usd())} (every row online: it leaves none); "
                    "rows a full batch queue cannot take in time go online"
                )
        seconds = self.online_seconds()
        if seconds is None:
            lines.append(
                "  duration online:   no limits configured for this lane; set them with: batchdb limits set "
                f"{self.provider} {self.model} --key-alias {self.key_alias} --rpm N --tpm N"
            )
        else:
            per_minute = {
                "requests per minute": self.calls / self.rpm * 60 if self.rpm else 0.0,
                "tokens per minute": self._charged() / self.tpm * 60 if self.tpm else 0.0,
                "requests per day": (self.calls - 1) // self.rpd * 86_400 if self.rpd else 0.0,
            }
            binding = max(per_minute, key=lambda name: per_minute[name])
            lines.append(
                f"  duration online:   {_duration(seconds)} at the lane's limits "
                f"(rpm {self.rpm or '-'}, tpm {self.tpm or '-'}, rpd {self.rpd or '-'}; {binding} bind)"
            )
        if self.rows_over_context_window:
            named = ", ".join(self.rows_over_context_window_named)
            lines.append(
                f"  over the context window: {self.rows_over_context_window:,} rows ({named}); submit refuses them"
            )
        if self.pilot_job_id is not None:
            lines.append(f"  pilot: job {self.pilot_job_id}")
        if self.sample_messages:
            lines.append("  first row's request:")
            for message in self.sample_messages:
                content = message.get("content")
                text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
                lines.append(f"    {message.get('role')}: {_clip(text)}")
        return "\n".join(lines)


def estimate(
    data: DataSource,
    *,
    model: str,
    prompt: str | None = None,
    system: str | None = None,
    messages_column: str | None = None,
    id_column: str | None = None,
    provider: str = "openai",
    key_alias: str = "default",
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    response_format: dict[str, Any] | None = None,
    response_schema: Any = None,
    validation_retries: int | None = None,
    pilot_rows: int = 0,
    pilot_timeout_s: float = 600.0,
    dsn: str | None = None,
    **submit_options: Any,
) -> Estimate:
    """What `submit` with the same arguments would queue, cost and take; nothing is queued but,
    when `pilot_rows` > 0, a pilot job of the first rows that workers answer for real.

    Takes every argument `submit` takes (those that only matter once the job runs, such as
    `priority` or `webhook_url`, are passed to the pilot's submit and otherwise ignored).
    Refuses what `submit` refuses, with the same messages.
    """
    from batchdb.submission import (
        check_deadline,
        check_options,
        check_reuse,
        job_params,
        notification_targets,
        refuse_unknown_model,
        submit,
    )

    unknown = sorted(set(submit_options) - set(inspect.signature(submit).parameters))
    if unknown:
        raise TypeError(
            f"estimate() got unexpected keyword argument(s) {', '.join(unknown)} (submit takes none of them)"
        )
    check_options(
        model=model,
        provider=provider,
        priority=submit_options.get("priority", 1),
        max_attempts=submit_options.get("max_attempts", 5),
        budget_usd=submit_options.get("budget_usd"),
        max_tokens=max_tokens,
        temperature=temperature,
        mode=submit_options.get("mode", "online"),
    )
    check_deadline(submit_options.get("mode", "online"), submit_options.get("deadline"))
    check_reuse(
        submit_options.get("reuse"),
        submit_options.get("reuse_scope", "user"),
        submit_options.get("reuse_max_age"),
        dedupe=bool(submit_options.get("dedupe", True)),
    )
    notification_targets(
        submit_options.get("webhook_url"), submit_options.get("webhook_secret"), submit_options.get("notify_emails")
    )
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
    with connect(dsn) as conn:
        model_problem = None
        if not submit_options.get("allow_unknown_model"):
            try:
                refuse_unknown_model(conn, provider, model)
            except InputError as exc:
                model_problem = str(exc)
        limits = context_window.load(conn, provider, model)
        too_many = limits.max_tokens_problem(max_tokens)
        if too_many:
            raise InputError(f"max_tokens: {too_many}")
        price_row = conn.execute(query("price_of_model"), {"provider": provider, "model": model}).fetchone()
        lane = conn.execute(
            query("lane_limits"), {"provider": provider, "key_alias": key_alias, "model": model}
        ).fetchone()
        history = one_row(
            conn.execute(
                query("output_tokens_of_similar_jobs"),
                {"provider": provider, "model": model, "shape": json.dumps(_shape(params))},
            )
        )
    price = _price(provider, price_row)
    counted = _count(
        batches, spec=spec, input_columns=input_schema.columns, row_name=row_name, params=params, model=model,
        provider=provider, limits=limits,
    )  # fmt: skip
    if counted.rows == 0:
        raise InputError("the data has no rows")
    max_output = output_charge(params.get("max_tokens"))
    per_row, basis = float(max_output), "the max_tokens bound; --pilot N measures it"
    if history["rows"]:
        per_row = float(history["completion_tokens"]) / float(history["rows"])
        basis = f"mean of {int(history['rows']):,} calls of {int(history['jobs'])} earlier similar job(s)"
    pilot_job_id = None
    if pilot_rows > 0:
        pilot_job_id, per_row = _pilot(
            data, pilot_rows, pilot_timeout_s, dsn=dsn, model=model, prompt=prompt, system=system,
            messages_column=messages_column, id_column=id_column, provider=provider, key_alias=key_alias,
            max_tokens=max_tokens, temperature=temperature, seed=seed, response_format=response_format,
            response_schema=response_schema, validation_retries=validation_retries, **submit_options,
        )  # fmt: skip
        basis = f"pilot job {pilot_job_id}: mean of its {min(pilot_rows, counted.rows):,} rows"
    return Estimate(
        provider=provider,
        model=model,
        rows=counted.rows,
        distinct_requests=counted.distinct,
        prompt_tokens=counted.prompt_tokens,
        distinct_prompt_tokens=counted.distinct_prompt_tokens,
        output_tokens_per_row=per_row,
        output_basis=basis,
        max_output_tokens_per_row=max_output,
        price=price,
        rpm=lane["rpm"] if lane else None,
        tpm=lane["tpm"] if lane else None,
        rpd=lane["rpd"] if lane else None,
        charged_tpm_tokens=counted.charged_tpm_tokens,
        distinct_charged_tpm_tokens=counted.distinct_charged_tpm_tokens,
        rows_over_context_window=counted.over_window,
        rows_over_context_window_named=counted.over_window_named,
        sample_messages=counted.sample,
        pilot_job_id=pilot_job_id,
        key_alias=key_alias,
        model_problem=model_problem,
        dedupe=bool(submit_options.get("dedupe", True)),
        mode=str(submit_options.get("mode", "online")),
    )


@dataclass
class _Counted:
    rows: int = 0
    distinct: int = 0
    prompt_tokens: int = 0
    distinct_prompt_tokens: int = 0
    charged_tpm_tokens: int = 0
    distinct_charged_tpm_tokens: int = 0
    over_window: int = 0
    over_window_named: list[str] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)


def _count(
    batches: Iterator[pa.RecordBatch],
    *,
    spec: InputSpec,
    input_columns: list[str],
    row_name: Any,
    params: dict[str, Any],
    model: str,
    provider: str,
    limits: context_window.ModelLimits,
) -> _Counted:
    """Render and count every distinct request once; a row whose request key (the one submit stores,
    batchdb/ingest.py) was seen before is counted from memory, so the distinct counts are the
    calls dedupe makes."""
    counted = _Counted()
    tokens_of: dict[str, tuple[int, int | None]] = {}
    seen_ids: dict[str, int] = {}
    for batch in batches:
        first_row = counted.rows
        custom_ids(batch, first_row, spec.id_column, seen_ids, row_name)  # a repeated id is refused, as by submit
        for i, (payload, values, key) in enumerate(
            request_parts(batch, first_row=first_row, spec=spec, input_columns=input_columns, name=row_name)
        ):
            seen = tokens_of.get(key)
            if seen is None:
                try:
                    request = build_request(model=model, params=params, payload=payload, input=values)
                except PromptError as exc:
                    raise InputError(f"{row_name(first_row + i)}: {exc}") from None
                seen = estimate_prompt_tokens(provider, request.messages), request.max_tokens
                tokens_of[key] = seen
                counted.distinct += 1
                counted.distinct_prompt_tokens += seen[0]
                counted.distinct_charged_tpm_tokens += charged_tokens(provider, *seen)
                if not counted.sample:
                    counted.sample = request.messages
            tokens, max_tokens = seen
            counted.prompt_tokens += tokens
            counted.charged_tpm_tokens += charged_tokens(provider, tokens, max_tokens)
            if limits.problem(tokens, max_tokens):
                counted.over_window += 1
                if len(counted.over_window_named) < _NAMED_PROBLEMS:
                    counted.over_window_named.append(row_name(first_row + i))
        counted.rows += batch.num_rows
    return counted


def _pilot(data: DataSource, n: int, timeout_s: float, *, dsn: str | None, **submit_options: Any) -> tuple[int, float]:
    """Submit the first `n` rows as a job, wait for its answers, return (job id, output tokens per row)."""
    from batchdb.submission import submit

    schema, batches, _ = open_source(data)
    taken: list[pa.RecordBatch] = []
    remaining = n
    for batch in batches:
        if remaining <= 0:
            break
        taken.append(batch.slice(0, remaining))
        remaining -= taken[-1].num_rows
    name = submit_options.pop("name", None) or "estimate"
    # The pilot is a job of its own: the real job's idempotency key and notifications are not its.
    # It runs online whatever the real job's mode: its answers are wanted now, not within a batch window.
    for option in ("idempotency_key", "webhook_url", "webhook_secret", "notify_emails", "mode", "deadline"):
        submit_options.pop(option, None)
    job = submit(pa.Table.from_batches(taken, schema=schema), name=f"pilot: {name}", dsn=dsn, **submit_options)
    deadline = time.monotonic() + timeout_s
    while True:
        status = job.status()
        if status.status in ("completed", "cancelled") or status.n_done >= status.n_total:
            break
        if status.status == "paused":
            job.cancel()
            raise PilotFailed(f"pilot job {job.id} paused ({status.status_reason}); it was cancelled")
        if time.monotonic() >= deadline:
            job.cancel()  # left queued, it would be paid for whenever workers next run
            raise PilotFailed(
                f"pilot job {job.id} answered {status.n_done} of {status.n_total} rows in {timeout_s:.0f} s and was "
                "cancelled; are workers running? (batchdb workers lists them; start one with: batchdb worker)"
            )
        time.sleep(0.5)
    calls = status.n_succeeded - status.n_duplicates  # rows answered by a call of their own
    if calls == 0:
        raise PilotFailed(f"pilot job {job.id} answered no row; see: batchdb status {job.id}")
    return job.id, status.completion_tokens / calls


def _price(provider: str, row: dict[str, Any] | None) -> Price | None:
    """The model's price; the no-network instant provider is free, as job_progress counts it."""
    if provider == "instant":
        return Price(Decimal(0), Decimal(0))
    if row is None:
        return None
    return Price.of(
        row["input_per_mtok"],
        row["output_per_mtok"],
        cached_input_per_mtok=row["cached_input_per_mtok"],
        batch_discount=row["batch_discount"],
    )


def _shape(params: dict[str, Any]) -> dict[str, Any]:
    """What makes answers of two jobs comparable in length: the templates, max_tokens, the format."""
    return {k: params[k] for k in ("prompt", "system", "max_tokens", "response_format") if params.get(k) is not None}


def _usd(value: Decimal | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if value >= 1 else f"${value:,.4f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _clip(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
