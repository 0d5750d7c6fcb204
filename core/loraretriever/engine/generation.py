"""Inline generation: a batch of prompts, each with its own routing and settings, served by an
:class:`~loraretriever.engine.engine.Engine` stepped in the caller's thread.

This is what evaluations, benchmarks and tests call directly; ``RoutedLM`` runs the same engine in
a worker thread (:mod:`loraretriever.engine.worker`) so that concurrent callers share steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraretriever.engine.composer import Composer
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.requests import Completion, GenerationConfig, Prompt, StreamEvent, prompt_text
from loraretriever.engine.routing import Routing
from loraretriever.errors import InvalidOptionError, InvalidTypeError

__all__ = ["Generator"]


class Generator:
    """Generates text for a batch of prompts, each with its own routing and settings.

    Args:
        model: A causal LM (eval mode).
        tokenizer: Its tokenizer.
        composer: Applies routings; without one, every row must be routed to the base model.
        config: The engine's limits and policy.

    Example:
        >>> generator = Generator(model, tokenizer, Composer(model, pool))  # doctest: +SKIP
        >>> out = generator.generate(["Translate to French: cat", "Is this positive? great film"],
        ...                          [Routing.pinned(["wmt"]), Routing.pinned(["sst2"])],
        ...                          GenerationConfig(max_new_tokens=8))  # doctest: +SKIP
        >>> out[1].text, out[1].finish_reason  # doctest: +SKIP
        ('positive', 'stop')
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        composer: Composer | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.engine = Engine(model, tokenizer, composer, config)

    @property
    def context_window(self) -> int:
        return self.engine.context_window

    @property
    def composer(self) -> Composer | None:
        return self.engine.composer

    def generate(
        self,
        prompts: Sequence[Prompt],
        routings: Sequence[Routing] | None = None,
        config: GenerationConfig | Sequence[GenerationConfig] | None = None,
    ) -> list[Completion]:
        """Generates every row; returns one :class:`Completion` per prompt."""
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

        Raises:
            RequestError: a prompt or setting that cannot be served (before anything runs), or the
                first row that fails while generating.
        """
        if isinstance(prompts, str):
            raise InvalidTypeError("prompts must be a list of strings, not one string; wrap it: [prompt].")
        n = len(prompts)
        routings = list(routings) if routings is not None else [Routing.base()] * n
        configs = [config or GenerationConfig()] * n if not isinstance(config, Sequence) else list(config)
        if len(routings) != n or len(configs) != n:
            raise InvalidOptionError(
                f"got {n} prompts, {len(routings)} routings and {len(configs)} configs; they must match."
            )
        for i, prompt in enumerate(prompts):
            prompt_text(prompt, i)  # every prompt is checked before any is tokenized
        events: list[StreamEvent] = []
        requests = [
            self.engine.new_request(prompt, cfg, routing, index=i, on_event=events.append)
            for i, (prompt, routing, cfg) in enumerate(zip(prompts, routings, configs, strict=True))
        ]
        if not requests:
            return
        self.engine.add(requests)
        try:
            while not all(r.finished for r in requests):
                self.engine.step()
                yield from events
                events.clear()
                failed = next((r for r in requests if r.error is not None), None)
                if failed is not None:
                    raise failed.error
        finally:
            for request in requests:  # a caller that stops early frees the rows
                if not request.finished:
                    request.cancel()
            while any(not r.finished for r in requests):
                self.engine.step()
