"""Submit-time checks: each refusal says what is wrong; valid requests pass and convert."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from batchdb.providers.base import ChatRequest
from batchdb.providers.compat import (
    GeminiCall,
    UnsupportedRequest,
    check_chat_request,
    check_request,
    to_gemini,
    to_openai,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["sentiment", "confidence", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "sentiment", "schema": SCHEMA, "strict": True}}
JOB = {
    "system": "Label the headline. Answer in JSON.",
    "prompt": "Headline: {headline}",
    "input_columns": ["headline"],
    "input_types": {"headline": "string"},
    "max_tokens": 50,
    "temperature": 0.0,
    "seed": 1,
}


def with_schema(**changes: Any) -> dict[str, Any]:
    schema = copy.deepcopy(SCHEMA)
    schema.update(changes)
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


@pytest.mark.parametrize("provider", ["openai", "azure", "gemini", "instant"])
@pytest.mark.parametrize("response_format", [None, {"type": "text"}, {"type": "json_object"}, JSON_SCHEMA])
def test_valid_jobs_pass(provider: str, response_format: dict[str, Any] | None) -> None:
    check_request(provider, "some-model", {**JOB, "response_format": response_format})


def test_a_job_of_ready_messages_passes_without_a_prompt() -> None:
    # Each row brings its own messages: the JSON-word rule cannot be judged at submit.
    check_request("openai", "gpt-4o-mini", {"input_columns": ["messages"], "response_format": {"type": "json_object"}})
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    check_request("gemini", "gemini-2.0-flash", {"messages": messages})


@pytest.mark.parametrize(
    ("provider", "params", "expected"),
    [
        ("mistral", {}, "provider 'mistral' is not one of"),
        ("openai", {"response_format": "json"}, "response_format: expected a JSON object"),
        ("openai", {"response_format": {"type": "xml"}}, "type must be one of text, json_object, json_schema"),
        ("openai", {"response_format": {"type": "json_schema"}}, "needs a 'json_schema' object"),
        (
            "gemini",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
            "json_schema.schema: expected a JSON Schema object, got list",
        ),
        (
            "openai",
            {"response_format": {"type": "json_schema", "schema": SCHEMA}},
            "a schema goes in {'type': 'json_schema', 'json_schema'",
        ),
        (
            "gemini",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}}},
            "strict: expected true or false",
        ),
        ("openai", {"n": 2}, "n must be 1"),
        ("gemini", {"n": 4}, "n must be 1"),
        ("openai", {"stream": True}, "leave stream unset"),
        ("openai", {"max_tokens": 0}, "max_tokens: expected a positive integer"),
        ("gemini", {"temperature": 3}, "temperature: expected a number from 0 to 2"),
        ("gemini", {"seed": "1"}, "seed: expected an integer"),
        ("openai", {"messages": []}, "messages: expected a non-empty list"),
        ("openai", {"messages": [{"content": "hi"}]}, "messages[0]: expected an object with a 'role'"),
        ("openai", {"messages": [{"role": "model", "content": "hi"}]}, "OpenAI has no role 'model'"),
        (
            "azure",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "Azure OpenAI needs a name",
        ),
        ("openai", {"prompt": "Label: {headline}", "response_format": {"type": "json_object"}}, "mentions JSON"),
        (
            "openai",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "s",
                        "strict": True,
                        "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                    },
                }
            },
            "$ lacks additionalProperties: false; $ does not list a in required",
        ),
        (
            "gemini",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
            "messages[1]: Gemini has no role 'tool'",
        ),
        (
            "gemini",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]},
            "put system messages first",
        ),
        ("gemini", {"messages": [{"role": "system", "content": "only a system"}]}, "at least one user message"),
        (
            "gemini",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "only text parts can be sent to Gemini by batchdb, got 'image_url'",
        ),
        (
            "gemini",
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
            "tool_calls cannot be sent to Gemini",
        ),
        ("gemini", {"logit_bias": {"50256": -100}}, "'logit_bias' has no Gemini equivalent"),
        (
            "gemini",
            {"response_format": with_schema(allOf=[{"required": ["a"]}])},
            "'allOf' at $ (merge the sub-schemas",
        ),
        (
            "gemini",
            {"response_format": with_schema(properties={"code": {"type": "string", "pattern": "^[A-Z]+$"}})},
            "'pattern' at $.properties.code",
        ),
        ("gemini", {"response_format": with_schema(properties={"kind": {"const": "a"}})}, "use enum: [value]"),
        (
            "gemini",
            {"response_format": with_schema(properties={"x": {"$ref": "#/$defs/X", "description": "d"}})},
            "'description' next to $ref at $.properties.x",
        ),
        (
            "gemini",
            {"response_format": with_schema(properties={"x": {"type": "date"}})},
            "type 'date' at $.properties.x",
        ),
    ],
)
def test_refusals_say_what_is_wrong(provider: str, params: dict[str, Any], expected: str) -> None:
    with pytest.raises(UnsupportedRequest) as caught:
        check_request(provider, "m", params)
    assert expected in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_empty_model_is_refused() -> None:
    with pytest.raises(UnsupportedRequest, match="model"):
        check_request("openai", " ", JOB)


def test_gemini_conversion_of_a_full_request() -> None:
    request = ChatRequest(
        messages=[
            {"role": "system", "content": "A"},
            {"role": "developer", "content": "B"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": [{"type": "text", "text": "q2 "}, {"type": "text", "text": "more"}]},
        ],
        model="gemini-2.0-flash",
        max_tokens=64,
        temperature=0.5,
        seed=3,
        response_format=JSON_SCHEMA,
        extra={"top_p": 0.9, "stop": "END", "n": 1},
    )
    call = to_gemini(request)
    assert call == GeminiCall(
        contents=[
            {"role": "user", "parts": [{"text": "q1"}]},
            {"role": "model", "parts": [{"text": "a1"}]},
            {"role": "user", "parts": [{"text": "q2 more"}]},
        ],
        config={
            "system_instruction": "A\n\nB",
            "max_output_tokens": 64,
            "temperature": 0.5,
            "seed": 3,
            "response_mime_type": "application/json",
            "response_json_schema": SCHEMA,
            "top_p": 0.9,
            "stop_sequences": ["END"],
        },
    )
    assert to_gemini(
        ChatRequest(messages=[{"role": "user", "content": "x"}], model="g", response_format={"type": "json_object"})
    ).config == {"response_mime_type": "application/json"}


def test_openai_conversion_passes_the_request_through() -> None:
    request = ChatRequest(
        messages=[{"role": "user", "content": "Answer in JSON"}],
        model="gpt-4o-mini",
        max_tokens=5,
        seed=2,
        response_format={"type": "json_object"},
        extra={"top_p": 0.5},
    )
    assert to_openai(request) == {
        "model": "gpt-4o-mini",
        "messages": request.messages,
        "max_tokens": 5,
        "seed": 2,
        "response_format": {"type": "json_object"},
        "top_p": 0.5,
    }


def test_submit_and_worker_paths_agree() -> None:
    """A job refused at submit is refused for its rows too, with the same message."""
    params = {"prompt": "hi", "response_format": with_schema(properties={"x": {"type": "string", "minLength": 2}})}
    with pytest.raises(UnsupportedRequest) as at_submit:
        check_request("gemini", "g", params)
    row = ChatRequest(
        messages=[{"role": "user", "content": "hi"}], model="g", response_format=params["response_format"]
    )
    with pytest.raises(UnsupportedRequest) as at_worker:
        check_chat_request("gemini", row)
    assert str(at_submit.value) == str(at_worker.value)
