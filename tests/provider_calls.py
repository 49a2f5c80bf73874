"""Send requests through one provider adapter and keep each answer or classified error, in order:
how the adapter tests (tests/providers) look at a provider call by call."""

from __future__ import annotations

import asyncio

from batchdb.providers.base import ChatRequest, ChatResponse, Provider, ProviderError


def call(provider: Provider, *requests: ChatRequest) -> list[ChatResponse | ProviderError]:
    """Each request's `ChatResponse` or `ProviderError`; the provider is closed afterwards."""

    async def main() -> list[ChatResponse | ProviderError]:
        out: list[ChatResponse | ProviderError] = []
        try:
            for r in requests:
                try:
                    out.append(await provider.complete(r))
                except ProviderError as exc:
                    out.append(exc)
        finally:
            await provider.aclose()
        return out

    return asyncio.run(main())
