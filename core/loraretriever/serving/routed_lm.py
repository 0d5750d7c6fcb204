"""RoutedLM: base model + LoRA pool + router + composer + generation settings, behind one front.

Every call is routed: each prompt gets its own adapters (retrieved, pinned by the caller, or
weighed by a gate). Every call, a list or a single prompt, sync, async or streamed, takes ONE
path: its requests are validated alone, then go to the
:class:`~loraretriever.engine.worker.EngineLoop`, whose worker routes new arrivals
(:class:`~loraretriever.serving.runner.BatchRunner`) and steps the continuous-batching
:class:`~loraretriever.engine.engine.Engine`, which concurrent calls share.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import queue
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraretriever.engine.composer import Composer
from loraretriever.engine.engine import ENGINE_OPTIONS, Engine, EngineConfig
from loraretriever.engine.gates import Gate, gate_dirs, load_gate
from loraretriever.engine.requests import GenerationConfig, Prompt, prompt_text
from loraretriever.engine.routing import Routing
from loraretriever.engine.worker import EngineLoop, LoopDeltas, QueuedRequest
from loraretriever.errors import InvalidOptionError, InvalidTypeError
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.pool.manifest import prompt_format, recorded_model
from loraretriever.retrieval.options import RouteOptions
from loraretriever.serving import adapters as pool_changes
from loraretriever.serving.calls import GENERATION_OPTIONS, ROUTE_ON, Request, route_text, split_call_options
from loraretriever.serving.gating import plan_gated, warn_if_mismatched
from loraretriever.serving.memory import return_freed_memory
from loraretriever.serving.pool_sync import PoolSync
from loraretriever.serving.runner import BatchRunner, Result, Timings
from loraretriever.serving.tools import TOOL_OPTIONS, with_tools

logger = logging.getLogger(__name__)

__all__ = [
    "LOAD_OPTIONS",
    "Result",
    "RoutedLM",
    "RoutesPrompts",
    "Timings",
    "aflag_last",
    "flag_last",
    "split_load_options",
]


class RoutesPrompts(Protocol):
    """What RoutedLM needs of a router (e.g. :class:`loraretriever.retrieval.router.Router`)."""

    def route(self, prompts: Sequence[str], options: RouteOptions) -> list[Routing]: ...


class RoutedLM:
    """A causal LM whose every call is routed to its own LoRAs, served in batches.

    Args:
        model: The base model.
        tokenizer: Its tokenizer (left padding).
        pool: The LoRA pool of that model.
        router: Chooses adapters per prompt; without one, calls must pin ``adapters=`` or get the
            base model.
        generation: Default generation settings (overridable per call).
        route_defaults: Default :class:`~loraretriever.retrieval.options.RouteOptions` (or their
            names and values), overridable per call.
        max_wait_ms: How long the first call to an idle engine waits for others to share its step.
        **engine_options: The engine's limits and policy, by the names of
            :class:`~loraretriever.engine.engine.EngineConfig`'s fields (:data:`ENGINE_OPTIONS`:
            ``max_batch_size``, ``max_batch_tokens``, ``max_prompt_tokens``,
            ``max_new_tokens_limit``, ``max_load_wait``, ``policy``), declared there once.

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
        route_defaults: RouteOptions | Mapping[str, Any] | None = None,
        max_wait_ms: float = 10.0,
        **engine_options: Any,
    ) -> None:
        unknown = sorted(set(engine_options) - set(ENGINE_OPTIONS))
        if unknown:
            raise InvalidTypeError(
                f"unknown option(s) {unknown}; RoutedLM takes generation, route_defaults, max_wait_ms and the "
                f"engine's {list(ENGINE_OPTIONS)}."
            )
        config = EngineConfig(**engine_options)  # checked before anything is built
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.router = router
        self.composer = Composer(model, pool)
        self.engine = Engine(model, tokenizer, self.composer, config)
        self.generation = generation or GenerationConfig()
        self.route_defaults = RouteOptions.coerce(route_defaults)
        self.max_batch_size = config.max_batch_size
        self._runner = BatchRunner(pool, router, self.composer)
        self._loop = EngineLoop(self.engine, self._runner.prepare, max_wait_ms=max_wait_ms)
        self.pool_dir: Path | None = None  # set by from_pretrained(pool_dir=...)
        self.prompt_format: str | None = None  # "chat" / "plain": how the pool's LoRAs were trained
        self._sync: PoolSync | None = None
        self._owned: list[Any] = []  # what this LM opened and closes (the router from_model built)
        # close() also runs when the LM is garbage-collected or the interpreter exits: the worker
        # thread stops before Python tears down, and a dropped LM frees its adapters and caches.
        self._finalizer = weakref.finalize(self, _release, self._loop, self.composer, self._owned)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | Path | None = None,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        **kwargs: Any,
    ) -> RoutedLM:
        """Loads a base model (hub id, local path, or the packaged default), then :meth:`from_model`.
        RoutedLMs of one base model, device and dtype share its weights.

        Args:
            model_id: See :func:`loraretriever.load_base_model`. ``None`` with a ``pool_dir`` takes the
                base model its manifest (``pool.json``) records; another model than the recorded one
                is refused (:class:`~loraretriever.pool.manifest.PoolMismatchError`).
            device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``;
                adapters, gates and caches follow the model.
            dtype: ``"auto"`` (bfloat16 or float16 on a GPU, float32 on CPU), ``"float32"``,
                ``"bfloat16"``, ``"float16"``.
            **kwargs: :meth:`from_model`'s options (``pool_dir``, ``adapters``, ``router``,
                ``embedder``, ``chroma_host``, ``chroma_port``) and :class:`RoutedLM`'s
                (``generation``, ``route_defaults``, ``max_batch_size``, ``max_batch_tokens``, ...); together
                :data:`LOAD_OPTIONS`.

        Example:
            >>> lm = RoutedLM.from_pretrained(pool_dir="~/loras")  # doctest: +SKIP
        """
        from loraretriever.engine.base_model import shared_base_model

        _check_load_options(kwargs)
        if model_id is None and kwargs.get("pool_dir") is not None:
            model_id = recorded_model(Path(kwargs["pool_dir"]).expanduser())  # the pool's own base model
        model, tokenizer = shared_base_model(model_id, device=device, dtype=dtype)  # one copy per process
        return cls.from_model(model, tokenizer, **kwargs)

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
        host_cache_gb: float | None = None,
        device_cache_gb: float | None = None,
        **kwargs: Any,
    ) -> RoutedLM:
        """A RoutedLM over a model and tokenizer already loaded.

        Args:
            model: The base model.
            tokenizer: Its tokenizer.
            pool_dir: A pool directory (``adapters/``, ``cards/``, ``index/``, ``gates/``): its adapters
                and gates are loaded and a :class:`~loraretriever.retrieval.router.Router` over its cards
                follows the pool.
            adapters: More ``{name: directory or hub id}`` to add (not stored in ``pool_dir``).
            router: A router to use instead of the pool directory's.
            embedder: The router's embedder (an Embedder, model id or directory; default MiniLM).
            chroma_host: Share the index on a ``chroma run`` server at ``chroma_host:chroma_port``.
            chroma_port: The server's port.
            host_cache_gb: The pool's host cache budget in GiB: the adapters loaded from disk and held
                in memory (least recently used evicted; default: no limit).
            device_cache_gb: The same for the device's copies, for a model on a GPU.
            **kwargs: Passed to :class:`RoutedLM`.
        """
        pool = LoraPool(
            model,
            host_cache_bytes=_gib_to_bytes(host_cache_gb, "host"),
            device_cache_bytes=_gib_to_bytes(device_cache_gb, "device"),
        )
        cards = None
        if router is None and pool_dir is not None:  # the router's store, so each card is parsed once
            from loraretriever.pool.layout import PoolLayout
            from loraretriever.retrieval.cards import CardStore

            cards = CardStore(PoolLayout(pool_dir).cards)
        if pool_dir is not None:
            # interrupted changes undone, broken entries quarantined: the rest always opens
            pool_changes.open_pool_dir(pool, pool_dir, cards=cards)
        for name, source in (adapters or {}).items():
            pool.add(source, name=name)
        if router is None and pool_dir is not None:
            from loraretriever.retrieval.router import Router

            router = Router.open(
                pool_dir, embedder=embedder, host=chroma_host, port=chroma_port, pool=pool, store=cards
            )
            built_router = router
        else:
            built_router = None
        recorded = prompt_format(pool_dir) if pool_dir is not None else None
        if recorded is not None and "generation" not in kwargs:  # prompts as the pool's LoRAs were trained
            kwargs["generation"] = GenerationConfig(chat_template=recorded == "chat")
        lm = cls(model, tokenizer, pool, router, **kwargs)
        lm._owned.append(pool)  # its loader thread
        if built_router is not None:
            lm._owned.append(built_router)
        lm.prompt_format = recorded
        lm.pool_dir = Path(pool_dir).expanduser() if pool_dir is not None else None
        if pool_dir is not None:
            lm._sync = PoolSync(
                pool,
                pool_dir,
                extra=(adapters or {}).keys(),
                on_change=built_router.reconcile if built_router is not None else None,
            )
            lm._runner.refresh = lm._sync.refresh  # not lm.sync_pool: the worker must not keep the LM alive
            for name, directory in gate_dirs(pool_dir).items():
                lm.register_gate(name, load_gate(directory))
        return lm

    # -- gates and adapters ------------------------------------------------------------------
    @property
    def gates(self) -> dict[str, Gate]:
        """The registered LoRA-Flow and MeteoRA gates by name (``mode="flow"`` / ``"meteora"``)."""
        return dict(self.composer.gates)

    def register_gate(self, name: str, gate: Gate) -> None:
        """Makes a gate usable as ``mode="flow"`` / ``"meteora"`` with ``gate=name``. A meteora gate
        that does not match the pool is kept: calls fall back to the retrieval mixture, saying why."""
        self.composer.gates.register(name, gate)
        warn_if_mismatched(name, gate, self.pool)

    def add_adapter(self, source: str | Path, card: Any = None, *, name: str | None = None) -> str:
        """Adds an adapter (and its card, which makes it routable) without reloading anything.

        With a pool directory, the adapter is first stored there. Any failure undoes the steps
        already taken, so the pool, the directory and the index are left as they were.

        Args:
            source: A PEFT adapter directory (or hub id when there is no pool directory).
            card: An :class:`~loraretriever.retrieval.cards.AdapterCard` or its dict (``samples``, ...).
            name: The adapter's name; defaults to the card's name or the directory name.
        """
        return pool_changes.add_adapter(self.pool, self.router, self.pool_dir, source, card, name=name)

    def remove_adapter(self, name: str) -> None:
        """Removes an adapter: its card and index entry first (so it is never routed while missing),
        then the pool entry and the stored files."""
        pool_changes.remove_adapter(self.pool, self.router, self.pool_dir, name)

    def sync_pool(self) -> dict[str, list[str]]:
        """Loads the adapters other processes stored in the pool directory and drops those they
        removed (done before every routing; cheap when nothing changed).

        Returns:
            ``{"added": [...], "removed": [...]}`` (empty without a pool directory).
        """
        return self._sync.refresh() if self._sync is not None else {"added": [], "removed": []}

    # -- routing -----------------------------------------------------------------------------
    def route(
        self,
        prompts: Sequence[Prompt],
        options: RouteOptions | Mapping[str, Any] | None = None,
        *,
        route_on: str | Callable[[Prompt], str] | None = None,
        **overrides: Any,
    ) -> list[Routing]:
        """The routing of each prompt (a chat is routed by its last user message).

        Args:
            prompts: The prompts.
            options: Routing options (default: :attr:`route_defaults`).
            route_on: Which text is routed (:func:`~loraretriever.serving.calls.route_text`).
            **overrides: Routing options to change for this call, by name.
        """
        opts = (self.route_defaults if options is None else RouteOptions.coerce(options)).replace(**overrides)
        prompts = _check_prompts(prompts)
        return self._runner.route([route_text(p, route_on, i) for i, p in enumerate(prompts)], opts)

    # -- generation: every method below submits to the one queue ----------------------------
    def generate(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[Result]:
        """Routes every prompt and generates them all in batched passes of at most
        ``max_batch_size`` rows, shared with concurrent calls.

        Args:
            prompts: Strings or chats (lists of ``{"role", "content"}``).
            **kwargs: Generation options (``max_new_tokens``, ``temperature``, ``stop``, ...) and
                routing options (``mode``, ``top_k``, ``adapters``, ``filter``, ...), by name.

        Raises:
            TypeError: an unknown option. ValueError: a bad prompt or option value.
        """
        return [queued.future.result() for queued in self._submit(prompts, kwargs)]

    def generate_routed(self, prompts: Sequence[Prompt], routings: Sequence[Routing], **kwargs: Any) -> list[Result]:
        """Generates with routings the caller chose (one per prompt), e.g. an evaluation's oracle.

        Args:
            prompts: The prompts.
            routings: One :class:`Routing` per prompt (adapters must be in the pool).
            **kwargs: Generation options only (``max_new_tokens``, ``temperature``, ...).
        """
        prompts = _check_prompts(prompts)
        routing_options = sorted(set(kwargs) - set(GENERATION_OPTIONS))
        if routing_options:
            raise InvalidTypeError(f"{routing_options} do not apply to generate_routed: the routings are given.")
        if len(routings) != len(prompts):
            raise InvalidOptionError(f"got {len(prompts)} prompts but {len(routings)} routings; pass one per prompt.")
        for routing in routings:
            self.pool.check_names(list(routing.adapters))
        config, options = split_call_options(kwargs, self.generation, self.route_defaults)
        requests = [Request(p, config, options, r) for p, r in zip(prompts, routings, strict=True)]
        return [queued.future.result() for queued in self._enqueue(requests)]

    def submit(self, prompt: Prompt, **kwargs: Any) -> QueuedRequest:
        """Queues one prompt; ``.future.result()`` is its :class:`Result`."""
        return self._submit([prompt], kwargs)[0]

    def complete(self, prompt: Prompt, **kwargs: Any) -> Result:
        """One prompt, coalesced with concurrent calls from other threads."""
        return self.submit(prompt, **kwargs).future.result()

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Yields the text of one prompt as it is produced (coalesced with concurrent calls)."""
        deltas, _ = self.stream_with_result(prompt, **kwargs)
        yield from deltas

    def stream_with_result(self, prompt: Prompt, **kwargs: Any) -> tuple[Iterator[str], QueuedRequest]:
        """Like :meth:`stream`, also returning the request whose future holds the final Result."""
        queued = self._submit([prompt], kwargs, stream=True)[0]
        return queued.iter_deltas(), queued

    def astream_with_result(self, prompt: Prompt, **kwargs: Any) -> tuple[AsyncIterator[str], QueuedRequest]:
        """Like :meth:`stream_with_result` for an asyncio caller (call it inside the running loop):
        the deltas are awaited on the loop, no thread waits for them."""
        queued = self._submit([prompt], kwargs, stream="async")[0]
        return queued.aiter_deltas(), queued

    async def acomplete(self, prompt: Prompt, **kwargs: Any) -> Result:
        """Async :meth:`complete`: never blocks the event loop; concurrent calls share batches."""
        return await asyncio.wrap_future(self.submit(prompt, **kwargs).future)

    async def agenerate(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[Result]:
        """Async :meth:`generate`: never blocks the event loop."""
        return list(await asyncio.gather(*(asyncio.wrap_future(q.future) for q in self._submit(prompts, kwargs))))

    async def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream`."""
        deltas, _ = self.astream_with_result(prompt, **kwargs)
        async for delta in deltas:
            yield delta

    def close(self) -> None:
        """Stops the engine's worker (after the requests it holds), detaches the composer's hooks
        and closes the router :meth:`from_model` opened. Idempotent; it also runs when the LM is
        garbage-collected or the interpreter exits."""
        self._finalizer()

    def __enter__(self) -> RoutedLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def generations(self) -> int:
        """Engine runs so far: times the engine went from idle to busy, however many callers
        shared that run (so concurrent calls that were batched together count once)."""
        return self.engine.busy_periods

    def _submit(
        self, prompts: Sequence[Prompt], kwargs: Mapping[str, Any], stream: bool | str = False
    ) -> list[QueuedRequest]:
        """Validates the whole call (so a bad one fails here, alone), then queues one request per prompt."""
        prompts = _check_prompts(prompts)
        config, options = split_call_options(kwargs, self.generation, self.route_defaults)
        if options.adapters is not None:
            self.pool.check_names(list(options.adapters), param="adapters")
        plan_gated(options, self.composer.gates, self.pool)  # a missing or mismatched gate fails now
        per_prompt = [options] * len(prompts)
        if options.exclude is not None and not all(isinstance(e, str) for e in options.exclude):
            per_prompt = [
                dataclasses.replace(options, exclude=tuple(names)) for names in options.excludes_for(len(prompts))
            ]
        tool_options = {k: kwargs[k] for k in TOOL_OPTIONS if kwargs.get(k) is not None}
        route_on = kwargs.get(ROUTE_ON)
        requests = []
        for i, (prompt, opts) in enumerate(zip(prompts, per_prompt, strict=True)):
            text = route_text(prompt, route_on, i)  # what it is routed by: before tools change the prompt
            if tool_options:  # described in the prompt, forced by a grammar, parsed in the result
                prompt, grammar, spec, chat_tools = with_tools(prompt, tool_options, self.tokenizer.chat_template)
                call = dataclasses.replace(config, grammar=grammar, chat_tools=chat_tools)
                requests.append(Request(prompt, call, opts, tools=spec, route_text=text))
            else:
                requests.append(Request(prompt, config, opts, route_text=text))
        return self._enqueue(requests, stream)

    def _enqueue(self, requests: Sequence[Request], stream: bool | str = False) -> list[QueuedRequest]:
        """Tokenizes and checks each request against the engine's limits (a bad one raises here,
        before anything is queued), then hands them to the engine's worker together. ``stream``:
        False, True (deltas for a thread) or ``"async"`` (deltas for the running event loop)."""
        states = [
            self.engine.new_request(r.prompt, r.config, r.routing, index=i, payload=r) for i, r in enumerate(requests)
        ]
        queued = [QueuedRequest(state, deltas=_deltas(stream), make_result=BatchRunner.result) for state in states]
        return self._loop.submit(queued)

    @property
    def model_id(self) -> str:
        """The base model's name for people and APIs: its hub id, or a local copy's directory name
        (a path says where it lies, not what it is); the class name for a model built in memory."""
        name = getattr(self.model.config, "_name_or_path", "") or ""
        if not name:
            return type(self.model).__name__
        path = Path(name)
        return path.name if path.is_absolute() or path.exists() else name

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this LM's outputs: base model, pool content, defaults (for caches)."""
        return {
            "model": getattr(self.model.config, "_name_or_path", type(self.model).__name__),
            "pool": self.pool.fingerprint(),
            "generation": dataclasses.asdict(self.generation),
            "routing": json.loads(json.dumps(self.route_defaults.given(), default=str)),
        }


def _release(loop: EngineLoop, composer: Composer, owned: list[Any]) -> None:
    """What :meth:`RoutedLM.close` does; holds no reference to the LM, so it can run once the LM is gone."""
    loop.close()
    composer.remove_hooks()
    for resource in owned:
        resource.close()
    owned.clear()
    return_freed_memory()


def flag_last(deltas: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Each delta with whether it is the last, one delta behind, so that a stream's final chunk
    carries both text and the result (no trailing empty chunk); an empty answer is one ``("", True)``."""
    held: str | None = None
    for delta in deltas:
        if held is not None:
            yield held, False
        held = delta
    yield ("" if held is None else held), True


async def aflag_last(deltas: AsyncIterable[str]) -> AsyncIterator[tuple[str, bool]]:
    """:func:`flag_last` for an async stream."""
    held: str | None = None
    async for delta in deltas:
        if held is not None:
            yield held, False
        held = delta
    yield ("" if held is None else held), True


def _deltas(stream: bool | str) -> queue.SimpleQueue | LoopDeltas | None:
    if stream == "async":
        return LoopDeltas()
    return queue.SimpleQueue() if stream else None


def _check_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        raise InvalidTypeError("prompts must be a list of strings, not one string; wrap it: [prompt].")
    prompts = list(prompts)
    for i, prompt in enumerate(prompts):
        prompt_text(prompt, i)
    return prompts


def _parameters(function: Any) -> list[str]:
    skip = {"self", "cls", "model", "tokenizer", "pool", "kwargs"}
    return [name for name in inspect.signature(function).parameters if name not in skip]


# Everything from_pretrained takes besides model_id: derived, so that the integrations forward
# these options without listing them again.
LOAD_OPTIONS: tuple[str, ...] = tuple(
    [p for p in _parameters(RoutedLM.from_pretrained) if p != "model_id"]
    + _parameters(RoutedLM.from_model)
    + [p for p in _parameters(RoutedLM.__init__) if p != "engine_options"]
    + list(ENGINE_OPTIONS)
)


def _gib_to_bytes(value: float | None, tier: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < float("inf"):
        raise InvalidOptionError(f"{tier}_cache_gb={value!r} must be a number of GiB >= 0, or None for no limit.")
    return int(value * 2**30)


def _check_load_options(kwargs: Mapping[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(LOAD_OPTIONS))
    if unknown:
        raise InvalidTypeError(f"unknown option(s) {unknown}; RoutedLM.from_pretrained takes {list(LOAD_OPTIONS)}.")


def split_load_options(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` split into :meth:`RoutedLM.from_pretrained` options and the rest (an integration's fields)."""
    load = {k: v for k, v in kwargs.items() if k in LOAD_OPTIONS}
    return load, {k: v for k, v in kwargs.items() if k not in LOAD_OPTIONS}
