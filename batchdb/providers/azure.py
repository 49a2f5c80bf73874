"""Azure OpenAI through the official `openai` SDK's `AsyncAzureOpenAI`.

Azure speaks OpenAI's wire format on a per-deployment path with an `api-key`
header, so everything but the client is the OpenAI adapter's: the same request
conversion, the same rate-limit headers, the same error classification
(`classify_openai_error`). A job's `model` is the Azure *deployment* name.
"""

from __future__ import annotations

import openai

from batchdb.providers.openai import OpenAIProvider

DEFAULT_API_VERSION = "2024-10-21"


class AzureOpenAIProvider(OpenAIProvider):
    name = "azure"

    def __init__(
        self, *, api_key: str, endpoint: str, api_version: str = DEFAULT_API_VERSION, timeout: float = 120.0
    ) -> None:
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=endpoint, api_key=api_key, api_version=api_version, max_retries=0, timeout=timeout
        )
        super().__init__(api_key=api_key, timeout=timeout, client=client)
