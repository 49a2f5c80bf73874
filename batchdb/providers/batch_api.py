"""The OpenAI Batch API, and Azure OpenAI Global Batch (the same API through `AsyncAzureOpenAI`).

What workers/batch_driver.py needs from a provider's Batch API, in provider-neutral terms: render
a row as a line of the input file, upload a file (and find one uploaded before, by its name),
create a batch (and find one created before, by its metadata), poll it, cancel it, and read its
output and error files back as one `LineResult` per line.

Limits, from the providers' documentation (docs/simulator.md lists the sources): an input file
holds up to 50,000 requests on OpenAI and 100,000 on Azure, and up to 200 MB (209,715,200 bytes)
on both; one model per file; `completion_window` is "24h"; batch metadata takes 16 pairs of at
most 64-character keys and 512-character values. Past the per-model enqueued-token limit the
batch is created but fails validation with `token_limit_exceeded`.

Every SDK error is classified as the online path classifies it (`classify_openai_error`), so the
driver reacts to a refused key, a 5xx or a 429 the same way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import openai
from openai.types import Batch
from openai.types.chat import ChatCompletion

from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.compat import to_openai
from batchdb.providers.openai import classify_openai_error, response_of

OPENAI_MAX_REQUESTS = 50_000
AZURE_MAX_REQUESTS = 100_000
MAX_FILE_BYTES = 200 * 1024 * 1024
CHAT_URL: Literal["/v1/chat/completions"] = "/v1/chat/completions"
COMPLETION_WINDOW: Literal["24h"] = "24h"
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
# Error-file codes of lines that never ran (the batch expired or was cancelled first).
NEVER_RAN = frozenset({"batch_expired", "batch_cancelled"})
# A batch refused for the lane's enqueued-token limit: created again once the queue has room.
QUEUE_FULL = "token_limit_exceeded"


@dataclass(frozen=True, slots=True)
class RemoteBatch:
    """A batch as the provider reports it."""

    id: str
    status: str  # validating, in_progress, finalizing, cancelling, completed, failed, expired, cancelled
    created_at: int  # unix time
    output_file_id: str | None = None
    error_file_id: str | None = None
    # Validation errors of a failed batch: {code, message, line, param}.
    errors: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    completed: int | None = None
    failed: int | None = None
    model: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def queue_full(self) -> bool:
        """Refused because the lane's batch queue (enqueued tokens) is full: try again later."""
        return self.status == "failed" and any(e.get("code") == QUEUE_FULL for e in self.errors)

    def error_text(self) -> str:
        """The provider's reasons for a failed batch, in one line."""
        parts = []
        for error in self.errors[:5]:
            line = f" (line {error['line']})" if error.get("line") else ""
            parts.append(f"{error.get('code') or 'error'}{line}: {error.get('message') or ''}".strip())
        more = f"; and {len(self.errors) - 5} more" if len(self.errors) > 5 else ""
        return "; ".join(parts) + more if parts else f"batch {self.id} {self.status}"


class QueueFull(ProviderError):
    """The provider refused to create the batch for the lane's enqueued-token quota (Gemini's 429
    RESOURCE_EXHAUSTED): no batch was made, so the chunk waits for room and is created again."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.RATE_LIMITED, message, status_code=429)


@dataclass(frozen=True, slots=True)
class LineResult:
    """One line of a batch's output or error file."""

    custom_id: str
    response: ChatResponse | None = None
    error: ProviderError | None = None
    # The line never ran (the batch expired or was cancelled first); its error says which.
    never_ran: bool = False


class OpenAIBatchAPI:
    """OpenAI's Batch API on an `AsyncOpenAI` (or `AsyncAzureOpenAI`) client; `provider` is
    ``openai`` or ``azure`` (which decides the per-file request limit and error wording)."""

    def __init__(
        self, client: openai.AsyncOpenAI, *, provider: str, secret: str | None = None, timeout: float = 60.0
    ) -> None:
        self._client = client
        self.provider = provider
        self._secret = secret
        self.timeout = timeout
        self.max_requests = AZURE_MAX_REQUESTS if provider == "azure" else OPENAI_MAX_REQUESTS
        self.max_file_bytes = MAX_FILE_BYTES

    # -- the input file --------------------------------------------------------------------------

    def line(self, custom_id: str, request: ChatRequest) -> bytes:
        """One JSONL line of the input file (raises `UnsupportedRequest` as the online path would)."""
        body = to_openai(request, provider=self.provider)
        item = {"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body}
        return (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    async def find_file(self, filename: str, *, created_after: float) -> str | None:
        """The id of an input file named `filename` uploaded after `created_after` (unix time), if
        any: files are listed newest first, so the search stops at the first older one."""
        try:
            async for item in self._client.files.list(purpose="batch", order="desc"):
                if item.created_at < created_after:
                    return None
                if item.filename == filename:
                    return item.id
        except openai.APIError as exc:
            raise self._classify(exc) from None
        return None

    async def upload(self, filename: str, data: bytes) -> str:
        try:
            uploaded = await self._client.files.create(
                file=(filename, io.BytesIO(data), "application/jsonl"), purpose="batch", timeout=self.timeout
            )
        except openai.APIError as exc:
            raise self._classify(exc) from None
        return uploaded.id

    # -- the batch ----------------------------------------------------------------------------

    async def find_batch(self, metadata: Mapping[str, str], *, created_after: float) -> RemoteBatch | None:
        """A batch whose metadata includes every pair of `metadata`, created after `created_after`
        (unix time): batches are listed newest first, page by page, until an older one."""
        try:
            async for item in self._client.batches.list(limit=100):
                if item.created_at < created_after:
                    return None
                found = item.metadata or {}
                if all(found.get(k) == v for k, v in metadata.items()):
                    return _remote(item)
        except openai.APIError as exc:
            raise self._classify(exc) from None
        return None

    async def create(self, input_file_id: str, metadata: Mapping[str, str], *, model: str) -> RemoteBatch:
        """The model is each line's (OpenAI takes one model per file); `model` is not sent."""
        try:
            created = await self._client.batches.create(
                input_file_id=input_file_id,
                endpoint=CHAT_URL,
                completion_window=COMPLETION_WINDOW,
                metadata=dict(metadata),
                timeout=self.timeout,
            )
        except openai.APIError as exc:
            raise self._classify(exc) from None
        return _remote(created)

    async def retrieve(self, batch_id: str) -> RemoteBatch:
        try:
            return _remote(await self._client.batches.retrieve(batch_id, timeout=self.timeout))
        except openai.APIError as exc:
            raise self._classify(exc) from None

    async def cancel(self, batch_id: str) -> RemoteBatch | None:
        """Ask the provider to cancel; None when it had already ended (409)."""
        try:
            return _remote(await self._client.batches.cancel(batch_id, timeout=self.timeout))
        except openai.APIStatusError as exc:
            if exc.status_code == 409:
                return None
            raise self._classify(exc) from None
        except openai.APIError as exc:
            raise self._classify(exc) from None

    async def results(self, batch: RemoteBatch) -> dict[str, LineResult]:
        """Every line of the batch's output and error files, by custom_id."""
        found: dict[str, LineResult] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                for raw in (await self._download(file_id)).splitlines():
                    if raw.strip():
                        result = parse_line(json.loads(raw), provider=self.provider)
                        found[result.custom_id] = result
        return found

    async def delete_file(self, file_id: str) -> None:
        """Best effort: files expire at the provider anyway (30 days)."""
        try:
            await self._client.files.delete(file_id, timeout=self.timeout)
        except openai.APIError:
            pass

    async def _download(self, file_id: str) -> bytes:
        try:
            content = await self._client.files.content(file_id, timeout=self.timeout)
        except openai.APIError as exc:
            raise self._classify(exc) from None
        return content.content

    def _classify(self, exc: openai.APIError) -> ProviderError:
        return classify_openai_error(exc, secret=self._secret, provider=self.provider)


def parse_line(item: Mapping[str, Any], *, provider: str = "openai") -> LineResult:
    """One line of an output or error file: `{custom_id, response: {status_code, body}, error}`."""
    custom_id = str(item.get("custom_id"))
    response = item.get("response")
    error = item.get("error")
    if not isinstance(response, Mapping):
        code = error.get("code") if isinstance(error, Mapping) else None
        message = error.get("message") if isinstance(error, Mapping) else None
        text = f"batch line {code or 'error'}: {message or 'no response'}"
        if code in NEVER_RAN:
            return LineResult(custom_id, error=ProviderError(ErrorKind.TRANSIENT, text), never_ran=True)
        return LineResult(custom_id, error=ProviderError(ErrorKind.TRANSIENT, text))
    status = int(response.get("status_code") or 0)
    body = response.get("body")
    if status == 200 and isinstance(body, Mapping):
        return LineResult(custom_id, response=response_of(ChatCompletion.model_validate(body)))
    return LineResult(custom_id, error=line_error(status, body, provider=provider))


def line_error(status: int, body: Any, *, provider: str = "openai") -> ProviderError:
    """What a line answered with an error status means for its row, as for an online call:
    429 and 5xx are worth another try, other statuses are the request's own fault."""
    inner = body.get("error") if isinstance(body, Mapping) else None
    code = inner.get("code") if isinstance(inner, Mapping) else None
    message = inner.get("message") if isinstance(inner, Mapping) else None
    vendor = "Azure OpenAI" if provider == "azure" else "OpenAI"
    text = f"{vendor} batch line {status}{f' ({code})' if code else ''}: {message or 'error'}"
    if status == 429:
        return ProviderError(ErrorKind.RATE_LIMITED, text, status_code=status)
    if status in (408, 409) or status >= 500:
        return ProviderError(ErrorKind.TRANSIENT, text, status_code=status)
    return ProviderError(ErrorKind.PERMANENT, text, status_code=status)


def _remote(batch: Batch) -> RemoteBatch:
    errors = [e.model_dump() for e in (batch.errors.data or [])] if batch.errors else []
    counts = batch.request_counts
    return RemoteBatch(
        id=batch.id,
        status=batch.status,
        created_at=batch.created_at,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        errors=errors,
        metadata=dict(batch.metadata or {}),
        completed=counts.completed if counts else None,
        failed=counts.failed if counts else None,
    )
