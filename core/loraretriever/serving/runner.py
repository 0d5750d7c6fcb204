"""The batch runner behind every RoutedLM call: route each group of requests, then ONE generation.

The :class:`~loraretriever.engine.scheduler.BatchingQueue` hands it a batch of requests; requests
that share their :class:`RouteOptions` are routed together (one embedding pass), requests with a
given routing are not routed again, and one :meth:`Generator.stream` serves every row, each
caller receiving only its own row's text and result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loraretriever.engine.composer import Composer
from loraretriever.engine.generation import Completion, Generator, prompt_text
from loraretriever.engine.pool import LoraPool
from loraretriever.engine.routing import Routing
from loraretriever.engine.scheduler import QueuedRequest
from loraretriever.retrieval.options import RouteOptions
from loraretriever.serving.gating import plan_gated

__all__ = ["BatchRunner", "Result", "Timings"]


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
        from dataclasses import asdict

        data = asdict(self)
        data["routing"] = self.routing.to_dict()
        return data

    @classmethod
    def of(cls, completion: Completion, timings: Timings, batch_size: int) -> Result:
        return cls(
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


class BatchRunner:
    """Routes and generates batches of :class:`~loraretriever.serving.calls.Request` payloads.

    Args:
        pool: The adapters pinned routings are checked against.
        router: Retrieves adapters per prompt (``route(texts, options)``), or None.
        composer: Holds the gates.
        generator: Runs the batched generation.
    """

    def __init__(self, pool: LoraPool, router: Any, composer: Composer, generator: Generator) -> None:
        self.pool = pool
        self.router = router
        self.composer = composer
        self.generator = generator
        self.generations = 0  # batched generations run so far (one per batch)
        self._engine_lock = threading.Lock()

    def route(self, texts: Sequence[str], options: RouteOptions) -> list[Routing]:
        """The routings of ``texts`` under ``options``: pinned, retrieved, or gated.

        Raises:
            RetrievalError, GateError, AdapterError: options that cannot be honoured.
        """
        plan = plan_gated(options, self.composer.gates, self.pool)
        retrieval = plan.retrieval
        if retrieval is None:
            routings = [Routing.base()] * len(texts)
        elif retrieval.adapters is not None:
            self.pool.check_names(list(retrieval.adapters))
            pinned = Routing.pinned(retrieval.adapters, retrieval.adapter_weights, mode=retrieval.mode)
            routings = [pinned] * len(texts)
        elif self.router is None:
            routings = [Routing.base("no router: pass adapters= to pin some")] * len(texts)
        else:
            routings = self.router.route(list(texts), retrieval)
        return [plan.finish(routing) for routing in routings]

    def __call__(self, requests: Sequence[QueuedRequest]) -> None:
        started = time.perf_counter()
        routings: dict[int, Routing] = {}
        groups: dict[tuple, list[int]] = {}
        for i, queued in enumerate(requests):
            if queued.payload.routing is not None:
                routings[i] = queued.payload.routing
            else:
                groups.setdefault(queued.payload.options.key, []).append(i)
        for members in groups.values():
            try:
                texts = [prompt_text(requests[i].payload.prompt, i) for i in members]
                routed = self.route(texts, requests[members[0]].payload.options)
            except Exception as error:  # this group's options failed; the other callers go on
                for i in members:
                    requests[i].finish(error=error)
                continue
            routings.update(zip(members, routed, strict=True))
        live = sorted(routings)
        if not live:
            return
        route_s = time.perf_counter() - started
        prompts = [requests[i].payload.prompt for i in live]
        configs = [requests[i].payload.config for i in live]
        with self._engine_lock:
            self.generations += 1  # counted before any caller is answered
            start = time.perf_counter()

            def finish(row: int, completion: Completion) -> None:
                queued = requests[live[row]]
                timings = Timings(
                    queue_s=started - queued.enqueued_at, route_s=route_s, generate_s=time.perf_counter() - start
                )
                queued.finish(Result.of(completion, timings, len(live)))

            if not any(requests[i].deltas is not None for i in live):
                # No caller streams: skip the per-step incremental decoding of every row.
                for row, completion in enumerate(
                    self.generator.generate(prompts, [routings[i] for i in live], configs)
                ):
                    finish(row, completion)
                return
            for event in self.generator.stream(prompts, [routings[i] for i in live], configs):
                requests[live[event.row]].push(event.delta)
                if event.completion is not None:
                    finish(event.row, event.completion)
