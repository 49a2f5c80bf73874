"""Gemini Batch Mode through google-genai, in the terms workers/batch_driver.py drives every Batch API.

A chunk's rows go in a JSONL input file uploaded with the Files API (display name
``batchdb-<chunk uid>.jsonl``, so a file uploaded before is found again by name), one line per row:
``{"key": <custom_id>, "request": <GenerateContentRequest>}``, the request built by the same
conversion as an online call (`compat.to_gemini`). The batch is created with
``client.batches.create(model=..., src=<file>, config={display_name: batchdb-<uid>-<try>})``:
Gemini batches carry no metadata, so the display name is what a successor looks for. Results come
back as a responses file of ``{key, response}`` or ``{key, error}`` lines.

What Gemini documents (https://ai.google.dev/gemini-api/docs/batch-mode): input files up to 2 GB
(inlined requests up to 20 MB, not used here); job states PENDING, RUNNING, SUCCEEDED, FAILED,
CANCELLED, EXPIRED (a job pending or running for 48 hours expires and has no results); past the
batch enqueued-token quota the create call answers 429 RESOURCE_EXHAUSTED, which is `QueueFull`
here: the driver waits and creates the batch again. Gemini publishes no per-file request count;
chunks are cut at 50,000 rows like OpenAI's.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google import genai
from google.genai import errors, types

from batchdb.providers.base import ChatRequest, ErrorKind, ProviderError
from batchdb.providers.batch_api import LineResult, QueueFull, RemoteBatch
from batchdb.providers.compat import to_gemini
from batchdb.providers.gemini import classify_gemini_error, normalise_response

MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 2 * 1024**3
_STATES = {
    "JOB_STATE_QUEUED": "validating",
    "JOB_STATE_PENDING": "validating",
    "JOB_STATE_RUNNING": "in_progress",
    "JOB_STATE_PAUSED": "in_progress",
    "JOB_STATE_UPDATING": "in_progress",
    "JOB_STATE_CANCELLING": "cancelling",
    "JOB_STATE_SUCCEEDED": "completed",
    "JOB_STATE_PARTIALLY_SUCCEEDED": "completed",
    "JOB_STATE_FAILED": "failed",
    "JOB_STATE_CANCELLED": "cancelled",
    "JOB_STATE_EXPIRED": "expired",
}


class GeminiBatchAPI:
    """Gemini Batch Mode on a `genai.Client` (its async side)."""

    provider = "gemini"

    def __init__(self, client: genai.Client, *, secret: str | None = None, timeout: float = 60.0) -> None:
        self._client = client
        self._secret = secret
        self.timeout = timeout
        self.max_requests = MAX_REQUESTS
        self.max_file_bytes = MAX_FILE_BYTES
        self._options = types.HttpOptions(timeout=int(timeout * 1000))

    # -- the input file --------------------------------------------------------------------------

    def line(self, custom_id: str, request: ChatRequest) -> bytes:
        """One line of the input file (raises `UnsupportedRequest` as the online path would)."""
        call = to_gemini(request)
        config = dict(call.config)
        body: dict[str, Any] = {"contents": call.contents}
        system = config.pop("system_instruction", None)
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        if config:
            body["generationConfig"] = {_camel(name): value for name, value in config.items()}
        item = {"key": custom_id, "request": body}
        return (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    async def find_file(self, filename: str, *, created_after: float) -> str | None:
        """An input file with this display name uploaded after `created_after` (files live 48 hours)."""
        try:
            async for item in await self._client.aio.files.list(config={"page_size": 100}):
                if item.display_name == filename and _unix(item.create_time) >= created_after:
                    return item.name
        except errors.APIError as exc:
            raise self._classify(exc) from None
        return None

    async def upload(self, filename: str, data: bytes) -> str:
        try:
            uploaded = await self._client.aio.files.upload(
                file=io.BytesIO(data),
                config=types.UploadFileConfig(display_name=filename, mime_type="jsonl", http_options=self._options),
            )
        except errors.APIError as exc:
            raise self._classify(exc) from None
        if not uploaded.name:
            raise ProviderError(ErrorKind.TRANSIENT, "Gemini Files API returned a file without a name")
        return uploaded.name

    # -- the batch ----------------------------------------------------------------------------

    async def find_batch(self, metadata: Mapping[str, str], *, created_after: float) -> RemoteBatch | None:
        """The batch whose display name is the one `create` gives these metadata, created after
        `created_after`; batches are listed newest first, so the search stops at an older one."""
        wanted = display_name(metadata)
        try:
            async for job in await self._client.aio.batches.list(config={"page_size": 100}):
                if _unix(job.create_time) < created_after:
                    return None
                if job.display_name == wanted:
                    return _remote(job)
        except errors.APIError as exc:
            raise self._classify(exc) from None
        return None

    async def create(self, input_file_id: str, metadata: Mapping[str, str], *, model: str) -> RemoteBatch:
        try:
            job = await self._client.aio.batches.create(
                model=model,
                src=input_file_id,
                config=types.CreateBatchJobConfig(display_name=display_name(metadata), http_options=self._options),
            )
        except errors.APIError as exc:
            error = self._classify(exc)
            if exc.code == 429:
                # The batch enqueued-token quota: no batch was made; the chunk waits for room.
                raise QueueFull(error.message) from None
            raise error from None
        return _remote(job)

    async def retrieve(self, batch_id: str) -> RemoteBatch:
        try:
            return _remote(await self._client.aio.batches.get(name=batch_id))
        except errors.APIError as exc:
            raise self._classify(exc) from None

    async def cancel(self, batch_id: str) -> RemoteBatch | None:
        """Ask Gemini to cancel; None when the batch had already ended."""
        try:
            await self._client.aio.batches.cancel(name=batch_id)
        except errors.APIError as exc:
            if exc.code in (400, 409):
                return None
            raise self._classify(exc) from None
        return await self.retrieve(batch_id)

    async def results(self, batch: RemoteBatch) -> dict[str, LineResult]:
        """Every line of the responses file, by key (an expired or cancelled batch has none)."""
        if not batch.output_file_id:
            return {}
        try:
            data = await self._client.aio.files.download(file=batch.output_file_id)
        except errors.APIError as exc:
            raise self._classify(exc) from None
        found: dict[str, LineResult] = {}
        for raw in data.splitlines():
            if raw.strip():
                result = parse_line(json.loads(raw), model=batch.model or "")
                found[result.custom_id] = result
        return found

    async def delete_file(self, file_id: str) -> None:
        try:
            await self._client.aio.files.delete(name=file_id)
        except errors.APIError:
            pass

    def _classify(self, exc: errors.APIError) -> ProviderError:
        return classify_gemini_error(exc, secret=self._secret)


def display_name(metadata: Mapping[str, str]) -> str:
    """The batch's display name: the chunk and the try, as OpenAI's batches carry them in metadata."""
    return f"batchdb-{metadata['batchdb_chunk']}-{metadata['batchdb_try']}"


def parse_line(item: Mapping[str, Any], *, model: str = "") -> LineResult:
    """One line of a responses file: ``{key, response}`` or ``{key, error: {code, message, status}}``."""
    key = str(item.get("key"))
    response = item.get("response")
    if isinstance(response, Mapping):
        try:
            parsed = types.GenerateContentResponse.model_validate(response)
            return LineResult(key, response=normalise_response(parsed, model=model))
        except ProviderError as exc:  # a blocked prompt or answer
            return LineResult(key, error=exc)
    error = item.get("error") if isinstance(item.get("error"), Mapping) else {}
    assert isinstance(error, Mapping)
    code = int(error.get("code") or 0)
    text = f"Gemini batch line {code} {error.get('status') or ''}: {error.get('message') or 'error'}".replace("  ", " ")
    if code == 429:
        return LineResult(key, error=ProviderError(ErrorKind.RATE_LIMITED, text, status_code=code))
    if code in (408, 409, 499) or code >= 500 or code == 0:
        return LineResult(key, error=ProviderError(ErrorKind.TRANSIENT, text, status_code=code))
    return LineResult(key, error=ProviderError(ErrorKind.PERMANENT, text, status_code=code))


def _remote(job: types.BatchJob) -> RemoteBatch:
    state = getattr(job.state, "name", None) or str(job.state or "")
    errors_: list[dict[str, Any]] = []
    if job.error is not None:
        errors_.append({"code": str(job.error.code or "error"), "message": job.error.message or ""})
    return RemoteBatch(
        id=job.name or "",
        status=_STATES.get(state, "in_progress"),
        created_at=int(_unix(job.create_time)),
        output_file_id=job.dest.file_name if job.dest is not None else None,
        errors=errors_,
        model=(job.model or "").removeprefix("models/"),
    )


def _unix(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)
