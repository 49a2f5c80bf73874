"""The simulator's HTTP server: OpenAI, Azure OpenAI, Gemini and Vertex AI routes plus `/_sim/*` control.

One `Simulator` object owns the run's state (config, limiter, recorder, random
streams); the aiohttp handlers only translate between the wire and it. Every
provider request goes through the same steps, in the order real providers apply
them: key -> body -> quota -> outage -> validation (context window) -> rate limit
(charged on arrival) -> injected fault -> latency -> prompt cache (cached tokens of a
served prompt) -> generated response. The request checks and the generated response
live in `answers`, which the Batch APIs (`batch_routes`, `batches`) share, so a batch
line is answered exactly as the online route would answer it, less the rate limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from batchdb.simulator import answers, content, responses
from batchdb.simulator.batch_routes import BatchRoutes
from batchdb.simulator.config import SimulatorConfig
from batchdb.simulator.limits import pacific_day
from batchdb.simulator.recorder import Outcome
from batchdb.simulator.responses import Reply
from batchdb.simulator.state import RESET, Simulator
from batchdb.tokens import count_embedding_input, count_gemini_contents

log = logging.getLogger("batchdb.simulator")


# -- HTTP helpers ---------------------------------------------------------------


def _respond(reply: Reply, extra_headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(reply.headers)
    if extra_headers:
        headers.update(extra_headers)
    return web.Response(body=reply.encode(), status=reply.status, content_type="application/json", headers=headers)


def _reset_connection(request: web.Request) -> web.Response:
    """Abort the TCP connection with an RST: the client sees a reset, not an HTTP answer."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp discards a response for a closed transport.
    return web.Response(status=500)


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


# -- Routes -------------------------------------------------------------------------


class Routes:
    """aiohttp handlers bound to one `Simulator`."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.batch_routes = BatchRoutes(sim)

    # OpenAI and Azure OpenAI ------------------------------------------------------

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, key=_bearer(request), deployment=None)

    async def azure_chat(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("api-key") or _bearer(request)
        return await self._chat(request, key=key, deployment=request.match_info["deployment"])

    async def openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._embeddings(request, key=_bearer(request), deployment=None)

    async def azure_embeddings(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("api-key") or _bearer(request)
        return await self._embeddings(request, key=key, deployment=request.match_info["deployment"])

    async def _openai_preamble(
        self, request: web.Request, key: str | None, deployment: str | None, now: float
    ) -> tuple[dict[str, Any], str, str] | web.Response:
        """Checks shared by chat and embeddings: body, model, key, quota, outage."""
        sim, config = self.sim, self.sim.config
        second = sim.limiter.second(now)
        body = await _read_json(request)
        if deployment is not None:
            model: Any = deployment
        else:
            model = body.get("model") if isinstance(body, dict) else None
        record_key, record_model = key or "", str(model or "")
        if not key or (config.api_keys and key not in config.api_keys):
            sim.recorder.record(second, record_key, record_model, Outcome.CLIENT_ERROR)
            return _respond(responses.openai_invalid_key(key))
        if not isinstance(body, dict):
            sim.recorder.record(second, record_key, record_model, Outcome.CLIENT_ERROR)
            return _respond(responses.openai_bad_request("We could not parse the JSON body of your request."))
        if not isinstance(model, str) or not model:
            sim.recorder.record(second, record_key, record_model, Outcome.CLIENT_ERROR)
            return _respond(responses.openai_bad_request("you must provide a model parameter", "model"))
        if config.models and model not in config.models:
            sim.recorder.record(second, key, model, Outcome.CLIENT_ERROR)
            return _respond(responses.openai_model_not_found(model))
        if key in config.quota_exhausted_keys:
            sim.recorder.record(second, key, model, Outcome.QUOTA_EXCEEDED)
            headers = responses.rate_limit_headers(sim.limiter.snapshot(key, model, now))
            return _respond(responses.openai_insufficient_quota(), headers)
        outage = sim.outage_status(now)
        if outage is not None:
            sim.recorder.record(second, key, model, Outcome.OUTAGE)
            headers = responses.rate_limit_headers(sim.limiter.snapshot(key, model, now))
            return _respond(responses.openai_server_error(outage), headers)
        return body, key, model

    async def _admitted(
        self, request: web.Request, key: str, model: str, charge: int, now: float, headers: dict[str, str], gemini: bool
    ) -> web.StreamResponse | None:
        """Injected fault (as a response) or None; then sleeps the latency."""
        sim = self.sim
        second = sim.limiter.second(now)
        fault = sim.draw_fault()
        if fault == RESET:
            sim.recorder.record(second, key, model, Outcome.CONNECTION_RESET, admitted=True, charged_tokens=charge)
            return _reset_connection(request)
        if fault is not None:
            assert isinstance(fault, int)
            sim.recorder.record(second, key, model, Outcome.SERVER_ERROR, admitted=True, charged_tokens=charge)
            reply = responses.gemini_server_error(fault) if gemini else responses.openai_server_error(fault)
            return _respond(reply, headers)
        latency = sim.draw_latency()
        if latency > 0:
            await asyncio.sleep(latency)
        return None

    async def _chat(self, request: web.Request, *, key: str | None, deployment: str | None) -> web.StreamResponse:
        sim, config = self.sim, self.sim.config
        now = sim.now()
        second = sim.limiter.second(now)
        checked = await self._openai_preamble(request, key, deployment, now)
        if isinstance(checked, web.Response):
            return checked
        body, key, model = checked

        plan = answers.check_openai_chat(sim, body, model)
        if isinstance(plan, Reply):
            sim.recorder.record(second, key, model, Outcome.CLIENT_ERROR)
            return _respond(plan)

        charge = plan.prompt_tokens + (plan.max_tokens if plan.max_tokens is not None else config.default_max_tokens)
        verdict = sim.limiter.admit(key, model, charge, now)
        headers = responses.rate_limit_headers(verdict.state)
        if not verdict.allowed:
            sim.recorder.record(second, key, model, Outcome.RATE_LIMITED)
            return _respond(responses.openai_rate_limited(verdict, model), headers)
        failed = await self._admitted(request, key, model, charge, now, headers, gemini=False)
        if failed is not None:
            return failed

        answer = answers.answer_openai_chat(
            sim,
            plan,
            model=model,
            cache_scope=("azure" if deployment is not None else "openai", key, model),
            draw_broken=sim.draw_broken_json,
            response_id=sim.next_id("chatcmpl-"),
        )
        sim.recorder.record(
            second, key, model, Outcome.ACCEPTED, admitted=True, charged_tokens=charge,
            prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
            cached_tokens=answer.cached_tokens,
        )  # fmt: skip
        headers["x-request-id"] = sim.next_id("req_")
        headers["openai-processing-ms"] = str(int((sim.now() - now) * 1000))
        return _respond(Reply(200, answer.body), headers)

    async def _embeddings(self, request: web.Request, *, key: str | None, deployment: str | None) -> web.StreamResponse:
        sim, config = self.sim, self.sim.config
        now = sim.now()
        second = sim.limiter.second(now)
        checked = await self._openai_preamble(request, key, deployment, now)
        if isinstance(checked, web.Response):
            return checked
        body, key, model = checked
        prompt_tokens, texts = count_embedding_input(body.get("input"))
        dimensions = body.get("dimensions", config.embedding_dimensions)
        if not texts or answers.positive_int(dimensions) is None:
            sim.recorder.record(second, key, model, Outcome.CLIENT_ERROR)
            return _respond(responses.openai_bad_request("'input' must be a non-empty string or array.", "input"))

        verdict = sim.limiter.admit(key, model, prompt_tokens, now)
        headers = responses.rate_limit_headers(verdict.state)
        if not verdict.allowed:
            sim.recorder.record(second, key, model, Outcome.RATE_LIMITED)
            return _respond(responses.openai_rate_limited(verdict, model), headers)
        failed = await self._admitted(request, key, model, prompt_tokens, now, headers, gemini=False)
        if failed is not None:
            return failed

        as_base64 = body.get("encoding_format") == "base64"
        vectors = [content.embedding_vector(f"{config.seed}\x1f{model}\x1f{text}", dimensions) for text in texts]
        embeddings = [content.embedding_base64(v) if as_base64 else v.tolist() for v in vectors]
        sim.recorder.record(
            second, key, model, Outcome.ACCEPTED, admitted=True, charged_tokens=prompt_tokens,
            prompt_tokens=prompt_tokens,
        )  # fmt: skip
        headers["x-request-id"] = sim.next_id("req_")
        reply = responses.openai_embeddings(model=model, embeddings=embeddings, prompt_tokens=prompt_tokens)
        return _respond(Reply(200, reply), headers)

    # Gemini ---------------------------------------------------------------------------

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["target"].partition(":")
        if action == "generateContent":
            return await self._gemini_generate(request, model)
        if action == "batchGenerateContent":
            return await self.batch_routes.gemini_create_batch(request, model)
        if action == "countTokens":
            body = await _read_json(request)
            body = body if isinstance(body, dict) else {}
            inner = body.get("generateContentRequest") or body
            tokens, _ = count_gemini_contents(inner.get("contents"), inner.get("systemInstruction"))
            return _respond(Reply(200, {"totalTokens": tokens}))
        return _respond(responses.gemini_error(404, f"Method {action or '(none)'} not found for models/{model}."))

    async def _gemini_generate(self, request: web.Request, model: str) -> web.StreamResponse:
        sim, config = self.sim, self.sim.config
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key or (config.api_keys and key not in config.api_keys):
            sim.recorder.record(sim.limiter.second(sim.now()), key or "", model, Outcome.CLIENT_ERROR)
            return _respond(responses.gemini_invalid_key(key))
        return await self._generate(request, model, key, vertex=None)

    # Google Vertex AI ---------------------------------------------------------------------

    async def vertex(self, request: web.Request) -> web.StreamResponse:
        """`/{v1,v1beta1}/projects/{p}/locations/{l}/publishers/google/models/{m}:generateContent`, the
        URL google-genai calls with ``vertexai=True``. The caller is an OAuth access token (bearer);
        quotas belong to the project in its region, so ``{p}/{l}`` is the key limits, the recorder and
        the prompt cache see (a `LimitRule` with ``key="my-project/us-central1"`` limits that lane)."""
        sim, config = self.sim, self.sim.config
        project, location = request.match_info["project"], request.match_info["location"]
        model, _, action = request.match_info["target"].partition(":")
        quota_key = f"{project}/{location}"
        token = _bearer(request)
        if not token or (config.api_keys and token not in config.api_keys):
            sim.recorder.record(sim.limiter.second(sim.now()), quota_key, model, Outcome.CLIENT_ERROR)
            return _respond(responses.vertex_unauthenticated(token))
        if action != "generateContent":
            return _respond(responses.gemini_error(404, f"Method {action or '(none)'} not found for {model}."))
        return await self._generate(request, model, quota_key, vertex=(project, location))

    async def _generate(
        self, request: web.Request, model: str, key: str, *, vertex: tuple[str, str] | None
    ) -> web.StreamResponse:
        """generateContent for a caller already let in: the Gemini API's (`key` is the API key) or
        Vertex AI's (`vertex` is (project, location) and `key` their quota), which differ only in
        the sentences of their errors and Vertex's bare 429."""
        sim, config = self.sim, self.sim.config
        now = sim.now()
        second = sim.limiter.second(now)
        body = await _read_json(request)
        if not isinstance(body, dict):
            sim.recorder.record(second, key, model, Outcome.CLIENT_ERROR)
            return _respond(responses.gemini_error(400, "Invalid JSON payload received."))
        if config.models and model not in config.models:
            sim.recorder.record(second, key, model, Outcome.CLIENT_ERROR)
            if vertex is not None:
                return _respond(responses.vertex_model_not_found(*vertex, model))
            return _respond(
                responses.gemini_error(404, f"models/{model} is not found for API version v1, or is not supported.")
            )
        if key in config.quota_exhausted_keys:
            sim.recorder.record(second, key, model, Outcome.QUOTA_EXCEEDED)
            if vertex is not None:
                return _respond(responses.vertex_rate_limited())
            return _respond(responses.gemini_quota_exhausted(model, pacific_day(time.time())[1]))
        outage = sim.outage_status(now)
        if outage is not None:
            sim.recorder.record(second, key, model, Outcome.OUTAGE)
            return _respond(responses.gemini_server_error(outage))

        plan = answers.check_gemini_generate(sim, body, model)
        if isinstance(plan, Reply):
            sim.recorder.record(second, key, model, Outcome.CLIENT_ERROR)
            return _respond(plan)

        verdict = sim.limiter.admit(key, model, plan.prompt_tokens, now)
        if not verdict.allowed:
            sim.recorder.record(second, key, model, Outcome.RATE_LIMITED)
            if vertex is not None:
                return _respond(responses.vertex_rate_limited())
            return _respond(responses.gemini_rate_limited(verdict, model))
        failed = await self._admitted(request, key, model, plan.prompt_tokens, now, {}, gemini=True)
        if failed is not None:
            return failed

        answer = answers.answer_gemini_generate(
            sim,
            plan,
            model=model,
            cache_scope=("vertex" if vertex is not None else "gemini", key, model),
            draw_broken=sim.draw_broken_json,
            response_id=sim.next_id("sim-"),
        )
        sim.recorder.record(
            second, key, model, Outcome.ACCEPTED, admitted=True, charged_tokens=plan.prompt_tokens,
            prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
            cached_tokens=answer.cached_tokens,
        )  # fmt: skip
        return _respond(Reply(200, answer.body))

    # Control ----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "elapsed_s": self.sim.now() - self.sim.start, "pid": os.getpid()})

    async def stats(self, request: web.Request) -> web.Response:
        include_series = request.query.get("series", "1").lower() not in ("0", "false", "no")
        return web.json_response(self.sim.stats(include_series=include_series))

    async def reset(self, request: web.Request) -> web.Response:
        self.sim.reset()
        return web.json_response({"status": "ok"})

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.config.to_dict())

    async def set_config(self, request: web.Request) -> web.Response:
        changes = await _read_json(request)
        if not isinstance(changes, dict):
            return web.json_response({"error": "body must be a JSON object of config fields"}, status=400)
        try:
            config = self.sim.apply(changes)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(config.to_dict())


async def _answer_batches_in_background(app: web.Application) -> AsyncIterator[None]:
    """Answer due batch lines a slice at a time between requests, so that reading a large batch
    (50,000 lines is seconds of generation) seldom has much left to do. Reads still bring a batch
    fully up to date themselves; this only moves the work earlier, never changes it."""
    sim: Simulator = app["simulator"]

    async def tick() -> None:
        while True:
            busy = sim.batches.advance_all(sim.now(), budget=_BATCH_SLICE) >= _BATCH_SLICE
            await asyncio.sleep(0 if busy else 0.05)

    task = asyncio.create_task(tick())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


_BATCH_SLICE = 200  # lines per background slice: ~20 ms of generation


def build_app(config: SimulatorConfig | Simulator) -> web.Application:
    """The aiohttp application; pass a `Simulator` to keep a handle on its state."""
    sim = config if isinstance(config, Simulator) else Simulator(config)
    routes = Routes(sim)
    # Room for a batch input file at OpenAI's 200 MB limit (and Gemini's 20 MB inline batches).
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app["simulator"] = sim
    app.cleanup_ctx.append(_answer_batches_in_background)
    app.add_routes(
        [
            *routes.batch_routes.routes(),
            web.post("/v1/chat/completions", routes.openai_chat),
            web.post("/v1/embeddings", routes.openai_embeddings),
            web.post("/openai/deployments/{deployment}/chat/completions", routes.azure_chat),
            web.post("/openai/deployments/{deployment}/embeddings", routes.azure_embeddings),
            web.post("/v1/models/{target}", routes.gemini),
            web.post("/v1beta/models/{target}", routes.gemini),
            web.post(
                r"/{version:v1|v1beta1}/projects/{project}/locations/{location}/publishers/google/models/{target}",
                routes.vertex,
            ),
            web.get("/_sim/health", routes.health),
            web.get("/_sim/stats", routes.stats),
            web.post("/_sim/reset", routes.reset),
            web.get("/_sim/config", routes.get_config),
            web.post("/_sim/config", routes.set_config),
        ]
    )
    return app


async def serve(
    config: SimulatorConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_file: str | None = None,
    exit_with_parent: bool = False,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or the parent process dies, if asked); `on_ready(host, port)`
    is called once the socket accepts connections (port 0 is resolved by then)."""
    import signal

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]

    content.warm_up()  # load the tokenizer now, not on the first (timed) request
    runner = web.AppRunner(build_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        while not stop.is_set():
            if os.getppid() != parent:
                log.warning("parent process %d is gone; stopping", parent)
                stop.set()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_parent()) if exit_with_parent else None
    log.info("provider simulator listening on http://%s:%d", host, bound_port)
    if on_ready is not None:
        on_ready(host, bound_port)
    if ready_file:
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(bound_port))
        os.replace(tmp, ready_file)  # atomic: the parent never reads a half-written port
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()
