"""Built-in providers, looked up by the name a job carries."""

from __future__ import annotations

import os

from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, Provider, ProviderError
from batchdb.secrets import MissingSecret, describe_endpoint_sources, resolve_endpoint, resolve_key

__all__ = ["ChatRequest", "ChatResponse", "ErrorKind", "Provider", "ProviderError", "KNOWN_PROVIDERS", "build_provider"]

KNOWN_PROVIDERS = ("openai", "azure", "gemini", "instant")
AZURE_API_VERSION_ENV = "BATCHDB_AZURE_API_VERSION"


def build_provider(name: str, *, key_alias: str = "default", timeout: float = 120.0) -> Provider:
    """A provider client for `name`, with the key and endpoint `key_alias` resolves to in this process.

    See `batchdb.secrets` for where keys and endpoints come from. openai: any
    OpenAI-compatible server via its endpoint (the simulator, vLLM ...); azure: the
    resource endpoint is required, the job's model is the deployment name, the API
    version comes from BATCHDB_AZURE_API_VERSION (default 2024-10-21); gemini: the
    Gemini API (an endpoint replaces the public one). SDK retries are off for all.

    A missing key or endpoint raises `ProviderError(QUOTA_EXHAUSTED)`: the worker
    pauses the job with the message, which names what was checked and no key.
    """
    if name == "instant":
        from batchdb.providers.instant import InstantProvider

        return InstantProvider()
    if name not in KNOWN_PROVIDERS:
        raise ProviderError(
            ErrorKind.PERMANENT, f"unknown provider {name!r}; this worker knows {', '.join(KNOWN_PROVIDERS)}"
        )
    try:
        api_key = resolve_key(name, key_alias)
        endpoint = resolve_endpoint(name, key_alias)
    except MissingSecret as exc:
        raise ProviderError(ErrorKind.QUOTA_EXHAUSTED, f"provider {name}: {exc}") from None
    if name == "openai":
        from batchdb.providers.openai import OpenAIProvider

        return OpenAIProvider(api_key=api_key, base_url=endpoint, timeout=timeout)
    if name == "azure":
        from batchdb.providers.azure import DEFAULT_API_VERSION, AzureOpenAIProvider

        if not endpoint:
            raise ProviderError(
                ErrorKind.QUOTA_EXHAUSTED,
                f"provider azure: no endpoint for key alias {key_alias!r}: checked "
                f"{describe_endpoint_sources(name, key_alias)}",
            )
        api_version = os.environ.get(AZURE_API_VERSION_ENV) or DEFAULT_API_VERSION
        return AzureOpenAIProvider(api_key=api_key, endpoint=endpoint, api_version=api_version, timeout=timeout)
    from batchdb.providers.gemini import GeminiProvider

    return GeminiProvider(api_key=api_key, base_url=endpoint, timeout=timeout)
