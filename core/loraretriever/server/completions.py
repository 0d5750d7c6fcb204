"""A completion request as engine requests: its prompts, its library call, submitting and waiting.

What ``/v1/chat/completions`` and ``/v1/completions`` share before a reply is built: OpenAI messages
become the library's chat (an assistant's tool calls in the form the model writes them), the body
becomes :meth:`RoutedLM.submit`'s keyword arguments, each (prompt, choice) becomes one engine
request counted against the server's queue bound, and a client that hangs up cancels its requests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from fastapi import Request

from loraretriever.engine.worker import QueuedRequest
from loraretriever.server.errors import APIError, from_library_error, unknown_model
from loraretriever.server.protocol import AUTO_MODEL, ChatCompletionRequest, CompletionRequest, unsupported_fields
from loraretriever.server.state import ServerState
from loraretriever.serving.routed_lm import Result, RoutedLM
from loraretriever.serving.tools import tool_call_text

__all__ = ["call_kwargs", "chat_messages", "submit_all", "wait_for_results"]


def chat_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """A chat request's messages as the library's chat (``developer`` is read as ``system``)."""
    return [{"role": _role(m.role), "content": _message_text(m)} for m in messages]


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


def call_kwargs(lm: RoutedLM, body: ChatCompletionRequest | CompletionRequest, default_max_tokens: int) -> dict:
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


def submit_all(
    state: ServerState, lm: RoutedLM, prompts: Sequence[Any], kwargs: dict, n: int, seed: int | None, stream: bool
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


async def wait_for_results(queued: list[QueuedRequest], request: Request) -> list[Result]:
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
