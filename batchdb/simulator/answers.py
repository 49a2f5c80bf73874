"""What a chat / generateContent request is answered with, shared by the online routes and batches.

The online routes (`server`) and the Batch APIs (`batches`) must answer the same request with the
same body: batchdb's batch mode is only worth testing if a line of a batch file gets exactly what
``POST /v1/chat/completions`` would have returned (same text, same usage), less the rate limits.
So the request checks that answer 400 (missing messages, bad max_tokens, context window) and the
generation itself live here, split in two steps around what only the online route does (the rate
limiter, injected faults, latency):

1. ``check_openai_chat`` / ``check_gemini_generate``: a `Reply` (the 400 the provider sends) or a
   plan (the parsed request and its prompt token count);
2. ``answer_openai_chat`` / ``answer_gemini_generate``: the response body and its token counts.

Randomness is the caller's: the online route draws broken JSON from the arrival-ordered fault
stream, a batch from its own stream, so switching batches on never shifts online answers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchdb.simulator import content, prompt_cache, responses
from batchdb.simulator.responses import Reply
from batchdb.tokens import count_gemini_contents, count_openai_messages

if TYPE_CHECKING:  # state imports batches, which imports this module
    from batchdb.simulator.state import Simulator


def positive_int(value: Any) -> int | None:
    """``value`` if it is a positive int, else None (also for absent values)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def openai_json_mode(response_format: Any) -> Any:
    """None (text), "object" (json_object) or a JSON schema dict (json_schema)."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "object"
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else "object"
    return None


def gemini_json_mode(generation_config: dict[str, Any]) -> Any:
    schema = generation_config.get("responseJsonSchema") or generation_config.get("responseSchema")
    if isinstance(schema, dict):
        return schema
    if generation_config.get("responseMimeType") == "application/json":
        return "object"
    return None


# -- OpenAI / Azure OpenAI chat -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatPlan:
    """A chat request that passed the provider's checks."""

    body: dict[str, Any]
    messages: list[Any]
    max_tokens: int | None  # max_completion_tokens / max_tokens, None when not sent
    n_choices: int
    prompt_tokens: int
    prompt_text: str
    window: int  # the model's context window

    @property
    def json_mode(self) -> Any:
        return openai_json_mode(self.body.get("response_format"))


def check_openai_chat(sim: Simulator, body: dict[str, Any], model: str) -> ChatPlan | Reply:
    """The 400s a chat request can get before it is admitted, in the provider's order."""
    config = sim.config
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return responses.openai_bad_request("'messages' must be a non-empty array.", "messages")
    raw_max = body.get("max_completion_tokens")
    if raw_max is None:
        raw_max = body.get("max_tokens")
    max_tokens = positive_int(raw_max)
    n_choices = positive_int(1 if body.get("n") is None else body["n"])
    if (raw_max is not None and max_tokens is None) or n_choices is None:
        return responses.openai_bad_request("max_tokens and n must be positive integers.")
    prompt_tokens, prompt_text = count_openai_messages(messages, body.get("tools"))
    window = config.context_window_for(model)
    if prompt_tokens + (max_tokens or 0) > window:
        return responses.openai_context_length(window, prompt_tokens, max_tokens or 0)
    return ChatPlan(body, messages, max_tokens, n_choices, prompt_tokens, prompt_text, window)


@dataclass(frozen=True, slots=True)
class Answer:
    """A generated response body and what it used."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def answer_openai_chat(
    sim: Simulator,
    plan: ChatPlan,
    *,
    model: str,
    cache_scope: tuple[str, str, str],
    draw_broken: Callable[[], bool],
    response_id: str,
    now: float | None = None,
) -> Answer:
    """The chat.completion body for an admitted request.

    ``cache_scope`` is the prompt cache's (route, key, model); ``now`` the simulator time the
    answer is produced at (a batch line's scheduled completion), default the current time.
    """
    config = sim.config
    tools = plan.body.get("tools")
    cached_tokens = sim.cached_prompt_tokens(
        cache_scope,
        plan.prompt_tokens,
        config.prompt_cache_min_tokens_openai,
        lambda: prompt_cache.openai_prompt_ids(plan.messages, tools),
        now=now,
    )
    json_mode = plan.json_mode
    broken = json_mode is not None and draw_broken()
    rng = random.Random(content.seed_for(config.seed, plan.body.get("seed"), model, plan.prompt_text))
    cap = plan.max_tokens if plan.max_tokens is not None else plan.window - plan.prompt_tokens
    choices: list[tuple[str, str]] = []
    completion_tokens = 0
    for _ in range(plan.n_choices):
        generated = sim.generate(rng, json_mode, cap, broken)
        choices.append((generated.text, "length" if generated.truncated else "stop"))
        completion_tokens += generated.completion_tokens
    body = responses.openai_chat(
        response_id=response_id,
        model=model,
        created=int(time.time()),
        choices=choices,
        prompt_tokens=plan.prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
    )
    return Answer(body, plan.prompt_tokens, completion_tokens, cached_tokens)


# -- Gemini generateContent -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GeminiPlan:
    """A generateContent request that passed the checks."""

    body: dict[str, Any]
    contents: Any
    generation_config: dict[str, Any]
    prompt_tokens: int
    prompt_text: str
    window: int


def check_gemini_generate(sim: Simulator, body: dict[str, Any], model: str) -> GeminiPlan | Reply:
    contents = body.get("contents")
    generation_config = body.get("generationConfig") or {}
    if not contents or not isinstance(generation_config, dict):
        return responses.gemini_error(400, "* GenerateContentRequest.contents: contents is not specified")
    prompt_tokens, prompt_text = count_gemini_contents(contents, body.get("systemInstruction"))
    window = sim.config.context_window_for(model)
    if prompt_tokens > window:
        return responses.gemini_context_length(window, prompt_tokens)
    return GeminiPlan(body, contents, generation_config, prompt_tokens, prompt_text, window)


def answer_gemini_generate(
    sim: Simulator,
    plan: GeminiPlan,
    *,
    model: str,
    cache_scope: tuple[str, str, str],
    draw_broken: Callable[[], bool],
    response_id: str,
    now: float | None = None,
) -> Answer:
    config = sim.config
    cached_tokens = 0
    if prompt_cache.gemini_caches_implicitly(model):
        system_instruction = plan.body.get("systemInstruction")
        contents = plan.contents
        cached_tokens = sim.cached_prompt_tokens(
            cache_scope,
            plan.prompt_tokens,
            config.prompt_cache_min_tokens_gemini,
            lambda: prompt_cache.gemini_prompt_ids(contents, system_instruction),
            now=now,
        )
    json_mode = gemini_json_mode(plan.generation_config)
    broken = json_mode is not None and draw_broken()
    rng = random.Random(content.seed_for(config.seed, plan.generation_config.get("seed"), model, plan.prompt_text))
    max_output = positive_int(plan.generation_config.get("maxOutputTokens"))
    generated = sim.generate(rng, json_mode, max_output if max_output is not None else plan.window, broken)
    body = responses.gemini_generate(
        model=model,
        response_id=response_id,
        text=generated.text,
        finish_reason="MAX_TOKENS" if generated.truncated else "STOP",
        prompt_tokens=plan.prompt_tokens,
        completion_tokens=generated.completion_tokens,
        cached_tokens=cached_tokens,
    )
    return Answer(body, plan.prompt_tokens, generated.completion_tokens, cached_tokens)
