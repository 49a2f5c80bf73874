"""Check a response against the job's JSON schema, and build the re-ask when it fails.

A job that asks for `response_format` json_object or json_schema gets every
answer parsed (and, for json_schema, validated with jsonschema). An invalid
answer is sent back to the model with the validation error, up to the job's
`validation_retries`; a row that never validates ends `failed` with its last
answer kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

DEFAULT_VALIDATION_RETRIES = 2


@dataclass(frozen=True, slots=True)
class Verdict:
    value: Any
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


class ResponseValidator:
    def __init__(self, schema: Mapping[str, Any] | None) -> None:
        self._validator = None if schema is None else jsonschema.Draft202012Validator(dict(schema))

    @classmethod
    def for_params(cls, params: Mapping[str, Any]) -> ResponseValidator | None:
        """The validator a job's params ask for, or None when answers are free text."""
        response_format = params.get("response_format")
        if not isinstance(response_format, Mapping):
            return None
        kind = response_format.get("type")
        if kind == "json_object":
            return cls(None)
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            return cls(spec.get("schema") if isinstance(spec, Mapping) else None)
        return None

    def check(self, text: str) -> Verdict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return Verdict(None, f"the answer is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
        if self._validator is not None:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "the top level"
                return Verdict(value, f"at {where}: {error.message}")
        return Verdict(value, None)


def check_response_schema(schema: Mapping[str, Any]) -> None:
    """Raise ValueError for a schema jsonschema itself rejects (used at submit time)."""
    try:
        jsonschema.Draft202012Validator.check_schema(dict(schema))
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"response schema is not a valid JSON schema: {exc.message}") from None


def reask(messages: list[dict[str, Any]], answer: str, error: str) -> list[dict[str, Any]]:
    """The conversation with the invalid answer and what was wrong with it appended."""
    return [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"Your answer was not valid: {error}. Reply again with only the corrected JSON."},
    ]
