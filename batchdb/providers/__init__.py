"""Built-in providers, looked up by the name a job carries."""

from __future__ import annotations

import os

from batchdb import settings
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, Provider, ProviderError
from batchdb.secrets import (
    MissingSecret,
    VertexTarget,
    describe_endpoint_sources,
    resolve_endpoint,
    resolve_key,
    resolve_vertex_target,
)

__all__ = [
    "KNOWN_PROVIDERS",
    "ChatRequest",
    "ChatResponse",
    "ErrorKind",
    "Provider",
    "ProviderError",
    "build_provider",
    "lane_endpoint",
]

KNOWN_PROVIDERS = ("openai", "azure", "gemini", "vertex", "instant")
AZURE_API_VERSION_ENV = settings.AZURE_API_VERSION


def build_provider(name: str, *, key_alias: str = "default", timeout: float = 120.0) -> Provider:
    """A provider client for `name`, with the key and endpoint `key_alias` resolves to in this process.

    See `batchdb.secrets` for where keys and endpoints come from. openai: any
    OpenAI-compatible server via its endpoint (the simulator, vLLM ...); azure: the
    resource endpoint is required, the job's model is the deployment name, the API
    version comes from BATCHDB_AZURE_API_VERSION (default 2024-10-21); gemini: the
    Gemini API (an endpoint replaces the public one); vertex: Vertex AI in the project and
    location the alias names, with the worker's Google credentials (providers/vertex.py). SDK
    retries are off for all.

    A missing key or endpoint raises `ProviderError(QUOTA_EXHAUSTED)`: the worker
    pauses the job with the message, which names what was checked and no key.
    """
    if name == "instant":
        from batchdb.providers.instant import InstantProvider

        return InstantProvider()
    if name == "vertex":
        from batchdb.providers.vertex import VertexProvider, vertex_credentials

        target = _vertex_target(key_alias)
        return VertexProvider(target=target, credentials=vertex_credentials(key_alias), timeout=timeout)
    api_key, endpoint = _resolve(name, key_alias)
    if name == "openai":
        from batchdb.providers.openai import OpenAIProvider

        return OpenAIProvider(api_key=api_key, base_url=endpoint, timeout=timeout)
    if name == "azure":
        from batchdb.providers.azure import DEFAULT_API_VERSION, AzureOpenAIProvider

        api_version = os.environ.get(AZURE_API_VERSION_ENV) or DEFAULT_API_VERSION
        return AzureOpenAIProvider(api_key=api_key, endpoint=endpoint or "", api_version=api_version, timeout=timeout)
    from batchdb.providers.gemini import GeminiProvider

    return GeminiProvider(api_key=api_key, base_url=endpoint, timeout=timeout)


def lane_endpoint(name: str, *, key_alias: str = "default") -> str | None:
    """Whether this process could call `name` under `key_alias`, without building a client.

    Returns the endpoint `build_provider` would use (None: the provider's public one, or
    no network at all for ``instant``; for ``vertex`` the project's location URL, its
    credentials being looked for when the client is built); raises the same `ProviderError` as
    `build_provider` when the key or a required endpoint is missing. Never returns a key.
    """
    if name == "instant":
        return None
    if name == "vertex":
        return _vertex_target(key_alias).endpoint
    return _resolve(name, key_alias)[1]


def _vertex_target(key_alias: str) -> VertexTarget:
    try:
        return resolve_vertex_target(key_alias)
    except MissingSecret as exc:
        raise ProviderError(ErrorKind.QUOTA_EXHAUSTED, f"provider vertex: {exc}") from None


def _resolve(name: str, key_alias: str) -> tuple[str, str | None]:
    if name not in KNOWN_PROVIDERS:
        raise ProviderError(
            ErrorKind.PERMANENT, f"unknown provider {name!r}; this worker knows {', '.join(KNOWN_PROVIDERS)}"
        )
    try:
        api_key = resolve_key(name, key_alias)
        endpoint = resolve_endpoint(name, key_alias)
    except MissingSecret as exc:
        raise ProviderError(ErrorKind.QUOTA_EXHAUSTED, f"provider {name}: {exc}") from None
    if name == "azure" and not endpoint:
        raise ProviderError(
            ErrorKind.QUOTA_EXHAUSTED,
            f"provider azure: no endpoint for key alias {key_alias!r}: checked "
            f"{describe_endpoint_sources(name, key_alias)}",
        )
    return api_key, endpoint
