"""The OpenAI JSON bodies the server answers with: choices, usage, routing metadata and tool calls.

:class:`Reply` builds one request's bodies, whole or as stream chunks, so that the JSON and the SSE
paths share one shape (ids, ``object`` names, each choice's ``routing``). Pure functions of the
results: nothing here touches the engine or the HTTP request.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loraretriever.server.protocol import AUTO_MODEL
from loraretriever.serving.routed_lm import Result

__all__ = ["Reply", "model_list", "openai_tool_calls"]


def model_list(base: str, names: Sequence[str]) -> dict[str, Any]:
    """The ``GET /v1/models`` body: ``auto`` (route each prompt), then each adapter over ``base``."""
    created = int(time.time())
    entry = {"object": "model", "created": created, "owned_by": "loraretriever", "root": base}
    entries = [{"id": AUTO_MODEL, **entry}, *({"id": name, **entry, "parent": base} for name in names)]
    return {"object": "list", "data": entries}


def openai_tool_calls(result: Result) -> list[dict[str, Any]]:
    """A result's tool calls in OpenAI's shape (``arguments`` as a JSON string)."""
    return [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["args"])}}
        for c in result.tool_calls
    ]


@dataclass
class Reply:
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

    def usage(self, results: Sequence[Result]) -> dict[str, Any]:
        first = [r for i, r in enumerate(results) if i % self.n == 0]  # a prompt counts once
        prompt = sum(r.prompt_tokens for r in first)
        completion = sum(r.completion_tokens for r in results)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in first)},
        }

    def whole(self, results: Sequence[Result]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {"index": index, "finish_reason": result.finish_reason, "logprobs": None}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
                if result.tool_calls:
                    choice["message"]["tool_calls"] = openai_tool_calls(result)
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
