"""The scheduling policy: which waiting requests start their prefill, and how many prompt tokens
each step prefills.

The :class:`Scheduler` owns the waiting queue and nothing that runs: it reads how many rows are
decoding and how far the prefilling group has got, and returns a plain :class:`StepPlan`, which
the :class:`~loraretriever.engine.model_runner.ModelRunner` carries out (as vLLM v1's scheduler
returns a ``SchedulerOutput`` to its model runner). Every running request decodes one token every
step; what the policy decides is the prefill side:

* ``continuous``: the oldest waiting request is admitted first (unless its adapters are still
  loading, for at most ``max_load_wait`` seconds); it takes along the waiting requests among the
  next ``max_batch_size`` whose prompt lengths are closest to its own while the padded group fits
  the step's token budget (``max_batch_tokens`` minus the decoding rows), so little of a prefill
  is padding and a request is overtaken only by that window. A long prompt is prefilled over
  several steps (chunked prefill), so it never stalls the others' decoding; with no row
  decoding, nobody waits on the chunk, so a step prefills up to ``IDLE_PREFILL_TOKENS`` (one
  causal pass is cheaper than chunks that attend to their past through an explicit mask).
* ``static`` (a reference for benchmarks): a whole batch is admitted only when nothing runs, and
  prefilled in one pass.

Requests whose shared prefill failed are admitted one by one, to find the one that fails.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraretriever.engine.requests import RequestState

if TYPE_CHECKING:
    from loraretriever.engine.engine import EngineConfig
    from loraretriever.pool.lora_pool import LoraPool

__all__ = ["MIN_CHUNK", "Scheduler", "StepPlan"]

logger = logging.getLogger(__name__)

MIN_CHUNK = 16  # prefill tokens per step even when decoding rows use the whole budget
IDLE_PREFILL_TOKENS = 8192  # prefill tokens per step while no row decodes (bounds the pass's activations)


@dataclass
class StepPlan:
    """The prefill side of one step: a new group to start prefilling (empty: none), and how many
    of the prefilling group's prompt tokens this step computes (0: no prefill this step)."""

    admitted: list[RequestState] = field(default_factory=list)
    prefill_tokens: int = 0


class Scheduler:
    """Holds the waiting requests and decides, step by step, which are admitted and how much is
    prefilled.

    Args:
        config: The engine's limits and policy.
        pool: The adapter pool requests hold their adapters in (None: base model only).
    """

    def __init__(self, config: EngineConfig, pool: LoraPool | None = None) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[RequestState] = deque()
        self._solo: set[int] = set()  # requests whose shared prefill failed: prefilled alone

    def add(self, requests: Sequence[RequestState]) -> None:
        self.waiting.extend(requests)
        self.hold_ahead()

    def schedule(self, decoding: int, prefilling: tuple[int, int, int] | None) -> StepPlan:
        """The prefill side of this step.

        Args:
            decoding: Rows that decode this step.
            prefilling: ``(padded length, tokens done, rows)`` of the group being prefilled, or None
                (then a new group may be admitted).
        """
        plan = StepPlan()
        if prefilling is None:
            self.hold_ahead()
            plan.admitted = self._admit(decoding)
            if not plan.admitted:
                return plan
            prefilling = (max(len(r.prompt_ids) for r in plan.admitted), 0, len(plan.admitted))
        total, done, rows = prefilling
        if self.config.policy == "static":
            plan.prefill_tokens = total - done
        else:
            budget = self._budget(decoding) if decoding else max(self.config.max_batch_tokens, IDLE_PREFILL_TOKENS)
            plan.prefill_tokens = min(total - done, max(budget // rows, 1))
        return plan

    def defer(self, requests: Sequence[RequestState]) -> None:
        """Puts back at the head of the queue requests admitted but not prefilled yet (they share
        a prompt head with one being prefilled: the next admission finds it cached)."""
        self.waiting.extendleft(reversed(requests))

    def retry_alone(self, requests: Sequence[RequestState]) -> None:
        """Puts back at the head of the queue requests whose shared prefill failed; each is then
        admitted alone."""
        self.waiting.extendleft(reversed(requests))
        self._solo.update(id(r) for r in requests)

    def drop_cancelled(self) -> list[RequestState]:
        """Removes and returns the cancelled waiting requests."""
        gone = [r for r in self.waiting if r.cancelled]
        for request in gone:
            self.waiting.remove(request)
        return gone

    def window(self) -> list[RequestState]:
        """The next ``max_batch_size`` waiting requests: those that hold their adapters, and among
        which a batch is formed (without copying a long queue)."""
        return list(itertools.islice(self.waiting, self.config.max_batch_size))

    def hold_ahead(self) -> None:
        """The next ``max_batch_size`` waiting requests hold their adapters: loading starts (a
        prefetch, as soon as they are routed and queued), and from then on an adapter stays theirs
        until they end, whether the pool's cache would evict it or the pool drops it. Only that
        window holds, so a long queue never pins more than a batch's worth of adapters."""
        if self.pool is None:
            return
        for request in self.window():
            if request.adapters is None:
                gone = [n for n in request.routing.adapters if n not in self.pool]
                if gone and request.reroute is not None:
                    _reroute(request, gone)
                request.adapters = self.pool.hold([n for n in request.routing.adapters if n in self.pool])

    def _budget(self, decoding: int) -> int:
        return max(self.config.max_batch_tokens - decoding, MIN_CHUNK)

    def _admit(self, decoding: int) -> list[RequestState]:
        """The next requests to prefill (taken off the queue): the oldest waiting one first, within
        the step's token budget."""
        if not self.waiting or decoding >= self.config.max_batch_size:
            return []
        if self.config.policy == "static":
            if decoding:
                return []
            group = self.window()
            solo = [r for r in group if id(r) in self._solo]
            group = solo[:1] or group  # requests whose shared prefill failed go one by one
        else:
            group = self._continuous_group(decoding)
        picked = {id(r) for r in group}
        if picked:
            self.waiting = deque(r for r in self.waiting if id(r) not in picked)
            self._solo.difference_update(picked)
        return group

    def _head(self, decoding: int) -> RequestState | None:
        """The request to admit first: the oldest, unless its adapters are still loading from disk
        and it has waited less than ``max_load_wait``; then the oldest whose adapters are loaded,
        or, with none and a batch decoding, no one this step (the batch decodes on)."""
        oldest = self.waiting[0]
        if _loaded(oldest) or time.perf_counter() - oldest.arrived_at >= self.config.max_load_wait:
            return oldest
        ready = next((r for r in self.window() if _loaded(r)), None)
        if ready is not None:
            return ready
        return None if decoding else oldest

    def _continuous_group(self, decoding: int) -> list[RequestState]:
        """The head request, and with it, from the next ``max_batch_size`` waiting ones, those of
        the closest prompt lengths while the padded group fits the step's budget."""
        budget = self._budget(decoding)
        room = self.config.max_batch_size - decoding
        head = self._head(decoding)
        if head is None:
            return []
        group, longest = [head], len(head.prompt_ids)
        if id(head) in self._solo:
            return group
        window = [r for r in self.window() if r is not head and id(r) not in self._solo and _loaded(r)]
        for request in sorted(window, key=lambda r: abs(len(r.prompt_ids) - len(head.prompt_ids))):
            if len(group) >= room:
                break
            widest = max(longest, len(request.prompt_ids))
            if (len(group) + 1) * widest <= budget:
                group.append(request)
                longest = widest
        return group


def _loaded(request: RequestState) -> bool:
    """Whether the request's adapters are loaded (planning it will not wait for the disk)."""
    return request.adapters is None or request.adapters.ready


def _reroute(request: RequestState, gone: list[str]) -> None:
    """Routes again a request whose adapters ``gone`` were removed between its routing and its
    hold (the router no longer offers a removed adapter); if that fails, the old routing stays and
    the request fails alone when it is planned, naming the missing adapter."""
    try:
        routing = request.reroute()
    except Exception:
        logger.warning("routing request %d again failed", request.index, exc_info=True)
        return
    why = f"routed again: {', '.join(gone)} left the pool"
    request.routing = dataclasses.replace(routing, fallback=f"{routing.fallback}; {why}" if routing.fallback else why)
