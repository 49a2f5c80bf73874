"""The providers' Batch APIs: uploaded files, batches and their life, in compressed time.

What the providers document, and the figures used here (each overridable in `SimulatorConfig`):

OpenAI Batch API (https://platform.openai.com/docs/guides/batch, the API reference as shipped in
the openai SDK's ``batches.create`` / ``files.create`` docstrings):

- An input file is JSONL, uploaded with purpose ``batch``; each line is ``{custom_id, method:
  "POST", url, body}``; ``custom_id`` is unique in the file; "each input file can only include
  requests to a single model". "The file can contain up to 50,000 requests, and can be up to
  200 MB in size" (older pages said 100 MB; the current reference says 200 MB, and the error
  OpenAI answers names 209,715,200 bytes). Only ``completion_window="24h"`` exists.
- Status: ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``; or ``failed``
  (the input file failed validation: ``errors.data[]`` of ``{code, message, line, param}``),
  ``expired`` (not done in the window: "unfinished requests within that batch are cancelled, and
  any responses to completed requests are made available via the batch's output file"; each
  unfinished line is in the error file as ``{"error": {"code": "batch_expired", "message": "This
  request could not be executed before the completion window expired."}}``), ``cancelling`` ->
  ``cancelled`` ("until in-flight requests are complete").
- Output file: one line per succeeded request, ``{id, custom_id, response: {status_code: 200,
  request_id, body}, error: null}``; error file: requests that failed, with the HTTP status and
  error body they got (``response: {status_code: 400, body: {error: {...}}}``), or ``response:
  null, error: {code, message}`` for lines that never ran (``batch_expired``, ``batch_cancelled``).
- Rate limits: a pool apart from the online limits ("using the Batch API will not consume tokens
  from your standard per-model rate limits"); per model, a maximum of enqueued prompt tokens.
  Past it the batch fails validation with ``token_limit_exceeded`` / "Enqueued token limit
  reached for {model} in organization {org}. Limit: {n} enqueued tokens. Please try again once
  some in_progress batches have been completed." (error text as reported in openai-python
  issue 2084); the tokens are freed when a batch ends.
- Validation codes (as reported by users and clones of the API: ``invalid_json_line``,
  ``duplicate_custom_id``, ``url_mismatch``, ``model_mismatch``, ``empty_file``,
  ``too_many_tasks``). Their exact messages, and the codes for a missing field or an oversized
  file, are not published: the ones here are close paraphrases.

Azure OpenAI Global Batch (learn.microsoft.com .../openai/how-to/batch, quotas-limits): the same
objects under ``/openai/files`` and ``/openai/batches`` (``?api-version=``), the deployment name as
the ``model`` of every line; "Max requests per file 100,000", "Max input file size 200 MB";
quota in enqueued tokens per deployment, refused as ``token_limit_exceeded`` / "The number of
enqueued tokens has surpassed the configured limit of 30K for the deployment '...'. Please either
increase the limit or try again once the current jobs have finished."; and "we do not expire the
jobs that take longer" than 24 hours, so Azure batches here never expire.

Gemini Batch Mode (https://ai.google.dev/gemini-api/docs/batch-api, google-genai's batches.py):
``POST models/{model}:batchGenerateContent`` with ``{"batch": {"displayName", "inputConfig":
{"requests": {"requests": [{"request", "metadata"}]}} | {"fileName": "files/..."}}}`` returns the
batch as a long-running operation ``{name: "batches/...", metadata: {state, batchStats, output,
...}, done, response}``. Inlined requests suit batches under 20 MB; an input file (JSONL of
``{"key", "request"}``, uploaded with the Files API) may be 2 GB. States BATCH_STATE_PENDING /
RUNNING / SUCCEEDED / FAILED / CANCELLED / EXPIRED (the SDK reads them as JOB_STATE_*); a job
"running or pending for more than 48 hours" expires and "will not have any results to
retrieve". Results: ``output.inlinedResponses.inlinedResponses`` (in input order, each a
GenerateContentResponse or an error, with the request's metadata) or ``output.responsesFile``.

Time. A batch's whole life is decided when it is created, on the simulator clock: it validates for
``batch_validation_s``, then its lines finish evenly spread over a ``batch_duration_s`` sample, in
file order; then it finalizes for ``batch_finalizing_s``. The window (``batch_window_s``, OpenAI's
24 h and Gemini's 48 h compressed) cuts that short: lines due after it expire. A cancel stops it
``batch_cancelling_s`` later (Gemini: at once); lines due before then still finish. Answers are
produced lazily, when anything reads the batch (or ``/_sim/stats``), but each line is answered as
of its due time, in file order, so what a batch contains never depends on when or how often it is
polled (a background task in the server answers due lines in slices, so a read seldom has much
left to do). Which lines fail (``batch_error_rate``) and which JSON answers come back broken is drawn
when the batch is created, from the simulator's own batch stream. Prompt caching works within a
batch (a line repeating an earlier line's prefix reports cached tokens), not across batches or with
online traffic, so that a batch's answers depend on nothing but the batch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from batchdb.simulator import answers, content, responses
from batchdb.simulator.responses import Reply
from batchdb.tokens import count_gemini_contents, count_openai_messages

if TYPE_CHECKING:
    from batchdb.simulator.state import Simulator

T = TypeVar("T")

OPENAI = "openai"
AZURE = "azure"
GEMINI = "gemini"

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
# Published per-file limits (see the module docstring).
OPENAI_MAX_REQUESTS = 50_000
AZURE_MAX_REQUESTS = 100_000
OPENAI_MAX_FILE_BYTES = 200 * 1024 * 1024  # 209,715,200: the figure OpenAI's error message names
GEMINI_MAX_FILE_BYTES = 2 * 1024**3
FILE_RETENTION_S = 30 * 24 * 3600  # "files with purpose=batch expire after 30 days"
OPENAI_FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512

_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
_CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
_GEMINI_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_GEMINI_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
_GEMINI_STATES = {
    "validating": "BATCH_STATE_PENDING",
    "in_progress": "BATCH_STATE_RUNNING",
    "finalizing": "BATCH_STATE_RUNNING",
    "cancelling": "BATCH_STATE_RUNNING",
    "completed": "BATCH_STATE_SUCCEEDED",
    "failed": "BATCH_STATE_FAILED",
    "cancelled": "BATCH_STATE_CANCELLED",
    "expired": "BATCH_STATE_EXPIRED",
}
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


# -- Stored objects ---------------------------------------------------------------------------


@dataclass(slots=True)
class StoredFile:
    """An uploaded (or generated) file; ``id`` is ``file-...`` (OpenAI, Azure) or ``files/...`` (Gemini)."""

    id: str
    provider: str
    key: str
    filename: str
    purpose: str
    data: bytes
    created_at: float  # unix time
    mime_type: str = "application/jsonl"
    display_name: str | None = None
    generated: bool = False  # a batch's output, not an upload

    def openai_object(self) -> dict[str, Any]:
        created = int(self.created_at)
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": created,
            "expires_at": created + FILE_RETENTION_S if self.purpose.startswith("batch") else None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }

    def gemini_object(self, base_url: str) -> dict[str, Any]:
        """A google.ai.generativelanguage File (sizes are int64, so strings, as proto JSON has them)."""
        stamp = _rfc3339(self.created_at)
        entry: dict[str, Any] = {
            "name": self.id,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": stamp,
            "updateTime": stamp,
            "expirationTime": _rfc3339(self.created_at + 48 * 3600),
            "sha256Hash": base64.b64encode(hashlib.sha256(self.data).hexdigest().encode()).decode(),
            "uri": f"{base_url}/v1beta/{self.id}",
            "state": "ACTIVE",
            "source": "GENERATED" if self.generated else "UPLOADED",
        }
        if self.display_name:
            entry["displayName"] = self.display_name
        if self.generated:
            entry["downloadUri"] = f"{base_url}/v1beta/{self.id}:download?alt=media"
        return entry


@dataclass(slots=True)
class LineResult:
    """How one line was answered."""

    line_id: str  # batch_req_...
    request_id: str
    status: int  # HTTP status the request got: 200, 400, 500
    body: dict[str, Any]  # the response body, or the error body {"error": {...}}
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(slots=True)
class Line:
    """One request of a batch."""

    index: int
    custom_id: str | None  # OpenAI custom_id, Gemini file line "key"
    metadata: Any  # Gemini inlined request metadata, echoed back
    body: Any  # the request: a chat body (OpenAI) or a GenerateContentRequest (Gemini)
    prompt_tokens: int
    due: float = 0.0  # simulator time it is answered at
    fail: bool = False  # answered with an injected server error
    broken: bool = False  # a JSON answer comes back broken
    result: LineResult | None = None


@dataclass(slots=True)
class Batch:
    id: str  # batch_... (OpenAI, Azure) or batches/... (Gemini)
    provider: str
    key: str
    model: str
    created: float  # simulator clock
    lines: list[Line]
    errors: list[dict[str, Any]]  # validation errors: the batch fails
    validated_at: float
    finish_at: float  # the last line is due
    finalized_at: float
    expires_at: float
    expires: bool  # Azure batches never expire
    enqueued_tokens: int
    endpoint: str = CHAT_ENDPOINT
    input_file_id: str | None = None
    metadata: Any = None
    display_name: str | None = None
    inline: bool = False  # Gemini inlined requests (results inline) rather than a file
    cancel_at: float | None = None
    cancel_end: float | None = None
    done: int = 0  # lines answered so far (a prefix of ``lines``)
    ended: bool = False
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("ok", "failed", "prompt", "completion", "cached"), 0)
    )

    def end(self) -> tuple[str, float, float]:
        """(terminal status, when, cutoff): lines due at or before the cutoff are answered."""
        if self.errors:
            return "failed", self.validated_at, -math.inf
        if self.expires and self.finish_at > self.expires_at:
            kind, at, cutoff = "expired", self.expires_at, self.expires_at
        else:
            kind, at, cutoff = "completed", self.finalized_at, self.finish_at
        if self.cancel_at is not None and self.cancel_end is not None and self.cancel_end < at:
            kind, at = "cancelled", self.cancel_end
            cutoff = min(cutoff, self.cancel_end) if self.cancel_at >= self.validated_at else -math.inf
        return kind, at, cutoff

    def status(self, now: float) -> str:
        kind, at, _ = self.end()
        if now >= at:
            return kind
        if self.cancel_at is not None and now >= self.cancel_at:
            return "cancelling"
        if now < self.validated_at or self.errors:
            return "validating"
        return "in_progress" if now < self.finish_at else "finalizing"

    def active(self, now: float) -> bool:
        """Holding enqueued tokens: not failed validation and not ended."""
        return not self.errors and now < self.end()[1]


# -- The store --------------------------------------------------------------------------------


class BatchStore:
    """Files and batches of one simulator run, for every provider; each key sees its own."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}  # creation order
        self.uploads: dict[str, Any] = {}  # Gemini resumable uploads under way (batch_routes._Upload)
        self.rng = random.Random(content.seed_for("batches", sim.config.seed))

    # Time -----------------------------------------------------------------------------------

    def unix(self, t: float) -> float:
        """Simulator clock -> unix time."""
        return self.sim.started_at + (t - self.sim.start)

    # Files ----------------------------------------------------------------------------------

    def add_file(
        self,
        provider: str,
        key: str,
        *,
        filename: str,
        purpose: str,
        data: bytes,
        mime_type: str = "application/jsonl",
        display_name: str | None = None,
        generated: bool = False,
        at: float | None = None,
    ) -> StoredFile:
        if provider == GEMINI:
            file_id = f"files/{self.sim.next_id('batch-' if generated else '').lower()}"
        else:
            file_id = self.sim.next_id("file-")
        stored = StoredFile(
            id=file_id,
            provider=provider,
            key=key,
            filename=filename,
            purpose=purpose,
            data=data,
            created_at=self.unix(self.sim.now() if at is None else at),
            mime_type=mime_type,
            display_name=display_name,
            generated=generated,
        )
        self.files[file_id] = stored
        return stored

    def file(self, provider: str, key: str, file_id: str) -> StoredFile | None:
        stored = self.files.get(file_id)
        if stored is None or stored.provider != provider or stored.key != key:
            return None
        return stored

    def delete_file(self, provider: str, key: str, file_id: str) -> bool:
        if self.file(provider, key, file_id) is None:
            return False
        del self.files[file_id]
        return True

    def list_files(self, provider: str, key: str, purpose: str | None = None) -> list[StoredFile]:
        """Newest first."""
        found = [f for f in self.files.values() if f.provider == provider and f.key == key]
        return [f for f in reversed(found) if purpose is None or f.purpose == purpose]

    # Batches --------------------------------------------------------------------------------

    def batch(self, provider: str, key: str, batch_id: str) -> Batch | None:
        """The batch, brought up to now."""
        batch = self.batches.get(batch_id)
        if batch is None or batch.provider != provider or batch.key != key:
            return None
        self.advance(batch, self.sim.now())
        return batch

    def list_batches(self, provider: str, key: str) -> list[Batch]:
        """Newest first, each brought up to now."""
        now = self.sim.now()
        found = [b for b in self.batches.values() if b.provider == provider and b.key == key]
        for batch in found:
            self.advance(batch, now)
        return found[::-1]

    def delete_batch(self, provider: str, key: str, batch_id: str) -> bool:
        if self.batch(provider, key, batch_id) is None:
            return False
        del self.batches[batch_id]
        return True

    def advance_all(self, now: float, budget: int | None = None) -> int:
        """Bring every batch up to ``now``, answering at most ``budget`` lines (None: all);
        returns how many were answered."""
        used = 0
        for batch in list(self.batches.values()):
            used += self.advance(batch, now, None if budget is None else budget - used)
            if budget is not None and used >= budget:
                break
        return used

    def enqueued_tokens(self, provider: str, key: str, model: str, now: float) -> int:
        return sum(
            b.enqueued_tokens
            for b in self.batches.values()
            if b.provider == provider and b.key == key and b.model == model and b.active(now)
        )

    def cancel(self, batch: Batch, now: float) -> bool:
        """Start cancelling; False if the batch already completed, failed or expired. Cancelling a
        batch that is cancelling or cancelled changes nothing (and succeeds)."""
        self.advance(batch, now)
        if batch.cancel_at is not None:
            return True
        if batch.status(now) in TERMINAL:
            return False
        batch.cancel_at = now
        batch.cancel_end = now if batch.provider == GEMINI else now + self.sim.config.batch_cancelling_s
        return True

    def _schedule(self, batch_id: str, provider: str, key: str, model: str, lines: list[Line], now: float) -> Batch:
        """A new batch whose timeline starts now; lines get their due times and fault draws."""
        config = self.sim.config
        validated_at = now + config.batch_validation_s
        duration = config.batch_duration_s.sample(self.rng)
        n = max(1, len(lines))
        for line in lines:
            line.due = validated_at + duration * (line.index + 1) / n
            line.fail = config.batch_error_rate > 0 and self.rng.random() < config.batch_error_rate
            line.broken = config.invalid_json_rate > 0 and self.rng.random() < config.invalid_json_rate
        finish_at = validated_at + duration
        return Batch(
            id=batch_id,
            provider=provider,
            key=key,
            model=model,
            created=now,
            lines=lines,
            errors=[],
            validated_at=validated_at,
            finish_at=finish_at,
            finalized_at=finish_at + (config.batch_finalizing_s if provider != GEMINI else 0.0),
            expires_at=now + config.batch_window_s,
            expires=provider != AZURE,
            enqueued_tokens=sum(line.prompt_tokens for line in lines),
        )

    # Progress ---------------------------------------------------------------------------------

    def advance(self, batch: Batch, now: float, budget: int | None = None) -> int:
        """Answer the lines due by ``now`` (each as of its due time), at most ``budget`` of them
        (None: all); once every line is settled and the batch's end has come, write its results.
        Returns how many lines were answered. The result never depends on how the work is split."""
        if batch.ended:
            return 0
        _, at, cutoff = batch.end()
        limit = min(now, cutoff)
        lines = batch.lines
        used = 0
        while batch.done < len(lines) and lines[batch.done].due <= limit:
            if budget is not None and used >= budget:
                return used
            self._answer(batch, lines[batch.done])
            batch.done += 1
            used += 1
        if now >= at:
            batch.ended = True
            self._finish(batch, batch.status(at), at)
        return used

    def _answer(self, batch: Batch, line: Line) -> None:
        sim = self.sim
        result = self._answer_gemini(batch, line) if batch.provider == GEMINI else self._answer_openai(batch, line)
        line.result = result
        counts = batch.counts
        if result.ok:
            counts["ok"] += 1
            counts["prompt"] += result.prompt_tokens
            counts["completion"] += result.completion_tokens
            counts["cached"] += result.cached_tokens
        else:
            counts["failed"] += 1
        sim.recorder.record_batch_line(
            sim.limiter.second(line.due),
            batch.key,
            batch.model,
            ok=result.ok,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cached_tokens=result.cached_tokens,
        )

    def _answer_openai(self, batch: Batch, line: Line) -> LineResult:
        sim = self.sim
        line_id, request_id = sim.next_id("batch_req_"), sim.next_id("req_")
        if line.fail:
            reply = responses.openai_server_error(500)
            return LineResult(line_id, request_id, reply.status, reply.body)
        plan = answers.check_openai_chat(sim, line.body, batch.model)
        if isinstance(plan, Reply):
            return LineResult(line_id, request_id, plan.status, plan.body)
        answer = answers.answer_openai_chat(
            sim,
            plan,
            model=batch.model,
            cache_scope=(f"{batch.provider}-batch:{batch.id}", batch.key, batch.model),
            draw_broken=lambda: line.broken,
            response_id=sim.next_id("chatcmpl-"),
            now=line.due,
        )
        answer.body["created"] = int(self.unix(line.due))
        return LineResult(
            line_id, request_id, 200, answer.body, answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens
        )

    def _answer_gemini(self, batch: Batch, line: Line) -> LineResult:
        sim = self.sim
        line_id = request_id = sim.next_id("sim-")
        if line.fail:
            reply = responses.gemini_server_error(500)
            return LineResult(line_id, request_id, reply.status, reply.body)
        if not isinstance(line.body, dict):
            reply = responses.gemini_error(
                400, "Invalid JSON payload received. The line is not a GenerateContentRequest."
            )
            return LineResult(line_id, request_id, reply.status, reply.body)
        plan = answers.check_gemini_generate(sim, line.body, batch.model)
        if isinstance(plan, Reply):
            return LineResult(line_id, request_id, plan.status, plan.body)
        answer = answers.answer_gemini_generate(
            sim,
            plan,
            model=batch.model,
            cache_scope=(f"gemini-batch:{batch.id}", batch.key, batch.model),
            draw_broken=lambda: line.broken,
            response_id=request_id,
            now=line.due,
        )
        return LineResult(
            line_id, request_id, 200, answer.body, answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens
        )

    def _finish(self, batch: Batch, kind: str, at: float) -> None:
        """Write the output and error files of an ended batch (Gemini: only of a succeeded one)."""
        if kind == "failed":
            return
        if batch.provider == GEMINI:
            if kind == "completed" and not batch.inline:
                data = "".join(json.dumps(_gemini_file_line(line), ensure_ascii=False) + "\n" for line in batch.lines)
                name = f"batch-{batch.id.split('/')[-1]}-output.jsonl"
                stored = self.add_file(
                    GEMINI, batch.key, filename=name, purpose="", data=data.encode(), generated=True, at=at
                )
                batch.output_file_id = stored.id
            return
        output: list[str] = []
        errors: list[str] = []
        never_ran = {
            "expired": ("batch_expired", _EXPIRED_MESSAGE),
            "cancelled": ("batch_cancelled", _CANCELLED_MESSAGE),
        }
        for line in batch.lines:
            result = line.result
            if result is None:
                code, message = never_ran.get(kind, ("batch_cancelled", _CANCELLED_MESSAGE))
                entry: dict[str, Any] = {
                    "id": self.sim.next_id("batch_req_"),
                    "custom_id": line.custom_id,
                    "response": None,
                    "error": {"code": code, "message": message},
                }
                errors.append(json.dumps(entry, ensure_ascii=False))
                continue
            entry = {
                "id": result.line_id,
                "custom_id": line.custom_id,
                "response": {"status_code": result.status, "request_id": result.request_id, "body": result.body},
                "error": None,
            }
            (output if result.ok else errors).append(json.dumps(entry, ensure_ascii=False))
        for lines, attr, suffix in ((output, "output_file_id", "output"), (errors, "error_file_id", "error")):
            if lines:
                stored = self.add_file(
                    batch.provider,
                    batch.key,
                    filename=f"{batch.id}_{suffix}.jsonl",
                    purpose="batch_output",
                    data=("\n".join(lines) + "\n").encode(),
                    generated=True,
                    at=at,
                )
                setattr(batch, attr, stored.id)

    # OpenAI / Azure ---------------------------------------------------------------------------

    def create_openai(
        self,
        provider: str,
        key: str,
        *,
        input_file_id: Any,
        endpoint: Any,
        completion_window: Any,
        metadata: Any,
    ) -> Batch | Reply:
        """``POST /v1/batches``: a 4xx for a bad request, else a batch (which may fail validation)."""
        if not isinstance(input_file_id, str) or not input_file_id:
            return responses.openai_bad_request("Missing required parameter: 'input_file_id'.", "input_file_id")
        if endpoint != CHAT_ENDPOINT:
            return responses.openai_bad_request(
                f"Invalid value for 'endpoint': {endpoint!r}. The simulator supports '{CHAT_ENDPOINT}' only.",
                "endpoint",
            )
        if completion_window != COMPLETION_WINDOW:
            return responses.openai_bad_request(
                f"Invalid value: {completion_window!r}. Supported values are: '{COMPLETION_WINDOW}'.",
                "completion_window",
            )
        problem = _metadata_problem(metadata)
        if problem:
            return responses.openai_bad_request(problem, "metadata")
        stored = self.file(provider, key, input_file_id)
        if stored is None:
            return responses.openai_error(
                404, f"No such File object: {input_file_id}", type="invalid_request_error", param="input_file_id"
            )
        if stored.purpose != "batch":
            return responses.openai_bad_request(
                f"The input file {input_file_id} has purpose '{stored.purpose}'; batches need purpose 'batch'.",
                "input_file_id",
            )
        now = self.sim.now()
        lines, errors, model = self._parse_openai_file(provider, stored)
        batch = self._schedule(self.sim.next_id("batch_"), provider, key, model, lines if not errors else [], now)
        batch.input_file_id, batch.endpoint, batch.metadata = input_file_id, endpoint, metadata
        if not errors and model:
            limit = self.sim.config.batch_queue_limit(model)
            if limit is not None and self.enqueued_tokens(provider, key, model, now) + batch.enqueued_tokens > limit:
                errors = [_token_limit_error(provider, model, limit)]
        if errors:
            batch.errors, batch.lines, batch.enqueued_tokens = errors, [], 0
        self.batches[batch.id] = batch
        return batch

    def _parse_openai_file(self, provider: str, stored: StoredFile) -> tuple[list[Line], list[dict[str, Any]], str]:
        """The lines of an input file, the validation errors (capped at 100) and its model."""
        config = self.sim.config
        max_requests = config.batch_max_requests or (AZURE_MAX_REQUESTS if provider == AZURE else OPENAI_MAX_REQUESTS)
        max_bytes = config.batch_max_file_bytes or OPENAI_MAX_FILE_BYTES
        raw_lines = [raw for raw in stored.data.split(b"\n") if raw.strip()]
        first_model = _first_model(raw_lines)
        if len(stored.data) > max_bytes:
            message = (
                f"The batch input file is larger than the {max_bytes} maximum for the {first_model or 'requested'} "
                "model. Please try again with a smaller batch."
            )
            return [], [_batch_error("file_too_large", message)], first_model
        if not raw_lines:
            return (
                [],
                [_batch_error("empty_file", "The batch input file is empty. Please upload a file with requests.")],
                "",
            )
        if len(raw_lines) > max_requests:
            message = (
                f"The batch input file contains {len(raw_lines)} requests; a batch may include up to "
                f"{max_requests} requests. Please split it into smaller batches."
            )
            return [], [_batch_error("too_many_tasks", message)], first_model
        errors: list[dict[str, Any]] = []
        lines: list[Line] = []
        seen: set[str] = set()
        model = ""
        for number, raw in enumerate(raw_lines, start=1):
            problem = self._openai_line_problem(raw, number, seen, model)
            if isinstance(problem, dict):
                if len(errors) < 100:
                    errors.append(problem)
                continue
            custom_id, body = problem
            model = model or body["model"]
            prompt_tokens = 0
            messages = body.get("messages")
            if isinstance(messages, list):
                prompt_tokens, _ = count_openai_messages(messages, body.get("tools"))
            lines.append(Line(len(lines), custom_id, None, body, prompt_tokens))
        if not errors and config.models and model not in config.models:
            errors.append(
                _batch_error(
                    "model_not_found",
                    f"The model `{model}` does not exist or you do not have access to it.",
                    param="body.model",
                )
            )
        return lines, errors, model

    @staticmethod
    def _openai_line_problem(
        raw: bytes, number: int, seen: set[str], model: str
    ) -> dict[str, Any] | tuple[str, dict[str, Any]]:
        """A validation error for this line, or its (custom_id, body)."""
        try:
            item = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            item = None
        if not isinstance(item, dict):
            return _batch_error("invalid_json_line", "This line is not parseable as valid JSON.", line=number)
        for name in ("custom_id", "method", "url", "body"):
            if name not in item:
                return _batch_error(
                    "missing_required_parameter", f"Missing required parameter: '{name}'.", line=number, param=name
                )
        custom_id, body = item["custom_id"], item["body"]
        if not isinstance(custom_id, str) or not custom_id:
            return _batch_error(
                "invalid_custom_id", "custom_id must be a non-empty string.", line=number, param="custom_id"
            )
        if item["method"] != "POST":
            return _batch_error("invalid_method", "The only supported method is POST.", line=number, param="method")
        if item["url"] != CHAT_ENDPOINT:
            return _batch_error(
                "url_mismatch",
                f"The URL provided for this request does not match the batch endpoint {CHAT_ENDPOINT}.",
                line=number,
                param="url",
            )
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            return _batch_error(
                "missing_required_parameter",
                "Missing required parameter: 'body.model'.",
                line=number,
                param="body.model",
            )
        if model and body["model"] != model:
            return _batch_error(
                "model_mismatch",
                f"The provided model '{body['model']}' does not match the model '{model}' of the other requests "
                "in the file. Each input file can only include requests to a single model.",
                line=number,
                param="body.model",
            )
        if custom_id in seen:
            return _batch_error(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. The custom_id parameter must "
                "be unique for each request in a batch.",
                line=number,
                param="custom_id",
            )
        seen.add(custom_id)
        return custom_id, body

    def openai_object(self, batch: Batch) -> dict[str, Any]:
        """The Batch object as GET /v1/batches/{id} answers it now."""
        now = self.sim.now()
        self.advance(batch, now)
        status = batch.status(now)
        kind, at, _ = batch.end()
        ended = now >= at
        unix = self.unix

        def stamp(t: float | None, reached: bool = True) -> int | None:
            return int(unix(t)) if t is not None and reached and t <= now else None

        running = status not in ("validating", "failed") and not (
            batch.cancel_at is not None and batch.cancel_at < batch.validated_at
        )
        total = len(batch.lines) if running else 0
        failed = batch.counts["failed"] + (len(batch.lines) - batch.done if ended else 0)
        usage = None
        if running:
            usage = {
                "input_tokens": batch.counts["prompt"],
                "input_tokens_details": {"cached_tokens": batch.counts["cached"]},
                "output_tokens": batch.counts["completion"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": batch.counts["prompt"] + batch.counts["completion"],
            }
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": batch.model or None,
            "errors": {"object": "list", "data": batch.errors} if batch.errors and ended else None,
            "input_file_id": batch.input_file_id,
            "completion_window": COMPLETION_WINDOW,
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(unix(batch.created)),
            "in_progress_at": stamp(batch.validated_at, running),
            "expires_at": int(unix(batch.expires_at)),
            "finalizing_at": stamp(
                batch.finish_at, kind == "completed" and not batch.errors and batch.provider != GEMINI
            ),
            "completed_at": stamp(at, kind == "completed"),
            "failed_at": stamp(at, kind == "failed"),
            "expired_at": stamp(at, kind == "expired"),
            "cancelling_at": stamp(batch.cancel_at),
            "cancelled_at": stamp(at, kind == "cancelled"),
            "request_counts": {"total": total, "completed": batch.counts["ok"], "failed": failed if running else 0},
            "usage": usage,
            "metadata": batch.metadata,
        }

    # Gemini -----------------------------------------------------------------------------------

    def create_gemini(self, key: str, model: str, batch_body: Any, raw_size: int) -> Batch | Reply:
        """``POST models/{model}:batchGenerateContent``: a 4xx, or the new batch."""
        config = self.sim.config
        if raw_size > config.batch_max_inline_bytes:
            return responses.gemini_error(
                400, f"Request payload size exceeds the limit: {config.batch_max_inline_bytes} bytes."
            )
        if not isinstance(batch_body, dict):
            return responses.gemini_error(400, "* BatchGenerateContentRequest.batch: batch is required")
        input_config = batch_body.get("inputConfig") or batch_body.get("input_config")
        if not isinstance(input_config, dict):
            return responses.gemini_error(400, "* GenerateContentBatch.input_config: input_config is required")
        file_name = input_config.get("fileName") or input_config.get("file_name")
        requests = input_config.get("requests")
        lines: list[Line] = []
        inline = file_name is None
        if inline:
            items = requests.get("requests") if isinstance(requests, dict) else None
            if not isinstance(items, list) or not items:
                return responses.gemini_error(400, "* InputConfig.requests: requests must not be empty")
            for index, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
                    return responses.gemini_error(
                        400, f"* InlinedRequests.requests[{index}].request: request is required"
                    )
                lines.append(_gemini_line(index, None, item.get("metadata"), item["request"]))
        else:
            stored = self.file(GEMINI, key, str(file_name))
            if stored is None:
                return responses.gemini_error(404, f"Requested entity was not found: {file_name}")
            max_bytes = config.batch_max_file_bytes or GEMINI_MAX_FILE_BYTES
            if len(stored.data) > max_bytes:
                return responses.gemini_error(
                    400, f"The input file {file_name} is larger than the maximum of {max_bytes} bytes."
                )
            for raw in stored.data.split(b"\n"):
                if raw.strip():
                    lines.append(_gemini_file_request(len(lines), raw))
            if not lines:
                return responses.gemini_error(400, f"The input file {file_name} contains no requests.")
        if config.batch_max_requests is not None and len(lines) > config.batch_max_requests:
            return responses.gemini_error(
                400, f"A batch may include up to {config.batch_max_requests} requests; got {len(lines)}."
            )
        now = self.sim.now()
        batch = self._schedule(f"batches/{self.sim.next_id('').lower()}", GEMINI, key, model, lines, now)
        limit = config.batch_queue_limit(model)
        if limit is not None and self.enqueued_tokens(GEMINI, key, model, now) + batch.enqueued_tokens > limit:
            return responses.gemini_batch_quota_exceeded()
        display_name = batch_body.get("displayName") or batch_body.get("display_name")
        batch.display_name = display_name if isinstance(display_name, str) else None
        batch.inline = inline
        batch.input_file_id = None if inline else str(file_name)
        self.batches[batch.id] = batch
        return batch

    def gemini_object(self, batch: Batch) -> dict[str, Any]:
        """The batch as a long-running operation, as GET batches/{id} answers it now."""
        now = self.sim.now()
        self.advance(batch, now)
        status = batch.status(now)
        kind, at, _ = batch.end()
        ended = now >= at
        n = len(batch.lines)
        stats: dict[str, str] = {"requestCount": str(n)}
        for name, value in (
            ("successfulRequestCount", batch.counts["ok"]),
            ("failedRequestCount", batch.counts["failed"]),
            ("pendingRequestCount", n - batch.done if not ended else 0),
        ):
            if value:  # proto3 JSON leaves out zero int64 fields
                stats[name] = str(value)
        events = [batch.created, batch.validated_at, batch.cancel_at, at]
        updated = max(t for t in events if t is not None and t <= now)
        metadata: dict[str, Any] = {
            "@type": _GEMINI_BATCH_TYPE,
            "model": f"models/{batch.model}",
            "displayName": batch.display_name or "",
            "createTime": _rfc3339(self.unix(batch.created)),
            "updateTime": _rfc3339(self.unix(updated)),
            "batchStats": stats,
            "state": _GEMINI_STATES[status],
            "name": batch.id,
        }
        operation: dict[str, Any] = {"name": batch.id, "metadata": metadata}
        if ended:
            metadata["endTime"] = _rfc3339(self.unix(at))
            operation["done"] = True
            if kind == "completed":
                if batch.inline:
                    output: dict[str, Any] = {
                        "inlinedResponses": {
                            "inlinedResponses": [_gemini_inline_response(line) for line in batch.lines]
                        }
                    }
                else:
                    output = {"responsesFile": batch.output_file_id}
                metadata["output"] = output
                operation["response"] = {"@type": _GEMINI_OUTPUT_TYPE, **output}
        return operation


# -- Helpers ----------------------------------------------------------------------------------


def _rfc3339(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _batch_error(code: str, message: str, *, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _human_tokens(n: int) -> str:
    """30000 -> "30K", 200000000 -> "200M", as Azure writes quotas."""
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "K")):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def _token_limit_error(provider: str, model: str, limit: int) -> dict[str, Any]:
    if provider == AZURE:
        message = (
            f"The number of enqueued tokens has surpassed the configured limit of {_human_tokens(limit)} for the "
            f"deployment '{model}'. Please either increase the limit or try again once the current jobs have finished."
        )
    else:
        message = (
            f"Enqueued token limit reached for {model} in organization org-simulator. Limit: {limit:,} enqueued "
            "tokens. Please try again once some in_progress batches have been completed."
        )
    return _batch_error("token_limit_exceeded", message)


def _metadata_problem(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "Invalid type for 'metadata': expected an object."
    if len(metadata) > METADATA_MAX_PAIRS:
        return f"Invalid 'metadata': too many properties. Expected at most {METADATA_MAX_PAIRS}, got {len(metadata)}."
    for name, value in metadata.items():
        if not isinstance(value, str):
            return f"Invalid type for 'metadata.{name}': expected a string."
        if len(name) > METADATA_MAX_KEY:
            return f"Invalid 'metadata': keys may be at most {METADATA_MAX_KEY} characters."
        if len(value) > METADATA_MAX_VALUE:
            return f"Invalid 'metadata.{name}': string too long. Expected at most {METADATA_MAX_VALUE} characters."
    return None


def _first_model(raw_lines: Iterable[bytes]) -> str:
    for raw in raw_lines:
        try:
            item = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        body = item.get("body") if isinstance(item, dict) else None
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            return str(body["model"])
    return ""


def _gemini_line(index: int, key: str | None, metadata: Any, request: Any) -> Line:
    prompt_tokens = 0
    if isinstance(request, dict):
        prompt_tokens, _ = count_gemini_contents(request.get("contents"), request.get("systemInstruction"))
    return Line(index, key, metadata, _camel_request(request), prompt_tokens)


def _gemini_file_request(index: int, raw: bytes) -> Line:
    """A line of a Gemini input file: ``{"key", "request"}`` (or a bare GenerateContentRequest)."""
    try:
        item = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        item = None
    if not isinstance(item, dict):
        return Line(index, None, None, None, 0)
    key = item.get("key")
    request = item.get("request", item if "contents" in item else None)
    return _gemini_line(index, key if isinstance(key, str) else None, None, request)


def _camel_request(request: Any) -> Any:
    """The REST API takes snake_case field names as well (the docs' JSONL uses generation_config)."""
    if not isinstance(request, dict):
        return request
    aliases = {"generation_config": "generationConfig", "system_instruction": "systemInstruction"}
    return {aliases.get(name, name): value for name, value in request.items()}


def _gemini_error_status(result: LineResult) -> dict[str, Any]:
    error = result.body.get("error") if isinstance(result.body, dict) else None
    return dict(error) if isinstance(error, dict) else {"code": result.status, "message": "error"}


def _gemini_inline_response(line: Line) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    result = line.result
    if result is not None and result.ok:
        entry["response"] = result.body
    elif result is not None:
        entry["error"] = _gemini_error_status(result)
    if line.metadata is not None:
        entry["metadata"] = line.metadata
    return entry


def _gemini_file_line(line: Line) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if line.custom_id is not None:
        entry["key"] = line.custom_id
    result = line.result
    if result is not None and result.ok:
        entry["response"] = result.body
    elif result is not None:
        entry["error"] = _gemini_error_status(result)
    return entry


def page(items: Sequence[T], *, after: str | None, limit: int) -> tuple[list[T], bool]:
    """The items after the one whose ``id`` is ``after`` (from the first if None), at most ``limit``,
    and whether more follow: OpenAI's cursor pagination, which the SDKs follow with ``after=<last id>``."""
    start = 0
    if after:
        for i, item in enumerate(items):
            if getattr(item, "id", None) == after:
                start = i + 1
                break
        else:
            return [], False
    return list(items[start : start + limit]), start + limit < len(items)
