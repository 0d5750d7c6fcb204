"""Batched generation over routed rows: left padding, KV cache, per-row settings, streaming.

Every row of a batch has its own routing and its own :class:`GenerationConfig` (length, sampling,
stop strings), so requests from different callers can share one batched pass. Finished rows leave
the batch (their KV cache rows and composition factors are dropped), so a long row does not make
short ones cost more.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from loraretriever.engine.composer import Composer
from loraretriever.engine.routing import Routing

__all__ = ["ChatMessages", "Completion", "GenerationConfig", "Generator", "Prompt", "StreamEvent", "prompt_text"]

ChatMessages = Sequence[Mapping[str, str]]
Prompt = str | ChatMessages
"""A plain text prompt, or chat messages ``[{"role": "user", "content": ...}, ...]`` that are always
formatted with the model's chat template."""

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationConfig:
    """How one row is generated.

    Example:
        >>> GenerationConfig(max_new_tokens=16, stop=("\\n",))
        GenerationConfig(max_new_tokens=16, temperature=0.0, top_p=1.0, seed=None, stop=('\\n',), chat_template=False, system_prompt=None, ignore_eos=False, truncation='left')
    """

    max_new_tokens: int = field(default=64, metadata={"help": "The most tokens to generate."})
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy decoding, > 0 to sample."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer.")
        if not (
            isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 means greedy).")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1].")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must hold non-empty strings.")
        if self.truncation not in ("left", "error"):
            raise ValueError(f"truncation={self.truncation!r} must be 'left' or 'error'.")


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


@dataclass
class _Row:
    index: int
    config: GenerationConfig
    routing: Routing
    prompt_ids: list[int]
    truncated: bool
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    done: Completion | None = None
    prefix_offset: int = 0  # incremental detokenisation window: ids[prefix_offset:read_offset] is
    read_offset: int = 0  # context already turned into text


class Generator:
    """Generates text for a batch of prompts, each with its own routing and settings, in one pass.

    Args:
        model: A causal LM (eval mode).
        tokenizer: Its tokenizer.
        composer: Applies routings; without one, every row must be routed to the base model.

    Example:
        >>> generator = Generator(model, tokenizer, Composer(model, pool))  # doctest: +SKIP
        >>> out = generator.generate(["Translate to French: cat", "Is this positive? great film"],
        ...                          [Routing.pinned(["wmt"]), Routing.pinned(["sst2"])],
        ...                          GenerationConfig(max_new_tokens=8))  # doctest: +SKIP
        >>> out[1].text, out[1].finish_reason  # doctest: +SKIP
        ('positive', 'stop')
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, composer: Composer | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.composer = composer
        self.context_window = int(getattr(model.config, "max_position_embeddings", 2048))
        self._eos_ids = _eos_token_ids(model, tokenizer)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token).")
        self._pad_id = int(tokenizer.pad_token_id)

    def generate(
        self,
        prompts: Sequence[Prompt],
        routings: Sequence[Routing] | None = None,
        config: GenerationConfig | Sequence[GenerationConfig] | None = None,
    ) -> list[Completion]:
        """Generates every row in one batched pass; returns one :class:`Completion` per prompt."""
        results: list[Completion | None] = [None] * len(prompts)
        for event in self.stream(prompts, routings, config):
            if event.completion is not None:
                results[event.row] = event.completion
        return results  # type: ignore[return-value]

    def stream(
        self,
        prompts: Sequence[Prompt],
        routings: Sequence[Routing] | None = None,
        config: GenerationConfig | Sequence[GenerationConfig] | None = None,
    ) -> Iterator[StreamEvent]:
        """Yields text deltas of every row as tokens are produced, then each row's completion.

        Text that might be the start of a stop string, or an incomplete UTF-8 character, is held
        back until it is resolved, so the deltas always add up to the final text.
        """
        rows = self._prepare(prompts, routings, config)
        if not rows:
            return
        composing = self.composer is not None and any(not r.routing.is_base for r in rows)
        if composing:
            context = self.composer.apply([r.routing for r in rows])
        else:
            if any(not r.routing.is_base for r in rows):
                raise ValueError("rows are routed to adapters but the Generator has no Composer.")
            context = nullcontext()
        with context, torch.inference_mode():
            yield from self._decode(rows, composing)

    # -- internals ---------------------------------------------------------------------------
    def _prepare(self, prompts, routings, config) -> list[_Row]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt].")
        n = len(prompts)
        routings = list(routings) if routings is not None else [Routing.base()] * n
        configs = [config or GenerationConfig()] * n if not isinstance(config, Sequence) else list(config)
        if len(routings) != n or len(configs) != n:
            raise ValueError(f"got {n} prompts, {len(routings)} routings and {len(configs)} configs; they must match.")
        for i, prompt in enumerate(prompts):
            prompt_text(prompt, i)  # raises for an empty prompt
        rows = []
        for i, (prompt, routing, cfg) in enumerate(zip(prompts, routings, configs, strict=True)):
            ids = self._encode(prompt, cfg)
            budget = self.context_window - cfg.max_new_tokens
            if budget < 1:
                raise ValueError(
                    f"max_new_tokens={cfg.max_new_tokens} leaves no room for the prompt in the "
                    f"{self.context_window}-token context window; lower it."
                )
            truncated = len(ids) > budget
            if truncated:
                message = (
                    f"prompt {i} has {len(ids)} tokens but only {budget} fit the {self.context_window}-token "
                    f"context window with max_new_tokens={cfg.max_new_tokens}"
                )
                if cfg.truncation == "error":
                    raise ValueError(message + "; shorten it or set truncation='left'.")
                warnings.warn(message + "; its oldest tokens were dropped.", stacklevel=4)
                ids = ids[-budget:]
            generator = None
            if cfg.temperature > 0:
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2**62, ()).item()))
            rows.append(_Row(i, cfg, routing, ids, truncated, generator))
        return rows

    def _encode(self, prompt: Prompt, config: GenerationConfig) -> list[int]:
        if isinstance(prompt, str) and not config.chat_template:
            return self.tokenizer(prompt)["input_ids"]
        if self.tokenizer.chat_template is None:
            raise ValueError(
                "chat messages or chat_template=True need a tokenizer with a chat template; this one has none."
            )
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if config.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": config.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, rows: list[_Row], composing: bool) -> Iterator[StreamEvent]:
        device = self.model.device
        length = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long, device=device)
        attention = torch.zeros((len(rows), length), dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            input_ids[b, length - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, device=device)
            attention[b, length - len(row.prompt_ids) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        active = list(rows)
        step_input, step_positions = input_ids, positions
        while active:
            out = self.model(
                input_ids=step_input,
                attention_mask=attention,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            next_ids = self._choose(out.logits[:, -1, :], active)
            keep = []
            for b, row in enumerate(active):
                event = self._advance(row, int(next_ids[b]))
                if event is not None:
                    yield event
                if row.done is None:
                    keep.append(b)
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                if composing:
                    self.composer.select_rows(index)
                next_ids, attention, step_positions = next_ids[index], attention[index], step_positions[index]
                active = [active[b] for b in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
            step_input = next_ids.unsqueeze(1)
            step_positions = step_positions[:, -1:] + 1

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        chosen = logits.argmax(dim=-1)
        for b, row in enumerate(rows):
            if row.config.temperature > 0:
                chosen[b] = _sample(logits[b], row.config.temperature, row.config.top_p, row.generator)
        return chosen

    def _advance(self, row: _Row, token: int) -> StreamEvent | None:
        """Adds one token to a row; returns the text that can be shown now, and the end if reached."""
        cfg = row.config
        finish: FinishReason | None = None
        stop_sequence = None
        if token in self._eos_ids and not cfg.ignore_eos:
            finish = "stop"
        else:
            row.ids.append(token)
            previous = len(row.text)
            row.text += _new_text(self.tokenizer, row)
            hit = _find_stop(row.text, cfg.stop, previous)
            if hit is not None:
                position, stop_sequence = hit
                row.text = row.text[:position]
                finish = "stop"
            elif len(row.ids) >= cfg.max_new_tokens:
                finish = "length"
        if finish is not None and stop_sequence is None:
            row.text += _new_text(self.tokenizer, row, flush=True)  # bytes of a character cut off at the end
        if finish is not None:
            row.done = Completion(
                text=row.text,
                finish_reason=finish,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=len(row.ids),
                routing=row.routing,
                stop_sequence=stop_sequence,
                truncated_prompt=row.truncated,
            )
            delta = row.text[len(row.emitted) :]
            row.emitted = row.text
            return StreamEvent(row.index, delta, row.done)
        shown = row.text[: len(row.text) - _held_back(row.text, cfg.stop)]
        if len(shown) > len(row.emitted) and shown.startswith(row.emitted):
            delta = shown[len(row.emitted) :]
            row.emitted = shown
            return StreamEvent(row.index, delta)
        return None


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


def _new_text(tokenizer: PreTrainedTokenizerBase, row: _Row, flush: bool = False) -> str:
    """The text the newest tokens complete. Only a short window of ids is decoded (incremental
    detokenisation, as in TGI and vLLM), so a step costs the same at token 5 and token 500; a partial
    UTF-8 character waits for its remaining bytes unless ``flush``."""
    prefix = tokenizer.decode(row.ids[row.prefix_offset : row.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(row.ids[row.prefix_offset :], skip_special_tokens=True)
    if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
        row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
        return full[len(prefix) :]
    return ""


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


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


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
