"""Deterministic generated content: text of an exact token length, JSON, embeddings.

Text is made of pieces that are each exactly one o200k_base token (common English
words with a leading space, and "."), so a reply of ``n`` pieces is ``n`` completion
tokens without running the tokenizer on every response. JSON-mode replies are
instances of the requested schema, built by a small generator that honours
types, required properties, enums, consts, bounds and ``$ref`` (JSON Schema as
OpenAI takes it, and Gemini's OpenAPI-style ``responseSchema`` with upper-case types).
"""

from __future__ import annotations

import array
import base64
import hashlib
import json
import math
import random
import sys
from functools import lru_cache
from typing import Any

from batchdb.tokens import encoding

# Common words; the ones that are not a single o200k_base token are dropped at load.
_CANDIDATE_WORDS = """
the of and to in is for on that with as by at from this be are was it an or have not
they which you one all there can but more will about their has also new time people
other some what when only into year two first use data model system work part over most
after many such may these make between well each under where both while through
state long world day well high like way just because three good last city group
number water used found public small large given known high report order point
process result value level record table query batch queue worker token limit price
rate answer question sample field final simple better clear short local early
""".split()  # noqa: SIM905

_SENTENCE_MIN_WORDS = 6
_SENTENCE_END_CHANCE = 0.15


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(first words, following pieces) that encode to exactly one token each."""
    enc = encoding()
    unique = list(dict.fromkeys(_CANDIDATE_WORDS))
    following = tuple(" " + w for w in unique if len(enc.encode_ordinary(" " + w)) == 1)
    first = tuple(w.capitalize() for w in unique if len(enc.encode_ordinary(w.capitalize())) == 1)
    if len(following) < 20 or not first or len(enc.encode_ordinary(".")) != 1:
        raise RuntimeError("o200k_base vocabulary does not match the simulator's word list")
    return first, following


def warm_up() -> None:
    """Load the tokenizer and check the word list (about 0.5 s, once per process)."""
    _vocabulary()


def seed_for(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def text_of_tokens(rng: random.Random, n_tokens: int) -> str:
    """Sentence-like text of exactly ``n_tokens`` o200k_base tokens."""
    if n_tokens <= 0:
        return ""
    first, following = _vocabulary()
    words = rng.choices(following, k=n_tokens - 1)
    pieces = [rng.choice(first)]
    since_period = 1
    last = n_tokens - 2
    for i, word in enumerate(words):
        if i == last and n_tokens > 2:
            pieces.append(".")
        elif i < last - 1 and since_period >= _SENTENCE_MIN_WORDS and rng.random() < _SENTENCE_END_CHANCE:
            pieces.append(".")
            since_period = 0
        else:
            pieces.append(word)
            since_period += 1
    return "".join(pieces)


def phrase(rng: random.Random, n_words: int) -> str:
    _, following = _vocabulary()
    return "".join(rng.choices(following, k=max(1, n_words))).strip()


def json_object_text(rng: random.Random, n_tokens: int) -> str:
    """A JSON object whose size roughly follows the requested token count."""
    body = {"answer": text_of_tokens(rng, max(1, n_tokens - 8)), "confidence": round(rng.random(), 2)}
    return json.dumps(body)


def schema_instance(schema: Any, rng: random.Random) -> Any:
    """A deterministic value satisfying ``schema`` (best effort for exotic keywords)."""
    return _instance(schema, rng, schema, 0)


_MAX_DEPTH = 8


def _resolve_ref(ref: str, root: Any) -> Any:
    if not ref.startswith("#"):
        return {}
    node = root
    for token in ref.lstrip("#").strip("/").split("/"):
        if not token:
            continue
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or token not in node:
            return {}
        node = node[token]
    return node


def _schema_type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null = [k for k in kind if str(k).lower() != "null"]
        kind = non_null[0] if non_null else "null"
    if isinstance(kind, str):
        kind = kind.lower()
        return None if kind == "type_unspecified" else kind
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _instance(schema: Any, rng: random.Random, root: Any, depth: int) -> Any:
    if not isinstance(schema, dict):
        return None if schema is False else "value"
    if "$ref" in schema:
        if depth >= _MAX_DEPTH:
            return None
        return _instance(_resolve_ref(schema["$ref"], root), rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[rng.randrange(len(enum))]
    for combinator in ("anyOf", "oneOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            chosen = next((o for o in options if not (isinstance(o, dict) and o.get("type") == "null")), options[0])
            return _instance(chosen, rng, root, depth + 1)
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and all_of:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in all_of:
            part = _resolve_ref(part["$ref"], root) if isinstance(part, dict) and "$ref" in part else part
            if isinstance(part, dict):
                for k, v in part.items():
                    if k == "properties":
                        merged.setdefault("properties", {}).update(v)
                    elif k == "required":
                        merged["required"] = list(dict.fromkeys([*merged.get("required", []), *v]))
                    else:
                        merged.setdefault(k, v)
        return _instance(merged, rng, root, depth + 1)

    kind = _schema_type(schema)
    if kind == "object":
        return _object(schema, rng, root, depth)
    if kind == "array":
        return _array(schema, rng, root, depth)
    if kind == "integer":
        return _integer(schema, rng)
    if kind == "number":
        return _number(schema, rng)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _string(schema, rng)


def _object(schema: dict[str, Any], rng: random.Random, root: Any, depth: int) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    required = [name for name in schema.get("required") or [] if isinstance(name, str)]
    # Deep optional properties are left out so recursive schemas terminate.
    names = list(properties) if depth < _MAX_DEPTH // 2 else [n for n in properties if n in required]
    ordering = schema.get("propertyOrdering")
    if isinstance(ordering, list):
        names.sort(key=lambda n: ordering.index(n) if n in ordering else len(ordering))
    result = {name: _instance(properties[name], rng, root, depth + 1) for name in names}
    for name in required:
        if name not in result:  # required but undeclared: any value will do
            result[name] = phrase(rng, 2)
    return result


def _array(schema: dict[str, Any], rng: random.Random, root: Any, depth: int) -> list[Any]:
    low = int(schema.get("minItems", 0) or 0)
    high = schema.get("maxItems")
    high = int(high) if high is not None else max(low, 3)
    count = min(max(low, 1 if depth < _MAX_DEPTH else 0, min(2, high)), high)
    prefix = schema.get("prefixItems") or []
    items = schema.get("items", {})
    values = [_instance(p, rng, root, depth + 1) for p in prefix[:count]]
    values += [_instance(items, rng, root, depth + 1) for _ in range(count - len(values))]
    return values


def _bounds(schema: dict[str, Any], default_low: float, default_high: float) -> tuple[float, float]:
    """[low, high] from minimum/maximum/exclusive*, defaulting to a window next to any given bound."""
    low: float | None = None
    high: float | None = None
    if isinstance(schema.get("minimum"), (int, float)):
        low = float(schema["minimum"])
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(schema["exclusiveMinimum"], bool):
        low = max(low if low is not None else -math.inf, schema["exclusiveMinimum"] + 1e-6)
    if isinstance(schema.get("maximum"), (int, float)):
        high = float(schema["maximum"])
    if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(schema["exclusiveMaximum"], bool):
        high = min(high if high is not None else math.inf, schema["exclusiveMaximum"] - 1e-6)
    span = default_high - default_low
    if low is None and high is None:
        low, high = default_low, default_high
    elif low is None:
        assert high is not None
        low = min(default_low, high - span)
    elif high is None:
        high = max(default_high, low + span)
    return low, max(low, high)


def _integer(schema: dict[str, Any], rng: random.Random) -> int:
    low, high = _bounds(schema, 0, 100)
    low_i, high_i = math.ceil(low), math.floor(high)
    return rng.randint(low_i, high_i) if high_i >= low_i else low_i


def _number(schema: dict[str, Any], rng: random.Random) -> float:
    low, high = _bounds(schema, 0.0, 1.0)
    value = round(rng.uniform(low, high), 3)
    return min(max(value, low), high)


_STRING_FORMATS = {
    "date-time": lambda rng: f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00Z",
    "date": lambda rng: f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    "time": lambda rng: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00",
    "email": lambda rng: f"user{rng.randint(1, 999)}@example.com",
    "uri": lambda rng: f"https://example.com/{rng.randint(1, 999)}",
    "uuid": lambda rng: (
        f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}"
        f"-8{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}"
    ),
}


def _string(schema: dict[str, Any], rng: random.Random) -> str:
    make = _STRING_FORMATS.get(str(schema.get("format", "")))
    value = make(rng) if make else phrase(rng, rng.randint(2, 6))
    low = int(schema.get("minLength", 0) or 0)
    high = schema.get("maxLength")
    while len(value) < low:
        value += " " + phrase(rng, 3)
    if high is not None:
        value = value[: int(high)]
    return value


def break_json(text: str, rng: random.Random) -> str:
    """Turn valid JSON into text no JSON parser accepts, the ways LLMs get it wrong."""
    choice = rng.randrange(3)
    if choice == 0 and text[:1] in "{[" and len(text) > 1:
        return text[: max(1, len(text) * 2 // 3)]  # cut off mid-value
    if choice == 1:
        return f"```json\n{text}\n```"  # wrapped in a Markdown fence
    return f"{text}\nHope this helps!"  # trailing chatter


def embedding_vector(seed_text: str, dimensions: int) -> array.array[float]:
    """A deterministic unit vector for ``seed_text`` (float32)."""
    raw = hashlib.shake_256(seed_text.encode("utf-8", "surrogatepass")).digest(2 * dimensions)
    ints = array.array("h")
    ints.frombytes(raw)
    norm = math.sqrt(sum(i * i for i in ints)) or 1.0
    return array.array("f", (i / norm for i in ints))


def embedding_base64(vector: array.array[float]) -> str:
    """The little-endian float32 bytes OpenAI's ``encoding_format="base64"`` returns."""
    if sys.byteorder == "big":
        vector = array.array("f", vector)
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")
