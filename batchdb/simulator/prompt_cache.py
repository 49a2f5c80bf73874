"""Automatic prompt caching, as OpenAI / Azure OpenAI and Gemini 2.5+ report it in usage.

What the providers document, and what is simulated here:

- OpenAI and Azure OpenAI cache prompt prefixes automatically. Only prompts of at
  least 1,024 tokens can hit; a hit covers the longest prefix seen before, counted
  in steps of 128 tokens (1,024, 1,152, 1,280, ...) and never more than the prompt.
  The cache belongs to the organisation (here: the API key) and the model, and an
  entry is dropped after some minutes of disuse. The response reports the hit as
  ``usage.prompt_tokens_details.cached_tokens``; ``prompt_tokens`` still counts
  every prompt token, cached or not.
- Gemini 2.5 and newer cache implicitly, from 2,048 prompt tokens for
  gemini-2.5-flash / gemini-2.5-pro; the hit is ``usageMetadata.cachedContentTokenCount``
  (absent when nothing was cached) and ``promptTokenCount`` includes it. Google
  publishes no granularity, so the same 128-token steps are used.

The minimum, the step and the time to live are `SimulatorConfig` fields. Batchdb
prices cached input at the providers' discount, so the simulator has to report
hits the way the providers do for that code to be exercised end to end.

How: the prompt becomes a sequence of token ids whose length is exactly the prompt
token count the server reports (`batchdb.tokens` counts per message framing, images
and tool definitions, so `openai_prompt_ids` / `gemini_prompt_ids` lay those out as
placeholder ids in the same amounts). Every prefix that ends on a step boundary
(minimum, minimum + step, ...) is hashed; each (route, key, model) keeps an LRU map
of prefix hash -> last use (simulator clock), bounded in size. A request is answered
with the longest boundary whose hash is present and used within the TTL, then all of
its boundaries are stored as used now. Prompts under the minimum never reach this
module: the caller compares the count it already has first.
"""

from __future__ import annotations

import array
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batchdb.tokens import (
    GEMINI_INLINE_DATA_TOKENS,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    encoding,
    openai_content_text,
)

# Largest number of prefix hashes kept per (route, key, model); the least recently used go first.
MAX_ENTRIES = 100_000

# Same chunking as batchdb.tokens.count_text, so a text's ids are exactly as many as it counts.
_MAX_CHARS_PER_CALL = 500_000

# Placeholder ids for the framing tokens the counts include. They lie above any
# o200k_base id, so they never coincide with a real token; only their hash matters.
_START = 0xFFFF_FF00  # opens a message
_MESSAGE = 0xFFFF_FF01  # between a message's role and its content
_END = 0xFFFF_FF02  # closes a message (the third framing token)
_NAME = 0xFFFF_FF03  # before a message's name
_PRIMING = (0xFFFF_FF04, 0xFFFF_FF05, 0xFFFF_FF06)  # the reply priming, last
assert len(_PRIMING) == REPLY_PRIMING_TOKENS and TOKENS_PER_MESSAGE == 3 and TOKENS_PER_NAME == 1

_Scope = tuple[str, str, str]  # (route, api key, model)


def _encode(text: str) -> list[int]:
    if not text:
        return []
    enc = encoding()
    if len(text) <= _MAX_CHARS_PER_CALL:
        return list(enc.encode_ordinary(text))
    ids: list[int] = []
    for i in range(0, len(text), _MAX_CHARS_PER_CALL):
        ids.extend(enc.encode_ordinary(text[i : i + _MAX_CHARS_PER_CALL]))
    return ids


def _opaque(value: Any, n: int) -> list[int]:
    """``n`` ids standing for non-text input (an image, a file): equal inputs give equal ids."""
    if n <= 0:
        return []
    seed = json.dumps(value, sort_keys=True, default=str).encode("utf-8", "surrogatepass")
    raw = hashlib.shake_128(seed).digest(4 * n)
    return list(array.array("I", raw))


def openai_prompt_ids(messages: Sequence[Mapping[str, Any]], tools: Any = None) -> list[int]:
    """The prompt as ids, laid out as OpenAI renders it: tools first, then each message
    (start, role, separator, content, name, tool calls, end), then the reply priming.

    Its length is `batchdb.tokens.count_openai_messages`'s count for the same input.
    """
    ids: list[int] = []
    if tools:
        ids += _encode(json.dumps(tools))
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        text, extra = openai_content_text(content)
        ids.append(_START)
        ids += _encode(str(message.get("role") or ""))
        ids.append(_MESSAGE)
        ids += _encode(text)
        ids += _opaque(content, extra)
        name = message.get("name")
        if name:
            ids.append(_NAME)
            ids += _encode(str(name))
        tool_calls = message.get("tool_calls")
        if tool_calls:
            ids += _encode(json.dumps(tool_calls))
        ids.append(_END)
    ids += _PRIMING
    return ids


def gemini_prompt_ids(contents: Any, system_instruction: Any = None) -> list[int]:
    """The prompt as ids: the system instruction, then every part of every content in order.

    Its length is `batchdb.tokens.count_gemini_contents`'s count for the same input
    (which counts no per-turn framing, so neither is there any here).
    """
    items: list[Any] = []
    if isinstance(system_instruction, dict):
        items.append(system_instruction)
    elif isinstance(system_instruction, str):
        items.append({"parts": [{"text": system_instruction}]})
    if isinstance(contents, list):
        items.extend(contents)
    elif isinstance(contents, (dict, str)):
        items.append(contents)
    ids: list[int] = []
    for item in items:
        if isinstance(item, str):
            item = {"parts": [{"text": item}]}
        if not isinstance(item, dict):
            continue
        for part in item.get("parts") or []:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                ids += _encode(part["text"])
            elif "inlineData" in part or "fileData" in part:
                ids += _opaque(part, GEMINI_INLINE_DATA_TOKENS)
    return ids


def gemini_caches_implicitly(model: str) -> bool:
    """Implicit caching is on for Gemini 2.5 and newer; 1.x and 2.0 models never report a hit.

    Model names the simulator does not recognise as older Gemini models count as newer.
    """
    name = model.removeprefix("models/")
    return not name.startswith(("gemini-1.", "gemini-2.0", "gemini-pro", "gemini-ultra"))


def boundaries(n_tokens: int, minimum: int, step: int) -> range:
    """The prefix lengths a prompt of ``n_tokens`` can hit at: minimum, minimum + step, ... <= n_tokens."""
    return range(minimum, n_tokens + 1, step)


class PromptCache:
    """Prefix hashes of the prompts served, per (route, key, model), with their last use.

    Not thread-safe; the simulator's single event loop is its only user. Time is
    whatever clock the caller passes as ``now`` (the simulator's), in seconds.
    """

    def __init__(self, *, max_entries: int = MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        # Insertion order is last-use order: a stored hash is moved to the end, so the
        # front holds the least recently used (and, clocks being monotonic, the oldest).
        self._scopes: dict[_Scope, OrderedDict[bytes, float]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._scopes.values())

    def serve(
        self,
        scope: _Scope,
        prompt_ids: Sequence[int] | Callable[[], Sequence[int]],
        *,
        n_tokens: int,
        minimum: int,
        step: int,
        ttl_s: float,
        now: float,
    ) -> int:
        """Cached tokens for this prompt (0, or a boundary <= ``n_tokens``); then remember its prefixes.

        ``prompt_ids`` may be a callable so that a prompt under ``minimum`` is never tokenized.
        """
        marks = boundaries(n_tokens, minimum, step)
        if not marks:
            return 0
        ids = prompt_ids() if callable(prompt_ids) else prompt_ids
        marks = boundaries(min(n_tokens, len(ids)), minimum, step)
        if not marks:
            return 0
        packed = array.array("I", ids)
        width = packed.itemsize  # bytes per id
        data = memoryview(packed).cast("B")
        hasher = hashlib.blake2b(digest_size=16)
        digests: list[bytes] = []
        done = 0
        for mark in marks:
            hasher.update(data[done * width : mark * width])
            done = mark
            digests.append(hasher.digest())  # digest() leaves the state as it was: keep extending

        entries = self._scopes.get(scope)
        if entries is None:
            entries = self._scopes[scope] = OrderedDict()
        cached = 0
        for mark, digest in zip(reversed(marks), reversed(digests), strict=True):
            last_used = entries.get(digest)
            if last_used is not None and now - last_used < ttl_s:
                cached = mark
                break
        for digest in digests:
            entries[digest] = now
            entries.move_to_end(digest)
        self._evict(entries, now - ttl_s)
        return cached

    def _evict(self, entries: OrderedDict[bytes, float], expired_before: float) -> None:
        """Drop expired hashes from the front, then the least recently used beyond the bound."""
        while entries:
            digest, last_used = next(iter(entries.items()))
            if last_used > expired_before:
                break
            del entries[digest]
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
