"""RoutedLM: base model + LoRA pool + router + composer + generation settings, behind one front.

Every call is routed: each prompt gets its own adapters (retrieved, or pinned by the caller) and
the whole list is ONE batched generation. Concurrent single calls (threads or asyncio) are merged
into batches by a :class:`~loraretriever.request_queue.BatchingQueue`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraretriever.composer import Composer
from loraretriever.gates import FlowGate, Gate, GateError, MeteoraGate, gate_dirs, load_gate
from loraretriever.generation import Completion, GenerationConfig, Generator, Prompt, prompt_text
from loraretriever.pool import LoraPool
from loraretriever.pool_dir import adapter_dirs, delete_adapter, load_adapters, store_adapter
from loraretriever.request_queue import BatchingQueue, QueuedRequest
from loraretriever.routing import GATED_MODES, MODES, Routing

logger = logging.getLogger(__name__)

__all__ = [
    "CALL_DEFAULT_FIELDS",
    "GENERATION_KEYS",
    "ROUTE_KEYS",
    "Result",
    "RoutedLM",
    "RoutesPrompts",
    "Timings",
    "call_options",
]

GENERATION_KEYS = frozenset(f.name for f in dataclasses.fields(GenerationConfig))
ROUTE_KEYS = frozenset(
    {
        "top_k",
        "mode",
        "weighting",
        "routing_temperature",
        "min_similarity",
        "filter",
        "exclude",
        "adapters",
        "adapter_weights",
        "gate",
    }
)

# The per-call options that the LangChain and LlamaIndex fronts expose as fields (their defaults).
CALL_DEFAULT_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "chat_template",
    "top_k",
    "mode",
    "adapters",
    "filter",
    "gate",
)


def call_options(owner: object, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The options of one call: ``owner``'s fields named in :data:`CALL_DEFAULT_FIELDS` (those not
    None) overridden by the call's kwargs.

    Raises:
        TypeError: a kwarg that is neither a generation nor a routing option, naming both lists.
    """
    unknown = set(overrides) - GENERATION_KEYS - ROUTE_KEYS
    if unknown:
        raise TypeError(
            f"{type(owner).__name__} got unknown argument(s) {sorted(unknown)}; it takes generation options "
            f"{sorted(GENERATION_KEYS)} and routing options {sorted(ROUTE_KEYS)}."
        )
    defaults = {name: getattr(owner, name, None) for name in CALL_DEFAULT_FIELDS}
    return {**{k: v for k, v in defaults.items() if v is not None}, **overrides}


class RoutesPrompts(Protocol):
    """What RoutedLM needs of a router (e.g. :class:`loraretriever.router.Router`)."""

    def route(self, prompts: Sequence[str], top_k: int | None = None, **kwargs: Any) -> list[Routing]: ...


@dataclass(frozen=True)
class Timings:
    """Seconds spent waiting for a batch, routing, and generating (the whole batch)."""

    queue_s: float = 0.0
    route_s: float = 0.0
    generate_s: float = 0.0


@dataclass(frozen=True)
class Result:
    """One prompt's answer: the new text, its routing, why it ended, token counts and timings."""

    text: str
    routing: Routing
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None
    truncated_prompt: bool = False
    timings: Timings = field(default_factory=Timings)
    batch_size: int = 1  # rows in the generation that served this prompt

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["routing"] = self.routing.to_dict()
        return data


@dataclass(frozen=True)
class _Request:
    prompt: Prompt
    config: GenerationConfig
    route_options: dict[str, Any]
    route_key: tuple  # the options frozen, so requests that share them are routed together


class RoutedLM:
    """A causal LM whose every call is routed to its own LoRAs, served in batches.

    Args:
        model: The base model.
        tokenizer: Its tokenizer (left padding).
        pool: The LoRA pool of that model.
        router: Chooses adapters per prompt; without one, calls must pin ``adapters=`` or get the
            base model.
        generation: Default generation settings (overridable per call).
        route_defaults: Default routing options (``top_k``, ``mode``, ``weighting``, ...).
        max_batch_size: The most rows in one generation.
        max_wait_ms: How long a single call waits for others to share its batch.

    Example:
        >>> lm = RoutedLM.from_pretrained(pool_dir="my_pool")  # doctest: +SKIP
        >>> results = lm.generate(["Translate to French: cat", "Is 'great film' positive?"])  # doctest: +SKIP
        >>> print(results[1].routing)  # doctest: +SKIP
        mixture: sst2 0.33 (sim 0.812), imdb 0.33 (sim 0.790), yelp 0.33 (sim 0.701)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pool: LoraPool,
        router: RoutesPrompts | None = None,
        *,
        generation: GenerationConfig | None = None,
        route_defaults: Mapping[str, Any] | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 10.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.router = router
        self.composer = Composer(model, pool)
        self.generator = Generator(model, tokenizer, self.composer)
        self.generation = generation or GenerationConfig()
        self.route_defaults = self._check_route_options(dict(route_defaults or {}))
        self.max_batch_size = max_batch_size
        self._queue = BatchingQueue(self._run_queued, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
        self._engine_lock = threading.Lock()
        self.pool_dir: Path | None = None  # set by from_pretrained(pool_dir=...)
        self.generations = 0  # batched generations run so far (one per batch)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | Path | None = None,
        *,
        pool_dir: str | Path | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        router: RoutesPrompts | None = None,
        embedder: Any = None,
        chroma_host: str | None = None,
        chroma_port: int = 8000,
        **kwargs: Any,
    ) -> RoutedLM:
        """Loads a base model (hub id, local path, or the packaged default), its adapters and router.

        Args:
            model_id: See :func:`loraretriever.load_base_model`.
            pool_dir: A pool directory (``adapters/``, ``cards/``, ``index/``, ``gates/``): its adapters
                and gates are loaded and a :class:`~loraretriever.router.Router` over its cards
                follows the pool.
            adapters: More ``{name: directory or hub id}`` to add (not stored in ``pool_dir``).
            router: A router to use instead of the pool directory's.
            embedder: The router's embedder (an Embedder, model id or directory; default MiniLM).
            chroma_host: Share the index on a ``chroma run`` server at ``chroma_host:chroma_port``.
            chroma_port: The server's port.
            **kwargs: Passed to :class:`RoutedLM`.

        Example:
            >>> lm = RoutedLM.from_pretrained(pool_dir="~/loras")  # doctest: +SKIP
        """
        from loraretriever.base_model import load_base_model

        model, tokenizer = load_base_model(model_id)
        return cls.from_model(
            model,
            tokenizer,
            pool_dir=pool_dir,
            adapters=adapters,
            router=router,
            embedder=embedder,
            chroma_host=chroma_host,
            chroma_port=chroma_port,
            **kwargs,
        )

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        pool_dir: str | Path | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        router: RoutesPrompts | None = None,
        embedder: Any = None,
        chroma_host: str | None = None,
        chroma_port: int = 8000,
        **kwargs: Any,
    ) -> RoutedLM:
        """Like :meth:`from_pretrained`, for a model and tokenizer already loaded."""
        pool = LoraPool(model)
        if pool_dir is not None:
            load_adapters(pool, pool_dir)
        for name, source in (adapters or {}).items():
            pool.add(source, name=name)
        if router is None and pool_dir is not None:
            from loraretriever.router import Router

            router = Router.open(pool_dir, embedder=embedder, host=chroma_host, port=chroma_port, pool=pool)
        lm = cls(model, tokenizer, pool, router, **kwargs)
        lm.pool_dir = Path(pool_dir).expanduser() if pool_dir is not None else None
        if pool_dir is not None:
            for name, directory in gate_dirs(pool_dir).items():
                lm.register_gate(name, load_gate(directory))
        return lm

    # -- gates -------------------------------------------------------------------------------
    @property
    def gates(self) -> dict[str, Gate]:
        """The registered LoRA-Flow and MeteoRA gates by name (``mode="flow"`` / ``"meteora"``)."""
        return dict(self.composer.gates)

    def register_gate(self, name: str, gate: Gate) -> None:
        """Makes a gate usable as ``mode="flow"`` / ``"meteora"`` with ``gate=name``. A meteora gate
        that does not match the pool is kept: calls fall back to the retrieval mixture, saying why."""
        self.composer.register_gate(name, gate)
        if isinstance(gate, MeteoraGate) and gate.mismatch(self.pool):
            logger.warning("meteora gate %r: %s; its calls fall back to retrieval.", name, gate.mismatch(self.pool))

    # -- the pool at run time ----------------------------------------------------------------
    def add_adapter(self, source: str | Path, card: Any = None, *, name: str | None = None) -> str:
        """Adds an adapter (and its card, which makes it routable) without reloading anything.

        With a pool directory, the adapter is first stored there. Any failure undoes the steps
        already taken, so the pool, the directory and the index are left as they were.

        Args:
            source: A PEFT adapter directory (or hub id when there is no pool directory).
            card: An :class:`~loraretriever.cards.AdapterCard` or its dict (``samples``, ...).
            name: The adapter's name; defaults to the card's name or the directory name.
        """
        if card is not None and not hasattr(card, "samples"):
            from loraretriever.cards import AdapterCard

            card = AdapterCard.from_dict({"name": name or Path(str(source)).name, **dict(card)})
        name = name or (card.name if card is not None else Path(str(source).rstrip("/")).name)
        if card is not None and card.name != name:
            raise ValueError(f"the card is named {card.name!r} but the adapter {name!r}; they must match.")
        if card is not None and self.router is None:
            raise ValueError("a card needs a router; open the RoutedLM with pool_dir= or router=.")
        stored = store_adapter(self.pool_dir, source, name) if self.pool_dir is not None else None
        try:
            self.pool.add(stored or source, name=name)
        except BaseException:
            if stored is not None:
                delete_adapter(self.pool_dir, name)
            raise
        if card is not None:
            try:
                self.router.register(card)
            except BaseException:
                self.pool.remove(name)
                if stored is not None:
                    delete_adapter(self.pool_dir, name)
                raise
        return name

    def remove_adapter(self, name: str) -> None:
        """Removes an adapter: its card and index entry first (so it is never routed while missing),
        then the pool entry and the stored files."""
        self.pool.check_names([name])
        store = getattr(self.router, "store", None)
        if store is not None and name in store:
            self.router.unregister(name)
        self.pool.remove(name)
        if self.pool_dir is not None and name in adapter_dirs(self.pool_dir):
            delete_adapter(self.pool_dir, name)

    # -- routing -----------------------------------------------------------------------------
    def route(self, prompts: Sequence[Prompt], **options: Any) -> list[Routing]:
        """The routing of each prompt (a chat is routed by its last user message), with the defaults
        and ``options`` applied."""
        options = self._check_route_options({**self.route_defaults, **options})
        mode = options.pop("mode", "mixture")
        gate_name = options.pop("gate", None)
        if mode in GATED_MODES:
            return self._route_gated(prompts, mode, gate_name, options)
        if gate_name is not None:
            raise ValueError(f"gate={gate_name!r} needs mode='flow' or 'meteora' (mode is {mode!r}).")
        pinned = options.pop("adapters", None)
        weights = options.pop("adapter_weights", None)
        if pinned is not None:
            self.pool.check_names(list(pinned))
            return [Routing.pinned(pinned, weights, mode=mode)] * len(prompts)
        if self.router is None:
            return [Routing.base("no router: pass adapters= to pin some")] * len(prompts)
        router_kwargs = {
            "top_k": options.get("top_k"),
            "weighting": options.get("weighting"),
            "temperature": options.get("routing_temperature"),
            "min_similarity": options.get("min_similarity"),
            "where": options.get("filter"),
            "exclude": options.get("exclude"),
            "mode": mode,
        }
        texts = [prompt_text(p, i) for i, p in enumerate(prompts)]
        return self.router.route(texts, **{k: v for k, v in router_kwargs.items() if v is not None})

    def _route_gated(self, prompts: Sequence[Prompt], mode: str, name: str | None, options: dict) -> list[Routing]:
        """Flow: the retrieved (or pinned) top-k become the gate's slots. MeteoRA: the gate picks per
        token; a gate that no longer matches the pool falls back to the retrieval mixture."""
        gate = self._gate_for(mode, name)
        name = name or next(n for n, g in self.composer.gates.items() if g is gate)
        if isinstance(gate, MeteoraGate):
            if options.get("adapters") is not None:
                raise ValueError("mode='meteora' picks adapters per token; it takes no adapters=.")
            reason = gate.mismatch(self.pool)
            if reason is None:
                return [Routing.meteora(name)] * len(prompts)
            fallback = f"meteora gate {name!r}: {reason}; retrieval mixture used"
            return [
                dataclasses.replace(r, fallback=r.fallback or fallback)
                for r in self.route(prompts, **{**options, "mode": "mixture"})
            ]
        k = gate.config.k
        top_k = options.get("top_k") or k
        if top_k > k:
            raise GateError(f"top_k={top_k} is more than flow gate {name!r}'s {k} slots. Fix: top_k <= {k}.")
        routings = self.route(prompts, **{**options, "mode": "mixture", "top_k": top_k})
        return [r if r.is_base else dataclasses.replace(r, mode="flow", gate=name) for r in routings]

    def _gate_for(self, mode: str, name: str | None) -> Gate:
        kind = FlowGate if mode == "flow" else MeteoraGate
        if name is not None:
            gate = self.composer.gates.get(name)
            if gate is None:
                raise GateError(f"no gate named {name!r} (known: {sorted(self.composer.gates)}).")
            if not isinstance(gate, kind):
                raise GateError(f"gate {name!r} is a {gate.kind} gate, not a {mode} gate.")
            return gate
        matching = [g for g in self.composer.gates.values() if isinstance(g, kind)]
        if len(matching) != 1:
            raise GateError(
                f"mode={mode!r} needs gate=<name>: {len(matching)} {mode} gates are registered "
                f"({sorted(self.composer.gates)}). Train one with `loraretriever train-gate --kind {mode} --pool DIR`."
            )
        return matching[0]

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[Result]:
        """Routes every prompt and generates them all in one batched pass (chunks of
        ``max_batch_size``). A single prompt goes through the batching queue instead, so that
        concurrent single calls share generations."""
        prompts = self._check_prompts(prompts)
        if len(prompts) == 1:  # a lone call may share a batch with concurrent ones
            return [self.complete(prompts[0], **kwargs)]
        config, route_options = self._split_kwargs(kwargs)
        start = time.perf_counter()
        routings = self.route(prompts, **route_options)
        return self._generate_chunks(prompts, routings, config, route_s=time.perf_counter() - start)

    def generate_routed(self, prompts: Sequence[Prompt], routings: Sequence[Routing], **kwargs: Any) -> list[Result]:
        """Generates with routings the caller chose (one per prompt), e.g. an evaluation's oracle.

        Args:
            prompts: The prompts.
            routings: One :class:`Routing` per prompt (adapters must be in the pool).
            **kwargs: Generation options only (``max_new_tokens``, ``temperature``, ...).
        """
        prompts = self._check_prompts(prompts)
        config, route_options = self._split_kwargs(kwargs)
        if route_options:
            raise TypeError(f"routing options {sorted(route_options)} do not apply: the routings are given.")
        if len(routings) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(routings)} routings; pass one per prompt.")
        for routing in routings:
            self.pool.check_names(list(routing.adapters))
        return self._generate_chunks(prompts, list(routings), config, route_s=0.0)

    def _generate_chunks(
        self, prompts: list[Prompt], routings: list[Routing], config: GenerationConfig, route_s: float
    ) -> list[Result]:
        results: list[Result] = []
        for offset in range(0, len(prompts), self.max_batch_size):
            chunk = slice(offset, offset + self.max_batch_size)
            completions, generate_s = self._generate(prompts[chunk], routings[chunk], config)
            timings = Timings(route_s=route_s, generate_s=generate_s)
            results += [_result(c, timings, len(completions)) for c in completions]
        return results

    def submit(self, prompt: Prompt, **kwargs: Any) -> QueuedRequest:
        """Queues one prompt to share a batch with concurrent calls; ``.future.result()`` is its Result."""
        config, route_options = self._split_kwargs(kwargs)
        return self._queue.submit(self._request(prompt, config, route_options))

    def complete(self, prompt: Prompt, **kwargs: Any) -> Result:
        """One prompt, coalesced with concurrent calls from other threads."""
        return self.submit(prompt, **kwargs).future.result()

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Yields the text of one prompt as it is produced (coalesced with concurrent calls)."""
        config, route_options = self._split_kwargs(kwargs)
        request = self._queue.submit(self._request(prompt, config, route_options), stream=True)
        yield from request.iter_deltas()

    def stream_with_result(self, prompt: Prompt, **kwargs: Any) -> tuple[Iterator[str], QueuedRequest]:
        """Like :meth:`stream`, also returning the request whose future holds the final Result."""
        config, route_options = self._split_kwargs(kwargs)
        request = self._queue.submit(self._request(prompt, config, route_options), stream=True)
        return request.iter_deltas(), request

    async def acomplete(self, prompt: Prompt, **kwargs: Any) -> Result:
        """Async :meth:`complete`: never blocks the event loop; concurrent calls share batches."""
        return await asyncio.wrap_future(self.submit(prompt, **kwargs).future)

    async def agenerate(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[Result]:
        """Async :meth:`generate`: the batch runs in a worker thread."""
        if len(prompts) == 1:
            return [await self.acomplete(prompts[0], **kwargs)]
        return await asyncio.to_thread(self.generate, prompts, **kwargs)

    async def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream`."""
        deltas, _ = self.stream_with_result(prompt, **kwargs)
        done = object()
        while (delta := await asyncio.to_thread(next, deltas, done)) is not done:
            yield delta

    def close(self) -> None:
        """Stops the batching worker and detaches the composer's hooks."""
        self._queue.close()
        self.composer.remove_hooks()

    # -- internals ---------------------------------------------------------------------------
    def _generate(
        self, prompts: Sequence[str], routings: Sequence[Routing], config: GenerationConfig | Sequence[GenerationConfig]
    ) -> tuple[list[Completion], float]:
        with self._engine_lock:
            self.generations += 1
            start = time.perf_counter()
            completions = self.generator.generate(prompts, routings, config)
            return completions, time.perf_counter() - start

    def _run_queued(self, requests: Sequence[QueuedRequest]) -> None:
        """The batch runner: routes each group of requests that share options, then ONE generation."""
        started = time.perf_counter()
        routings: dict[int, Routing] = {}
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.payload.route_key, []).append(i)
        for members in groups.values():
            try:
                options = requests[members[0]].payload.route_options
                routed = self.route([requests[i].payload.prompt for i in members], **options)
            except Exception as error:  # this group's options are bad; the other callers go on
                for i in members:
                    requests[i].finish(error=error)
                continue
            routings.update(zip(members, routed, strict=True))
        live = sorted(routings)
        if not live:
            return
        route_s = time.perf_counter() - started
        with self._engine_lock:
            self.generations += 1  # counted before any caller is answered
            start = time.perf_counter()
            for event in self.generator.stream(
                [requests[i].payload.prompt for i in live],
                [routings[i] for i in live],
                [requests[i].payload.config for i in live],
            ):
                request = requests[live[event.row]]
                request.push(event.delta)
                if event.completion is not None:
                    timings = Timings(
                        queue_s=started - request.enqueued_at, route_s=route_s, generate_s=time.perf_counter() - start
                    )
                    request.finish(_result(event.completion, timings, len(live)))

    def _request(self, prompt: Prompt, config: GenerationConfig, route_options: dict[str, Any]) -> _Request:
        self._check_prompts([prompt])
        options = self._check_route_options({**self.route_defaults, **route_options})
        if options.get("adapters") is not None:
            self.pool.check_names(list(options["adapters"]))
        return _Request(prompt, config, route_options, _freeze(options))

    def _split_kwargs(self, kwargs: Mapping[str, Any]) -> tuple[GenerationConfig, dict[str, Any]]:
        unknown = set(kwargs) - GENERATION_KEYS - ROUTE_KEYS
        if unknown:
            raise TypeError(
                f"unknown argument(s) {sorted(unknown)}; generation takes {sorted(GENERATION_KEYS)} and routing "
                f"takes {sorted(ROUTE_KEYS)}."
            )
        generation = {k: v for k, v in kwargs.items() if k in GENERATION_KEYS}
        if "stop" in generation and generation["stop"] is None:
            generation["stop"] = ()
        config = dataclasses.replace(self.generation, **generation)
        return config, {k: v for k, v in kwargs.items() if k in ROUTE_KEYS}

    def _check_route_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = set(options) - ROUTE_KEYS
        if unknown:
            raise TypeError(f"unknown routing option(s) {sorted(unknown)}; use {sorted(ROUTE_KEYS)}.")
        if options.get("mode", "mixture") not in MODES:
            raise ValueError(f"mode={options['mode']!r} is not one of {MODES}.")
        if isinstance(options.get("adapters"), str):
            options["adapters"] = [options["adapters"]]
        return options

    @staticmethod
    def _check_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt].")
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            prompt_text(prompt, i)
        return prompts

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this LM's outputs: base model, pool content, defaults (for caches)."""
        return {
            "model": getattr(self.model.config, "_name_or_path", type(self.model).__name__),
            "pool": self.pool.fingerprint(),
            "generation": dataclasses.asdict(self.generation),
            "routing": json.loads(json.dumps(self.route_defaults, default=str)),
        }


def _result(completion: Completion, timings: Timings, batch_size: int) -> Result:
    return Result(
        text=completion.text,
        routing=completion.routing,
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        stop_sequence=completion.stop_sequence,
        truncated_prompt=completion.truncated_prompt,
        timings=timings,
        batch_size=batch_size,
    )


def _freeze(value: Any) -> Any:
    """A hashable copy of a routing option (lists and dicts become tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value
