"""Generated content: exact token lengths, schema-valid JSON, broken JSON, wire helpers."""

from __future__ import annotations

import json
import math
import random

import pytest

from batchdb.simulator import content
from batchdb.simulator.responses import format_duration
from batchdb.tokens import count_openai_messages, count_text

from .schema_check import REVIEW_SCHEMA, violations


@pytest.mark.parametrize("n_tokens", [1, 2, 3, 7, 50, 301, 2000])
def test_text_has_exactly_the_requested_tokens(n_tokens: int) -> None:
    for seed in range(25):
        assert count_text(content.text_of_tokens(random.Random(seed), n_tokens)) == n_tokens


def test_text_is_deterministic_per_seed() -> None:
    a = content.text_of_tokens(random.Random(content.seed_for(1, "prompt")), 40)
    b = content.text_of_tokens(random.Random(content.seed_for(1, "prompt")), 40)
    c = content.text_of_tokens(random.Random(content.seed_for(2, "prompt")), 40)
    assert a == b != c


def test_schema_instances_satisfy_the_schema() -> None:
    for seed in range(200):
        value = content.schema_instance(REVIEW_SCHEMA, random.Random(seed))
        assert violations(REVIEW_SCHEMA, value) == [], value


def test_gemini_style_schema() -> None:
    schema = {
        "type": "OBJECT",
        "properties": {
            "label": {"type": "STRING", "format": "enum", "enum": ["a", "b"]},
            "items": {"type": "ARRAY", "items": {"type": "INTEGER"}},
            "note": {"type": "STRING", "nullable": True},
        },
        "required": ["label", "items"],
        "propertyOrdering": ["items", "label", "note"],
    }
    value = content.schema_instance(schema, random.Random(3))
    assert violations(schema, value) == []
    assert list(value) == ["items", "label", "note"]


def test_recursive_schema_terminates() -> None:
    schema = {
        "$defs": {
            "node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
        },
        "$ref": "#/$defs/node",
    }
    assert isinstance(content.schema_instance(schema, random.Random(0)), dict)


def test_broken_json_never_parses() -> None:
    for seed in range(100):
        rng = random.Random(seed)
        text = json.dumps(content.schema_instance(REVIEW_SCHEMA, rng))
        with pytest.raises(json.JSONDecodeError):
            json.loads(content.break_json(text, rng))


def test_embeddings_are_deterministic_unit_vectors() -> None:
    a = content.embedding_vector("hello", 256)
    assert a == content.embedding_vector("hello", 256) != content.embedding_vector("hullo", 256)
    assert math.sqrt(sum(x * x for x in a)) == pytest.approx(1.0, abs=1e-5)


def test_prompt_tokens_follow_openais_recipe() -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]
    expected = 3 + sum(3 + count_text(m["role"]) + count_text(m["content"]) for m in messages)
    assert count_openai_messages(messages)[0] == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0004, "1ms"), (0.12, "120ms"), (1, "1s"), (17.5, "17.5s"), (360, "6m0s"), (3725.25, "1h2m5.25s")],
)
def test_durations_are_formatted_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
