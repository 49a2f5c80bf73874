"""What each provider can be asked: checked at submit time, and again per request.

A job's parameters are checked once, before anything is written
(`check_request`), so a request Gemini cannot express fails at submit and not at
row 400,000. The adapters build their wire calls with the same functions
(`to_openai`, `to_gemini`), so submit and worker can never disagree about what a
provider accepts. Both raise `UnsupportedRequest` with a message that says what
to change.

Checks made for every provider:

- messages: a non-empty list of ``{"role": ..., "content": ...}`` objects;
- ``max_tokens`` a positive integer, ``temperature`` a number from 0 to 2, ``seed`` an integer;
- ``response_format`` of type ``text``, ``json_object`` or ``json_schema``; a
  ``json_schema`` one as OpenAI spells it:
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
- ``n`` (when given) is 1 and ``stream`` is not set: batchdb keeps one answer per row.

OpenAI and Azure: roles system/developer/user/assistant/tool/function; a
``json_schema`` needs a ``name``; ``strict: true`` needs ``additionalProperties: false``
and every property listed in ``required`` on every object; ``json_object`` needs the
word "JSON" in the prompt (OpenAI answers 400 otherwise).

Gemini: roles system/developer (-> ``system_instruction``, leading only), user,
assistant (-> ``model``); text content only; the schema is sent as
``response_json_schema``, whose supported keywords are listed in
`GEMINI_SCHEMA_KEYWORDS`; a few OpenAI extras map (`top_p`, `stop`, penalties),
others are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchdb.providers.base import ChatRequest
from batchdb.tokens import GEMINI_FORMAT_PROVIDERS

__all__ = [
    "GEMINI_SCHEMA_KEYWORDS",
    "RESPONSE_FORMAT_TYPES",
    "GeminiCall",
    "UnsupportedRequest",
    "check_chat_request",
    "check_request",
    "check_response_format",
    "to_gemini",
    "to_openai",
]

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
GEMINI_ROLES = ("system", "developer", "user", "assistant")
CHECKED_PROVIDERS = ("openai", "azure", "gemini", "vertex", "instant")

_REQUEST_FIELDS = ("max_tokens", "temperature", "seed", "response_format")
# Chat-completion parameters beyond `_REQUEST_FIELDS` that a job's params may carry (they become
# `ChatRequest.extra`); other keys are the job's own business (templates, columns) and not checked here.
_EXTRA_PARAMS = frozenset({
    "n", "stream", "stream_options", "top_p", "stop", "presence_penalty", "frequency_penalty", "logit_bias",
    "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "user",
    "service_tier", "store", "metadata", "modalities", "audio", "prediction", "reasoning_effort",
    "max_completion_tokens", "web_search_options",
})  # fmt: skip

# JSON Schema keywords Gemini's `response_json_schema` honours (Gemini API docs, GenerationConfig).
GEMINI_SCHEMA_KEYWORDS = frozenset({
    "$id", "$defs", "$ref", "$anchor", "type", "format", "title", "description", "enum", "items",
    "prefixItems", "minItems", "maxItems", "minimum", "maximum", "anyOf", "oneOf", "properties",
    "additionalProperties", "required", "propertyOrdering",
})  # fmt: skip
# Annotations that constrain nothing: dropping them changes no answer.
_ANNOTATIONS = frozenset({"$schema", "$comment", "default", "examples", "deprecated", "readOnly", "writeOnly"})
_HINTS = {
    "const": "use enum: [value]",
    "nullable": 'use type: ["<type>", "null"]',
    "allOf": "merge the sub-schemas into one",
    "definitions": "use $defs",
}
_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
# OpenAI extras with a Gemini `GenerateContentConfig` equivalent.
_GEMINI_EXTRAS = {
    "top_p": "top_p",
    "stop": "stop_sequences",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _RowContent(str):
    """Stands for the messages each row brings (no template to check at submit)."""


class UnsupportedRequest(ValueError):
    """The request cannot be sent to this provider as it is; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class GeminiCall:
    """`client.aio.models.generate_content(model=..., contents=contents, config=GenerateContentConfig(**config))`."""

    contents: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)


# -- entry points ----------------------------------------------------------------------


def check_request(provider: str, model: str, params: Mapping[str, Any]) -> None:
    """Refuse, before anything is written, a job `provider` cannot run.

    `params` are the job's parameters (`system`, `prompt`, `max_tokens`, `temperature`,
    `seed`, `response_format`; chat-completion keys such as `n` or `logit_bias` are
    checked as extras; keys that are not request parameters are left to the caller).
    Templates are checked as written. Pass a row's ready chat messages as
    ``params["messages"]`` to check those too.
    """
    if provider not in CHECKED_PROVIDERS:
        raise UnsupportedRequest(f"provider {provider!r} is not one of {', '.join(CHECKED_PROVIDERS)}")
    if not isinstance(model, str) or not model.strip():
        raise UnsupportedRequest("model: expected a model (or, for Azure, deployment) name")
    check_chat_request(provider, _probe_request(model, params))


def check_chat_request(provider: str, request: ChatRequest) -> None:
    """The same checks on a built request (what the worker would send)."""
    if provider in ("openai", "azure"):
        to_openai(request, provider=provider)
    elif provider in GEMINI_FORMAT_PROVIDERS:
        to_gemini(request)
    else:
        _check_common(request)


def check_response_format(response_format: Any) -> str:
    """Validate the shape of `response_format`; returns its type."""
    if not isinstance(response_format, Mapping):
        raise UnsupportedRequest(
            f"response_format: expected a JSON object such as {{'type': 'json_object'}}, "
            f"got {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise UnsupportedRequest(
            f"response_format: type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {kind!r}"
        )
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    unexpected = sorted(set(response_format) - allowed)
    if unexpected:
        hint = (
            "; a schema goes in {'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
            if "schema" in unexpected
            else ""
        )
        raise UnsupportedRequest(f"response_format of type {kind!r}: unexpected key(s) {', '.join(unexpected)}{hint}")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise UnsupportedRequest(
                "response_format of type 'json_schema' needs a 'json_schema' object: "
                "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
            )
        schema = spec.get("schema")
        if not isinstance(schema, Mapping):
            got = "nothing" if schema is None else type(schema).__name__
            raise UnsupportedRequest(f"response_format json_schema.schema: expected a JSON Schema object, got {got}")
        if "strict" in spec and not isinstance(spec["strict"], bool):
            raise UnsupportedRequest(
                f"response_format json_schema.strict: expected true or false, got {spec['strict']!r}"
            )
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise UnsupportedRequest(f"response_format json_schema.name: expected a string, got {name!r}")
    return str(kind)


# -- OpenAI and Azure -------------------------------------------------------------------


def to_openai(request: ChatRequest, *, provider: str = "openai") -> dict[str, Any]:
    """Keyword arguments for `chat.completions.create`, or `UnsupportedRequest`."""
    label = "Azure OpenAI" if provider == "azure" else "OpenAI"
    _check_common(request)
    for i, message in enumerate(request.messages):
        if message["role"] not in OPENAI_ROLES:
            raise UnsupportedRequest(
                f"messages[{i}]: {label} has no role {message['role']!r}; use one of {', '.join(OPENAI_ROLES)}"
            )
    response_format = request.response_format
    if response_format is not None:
        kind = response_format["type"]
        if kind == "json_schema":
            spec = response_format["json_schema"]
            name = spec.get("name")
            if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
                raise UnsupportedRequest(
                    f"response_format json_schema.name: {label} needs a name of 1-64 letters, digits, _ or -, "
                    f"got {name!r}"
                )
            if spec.get("strict") is True:
                problems = _strict_problems(spec["schema"], "$")
                if problems:
                    raise UnsupportedRequest(
                        f"response_format json_schema with strict: true: {label} needs "
                        "additionalProperties: false and every property in required on each object; "
                        + "; ".join(problems[:5])
                    )
        elif kind == "json_object" and not any(
            isinstance(m.get("content"), _RowContent) or "json" in _text_of(m).lower() for m in request.messages
        ):
            raise UnsupportedRequest(
                f"response_format json_object: {label} refuses it unless the prompt or system message "
                "mentions JSON; say 'Answer in JSON' in the prompt or system"
            )
    kwargs: dict[str, Any] = {"model": request.model, "messages": request.messages, **_checked_extras(request)}
    if request.max_tokens is not None:
        kwargs["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.seed is not None:
        kwargs["seed"] = request.seed
    if response_format is not None:
        kwargs["response_format"] = response_format
    return kwargs


def _strict_problems(schema: Any, path: str) -> list[str]:
    problems: list[str] = []
    for where, node in _subschemas(schema, path):
        properties = node.get("properties")
        is_object = (
            node.get("type") == "object"
            or (isinstance(node.get("type"), list) and "object" in node["type"])
            or isinstance(properties, Mapping)
        )
        if not is_object:
            continue
        if node.get("additionalProperties") is not False:
            problems.append(f"{where} lacks additionalProperties: false")
        if isinstance(properties, Mapping):
            required = node.get("required") or []
            missing = [p for p in properties if p not in required]
            if missing:
                problems.append(f"{where} does not list {', '.join(missing)} in required")
    return problems


# -- Gemini --------------------------------------------------------------------------------


def to_gemini(request: ChatRequest) -> GeminiCall:
    """Gemini `contents` and `GenerateContentConfig` fields for `request`, or `UnsupportedRequest`."""
    _check_common(request)
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        role = message["role"]
        if role not in GEMINI_ROLES:
            raise UnsupportedRequest(
                f"messages[{i}]: Gemini has no role {role!r}; batchdb maps only system, user and assistant "
                "(tool calls and tool results cannot be sent to Gemini)"
            )
        for key in ("tool_calls", "function_call", "tool_call_id"):
            if message.get(key):
                raise UnsupportedRequest(f"messages[{i}]: {key} cannot be sent to Gemini by batchdb")
        text = _gemini_text(message, i)
        if role in ("system", "developer"):
            if contents:
                raise UnsupportedRequest(
                    f"messages[{i}]: a {role} message after the conversation started has no Gemini equivalent "
                    "(Gemini takes one system instruction); put system messages first"
                )
            system.append(text)
        else:
            contents.append({"role": "model" if role == "assistant" else "user", "parts": [{"text": text}]})
    if not contents:
        raise UnsupportedRequest("messages: Gemini needs at least one user message besides the system instruction")

    config: dict[str, Any] = {}
    if system:
        config["system_instruction"] = "\n\n".join(system)
    if request.max_tokens is not None:
        config["max_output_tokens"] = request.max_tokens
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.seed is not None:
        config["seed"] = request.seed
    response_format = request.response_format
    if response_format is not None and response_format["type"] != "text":
        config["response_mime_type"] = "application/json"
        if response_format["type"] == "json_schema":
            schema = response_format["json_schema"]["schema"]
            problems = _gemini_schema_problems(schema)
            if problems:
                raise UnsupportedRequest(
                    "response_format json_schema: Gemini cannot enforce "
                    + "; ".join(problems[:5])
                    + f" (it honours {', '.join(sorted(GEMINI_SCHEMA_KEYWORDS))})"
                )
            config["response_json_schema"] = dict(schema)
    for key, value in _checked_extras(request).items():
        if key in ("n", "stream"):
            continue  # already checked: n == 1, stream off
        if key not in _GEMINI_EXTRAS:
            raise UnsupportedRequest(
                f"{key!r} has no Gemini equivalent; batchdb maps only {', '.join(sorted(_GEMINI_EXTRAS))} "
                "besides max_tokens, temperature, seed and response_format"
            )
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise UnsupportedRequest(f"stop: expected a string or a list of strings, got {value!r}")
        config[_GEMINI_EXTRAS[key]] = value
    return GeminiCall(contents=contents, config=config)


def _gemini_text(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                isinstance(part, Mapping)
                and part.get("type") in ("text", "input_text")
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise UnsupportedRequest(
                    f"messages[{i}].content[{j}]: only text parts can be sent to Gemini by batchdb, got {kind!r}"
                )
        return "".join(texts)
    raise UnsupportedRequest(f"messages[{i}]: Gemini needs text content, got {type(content).__name__}")


def _gemini_schema_problems(schema: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for where, node in _subschemas(schema, "$"):
        for key in node:
            if key in GEMINI_SCHEMA_KEYWORDS or key in _ANNOTATIONS:
                continue
            hint = f" ({_HINTS[key]})" if key in _HINTS else ""
            problems.append(f"{key!r} at {where}{hint}")
        if "$ref" in node:
            siblings = [k for k in node if not k.startswith("$")]
            if siblings:
                problems.append(
                    f"{', '.join(map(repr, siblings))} next to $ref at {where} (move them into the referenced schema)"
                )
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        bad = [k for k in kinds if k not in _JSON_TYPES]
        if bad:
            problems.append(f"type {bad[0]!r} at {where} (use {', '.join(sorted(_JSON_TYPES))})")
    return problems


# -- shared ----------------------------------------------------------------------------------


def _probe_request(model: str, params: Mapping[str, Any]) -> ChatRequest:
    """A `ChatRequest` standing for every row of a job: templates as written."""
    if not isinstance(params, Mapping):
        raise UnsupportedRequest(f"params: expected a mapping, got {type(params).__name__}")
    messages = params.get("messages")
    if messages is None:
        messages = []
        if params.get("system"):
            messages.append({"role": "system", "content": params["system"]})
        # Without a prompt template each row brings its own messages; stand in for them.
        messages.append({"role": "user", "content": params.get("prompt") or _RowContent("(row payload)")})
    elif (
        isinstance(messages, list)
        and params.get("system")
        and not any(isinstance(m, Mapping) and m.get("role") == "system" for m in messages)
    ):
        messages = [{"role": "system", "content": params["system"]}, *messages]
    extra = {k: v for k, v in params.items() if k in _EXTRA_PARAMS}
    return ChatRequest(
        messages=messages,
        model=model,
        max_tokens=params.get("max_tokens"),
        temperature=params.get("temperature"),
        seed=params.get("seed"),
        response_format=params.get("response_format"),
        extra=extra,
    )


def _check_common(request: ChatRequest) -> None:
    messages = request.messages
    if not isinstance(messages, list) or not messages:
        raise UnsupportedRequest("messages: expected a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise UnsupportedRequest(f"messages[{i}]: expected an object with a 'role' string, got {message!r:.80}")
    if request.max_tokens is not None and (not _is_int(request.max_tokens) or request.max_tokens < 1):
        raise UnsupportedRequest(f"max_tokens: expected a positive integer, got {request.max_tokens!r}")
    temperature = request.temperature
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise UnsupportedRequest(f"temperature: expected a number from 0 to 2, got {temperature!r}")
    if request.seed is not None and not _is_int(request.seed):
        raise UnsupportedRequest(f"seed: expected an integer, got {request.seed!r}")
    if request.response_format is not None:
        check_response_format(request.response_format)
    _checked_extras(request)


def _checked_extras(request: ChatRequest) -> dict[str, Any]:
    extra = dict(request.extra)
    n = extra.get("n")
    if n is not None and n != 1:
        raise UnsupportedRequest(f"n: batchdb keeps one answer per row, so n must be 1, got {n!r}")
    if extra.get("stream"):
        raise UnsupportedRequest("stream: batchdb reads whole answers; leave stream unset")
    return extra


def _subschemas(schema: Any, path: str) -> list[tuple[str, Mapping[str, Any]]]:
    """Every schema object inside `schema` (itself included), with a JSON-path-like location."""
    found: list[tuple[str, Mapping[str, Any]]] = []
    stack: list[tuple[str, Any]] = [(path, schema)]
    while stack:
        where, node = stack.pop()
        if not isinstance(node, Mapping):
            continue
        found.append((where, node))
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            children = node.get(key)
            if isinstance(children, Mapping):
                stack.extend((f"{where}.{key}.{name}", child) for name, child in children.items())
        for key in ("items", "additionalProperties", "not", "contains", "if", "then", "else"):
            if isinstance(node.get(key), Mapping):
                stack.append((f"{where}.{key}", node[key]))
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            children = node.get(key)
            if isinstance(children, list):
                stack.extend((f"{where}.{key}[{i}]", child) for i, child in enumerate(children))
    found.sort(key=lambda item: item[0])
    return found


def _text_of(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
