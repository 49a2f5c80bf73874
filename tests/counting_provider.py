"""A provider that answers each prompt and counts the calls (tests of dedupe and reuse: which rows
were sent, and how often)."""

from __future__ import annotations

from collections import Counter

from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError


class CountingProvider:
    """Answers each prompt, counting the calls; prompts listed in `refuse` fail as the provider refuses them."""

    name = "instant"

    def __init__(self, refuse: dict[str, ErrorKind] | None = None) -> None:
        self.calls: Counter[str] = Counter()
        self.refuse = refuse or {}

    async def complete(self, request: ChatRequest) -> ChatResponse:
        prompt = str(request.messages[-1]["content"])
        self.calls[prompt] += 1
        if prompt in self.refuse:
            raise ProviderError(self.refuse[prompt], f"refused: {prompt}", status_code=400)
        return ChatResponse(text=f"answer to {prompt}", finish_reason="stop", prompt_tokens=9, completion_tokens=4)

    async def aclose(self) -> None:
        return None
