"""A small JSON Schema checker for the keywords the simulator's generator honours."""

from __future__ import annotations

from typing import Any


def violations(schema: Any, value: Any, root: Any = None, path: str = "$") -> list[str]:
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        node: Any = root
        for token in schema["$ref"].lstrip("#").strip("/").split("/"):
            node = node[token]
        return violations(node, value, root, path)
    problems: list[str] = []
    if "const" in schema and value != schema["const"]:
        problems.append(f"{path}: {value!r} != const {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in enum")
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema and not any(not violations(s, value, root, path) for s in schema[combinator]):
            problems.append(f"{path}: matches no {combinator} option")
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [k.lower() for k in (kinds if isinstance(kinds, list) else [kinds])]
        if schema.get("nullable") and value is None:
            return problems
        if not any(_is(kind, value) for kind in kinds):
            return [*problems, f"{path}: {value!r} is not {kinds}"]
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{path}: missing required {name!r}")
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                problems += violations(properties[name], item, root, f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{path}: unexpected property {name!r}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            problems.append(f"{path}: {len(value)} items outside bounds")
        for i, item in enumerate(value):
            problems += violations(schema.get("items", {}), item, root, f"{path}[{i}]")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        problems.append(f"{path}: {value} outside [minimum, maximum]")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        problems.append(f"{path}: length {len(value)} outside bounds")
    return problems


def _is(kind: str, value: Any) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }.get(kind, True)


# A schema of the shape batchdb users send: nested objects, enums, arrays, refs, nullables.
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "is_spam": {"type": "boolean"},
        "topics": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "summary": {"type": "string", "minLength": 10, "maxLength": 80},
        "product": {"$ref": "#/$defs/product"},
        "reply_to": {"type": ["string", "null"]},
        "version": {"const": 2},
    },
    "required": ["sentiment", "score", "confidence", "is_spam", "topics", "summary", "product", "reply_to", "version"],
    "additionalProperties": False,
    "$defs": {
        "product": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "sku": {"type": "string", "format": "uuid"}},
            "required": ["name", "sku"],
            "additionalProperties": False,
        }
    },
}
