"""HTTP routes of the Batch APIs: OpenAI and Azure OpenAI files and batches, Gemini batches and files.

The handlers only translate between the wire and `batches.BatchStore`, where the state machine and
the providers' rules live. Routes, as the official SDKs call them:

- OpenAI (``OpenAI(base_url=.../v1)``): ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``,
  ``GET /v1/files/{id}/content``, ``POST/GET /v1/batches``, ``GET /v1/batches/{id}``,
  ``POST /v1/batches/{id}/cancel``.
- Azure OpenAI (``AzureOpenAI(azure_endpoint=..., api_version=...)``): the same under ``/openai/``
  (and ``/openai/v1/``); the ``api-version`` query is accepted and ignored; the key comes in the
  ``api-key`` header.
- Gemini (google-genai, ``v1beta``, the only version with Batch Mode): ``POST models/{model}:batchGenerateContent``
  (dispatched from `server.Routes.gemini`), ``GET batches``, ``GET/DELETE batches/{id}``,
  ``POST batches/{id}:cancel``; the Files API's resumable upload (``POST /upload/v1beta/files``
  with ``X-Goog-Upload-Command: start``, then the bytes to the returned ``X-Goog-Upload-URL``
  with ``upload, finalize``), ``GET/DELETE files/{name}``, ``GET files``, and
  ``GET files/{name}:download?alt=media`` (also under ``/download/``) for result files.

Each API key sees only its own files and batches (a key stands for a project). Requests to these
routes are not rate limited and not counted as online requests in ``/_sim/stats``; a configured
outage answers them with its status too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from batchdb.simulator import responses
from batchdb.simulator.batches import AZURE, GEMINI, OPENAI, OPENAI_FILE_PURPOSES, Batch, StoredFile, page
from batchdb.simulator.responses import Reply
from batchdb.simulator.state import Simulator

_JSON = "application/json"


def _respond(reply: Reply) -> web.Response:
    return web.Response(body=reply.encode(), status=reply.status, content_type=_JSON, headers=reply.headers)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return _respond(Reply(status, body, headers or {}))


def _not_found_openai(what: str, ident: str) -> web.Response:
    return _respond(responses.openai_error(404, f"No such {what} object: {ident}", type="invalid_request_error"))


def _limit(value: str | None, default: int, maximum: int) -> int | None:
    """A ``limit`` query parameter: the default when absent, None when out of range."""
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 1 <= number <= maximum else None


@dataclass(slots=True)
class _Upload:
    """A Gemini resumable upload under way."""

    key: str
    display_name: str | None
    mime_type: str
    size: int | None
    data: bytearray = field(default_factory=bytearray)


class BatchRoutes:
    """aiohttp handlers for the Batch and Files APIs, bound to one `Simulator`."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        """The route table. google-genai with a custom base URL calls ``/v1/...`` like the openai SDK
        does, so ``/v1/batches`` and ``/v1/files`` serve both: a request that carries a Gemini key
        (``x-goog-api-key`` header or ``key`` query) is Gemini's, any other OpenAI's."""
        table: list[web.RouteDef] = []
        for prefix in ("/openai", "/openai/v1"):
            table += self._openai_routes(prefix, AZURE)
        openai_v1 = {(route.method, route.path): route.handler for route in self._openai_routes("/v1", OPENAI)}
        for version in ("v1beta", "v1"):
            gemini = {
                ("GET", f"/{version}/batches"): self.gemini_list_batches,
                ("GET", f"/{version}/batches/{{target}}"): self.gemini_get_batch,
                ("POST", f"/{version}/batches/{{target}}"): self.gemini_batch_action,
                ("DELETE", f"/{version}/batches/{{target}}"): self.gemini_delete_batch,
                ("POST", f"/upload/{version}/files"): self.gemini_upload,
                ("GET", f"/{version}/files"): self.gemini_list_files,
                ("GET", f"/{version}/files/{{target}}"): self.gemini_get_file,
                ("GET", f"/download/{version}/files/{{target}}"): self.gemini_get_file,
                ("DELETE", f"/{version}/files/{{target}}"): self.gemini_delete_file,
            }
            for (method, path), handler in gemini.items():
                shared = openai_v1.pop((method, path.replace("{target}", "{file_id}")), None) or openai_v1.pop(
                    (method, path.replace("{target}", "{batch_id}")), None
                )
                table.append(web.route(method, path, handler if shared is None else _by_key(handler, shared)))
        table += [web.route(method, path, handler) for (method, path), handler in openai_v1.items()]
        return table

    def _openai_routes(self, prefix: str, provider: str) -> list[web.RouteDef]:
        bind = self._bind
        return [
            web.post(f"{prefix}/files", bind(self.upload_file, provider)),
            web.get(f"{prefix}/files", bind(self.list_files, provider)),
            web.get(f"{prefix}/files/{{file_id}}", bind(self.get_file, provider)),
            web.delete(f"{prefix}/files/{{file_id}}", bind(self.delete_file, provider)),
            web.get(f"{prefix}/files/{{file_id}}/content", bind(self.file_content, provider)),
            web.post(f"{prefix}/batches", bind(self.create_batch, provider)),
            web.get(f"{prefix}/batches", bind(self.list_batches, provider)),
            web.get(f"{prefix}/batches/{{batch_id}}", bind(self.get_batch, provider)),
            web.post(f"{prefix}/batches/{{batch_id}}/cancel", bind(self.cancel_batch, provider)),
        ]

    @staticmethod
    def _bind(handler: Any, provider: str) -> Any:
        async def bound(request: web.Request) -> web.StreamResponse:
            return await handler(request, provider)  # type: ignore[no-any-return]

        return bound

    # Checks shared by every route -----------------------------------------------------------

    def _openai_key(self, request: web.Request, provider: str) -> str | web.Response:
        auth = request.headers.get("Authorization", "")
        key: str | None = auth[7:].strip() or None if auth[:7].lower() == "bearer " else None
        if provider == AZURE:
            key = request.headers.get("api-key") or key
        config = self.sim.config
        if not key or (config.api_keys and key not in config.api_keys):
            return _respond(responses.openai_invalid_key(key))
        outage = self.sim.outage_status(self.sim.now())
        if outage is not None:
            return _respond(responses.openai_server_error(outage))
        return key

    def _gemini_key(self, request: web.Request) -> str | web.Response:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        config = self.sim.config
        if not key or (config.api_keys and key not in config.api_keys):
            return _respond(responses.gemini_invalid_key(key))
        outage = self.sim.outage_status(self.sim.now())
        if outage is not None:
            return _respond(responses.gemini_server_error(outage))
        return key

    # OpenAI / Azure files ----------------------------------------------------------------------

    async def upload_file(self, request: web.Request, provider: str) -> web.StreamResponse:
        key = self._openai_key(request, provider)
        if isinstance(key, web.Response):
            return key
        try:
            form = await request.post()
        except ValueError:
            return _respond(responses.openai_bad_request("The request must be multipart/form-data."))
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, web.FileField):
            return _respond(responses.openai_bad_request("Missing required parameter: 'file'.", "file"))
        if not isinstance(purpose, str) or purpose not in OPENAI_FILE_PURPOSES:
            choices = ", ".join(repr(p) for p in OPENAI_FILE_PURPOSES)
            return _respond(
                responses.openai_bad_request(
                    f"Invalid value for 'purpose': {purpose!r}. Expected one of {choices}.", "purpose"
                )
            )
        filename = upload.filename or "upload"
        if purpose == "batch" and not filename.endswith(".jsonl"):
            return _respond(responses.openai_bad_request("Invalid file format for Batch API. Must be .jsonl", "file"))
        data = upload.file.read()
        stored = self.sim.batches.add_file(provider, key, filename=filename, purpose=purpose, data=data)
        return _json(stored.openai_object())

    async def list_files(self, request: web.Request, provider: str) -> web.StreamResponse:
        key = self._openai_key(request, provider)
        if isinstance(key, web.Response):
            return key
        limit = _limit(request.query.get("limit"), 10_000, 10_000)
        if limit is None:
            return _respond(responses.openai_bad_request("Invalid 'limit': expected 1 to 10000.", "limit"))
        files = self.sim.batches.list_files(provider, key, request.query.get("purpose"))
        if request.query.get("order") == "asc":
            files.reverse()
        chunk, has_more = page(files, after=request.query.get("after"), limit=limit)
        return _json(_openai_list([f.openai_object() for f in chunk], has_more))

    async def get_file(self, request: web.Request, provider: str) -> web.StreamResponse:
        found = self._find_file(request, provider)
        return found if isinstance(found, web.Response) else _json(found.openai_object())

    async def delete_file(self, request: web.Request, provider: str) -> web.StreamResponse:
        found = self._find_file(request, provider)
        if isinstance(found, web.Response):
            return found
        self.sim.batches.delete_file(provider, found.key, found.id)
        return _json({"id": found.id, "object": "file", "deleted": True})

    async def file_content(self, request: web.Request, provider: str) -> web.StreamResponse:
        found = self._find_file(request, provider)
        if isinstance(found, web.Response):
            return found
        return web.Response(body=found.data, content_type="application/octet-stream")

    def _find_file(self, request: web.Request, provider: str) -> StoredFile | web.Response:
        key = self._openai_key(request, provider)
        if isinstance(key, web.Response):
            return key
        file_id = request.match_info["file_id"]
        stored = self.sim.batches.file(provider, key, file_id)
        return stored if stored is not None else _not_found_openai("File", file_id)

    # OpenAI / Azure batches ------------------------------------------------------------------

    async def create_batch(self, request: web.Request, provider: str) -> web.StreamResponse:
        key = self._openai_key(request, provider)
        if isinstance(key, web.Response):
            return key
        if key in self.sim.config.quota_exhausted_keys:
            return _respond(responses.openai_insufficient_quota())
        body = await _read_json(request)
        if not isinstance(body, dict):
            return _respond(responses.openai_bad_request("We could not parse the JSON body of your request."))
        created = self.sim.batches.create_openai(
            provider,
            key,
            input_file_id=body.get("input_file_id"),
            endpoint=body.get("endpoint"),
            completion_window=body.get("completion_window"),
            metadata=body.get("metadata"),
        )
        if isinstance(created, Reply):
            return _respond(created)
        return _json(self.sim.batches.openai_object(created))

    async def list_batches(self, request: web.Request, provider: str) -> web.StreamResponse:
        key = self._openai_key(request, provider)
        if isinstance(key, web.Response):
            return key
        limit = _limit(request.query.get("limit"), 20, 100)
        if limit is None:
            return _respond(responses.openai_bad_request("Invalid 'limit': expected 1 to 100.", "limit"))
        store = self.sim.batches
        chunk, has_more = page(store.list_batches(provider, key), after=request.query.get("after"), limit=limit)
        return _json(_openai_list([store.openai_object(b) for b in chunk], has_more))

    async def get_batch(self, request: web.Request, provider: str) -> web.StreamResponse:
        found = self._find_batch(request, provider)
        return found if isinstance(found, web.Response) else _json(self.sim.batches.openai_object(found))

    async def cancel_batch(self, request: web.Request, provider: str) -> web.StreamResponse:
        found = self._find_batch(request, provider)
        if isinstance(found, web.Response):
            return found
        store = self.sim.batches
        if not store.cancel(found, self.sim.now()):
            status = found.status(self.sim.now())
            return _respond(
                responses.openai_error(
                    409, f"Cannot cancel a batch with status '{status}'.", type="invalid_request_error"
                )
            )
        return _json(store.openai_object(found))

    def _find_batch(self, request: web.Request, provider: str) -> Batch | web.Response:
        key = self._openai_key(request, provider)
        if isinstance(key, web.Response):
            return key
        batch_id = request.match_info["batch_id"]
        batch = self.sim.batches.batch(provider, key, batch_id)
        return batch if batch is not None else _not_found_openai("Batch", batch_id)

    # Gemini batches ---------------------------------------------------------------------------

    async def gemini_create_batch(self, request: web.Request, model: str) -> web.StreamResponse:
        """``POST models/{model}:batchGenerateContent`` (routed here by `server.Routes.gemini`)."""
        key = self._gemini_key(request)
        if isinstance(key, web.Response):
            return key
        config = self.sim.config
        if config.models and model not in config.models:
            return _respond(responses.gemini_error(404, f"models/{model} is not found for API version v1beta."))
        if key in config.quota_exhausted_keys:
            return _respond(responses.gemini_batch_quota_exceeded())
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if len(raw) <= config.batch_max_inline_bytes and not isinstance(body, dict):
            return _respond(responses.gemini_error(400, "Invalid JSON payload received."))
        batch_body = body.get("batch") if isinstance(body, dict) else None
        created = self.sim.batches.create_gemini(key, model, batch_body, len(raw))
        if isinstance(created, Reply):
            return _respond(created)
        return _json(self.sim.batches.gemini_object(created))

    async def gemini_list_batches(self, request: web.Request) -> web.StreamResponse:
        key = self._gemini_key(request)
        if isinstance(key, web.Response):
            return key
        limit = _limit(request.query.get("pageSize"), 50, 1000)
        if limit is None:
            return _respond(responses.gemini_error(400, "pageSize must be between 1 and 1000."))
        store = self.sim.batches
        batches = store.list_batches(GEMINI, key)
        chunk, has_more = page(batches, after=request.query.get("pageToken"), limit=limit)
        reply: dict[str, Any] = {"operations": [store.gemini_object(b) for b in chunk]}
        if has_more:
            reply["nextPageToken"] = chunk[-1].id
        return _json(reply)

    async def gemini_get_batch(self, request: web.Request) -> web.StreamResponse:
        found = self._find_gemini_batch(request, request.match_info["target"])
        return found if isinstance(found, web.Response) else _json(self.sim.batches.gemini_object(found))

    async def gemini_batch_action(self, request: web.Request) -> web.StreamResponse:
        name, _, action = request.match_info["target"].partition(":")
        if action != "cancel":
            return _respond(responses.gemini_error(404, f"Method {action or '(none)'} not found for batches/{name}."))
        found = self._find_gemini_batch(request, name)
        if isinstance(found, web.Response):
            return found
        if not self.sim.batches.cancel(found, self.sim.now()):
            state = found.status(self.sim.now())
            return _json(
                {
                    "error": {
                        "code": 400,
                        "message": f"Batch is in a terminal state ({state}).",
                        "status": "FAILED_PRECONDITION",
                    }
                },
                status=400,
            )
        return _json({})

    async def gemini_delete_batch(self, request: web.Request) -> web.StreamResponse:
        found = self._find_gemini_batch(request, request.match_info["target"])
        if isinstance(found, web.Response):
            return found
        self.sim.batches.delete_batch(GEMINI, found.key, found.id)
        return _json({})

    def _find_gemini_batch(self, request: web.Request, name: str) -> Batch | web.Response:
        key = self._gemini_key(request)
        if isinstance(key, web.Response):
            return key
        batch = self.sim.batches.batch(GEMINI, key, f"batches/{name}")
        return batch if batch is not None else _respond(responses.gemini_error(404, "Requested entity was not found."))

    # Gemini files -----------------------------------------------------------------------------

    async def gemini_upload(self, request: web.Request) -> web.StreamResponse:
        """The Files API's resumable upload: ``start`` opens a session, ``upload[, finalize]`` sends bytes."""
        upload_id = request.query.get("upload_id")
        command = request.headers.get("X-Goog-Upload-Command", "").lower()
        if upload_id is None:
            return await self._gemini_upload_start(request, command)
        session = self.sim.batches.uploads.get(upload_id)
        if session is None:
            return _respond(responses.gemini_error(404, "No upload session found for this upload_id."))
        chunk = await request.read()
        offset = request.headers.get("X-Goog-Upload-Offset")
        if offset is not None and offset.isdigit() and int(offset) != len(session.data):
            return _respond(
                responses.gemini_error(400, f"Invalid upload offset {offset}; expected {len(session.data)}.")
            )
        session.data.extend(chunk)
        if "finalize" not in command:
            return web.Response(status=200, headers={"X-Goog-Upload-Status": "active"})
        del self.sim.batches.uploads[upload_id]
        stored = self.sim.batches.add_file(
            GEMINI,
            session.key,
            filename=session.display_name or "upload.jsonl",
            purpose="",
            data=bytes(session.data),
            mime_type=session.mime_type,
            display_name=session.display_name,
        )
        return _json({"file": stored.gemini_object(self._base_url(request))}, headers={"X-Goog-Upload-Status": "final"})

    async def _gemini_upload_start(self, request: web.Request, command: str) -> web.StreamResponse:
        key = self._gemini_key(request)
        if isinstance(key, web.Response):
            return key
        if command != "start" or request.headers.get("X-Goog-Upload-Protocol", "").lower() != "resumable":
            return _respond(responses.gemini_error(400, "Only the resumable upload protocol is supported."))
        body = await _read_json(request)
        meta = body.get("file") if isinstance(body, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        size_header = request.headers.get("X-Goog-Upload-Header-Content-Length", "")
        session = _Upload(
            key=key,
            display_name=meta.get("displayName") or meta.get("display_name"),
            mime_type=request.headers.get("X-Goog-Upload-Header-Content-Type")
            or meta.get("mimeType")
            or "application/octet-stream",
            size=int(size_header) if size_header.isdigit() else None,
        )
        upload_id = self.sim.next_id("up")
        self.sim.batches.uploads[upload_id] = session
        version = request.path.split("/")[2]
        url = f"{self._base_url(request)}/upload/{version}/files?upload_id={upload_id}&upload_protocol=resumable"
        return web.Response(
            status=200,
            headers={
                "X-Goog-Upload-URL": url,
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Chunk-Granularity": str(8 * 1024 * 1024),
            },
        )

    async def gemini_list_files(self, request: web.Request) -> web.StreamResponse:
        key = self._gemini_key(request)
        if isinstance(key, web.Response):
            return key
        limit = _limit(request.query.get("pageSize"), 10, 100)
        if limit is None:
            return _respond(responses.gemini_error(400, "pageSize must be between 1 and 100."))
        files = self.sim.batches.list_files(GEMINI, key)
        chunk, has_more = page(files, after=request.query.get("pageToken"), limit=limit)
        reply: dict[str, Any] = {"files": [f.gemini_object(self._base_url(request)) for f in chunk]}
        if has_more:
            reply["nextPageToken"] = chunk[-1].id
        return _json(reply)

    async def gemini_get_file(self, request: web.Request) -> web.StreamResponse:
        name, _, action = request.match_info["target"].partition(":")
        key = self._gemini_key(request)
        if isinstance(key, web.Response):
            return key
        stored = self.sim.batches.file(GEMINI, key, f"files/{name}")
        if stored is None:
            return _respond(responses.gemini_error(404, f"File files/{name} not found."))
        if action == "download":
            return web.Response(body=stored.data, content_type="application/octet-stream")
        if action:
            return _respond(responses.gemini_error(404, f"Method {action} not found for files/{name}."))
        return _json(stored.gemini_object(self._base_url(request)))

    async def gemini_delete_file(self, request: web.Request) -> web.StreamResponse:
        key = self._gemini_key(request)
        if isinstance(key, web.Response):
            return key
        if not self.sim.batches.delete_file(GEMINI, key, f"files/{request.match_info['target']}"):
            return _respond(responses.gemini_error(404, "Requested entity was not found."))
        return _json({})

    @staticmethod
    def _base_url(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"


def _by_key(gemini: Any, openai: Any) -> Any:
    """One handler for a path both APIs use: Gemini's when the request carries a Gemini key."""

    async def dispatch(request: web.Request) -> web.StreamResponse:
        match_info = request.match_info
        if "x-goog-api-key" in request.headers or "key" in request.query:
            return await gemini(request)  # type: ignore[no-any-return]
        if "target" in match_info:  # the OpenAI handlers name the path part file_id / batch_id
            name = "file_id" if "/files/" in request.path else "batch_id"
            return await openai(_renamed(request, name, match_info["target"]))  # type: ignore[no-any-return]
        return await openai(request)  # type: ignore[no-any-return]

    return dispatch


def _renamed(request: web.Request, name: str, value: str) -> web.Request:
    request.match_info[name] = value  # UrlMappingMatchInfo is a dict
    return request


def _openai_list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
