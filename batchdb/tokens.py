"""Prompt token counting with OpenAI's o200k_base vocabulary, offline (bpe-openai).

Both sides use it: workers estimate what a call will cost against a key's TPM
before sending it, and the provider simulator counts what it was sent.

Counts follow OpenAI's published recipe for chat models: each message costs 3
tokens plus its role and content (plus 1 and the name when named), and every
reply is primed with 3 more. The same tokenizer stands in for Gemini's, whose
vocabulary is not available offline; counts are close enough for rate limiting.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS = 85  # OpenAI's "low detail" image cost; Gemini charges 258
GEMINI_INLINE_DATA_TOKENS = 258
_MAX_CHARS_PER_CALL = 500_000  # bpe-openai accepts at most 1,000,000 characters per call


@lru_cache(maxsize=1)
def encoding() -> Any:
    # bpe-openai 0.1.4 reads its vocabularies with importlib.resources.open_binary,
    # deprecated since Python 3.11; keep that out of callers' warnings-as-errors runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai  # type: ignore[import-untyped]

        return bpe_openai.get_encoding("o200k_base")


def count_text(text: str) -> int:
    if not text:
        return 0
    enc = encoding()
    if len(text) <= _MAX_CHARS_PER_CALL:
        return len(enc.encode_ordinary(text))
    return sum(
        len(enc.encode_ordinary(text[i : i + _MAX_CHARS_PER_CALL])) for i in range(0, len(text), _MAX_CHARS_PER_CALL)
    )


def openai_content_text(content: Any) -> tuple[str, int]:
    """(text, extra tokens) of a message's content: a string or a list of parts."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    extra = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_image"):
                extra += IMAGE_TOKENS
    return "\n".join(texts), extra


def count_openai_messages(messages: Sequence[Mapping[str, Any]], tools: Any = None) -> tuple[int, str]:
    """(prompt tokens, the prompt's text) for a chat completion request.

    The text is returned so the caller can seed deterministic output from it
    without walking the messages twice.
    """
    total = REPLY_PRIMING_TOKENS
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        text, extra = openai_content_text(message.get("content"))
        role = message.get("role") or ""
        total += TOKENS_PER_MESSAGE + extra + count_text(str(role)) + count_text(text)
        name = message.get("name")
        if name:
            total += TOKENS_PER_NAME + count_text(str(name))
        tool_calls = message.get("tool_calls")
        if tool_calls:
            total += count_text(json.dumps(tool_calls))
        texts.append(f"{role}:{text}")
    if tools:
        total += count_text(json.dumps(tools))
    return total, "\n".join(texts)


def count_embedding_input(value: Any) -> tuple[int, list[str]]:
    """(tokens, one text per input) for an embeddings request.

    ``input`` may be a string, a list of strings, a list of token ids or a list of
    token-id lists; token ids are counted as given and rendered as text for seeding.
    """
    if isinstance(value, str):
        return count_text(value), [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return len(value), [" ".join(map(str, value))]
    total = 0
    texts: list[str] = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, str):
            total += count_text(item)
            texts.append(item)
        elif isinstance(item, list):
            total += len(item)
            texts.append(" ".join(map(str, item)))
    return total, texts


def count_gemini_contents(contents: Any, system_instruction: Any = None) -> tuple[int, str]:
    """(prompt tokens, the prompt's text) for a Gemini generateContent body."""
    total = 0
    texts: list[str] = []
    items: list[Any] = []
    if isinstance(system_instruction, dict):
        items.append(system_instruction)
    elif isinstance(system_instruction, str):
        items.append({"parts": [{"text": system_instruction}]})
    if isinstance(contents, list):
        items.extend(contents)
    elif isinstance(contents, (dict, str)):
        items.append(contents)
    for item in items:
        if isinstance(item, str):
            item = {"parts": [{"text": item}]}
        if not isinstance(item, dict):
            continue
        for part in item.get("parts") or []:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                total += count_text(part["text"])
                texts.append(f"{item.get('role', '')}:{part['text']}")
            elif "inlineData" in part or "fileData" in part:
                total += GEMINI_INLINE_DATA_TOKENS
    return total, "\n".join(texts)


# Providers that speak the Gemini API's wire format (generateContent): the Gemini API and Vertex AI.
GEMINI_FORMAT_PROVIDERS = frozenset({"gemini", "vertex"})


def estimate_prompt_tokens(provider: str, messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens a provider will count for these chat messages (an estimate for Gemini)."""
    if provider in GEMINI_FORMAT_PROVIDERS:
        return sum(count_text(openai_content_text(m.get("content"))[0]) for m in messages if isinstance(m, dict))
    return count_openai_messages(messages)[0]
