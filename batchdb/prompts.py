"""Turn a queued row plus its job's parameters into a provider-neutral `ChatRequest`.

A row carries either a ready payload (`{"prompt": ...}` or `{"messages": [...]}`)
or `input` columns that the job's prompt template formats (Python
`str.format` fields: "Classify: {headline}").
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import Any

from batchdb.providers.base import ChatRequest

# Parameters a job or a row may set; anything else is refused at submit.
REQUEST_PARAMS = ("max_tokens", "temperature", "seed", "response_format")
JOB_PARAMS = ("system", "prompt", "input_columns", "input_types", *REQUEST_PARAMS)


class PromptError(ValueError):
    """The row cannot be turned into a request (a permanent, per-row failure)."""


def template_fields(template: str) -> list[str]:
    """Column names a template refers to, e.g. 'Rate {title}' -> ['title']."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise PromptError(f"prompt template {template!r} is not a valid format string: {exc}") from None
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise PromptError(f"prompt template {template!r} uses a positional field; name a column: {{column}}")
        name = field.split(".")[0].split("[")[0]
        if name not in fields:
            fields.append(name)
    return fields


def missing_columns(templates: Iterable[str | None], columns: Iterable[str]) -> list[str]:
    available = set(columns)
    return [f for t in templates if t for f in template_fields(t) if f not in available]


def build_request(
    *, model: str, params: Mapping[str, Any], payload: Mapping[str, Any] | None, input: Mapping[str, Any] | None
) -> ChatRequest:
    merged = {k: params[k] for k in REQUEST_PARAMS if params.get(k) is not None}
    if payload:
        merged.update({k: payload[k] for k in REQUEST_PARAMS if payload.get(k) is not None})
    messages = _messages(params, payload, input)
    return ChatRequest(
        messages=messages,
        model=str((payload or {}).get("model") or model),
        max_tokens=merged.get("max_tokens"),
        temperature=merged.get("temperature"),
        seed=merged.get("seed"),
        response_format=merged.get("response_format"),
    )


def _messages(
    params: Mapping[str, Any], payload: Mapping[str, Any] | None, input: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    system = params.get("system")
    if payload and isinstance(payload.get("messages"), list):
        messages = list(payload["messages"])
    elif payload and isinstance(payload.get("prompt"), str):
        messages = [{"role": "user", "content": payload["prompt"]}]
    elif params.get("prompt"):
        messages = [{"role": "user", "content": _format(params["prompt"], input or {})}]
    else:
        raise PromptError("row has no payload and its job has no prompt template")
    if system and not any(m.get("role") == "system" for m in messages if isinstance(m, dict)):
        messages.insert(0, {"role": "system", "content": _format(system, input or {})})
    return messages


def _format(template: str, values: Mapping[str, Any]) -> str:
    missing = [f for f in template_fields(template) if f not in values]
    if missing:
        raise PromptError(
            f"prompt template needs column(s) {', '.join(missing)} but the row's input has only "
            f"{', '.join(sorted(values)) or 'no columns'}"
        )
    return template.format_map({k: "" if v is None else v for k, v in values.items()})
