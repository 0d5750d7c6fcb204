"""The OpenAI-compatible HTTP server: a thin layer over :class:`~loraretriever.serving.routed_lm.RoutedLM`.

Each choice of each request is one engine request, so concurrent HTTP requests share the running
batch (continuous batching) and a bad one fails alone. ``model="auto"`` routes each prompt,
``model="<adapter>"`` pins that adapter, and the extra body field ``routing`` takes
:class:`~loraretriever.retrieval.options.RouteOptions` by name; every choice says how it was
routed in its own ``routing`` field.

Example:
    >>> app = create_app(lambda: RoutedLM.from_pretrained(pool_dir="pools/bigbench"))  # doctest: +SKIP
    >>> uvicorn.run(app, port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from loraretriever.engine.extras import extra_error

try:  # the `serve` extra: without it, name the extra rather than the first package it lacks
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ModuleNotFoundError as error:
    raise extra_error(error) from error

from loraretriever.engine.worker import QueuedRequest
from loraretriever.pool.adapter import AdapterExistsError
from loraretriever.server.backend import Forwarder
from loraretriever.server.config import ServerConfig
from loraretriever.server.errors import APIError, from_library_error, unknown_model
from loraretriever.server.metrics import ServerMetrics
from loraretriever.server.protocol import (
    AUTO_MODEL,
    AdapterRequest,
    ChatCompletionRequest,
    CompletionRequest,
    unsupported_fields,
)
from loraretriever.serving.routed_lm import Result, RoutedLM
from loraretriever.serving.tools import tool_call_text

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_REPLICA = f"{socket.gethostname()}:{os.getpid()}"

Served = RoutedLM | Forwarder
"""What a server answers with: this engine, or a router in front of another engine."""


class _State:
    """The loaded LM (or why it is not there yet) and the requests in flight."""

    def __init__(self, source: Served | Callable[[], Served], config: ServerConfig) -> None:
        self.config = config
        self.lm: Served | None = source if isinstance(source, RoutedLM | Forwarder) else None
        self._load = None if self.lm is not None else source
        self.load_error: BaseException | None = None
        self.pending = 0
        self._lock = threading.Lock()
        self.metrics = ServerMetrics(self._queue_depth, self._running)

    def start_loading(self) -> None:
        if self.lm is not None or self._load is None:
            return

        def load() -> None:
            try:
                self.lm = self._load()
            except BaseException as error:  # reported by /health and every call
                logger.exception("loading the model failed")
                self.load_error = error

        threading.Thread(target=load, name="loraretriever-load", daemon=True).start()

    def ready(self) -> Served:
        if self.lm is not None:
            return self.lm
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}. Fix the server's options and restart.")
        raise APIError(503, "the model is loading; retry shortly.", headers={"Retry-After": "5"})

    def reserve(self, count: int) -> None:
        with self._lock:
            if self.pending + count > self.config.max_pending:
                raise APIError(
                    429,
                    f"the server holds {self.pending} requests (max_pending={self.config.max_pending}); retry later.",
                    headers={"Retry-After": str(self.config.retry_after_s)},
                )
            self.pending += count

    def release(self, count: int = 1) -> None:
        with self._lock:
            self.pending -= count

    def engine(self) -> RoutedLM:
        lm = self.ready()
        if isinstance(lm, Forwarder):
            raise APIError(400, "this server only routes (--backend); pool admin runs on a server without --backend.")
        return lm

    def _running(self) -> float:
        running = self.lm.engine.running if isinstance(self.lm, RoutedLM) else None
        return float(len(running)) if running is not None else 0.0

    def _queue_depth(self) -> float:
        return max(float(self.pending) - self._running(), 0.0)


def create_app(source: Served | Callable[[], Served], config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``source`` (a RoutedLM, or a function that loads one: the server
    answers 503 until it returns). A :class:`~loraretriever.server.backend.Forwarder` instead
    routes here and generates on another engine.

    Args:
        source: The LM (or forwarder), or its loader (run in a thread at start-up).
        config: API key, queue bound, defaults.
    """
    state = _State(source, config or ServerConfig())

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
        created = int(time.time())
        entry = {"object": "model", "created": created, "owned_by": "loraretriever", "root": base}
        entries = [{"id": AUTO_MODEL, **entry}, *({"id": name, **entry, "parent": base} for name in names)]
        return {"object": "list", "data": entries}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        lm = state.ready()
        if isinstance(lm, Forwarder):
            return await lm.forward("/v1/chat/completions", body)
        chat = [{"role": _role(m.role), "content": _message_text(m)} for m in body.messages]
        return await _serve(state, lm, body, [chat], request, chat=True)

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
        lm = _admin(state)
        try:
            name = await asyncio.to_thread(lm.add_adapter, body.source, body.card, name=body.name)
        except AdapterExistsError as error:
            raise from_library_error(error, param="name") from None
        except Exception as error:
            raise from_library_error(error, param="source") from None
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "loraretriever"}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict[str, Any]:
        lm = _admin(state)
        await asyncio.to_thread(lm.sync_pool)
        if name not in lm.pool:
            raise APIError(404, f"no adapter named {name!r}; GET /v1/models lists them.", param="name")
        try:
            await asyncio.to_thread(lm.remove_adapter, name)
        except Exception as error:
            raise from_library_error(error) from None
        return {"id": name, "object": "model", "deleted": True}

    return app


def _admin(state: _State) -> RoutedLM:
    if state.config.api_key is None:
        raise APIError(403, "pool admin is off: start the server with --api-key to add or remove adapters.")
    return state.engine()


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _message_text(message: Any) -> str:
    """A message as the model reads it: an assistant's tool calls in the form it writes them."""
    text = message.text()
    for call in message.tool_calls or ():
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError:
            raise APIError(400, f"tool call {call.id!r}: arguments are not JSON.", param="messages") from None
        text += tool_call_text(call.function.name, arguments)
    return text


def _openai_tool_calls(result: Result) -> list[dict[str, Any]]:
    return [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["args"])}}
        for c in result.tool_calls
    ]


# -- generation ------------------------------------------------------------------------------
def _call_kwargs(lm: RoutedLM, body: ChatCompletionRequest | CompletionRequest, default_max_tokens: int) -> dict:
    """The library call of a request body: routing options, tools, generation settings."""
    unsupported = unsupported_fields(body)
    if unsupported:
        raise APIError(400, f"{unsupported[0]} is not supported by this server; leave it unset.", param=unsupported[0])
    call = body.route_options()
    if body.model != AUTO_MODEL:
        if body.model not in lm.pool:
            lm.sync_pool()  # stored by another process sharing the pool?
        if body.model not in lm.pool:
            raise unknown_model(body.model)
        if "adapters" in call:
            raise APIError(
                400, "routing.adapters and an adapter as model both pin adapters; pass one.", param="routing"
            )
        call["adapters"] = [body.model]
    for name in ("tools", "tool_choice", "response_format"):
        if getattr(body, name, None) is not None:
            call[name] = getattr(body, name)
    return {
        **call,
        "max_new_tokens": body.token_limit() or default_max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "repetition_penalty": body.repetition_penalty,
        "stop": body.stop_strings(),
        "truncation": "error",
    }


def _submit_all(
    state: _State, lm: RoutedLM, prompts: Sequence[Any], kwargs: dict, n: int, seed: int | None, stream: bool
) -> list[tuple[Any, QueuedRequest]]:
    """One engine request per (prompt, choice); all are validated before any is queued."""
    state.reserve(len(prompts) * n)
    submitted: list[tuple[Any, QueuedRequest]] = []
    try:
        for prompt in prompts:
            for choice in range(n):
                call = {**kwargs, "seed": None if seed is None else seed + choice}
                if stream:
                    submitted.append(lm.astream_with_result(prompt, **call))
                else:
                    submitted.append((None, lm.submit(prompt, **call)))
    except BaseException as error:
        for _, queued in submitted:
            queued.cancel()
        state.release(len(prompts) * n)
        raise from_library_error(error) from None
    for _, queued in submitted:
        queued.future.add_done_callback(lambda _f: state.release())
    return submitted


async def _serve(
    state: _State,
    lm: RoutedLM,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[Any],
    request: Request,
    *,
    chat: bool,
) -> Response:
    kwargs = _call_kwargs(lm, body, state.config.default_max_tokens)
    whole = "tools" in kwargs  # tool calls are parsed from the whole answer: streamed at its end
    submitted = _submit_all(state, lm, prompts, kwargs, body.n, body.seed, body.stream and not whole)
    reply = _Reply(body.model, chat, body.n)
    if body.stream and whole:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream_whole(state, reply, [q for _, q in submitted], request, usage), media_type="text/event-stream"
        )
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(state, reply, submitted, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await _wait([queued for _, queued in submitted], request)
    for result in results:
        state.metrics.observe(result)
    return JSONResponse(reply.whole(results))


async def _wait(queued: list[QueuedRequest], request: Request) -> list[Result]:
    """The results; a client that hangs up cancels its requests (their slots free at the next step)."""
    together = asyncio.gather(*(asyncio.wrap_future(q.future) for q in queued))
    try:
        while True:
            try:
                return list(await asyncio.wait_for(asyncio.shield(together), timeout=1.0))
            except TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError from None
    except asyncio.CancelledError:
        for q in queued:
            q.cancel()
        raise
    except Exception as error:
        for q in queued:
            q.cancel()
        raise from_library_error(error) from None


@dataclass
class _Reply:
    """Builds the response bodies of one request (whole, or as stream chunks)."""

    model: str
    chat: bool
    n: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, results: Sequence[Result]) -> dict[str, int]:
        prompt = sum(r.prompt_tokens for i, r in enumerate(results) if i % self.n == 0)  # once per prompt
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, results: Sequence[Result]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {"index": index, "finish_reason": result.finish_reason, "logprobs": None}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
                if result.tool_calls:
                    choice["message"]["tool_calls"] = _openai_tool_calls(result)
            else:
                choice["text"] = result.text
            choice["routing"] = result.routing.to_dict()
            choices.append(choice)
        return {**self._head(self.object), "choices": choices, "usage": self.usage(results)}

    def chunk(
        self,
        index: int,
        delta: str,
        *,
        first: bool = False,
        routing: Any = None,
        finish: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ):
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        if self.chat and first:
            choice["delta"] = {"role": "assistant", "content": delta}
        elif self.chat and tool_calls:
            choice["delta"] = {"tool_calls": tool_calls}
        elif self.chat:
            choice["delta"] = {"content": delta} if delta else {}
        else:
            choice["text"] = delta
        if routing is not None:
            choice["routing"] = routing.to_dict()
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice]}

    def usage_chunk(self, results: Sequence[Result]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(results)}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream_whole(
    state: _State, reply: _Reply, queued: list[QueuedRequest], request: Request, include_usage: bool
) -> AsyncIterator[str]:
    """The events of answers that are sent whole (tool calls): each choice's text, calls and end."""
    try:
        results = await _wait(queued, request)
    except APIError as error:
        yield _sse(error.body())
        return
    for index, result in enumerate(results):
        state.metrics.observe(result)
        yield _sse(reply.chunk(index, result.text, first=True, routing=result.routing))
        if result.tool_calls:
            calls = [{"index": i, **c} for i, c in enumerate(_openai_tool_calls(result))]
            yield _sse(reply.chunk(index, "", tool_calls=calls))
        yield _sse(reply.chunk(index, "", finish=result.finish_reason))
    if include_usage:
        yield _sse(reply.usage_chunk(results))
    yield _sse("[DONE]")


async def _stream(
    state: _State, reply: _Reply, submitted: list[tuple[Any, QueuedRequest]], include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of every choice as its tokens come; a failure ends the stream with an
    error event. Closing the stream (the client hung up) cancels every choice's request."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, deltas: AsyncIterator[str], queued: QueuedRequest) -> None:
        try:
            async for delta in deltas:
                await events.put((index, "delta", delta, queued))
            await events.put((index, "done", queued.future.result(), queued))
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            await events.put((index, "error", error, queued))

    tasks = [asyncio.create_task(pump(i, d, q)) for i, (d, q) in enumerate(submitted)]
    started: set[int] = set()
    results: dict[int, Result] = {}
    try:
        remaining = len(tasks)
        while remaining:
            index, kind, value, queued = await events.get()
            if kind == "error":
                yield _sse(from_library_error(value).body())
                break
            first = index not in started
            started.add(index)
            if kind == "delta":
                yield _sse(reply.chunk(index, value, first=first, routing=queued.state.routing if first else None))
                continue
            remaining -= 1
            results[index] = value
            state.metrics.observe(value)
            if first:
                yield _sse(reply.chunk(index, "", first=True, routing=value.routing))
            yield _sse(reply.chunk(index, "", finish=value.finish_reason))
        else:
            if include_usage:
                yield _sse(reply.usage_chunk([results[i] for i in sorted(results)]))
            yield _sse("[DONE]")
    finally:
        for task in tasks:
            task.cancel()
        for _, queued in submitted:
            if not queued.future.done():
                queued.cancel()
