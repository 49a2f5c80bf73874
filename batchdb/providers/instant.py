"""A provider that answers at once without a network: for queue benchmarks and unit tests.

It measures batchdb's own overhead (claim -> call -> record) with the
provider taken out. The demo and end-to-end tests use the HTTP simulator.
"""

from __future__ import annotations

from batchdb.providers.base import ChatRequest, ChatResponse


class InstantProvider:
    name = "instant"

    async def complete(self, request: ChatRequest) -> ChatResponse:
        prompt = " ".join(str(m.get("content", "")) for m in request.messages)
        text = f"echo: {prompt[:64]}"
        return ChatResponse(
            text=text,
            finish_reason="stop",
            prompt_tokens=max(1, len(prompt) // 4),
            completion_tokens=max(1, len(text) // 4),
            model=request.model,
        )

    async def aclose(self) -> None:
        return None
