"""Built-in providers, looked up by the name a job carries."""

from __future__ import annotations

import os

from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, Provider, ProviderError

__all__ = ["ChatRequest", "ChatResponse", "ErrorKind", "Provider", "ProviderError", "KNOWN_PROVIDERS", "build_provider"]

KNOWN_PROVIDERS = ("openai", "instant")


def build_provider(name: str, *, timeout: float = 120.0) -> Provider:
    """A provider client configured from this process's environment.

    openai: OPENAI_API_KEY, and OPENAI_BASE_URL for any OpenAI-compatible server
    (the provider simulator, vLLM ...).
    """
    if name == "openai":
        from batchdb.providers.openai import OpenAIProvider

        api_key = os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise ProviderError(ErrorKind.QUOTA_EXHAUSTED, "provider openai: OPENAI_API_KEY is not set for this worker")
        return OpenAIProvider(api_key=api_key, base_url=os.environ.get("OPENAI_BASE_URL") or None, timeout=timeout)
    if name == "instant":
        from batchdb.providers.instant import InstantProvider

        return InstantProvider()
    raise ProviderError(ErrorKind.PERMANENT, f"unknown provider {name!r}; this worker knows {', '.join(KNOWN_PROVIDERS)}")
