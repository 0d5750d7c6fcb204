"""The OpenAI-compatible HTTP server: a thin layer over :class:`~loraretriever.serving.routed_lm.RoutedLM`.

Each choice of each request is one engine request, so concurrent HTTP requests share the running
batch (continuous batching) and a bad one fails alone. ``model="auto"`` routes each prompt,
``model="<adapter>"`` pins that adapter, and the extra body field ``routing`` takes
:class:`~loraretriever.retrieval.options.RouteOptions` by name; every choice says how it was
routed in its own ``routing`` field.

This module wires the routes; the work is in :mod:`~loraretriever.server.state` (readiness, queue
accounting), :mod:`~loraretriever.server.completions` (a request as engine requests),
:mod:`~loraretriever.server.replies` (response bodies), :mod:`~loraretriever.server.streaming` (SSE)
and :mod:`~loraretriever.server.admin` (pool admin).

Example:
    >>> app = create_app(lambda: RoutedLM.from_pretrained(pool_dir="pools/bigbench"))  # doctest: +SKIP
    >>> uvicorn.run(app, port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from loraretriever.engine.extras import extra_error

try:  # the `serve` extra: without it, name the extra rather than the first package it lacks
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ModuleNotFoundError as error:
    raise extra_error(error) from error

from loraretriever.server import admin
from loraretriever.server.backend import Forwarder
from loraretriever.server.completions import call_kwargs, chat_messages, submit_all, wait_for_results
from loraretriever.server.config import ServerConfig
from loraretriever.server.errors import APIError
from loraretriever.server.protocol import AdapterRequest, ChatCompletionRequest, CompletionRequest
from loraretriever.server.replies import Reply, model_list
from loraretriever.server.state import Served, ServerState
from loraretriever.server.streaming import stream, stream_whole
from loraretriever.serving.routed_lm import RoutedLM

__all__ = ["Served", "create_app"]

_REPLICA = f"{socket.gethostname()}:{os.getpid()}"


def create_app(source: Served | Callable[[], Served], config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``source`` (a RoutedLM, or a function that loads one: the server
    answers 503 until it returns). A :class:`~loraretriever.server.backend.Forwarder` instead
    routes here and generates on another engine.

    Args:
        source: The LM (or forwarder), or its loader (run in a thread at start-up).
        config: API key, queue bound, defaults.
    """
    state = ServerState(source, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        if isinstance(state.lm, Forwarder):
            await state.lm.close()
        elif state.lm is not None:
            await asyncio.to_thread(state.lm.close)

    app = FastAPI(title="loraretriever", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'body'}: {first.get('msg', 'invalid request body')}"
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {where!r}; this server takes OpenAI's fields plus 'routing'."
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Callable) -> Response:
        key = state.config.api_key
        if key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                error = APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'.")
                response: Response = JSONResponse(error.body(), status_code=401)
                state.metrics.responses.labels(endpoint=request.url.path, status="401").inc()
                return response
        response = await call_next(request)
        response.headers["x-loraretriever-replica"] = _REPLICA  # which process answered (several behind a proxy)
        endpoint = request.scope.get("route").path if request.scope.get("route") is not None else "other"
        state.metrics.responses.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.lm is not None:
            return JSONResponse({"status": "ok"})
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(state.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        lm = state.ready()
        if isinstance(lm, Forwarder):
            base, names = lm.base_model, lm.names
        else:
            await asyncio.to_thread(lm.sync_pool)  # what other processes sharing the pool changed
            base, names = getattr(lm.model.config, "_name_or_path", type(lm.model).__name__), lm.pool.names
        return model_list(base, names)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        lm = state.ready()
        if isinstance(lm, Forwarder):
            return await lm.forward("/v1/chat/completions", body)
        return await _serve(state, lm, body, [chat_messages(body.messages)], request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        lm = state.ready()
        if isinstance(lm, Forwarder):
            return await lm.forward("/v1/completions", body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list; send at least one prompt.", param="prompt")
        return await _serve(state, lm, body, prompts, request, chat=False)

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterRequest) -> dict[str, Any]:
        return await admin.add_adapter(state, body)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict[str, Any]:
        return await admin.remove_adapter(state, name)

    return app


async def _serve(
    state: ServerState,
    lm: RoutedLM,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[Any],
    request: Request,
    *,
    chat: bool,
) -> Response:
    """A chat or text completion's response: one JSON body, or server-sent events if it streams."""
    kwargs = call_kwargs(lm, body, state.config.default_max_tokens)
    whole = "tools" in kwargs  # tool calls are parsed from the whole answer: streamed at its end
    submitted = submit_all(state, lm, prompts, kwargs, body.n, body.seed, body.stream and not whole)
    reply = Reply(body.model, chat, body.n)
    if body.stream and whole:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            stream_whole(state, reply, [q for _, q in submitted], request, usage), media_type="text/event-stream"
        )
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            stream(state, reply, submitted, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await wait_for_results([queued for _, queued in submitted], request)
    for result in results:
        state.metrics.observe(result)
    return JSONResponse(reply.whole(results))
