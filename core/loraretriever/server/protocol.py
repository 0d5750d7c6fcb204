"""The OpenAI request bodies the server takes, as pydantic models (unknown fields are refused).

Fields OpenAI defines but this server cannot honour are accepted only at their neutral value
(``logprobs=False``, ``frequency_penalty=0``, ...), so a client that sends a default works and a
client that asks for more gets a 400 naming the field. ``routing`` is this server's extra field:
the :class:`~loraretriever.retrieval.options.RouteOptions` of the library, by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraretriever.errors import InvalidOptionError
from loraretriever.retrieval.options import ROUTE_OPTIONS
from loraretriever.server.errors import APIError

__all__ = [
    "AUTO_MODEL",
    "AdapterRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "unsupported_fields",
]

AUTO_MODEL = "auto"
"""``model="auto"`` routes each prompt; any other model name pins that adapter."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    """One message; ``content`` is text or a list of text parts (other parts are refused)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """What chat and text completions share."""

    model: str = Field(description="'auto' routes each prompt; an adapter's name pins it (GET /v1/models).")
    n: int = Field(default=1, ge=1, le=16, description="Choices per prompt.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings that end the text.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 is greedy, as OpenAI's default 1 samples.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=10.0, description="vLLM's extra parameter: above 1 discourages repeats; 1 is off."
    )
    seed: int | None = Field(default=None, description="Choice i samples with seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    routing: dict[str, Any] | None = Field(
        default=None, description="Routing options (RouteOptions by name): mode, top_k, filter, exclude, ..."
    )

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise InvalidOptionError(f"stop has {len(stop)} strings; at most 4 are allowed.")
        return stop

    def route_options(self) -> dict[str, Any]:
        """``routing`` checked: only RouteOptions names (their values are checked by the library)."""
        options = dict(self.routing or {})
        unknown = sorted(set(options) - set(ROUTE_OPTIONS))
        if unknown:
            message = f"routing has unknown option(s) {unknown}; it takes {list(ROUTE_OPTIONS)}."
            raise APIError(400, message, param="routing")
        return options

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(description="One prompt or a list (token ids are not taken).")
    max_tokens: int | None = Field(default=None, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens


class AdapterRequest(_Body):
    """``POST /v1/adapters``: store an adapter in the pool (and its card, which makes it routable)."""

    source: str = Field(description="A PEFT adapter directory on the server, or a hub id.")
    name: str | None = Field(default=None, description="Default: the card's name, else the directory's.")
    card: dict[str, Any] | None = Field(default=None, description="Its card: samples, metadata, ...")


def unsupported_fields(body: _Sampling) -> list[str]:
    """The fields set to something this server cannot do (each is a 400 naming it)."""
    neutral: dict[str, Any] = {
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "logit_bias": None,
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "echo": False,
        "best_of": (None, 1),
        "suffix": None,
        "modalities": (None, ["text"]),
    }
    bad = []
    for name, allowed in neutral.items():
        if name not in type(body).model_fields:
            continue
        value = getattr(body, name)
        options = allowed if isinstance(allowed, tuple) else (allowed,)
        if value not in options and not (value == {} and None in options):
            bad.append(name)
    return bad
