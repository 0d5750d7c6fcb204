"""What a request is: its prompt, generation settings, result, and its state inside the engine.

Only plain data lives here; the scheduler (:mod:`loraretriever.engine.worker`) decides what
runs when, and the output processor (:mod:`loraretriever.engine.outputs`) turns tokens into text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from loraretriever.engine.routing import Routing
from loraretriever.errors import InvalidOptionError, PromptTooLongError

__all__ = [
    "ChatMessages",
    "Completion",
    "FinishReason",
    "GenerationConfig",
    "Prompt",
    "PromptTooLong",
    "RequestError",
    "RequestState",
    "StepError",
    "StreamEvent",
    "prompt_text",
]

ChatMessages = Sequence[Mapping[str, str]]
Prompt = str | ChatMessages
"""A plain text prompt, or chat messages ``[{"role": "user", "content": ...}, ...]`` that are always
formatted with the model's chat template."""

FinishReason = Literal["stop", "length"]


class RequestError(InvalidOptionError):
    """One request cannot be served (bad prompt, settings or limits); other requests are unaffected."""


class PromptTooLong(RequestError, PromptTooLongError):
    """A prompt over ``max_prompt_tokens`` (or the context window) with ``truncation="error"`` (413)."""


class StepError(RequestError):
    """The model failed on one request's row (its forward pass raised, or its logits were not
    finite): a server-side failure (500), not a bad request, and only that request's."""

    status = 500


@dataclass(frozen=True)
class GenerationConfig:
    """How one row is generated.

    Example:
        >>> GenerationConfig(max_new_tokens=16, stop=("\\n",))
        GenerationConfig(max_new_tokens=16, temperature=0.0, top_p=1.0, repetition_penalty=1.0, seed=None, stop=('\\n',), chat_template=False, system_prompt=None, ignore_eos=False, truncation='left', grammar=None)
    """

    max_new_tokens: int = field(default=64, metadata={"help": "The most tokens to generate."})
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy decoding, > 0 to sample."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    repetition_penalty: float = field(
        default=1.0,
        metadata={
            "help": "Above 1 discourages tokens already in the prompt or the output (transformers' and vLLM's "
            "meaning); 1 is off. Small models under a grammar loop without it."
        },
    )
    seed: int | None = field(default=None, metadata={"help": "Sampling seed; the same seed gives the same text."})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "Strings that end the text (not included)."})
    chat_template: bool = field(default=False, metadata={"help": "Wrap the prompt in the model's chat template."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message, with chat_template."})
    ignore_eos: bool = field(default=False, metadata={"help": "Keep going past EOS (benchmarks need fixed lengths)."})
    truncation: Literal["left", "error"] = field(
        default="left",
        metadata={
            "help": "A prompt too long for the context window: drop its oldest tokens (with a warning), or raise."
        },
    )
    grammar: str | None = field(
        default=None,
        metadata={"help": "An llguidance grammar the text must follow (loraretriever.engine.constraints)."},
    )
    chat_tools: tuple[Mapping[str, Any], ...] | None = field(
        default=None,
        metadata={
            "help": "OpenAI function specs the chat template renders (apply_chat_template(tools=...)); set by "
            "the serving layer from a call's tools=, not a call option of its own."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise InvalidOptionError(
                f"max_new_tokens={self.max_new_tokens!r} must be a positive integer.", param="max_new_tokens"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidOptionError(f"seed={self.seed!r} must be an integer or None.", param="seed")
        if not (
            isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise InvalidOptionError(
                f"temperature={self.temperature!r} must be a finite number >= 0 (0 means greedy).", param="temperature"
            )
        if not (
            isinstance(self.repetition_penalty, int | float)
            and math.isfinite(self.repetition_penalty)
            and self.repetition_penalty > 0
        ):
            raise InvalidOptionError(
                f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0 (1 is off).",
                param="repetition_penalty",
            )
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise InvalidOptionError(f"top_p={self.top_p!r} must be in (0, 1].", param="top_p")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidOptionError(f"stop={self.stop!r} must hold non-empty strings.", param="stop")
        if self.truncation not in ("left", "error"):
            raise InvalidOptionError(f"truncation={self.truncation!r} must be 'left' or 'error'.", param="truncation")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise InvalidOptionError(
                f"grammar is a {type(self.grammar).__name__}; pass a grammar string, e.g. json_schema_grammar(schema)."
            )


@dataclass(frozen=True)
class Completion:
    """The result of one row: only the new text, why it ended, token counts and the routing."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    routing: Routing
    stop_sequence: str | None = None  # the stop string that ended the text, if one did
    truncated_prompt: bool = False  # the prompt lost its oldest tokens to fit the context window
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)


@dataclass(frozen=True)
class StreamEvent:
    """New text of one row; ``completion`` is set on the row's last event."""

    row: int
    delta: str
    completion: Completion | None = None


@dataclass(eq=False)
class RequestState:
    """One request inside the engine: what it asked for and how far it has got (plain state; the
    scheduler decides what runs).

    Args:
        prompt_ids: The prompt's tokens (after truncation).
        config: Its generation settings.
        routing: Its adapters; None until the serving layer has routed it.
        on_event: Called with each :class:`StreamEvent` of this request (text deltas, then the end).
        on_error: Called once if the request fails; no event follows.
    """

    prompt_ids: list[int]
    config: GenerationConfig
    routing: Routing | None = None
    on_event: Callable[[StreamEvent], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    truncated: bool = False
    index: int = 0  # the row number a caller knows it by (its place in a generate() call)
    payload: Any = None  # the upper layer's request (e.g. its routing options)
    rng: torch.Generator | None = None
    adapters: Any = None  # its routing's adapters (a pool's AdapterHold), held from queueing to the end
    # Routes it again (the serving layer's router) when an adapter it was routed to left the pool
    # before it was held: a router's choice, not the caller's, so the caller never sees the race.
    reroute: Callable[[], Routing] | None = None
    matcher: Any = None  # its grammar's matcher (constrained decoding), if it has a grammar
    arrived_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    queued: bool = False  # handed to an engine (a request is served once)
    prefilled: int = 0  # prompt tokens already in the KV cache
    cached_tokens: int = 0  # of those, tokens whose KV came from the prefix cache
    prefix_key: str | None = None  # its composition's key in the prefix cache (None: not cached)
    batch_rows: int = 0  # the most requests it was decoded together with (itself included)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    done: Completion | None = None
    error: BaseException | None = None
    cancelled: bool = False
    prefix_offset: int = 0  # incremental detokenisation window: ids[prefix_offset:read_offset] is
    read_offset: int = 0  # context already turned into text

    ended: FinishReason | None = None  # set by the step thread: EOS ("stop") or max_new_tokens ("length")
    stopped: bool = False  # set by the output processor: a stop string ended the text
    outputs: Any = None  # the engine's OutputProcessor once queued: callbacks go through it, in order
    detokenized: int = 0  # ids[:detokenized] are text (the output processor's progress)

    @property
    def finished(self) -> bool:
        """Whether the engine is done with it: it ended, stopped at a stop string, or failed."""
        return self.ended is not None or self.stopped or self.error is not None

    def cancel(self) -> None:
        """Asks the engine to drop this request; its slot is freed at the next step."""
        self.cancelled = True

    def fail(self, error: BaseException) -> None:
        """Ends the request with ``error`` (once; later calls are ignored). The callback runs after
        the text events already produced (through the output processor, when it has one)."""
        if self.finished:
            return
        self.error = error
        self.finished_at = time.perf_counter()
        self.release()
        if self.outputs is not None:
            self.outputs.post_error(self, error)
        elif self.on_error is not None:
            self.on_error(error)

    def append_token(self, token: int, eos_ids: set[int]) -> FinishReason | None:
        """Adds one sampled token (the step thread's part: no text); returns why the request ended
        if it did. EOS is not kept; stop strings are found in the text by the output processor."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in eos_ids and not self.config.ignore_eos:
            self.ended = "stop"
        else:
            self.ids.append(token)
            if len(self.ids) >= self.config.max_new_tokens:
                self.ended = "length"
        if self.ended is not None:
            self.finished_at = time.perf_counter()
            self.release()
        return self.ended

    def release(self) -> None:
        """Lets the pool evict the adapters again (the request has ended; idempotent)."""
        if self.adapters is not None:
            self.adapters.release()


def prompt_text(prompt: Prompt, index: int = 0) -> str:
    """The text a prompt is about: itself, or the last user message of a chat (what routing embeds).

    Raises:
        ValueError: for an empty prompt, empty chat, or malformed messages, naming the row.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidOptionError(f"prompt {index} is empty ({prompt!r}); pass some text to generate from.")
        return prompt
    if not isinstance(prompt, Sequence) or not prompt:
        raise InvalidOptionError(
            f"prompt {index} is empty ({prompt!r}); pass text or a non-empty list of chat messages."
        )
    for message in prompt:
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise InvalidOptionError(f"prompt {index}: chat message {message!r} needs 'role' and 'content'.")
    users = [m["content"] for m in prompt if m["role"] == "user" and str(m["content"]).strip()]
    if not users:
        raise InvalidOptionError(
            f"prompt {index} has no non-empty user message; the last user message is what gets routed."
        )
    return str(users[-1])
