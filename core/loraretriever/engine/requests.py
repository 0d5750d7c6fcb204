"""What a request is: its prompt, generation settings, result, and its state inside the engine.

Only plain data and per-request text handling live here (incremental detokenisation, stop
strings, the final :class:`Completion`); the scheduler in :mod:`loraretriever.engine.engine`
decides what runs when.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from loraretriever.engine.routing import Routing

__all__ = [
    "ChatMessages",
    "Completion",
    "FinishReason",
    "GenerationConfig",
    "Prompt",
    "PromptTooLong",
    "RequestError",
    "RequestState",
    "StreamEvent",
    "prompt_text",
]

ChatMessages = Sequence[Mapping[str, str]]
Prompt = str | ChatMessages
"""A plain text prompt, or chat messages ``[{"role": "user", "content": ...}, ...]`` that are always
formatted with the model's chat template."""

FinishReason = Literal["stop", "length"]


class RequestError(ValueError):
    """One request cannot be served (bad prompt, settings or limits); other requests are unaffected."""


class PromptTooLong(RequestError):
    """A prompt over ``max_prompt_tokens`` (or the context window) with ``truncation="error"``."""


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
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed={self.seed!r} must be an integer or None.")
        if not (
            isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 means greedy).")
        if not (
            isinstance(self.repetition_penalty, int | float)
            and math.isfinite(self.repetition_penalty)
            and self.repetition_penalty > 0
        ):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0 (1 is off).")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1].")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must hold non-empty strings.")
        if self.truncation not in ("left", "error"):
            raise ValueError(f"truncation={self.truncation!r} must be 'left' or 'error'.")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(
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
    batch_rows: int = 0  # the most requests it was decoded together with (itself included)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    done: Completion | None = None
    error: BaseException | None = None
    cancelled: bool = False
    prefix_offset: int = 0  # incremental detokenisation window: ids[prefix_offset:read_offset] is
    read_offset: int = 0  # context already turned into text

    @property
    def finished(self) -> bool:
        return self.done is not None or self.error is not None

    def cancel(self) -> None:
        """Asks the engine to drop this request; its slot is freed at the next step."""
        self.cancelled = True

    def fail(self, error: BaseException) -> None:
        """Ends the request with ``error`` (once; later calls are ignored)."""
        if self.finished:
            return
        self.error = error
        self.finished_at = time.perf_counter()
        self._release()
        if self.on_error is not None:
            self.on_error(error)

    def advance(self, token: int, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]) -> StreamEvent | None:
        """Adds one generated token; returns the text that can be shown now, and the end if reached."""
        cfg = self.config
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        finish: FinishReason | None = None
        stop_sequence = None
        if token in eos_ids and not cfg.ignore_eos:
            finish = "stop"
        else:
            self.ids.append(token)
            previous = len(self.text)
            self.text += _new_text(tokenizer, self)
            hit = _find_stop(self.text, cfg.stop, previous)
            if hit is not None:
                position, stop_sequence = hit
                self.text = self.text[:position]
                finish = "stop"
            elif len(self.ids) >= cfg.max_new_tokens:
                finish = "length"
        if finish is not None and stop_sequence is None:
            self.text += _new_text(tokenizer, self, flush=True)  # bytes of a character cut off at the end
        if finish is not None:
            self.finished_at = time.perf_counter()
            self._release()
            self.done = Completion(
                text=self.text,
                finish_reason=finish,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.ids),
                routing=self.routing,
                stop_sequence=stop_sequence,
                truncated_prompt=self.truncated,
            )
            delta = self.text[len(self.emitted) :]
            self.emitted = self.text
            return self._emit(StreamEvent(self.index, delta, self.done))
        shown = self.text[: len(self.text) - _held_back(self.text, cfg.stop)]
        if len(shown) > len(self.emitted) and shown.startswith(self.emitted):
            delta = shown[len(self.emitted) :]
            self.emitted = shown
            return self._emit(StreamEvent(self.index, delta))
        return None

    def _release(self) -> None:
        """Lets the pool evict the adapters again (the request has ended)."""
        if self.adapters is not None:
            self.adapters.release()

    def _emit(self, event: StreamEvent) -> StreamEvent:
        if self.on_event is not None:
            self.on_event(event)
        return event


def prompt_text(prompt: Prompt, index: int = 0) -> str:
    """The text a prompt is about: itself, or the last user message of a chat (what routing embeds).

    Raises:
        ValueError: for an empty prompt, empty chat, or malformed messages, naming the row.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"prompt {index} is empty ({prompt!r}); pass some text to generate from.")
        return prompt
    if not isinstance(prompt, Sequence) or not prompt:
        raise ValueError(f"prompt {index} is empty ({prompt!r}); pass text or a non-empty list of chat messages.")
    for message in prompt:
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise ValueError(f"prompt {index}: chat message {message!r} needs 'role' and 'content'.")
    users = [m["content"] for m in prompt if m["role"] == "user" and str(m["content"]).strip()]
    if not users:
        raise ValueError(f"prompt {index} has no non-empty user message; the last user message is what gets routed.")
    return str(users[-1])


def _new_text(tokenizer: PreTrainedTokenizerBase, row: RequestState, flush: bool = False) -> str:
    """The text the newest tokens complete. Only a short window of ids is decoded (incremental
    detokenisation, as in TGI and vLLM), so a step costs the same at token 5 and token 500; a partial
    UTF-8 character waits for its remaining bytes unless ``flush``."""
    prefix = tokenizer.decode(row.ids[row.prefix_offset : row.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(row.ids[row.prefix_offset :], skip_special_tokens=True)
    if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
        row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
        return full[len(prefix) :]
    return ""


def _find_stop(text: str, stops: tuple[str, ...], previous: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text``; only looks where the newest token can have completed one."""
    best = None
    for stop in stops:
        position = text.find(stop, max(0, previous - len(stop) + 1))
        if position != -1 and (best is None or position < best[0]):
            best = (position, stop)
    return best


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: a possible stop-string start or a partial character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold
