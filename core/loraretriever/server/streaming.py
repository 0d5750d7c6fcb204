"""Server-sent events for ``stream: true``: each choice's tokens as they come, or whole answers.

:func:`stream` interleaves the choices of one request as their engine requests yield tokens;
:func:`stream_whole` sends answers that must be parsed whole first (tool calls) as events once they
are done. Both end with ``[DONE]`` (after a usage chunk if asked), or with an error event when a
request fails; closing the stream cancels the requests still running.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from loraretriever.engine.worker import QueuedRequest
from loraretriever.server.completions import wait_for_results
from loraretriever.server.errors import APIError, from_library_error
from loraretriever.server.replies import Reply, openai_tool_calls
from loraretriever.server.state import ServerState
from loraretriever.serving.routed_lm import Result

__all__ = ["sse", "stream", "stream_whole"]


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data`` (a JSON body, or a literal like ``[DONE]``)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_whole(
    state: ServerState, reply: Reply, queued: list[QueuedRequest], request: Request, include_usage: bool
) -> AsyncIterator[str]:
    """The events of answers that are sent whole (tool calls): each choice's text, calls and end."""
    try:
        results = await wait_for_results(queued, request)
    except APIError as error:
        yield sse(error.body())
        return
    for index, result in enumerate(results):
        state.metrics.observe(result)
        yield sse(reply.chunk(index, result.text, first=True, routing=result.routing))
        if result.tool_calls:
            calls = [{"index": i, **c} for i, c in enumerate(openai_tool_calls(result))]
            yield sse(reply.chunk(index, "", tool_calls=calls))
        yield sse(reply.chunk(index, "", finish=result.finish_reason))
    if include_usage:
        yield sse(reply.usage_chunk(results))
    yield sse("[DONE]")


async def stream(
    state: ServerState, reply: Reply, submitted: list[tuple[Any, QueuedRequest]], include_usage: bool
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
                yield sse(from_library_error(value).body())
                break
            first = index not in started
            started.add(index)
            if kind == "delta":
                yield sse(reply.chunk(index, value, first=first, routing=queued.state.routing if first else None))
                continue
            remaining -= 1
            results[index] = value
            state.metrics.observe(value)
            if first:
                yield sse(reply.chunk(index, "", first=True, routing=value.routing))
            yield sse(reply.chunk(index, "", finish=value.finish_reason))
        else:
            if include_usage:
                yield sse(reply.usage_chunk([results[i] for i in sorted(results)]))
            yield sse("[DONE]")
    finally:
        for task in tasks:
            task.cancel()
        for _, queued in submitted:
            if not queued.future.done():
                queued.cancel()
