"""Readying requests for the engine: route each group of arrivals that share their options.

The :class:`~loraretriever.engine.worker.EngineLoop` hands :meth:`BatchRunner.prepare` the
requests that arrived since its last step; requests that share their :class:`RouteOptions` are
routed together (one embedding pass), requests with a given routing are not routed again, and a
group whose routing fails fails alone. :meth:`BatchRunner.result` turns a finished request into
its caller's :class:`Result`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraretriever.engine.composer import Composer
from loraretriever.engine.requests import prompt_text
from loraretriever.engine.routing import Routing
from loraretriever.engine.worker import QueuedRequest
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.options import RouteOptions
from loraretriever.serving.gating import plan_gated
from loraretriever.serving.tools import parse_tool_calls

__all__ = ["BatchRunner", "Result", "Timings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timings:
    """Seconds from submission to admission (queue and routing), routing alone, admission to the
    first token, and admission to the last."""

    queue_s: float = 0.0
    route_s: float = 0.0
    first_token_s: float = 0.0
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
    batch_size: int = 1  # the most requests it was decoded together with (itself included)
    tool_calls: tuple[dict[str, Any], ...] = ()  # {"name", "args", "id"} when the call had tools
    invalid_tool_calls: tuple[dict[str, Any], ...] = ()  # calls that did not parse, with the error
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's prompt_tokens_details)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["routing"] = self.routing.to_dict()
        return data


class BatchRunner:
    """Routes arrivals for the engine and builds their results.

    Args:
        pool: The adapters pinned routings are checked against.
        router: Retrieves adapters per prompt (``route(texts, options)``), or None.
        composer: Holds the gates.
    """

    def __init__(self, pool: LoraPool, router: Any, composer: Composer) -> None:
        self.pool = pool
        self.router = router
        self.composer = composer
        self.refresh: Callable[[], Any] | None = None  # brings the pool up to date before each routing

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
            self.pool.check_names(list(retrieval.adapters), param="adapters")
            pinned = Routing.pinned(
                retrieval.adapters,
                retrieval.adapter_weights,
                mode=retrieval.mode,
                fusion=retrieval.fusion,
                density=retrieval.density,
            )
            routings = [pinned] * len(texts)
        elif self.router is None:
            routings = [Routing.base("no router: pass adapters= to pin some")] * len(texts)
        else:
            routings = self.router.route(list(texts), retrieval)
        return [plan.finish(routing) for routing in routings]

    def _route_one(self, text: str, options: RouteOptions) -> Routing:
        return self.route([text], options)[0]

    def prepare(self, requests: Sequence[QueuedRequest]) -> None:
        """Sets every request's routing, or fails the group whose routing failed."""
        started = time.perf_counter()
        if self.refresh is not None:
            try:
                self.refresh()
            except Exception:  # a pool directory that cannot be read now: serve the pool as it is
                logger.exception("refreshing the pool from its directory failed")
        groups: dict[tuple, list[QueuedRequest]] = {}
        for queued in requests:
            if queued.state.routing is None:
                groups.setdefault(queued.payload.options.key, []).append(queued)
        for members in groups.values():
            try:
                texts = [q.payload.route_text or prompt_text(q.payload.prompt, i) for i, q in enumerate(members)]
                routings = self.route(texts, members[0].payload.options)
            except Exception as error:  # this group's options failed; the other callers go on
                for queued in members:
                    queued.state.fail(error)
                continue
            options = members[0].payload.options
            for queued, text, routing in zip(members, texts, routings, strict=True):
                queued.state.routing = routing
                if routing.similarities is not None:  # the router's choice: routed again if it goes
                    queued.state.reroute = functools.partial(self._route_one, text, options)
        route_s = time.perf_counter() - started
        admitted = time.perf_counter()
        for queued in requests:
            queued.route_s, queued.admitted_at = route_s, admitted

    @staticmethod
    def result(queued: QueuedRequest) -> Result:
        """The caller's result of a finished request."""
        state, completion = queued.state, queued.state.done
        admitted = queued.admitted_at or queued.enqueued_at
        timings = Timings(
            queue_s=admitted - queued.enqueued_at,
            route_s=queued.route_s,
            first_token_s=(state.first_token_at or admitted) - admitted,
            generate_s=(state.finished_at or admitted) - admitted,
        )
        text, finish, calls, invalid = completion.text, completion.finish_reason, (), ()
        spec = getattr(queued.payload, "tools", None)
        if spec is not None:
            parsed = parse_tool_calls(text, spec, cut=finish == "length")
            text, calls, invalid = parsed.content, parsed.calls, parsed.invalid
            finish = "tool_calls" if calls else finish
        return Result(
            text=text,
            routing=completion.routing,
            finish_reason=finish,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            cached_tokens=completion.cached_tokens,
            stop_sequence=completion.stop_sequence,
            truncated_prompt=completion.truncated_prompt,
            timings=timings,
            batch_size=max(state.batch_rows, 1),
        )
