"""Executing the scheduler's plans: the model's forward passes over persistent batches, their KV
caches and composition plans, and finding the request that makes a pass fail.

Two batches live here: the running one (decoding, one token per row per step) and the one being
prefilled (a group admitted by the scheduler, filled chunk by chunk). Both are persistent: rows
join and leave in place and only the rows that change are copied (:mod:`loraretriever.engine.kv`,
:class:`~loraretriever.engine.composer.RunningPlan`). A decoding pass that raises is retried on
halves of the batch until only the request that causes it fails; a prefill that raises hands its
group back to the scheduler to be prefilled one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from loraretriever.engine.composer import BatchPlan, Composer, RunningPlan
from loraretriever.engine.kv import PrefillKV, RunningKV, swap_moves
from loraretriever.engine.prefix_cache import PrefixCache, composition_key
from loraretriever.engine.requests import RequestState, StepError

__all__ = ["ModelRunner", "PrefillDone", "RowBatch"]

logger = logging.getLogger(__name__)

RESERVE = 256  # answer tokens of a request that the running KV cache reserves columns for


class RowBatch:
    """Requests that share a KV cache and a composition plan, row by row, changed in place."""

    def __init__(
        self,
        requests: list[RequestState],
        kv: PrefillKV | RunningKV,
        plan: RunningPlan | None,
        prompt: torch.Tensor | None = None,
    ) -> None:
        self.requests = list(requests)
        self.kv = kv
        self.plan = plan
        self.prompt = prompt  # (rows, length) left-padded prompt ids (prefill)
        self.last: torch.Tensor | None = None  # (rows,) the token each row feeds next (decoding)

    def __len__(self) -> int:
        return len(self.requests)

    def remove(self, leaving: Sequence[int]) -> None:
        """Drops rows: the last rows move into the holes, so only they are copied."""
        destinations, sources, n = swap_moves(len(self.requests), leaving)
        order = list(range(len(self.requests)))
        for d, s in zip(destinations, sources, strict=True):
            order[d] = s
        order = order[:n]
        self.requests = [self.requests[i] for i in order]
        self.kv.remove(leaving)
        if self.plan is not None:
            self.plan.remove(leaving)
        index = torch.tensor(order, dtype=torch.long, device=self.kv.device)
        if self.last is not None:
            self.last = self.last.index_select(0, index)
        if self.prompt is not None:
            self.prompt = self.prompt.index_select(0, index)

    def keep(self, rows: Sequence[int]) -> RowBatch | None:
        """This batch with only ``rows`` (changed in place), or None when none are left."""
        kept = set(rows)
        if not kept:
            return None
        leaving = [i for i in range(len(self)) if i not in kept]
        if leaving:
            self.remove(leaving)
        return self

    def take(self, rows: Sequence[int]) -> RowBatch:
        """A new batch holding copies of some rows (to retry them apart)."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.kv.device)
        batch = RowBatch(
            [self.requests[i] for i in rows], self.kv.take(rows), self.plan.take(rows) if self.plan else None
        )
        batch.last = None if self.last is None else self.last.index_select(0, index)
        return batch

    def extend(self, other: RowBatch, reserve: int = 0) -> None:
        """Appends the rows of ``other``, which is not used afterwards (only its rows are copied);
        ``reserve``: KV columns to make room for."""
        self.requests += other.requests
        self.kv.extend(other.kv, reserve)
        if self.plan is not None:
            self.plan.absorb(other.plan)
        self.last = other.last if self.last is None else torch.cat([self.last, other.last])


@dataclass
class PrefillDone:
    """A group whose prompts are all in its KV cache: the logits of each row's last prompt token."""

    batch: RowBatch
    logits: torch.Tensor


class ModelRunner:
    """Runs the model over the engine's batches.

    Args:
        model: A causal LM (eval mode).
        composer: Applies routings; None for the base model only.
        capacity: Rows of the running batch (the engine's ``max_batch_size``).
        pad_id: The token prompts are left-padded with.
        prefix_cache: Where prompt heads' KV is kept for reuse (None: nothing is kept).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        composer: Composer | None,
        capacity: int,
        pad_id: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.prefix_cache = prefix_cache
        self._kv_kind: tuple[torch.device, torch.dtype] | None = None  # of the cached blocks
        self.composer = composer
        self.capacity = capacity
        self.pad_id = pad_id
        self.layers = int(model.config.get_text_config().num_hidden_layers)
        self.running: RowBatch | None = None
        self.prefilling: RowBatch | None = None

    @property
    def decoding(self) -> int:
        return len(self.running) if self.running is not None else 0

    def progress(self) -> tuple[int, int, int] | None:
        """``(padded length, tokens done, rows)`` of the group being prefilled, or None."""
        group = self.prefilling
        return None if group is None else (group.prompt.shape[1], group.kv.done, len(group))

    # -- decoding ----------------------------------------------------------------------------
    def decode(self) -> tuple[RowBatch, torch.Tensor] | None:
        """One decoding pass over the running batch: the batch (its rows that did not fail) and
        their logits, or None when every row failed."""
        batch, logits = self._decode(self.running)
        self.running = batch
        return None if batch is None else (batch, logits)

    def _decode(self, batch: RowBatch) -> tuple[RowBatch | None, torch.Tensor | None]:
        """A failing forward pass is retried on halves of the batch, down to the row that fails."""
        try:
            return batch, self._forward(batch, batch.last[:, None], [1] * len(batch))
        except Exception as error:
            if len(batch) == 1:
                batch.requests[0].fail(_step_error(error, batch.requests[0]))
                return None, None
            logger.warning("a decoding step of %d rows failed (%s); splitting the batch", len(batch), error)
            half = len(batch) // 2
            parts = [self._decode(part) for part in (batch.take(range(half)), batch.take(range(half, len(batch))))]
            survivors = [(b, logits) for b, logits in parts if b is not None]
            if not survivors:
                return None, None
            merged = survivors[0][0]
            for part, _ in survivors[1:]:
                merged.extend(part)
            return merged, torch.cat([logits for _, logits in survivors])

    # -- prefill -----------------------------------------------------------------------------
    def start_prefill(self, requests: list[RequestState], defer: bool = True) -> list[RequestState]:
        """Plans the admitted group's composition (a request that cannot be planned fails alone)
        and makes its batch, each prompt's head from the prefix cache where it is there. Returns
        the requests deferred: those that would compute the same next block as an earlier one of
        the group (``n`` choices of a prompt, concurrent calls with one system prompt); admitted
        after this group, they find that block cached (``defer=False``: none is)."""
        self._key(requests)
        requests, deferred = self._leaders(requests) if defer else (requests, [])
        requests, plan = self._plan(requests)
        if not requests:
            return deferred
        heads = [self._cached_head(r) for r in requests]
        length = max(len(r.prompt_ids) - r.cached_tokens for r in requests)
        prompt = torch.full((len(requests), length), self.pad_id, dtype=torch.long)
        for row, request in enumerate(requests):
            rest = request.prompt_ids[request.cached_tokens :]
            prompt[row, length - len(rest) :] = torch.tensor(rest)
            request.prefilled = request.cached_tokens
        width = max(r.cached_tokens for r in requests)
        kv = PrefillKV(len(requests), width + length, self.layers, self.model.device)
        kv.preload(heads)
        self.prefilling = RowBatch(requests, kv, self._running_plan(plan, len(requests)), prompt.to(self.model.device))
        return deferred

    def prefill(self, tokens: int) -> PrefillDone | list[RequestState] | None:
        """The next ``tokens`` prompt tokens of the prefilling group. Returns the group and its last
        logits once its whole prompt is in; the group's requests to retry one by one if a shared
        pass failed (a group of one fails instead); None while the prefill goes on."""
        group = self.prefilling
        total, done = group.prompt.shape[1], group.kv.done
        rests = [len(r.prompt_ids) - r.cached_tokens for r in group.requests]
        lengths = [max(0, min(tokens, rest - (total - done - tokens))) for rest in rests]
        try:
            logits = self._forward(group, group.prompt[:, done : done + tokens], lengths)
        except Exception as error:
            self.prefilling = None
            if len(group) == 1:
                group.requests[0].fail(_step_error(error, group.requests[0]))
                return None
            logger.warning("prefill of %d requests failed (%s); retrying them one by one", len(group), error)
            return group.requests
        for request, n in zip(group.requests, lengths, strict=True):
            request.prefilled += n
        if group.kv.done < total:
            return None
        self.prefilling = None
        group.prompt = None
        for row, request in enumerate(group.requests):
            self._store(group.kv, row, request, request.prompt_ids, len(request.prompt_ids))
        return PrefillDone(group, logits)

    def join(self, batch: RowBatch, upcoming: Sequence[RequestState]) -> None:
        """Moves prefilled rows into the running batch, with KV room for theirs and ``upcoming``
        requests' prompts and answers (up to ``RESERVE`` answer tokens), so that neither decoding
        nor the next joins regrow the cache."""
        if self.running is None:  # its KV rows double as rows join (a long prompt alone holds one row)
            empty = None if self.composer is None else self.composer.build_plan([])
            self.running = RowBatch(
                [],
                RunningKV(len(batch), self.layers, self.model.device, max_rows=self.capacity),
                self._running_plan(empty, self.capacity),
            )
        soon = batch.requests + list(upcoming)
        self.running.extend(batch, max(len(r.prompt_ids) + min(r.config.max_new_tokens, RESERVE) for r in soon))

    # -- shared ------------------------------------------------------------------------------
    def drop(self) -> list[RequestState]:
        """Removes the cancelled rows (returned, to be failed) and the rows that ended meanwhile (a
        stop string found by the output processor, a failed callback)."""
        cancelled = []
        for name in ("running", "prefilling"):
            batch = getattr(self, name)
            if batch is None:
                continue
            keep, gone = [], []
            for i, request in enumerate(batch.requests):
                (gone if request.cancelled or request.finished else keep).append(i)
            if gone:
                self.remember(batch, gone)
                for i in gone:
                    batch.requests[i].release()
                    if batch.requests[i].cancelled:
                        cancelled.append(batch.requests[i])
                setattr(self, name, batch.keep(keep))
        return cancelled

    # -- prefix cache ------------------------------------------------------------------------
    def remember(self, batch: RowBatch, rows: Sequence[int]) -> None:
        """Keeps the KV of ``rows`` that ended well (prompt and answer) in the prefix cache, before
        they leave the running batch: an agent's next call starts with this one's conversation."""
        if self.prefix_cache is None or not isinstance(batch.kv, RunningKV):
            return
        for row in rows:
            request = batch.requests[row]
            if request.error is None and not request.cancelled:
                self._store(batch.kv, row, request, request.prompt_ids + request.ids, int(batch.kv.lengths[row]))

    def _key(self, requests: list[RequestState]) -> None:
        """Sets each admitted request's ``prefix_key`` (None without a prefix cache), once per
        admission; empties the cache first if the model moved or changed dtype since it was filled."""
        if self.prefix_cache is None:
            return
        kind = (self.model.device, next(self.model.parameters()).dtype)
        if kind != self._kv_kind:  # what is cached no longer fits the model's KV
            self.prefix_cache.clear()
            self._kv_kind = kind
        for request in requests:
            request.prefix_key = self._prefix_key(request)

    def _leaders(self, requests: list[RequestState]) -> tuple[list[RequestState], list[RequestState]]:
        """Splits a group into the requests to prefill now and those to defer (see
        :meth:`start_prefill`)."""
        cache = self.prefix_cache
        if cache is None or len(requests) < 2:
            return requests, []
        leaders, deferred, computing = [], [], set()
        for request in requests:
            chain = self._usable_chain(request)
            found = cache.match(chain)
            block = chain[found] if found < len(chain) else None  # the first block it would compute
            if block is not None and block in computing:
                deferred.append(request)
            else:
                leaders.append(request)
                computing.update(chain)
        return leaders, deferred

    def _usable_chain(self, request: RequestState) -> list[bytes]:
        """The block hashes of ``request``'s prompt head that may come from the cache: at least one
        prompt token is left to prefill (its logits give the first token)."""
        if request.prefix_key is None:
            return []
        usable = (len(request.prompt_ids) - 1) // self.prefix_cache.block_tokens
        return self.prefix_cache.chain(
            request.prefix_key, request.prompt_ids[: usable * self.prefix_cache.block_tokens]
        )

    def _cached_head(self, request: RequestState) -> torch.Tensor | None:
        """The KV of the longest head of ``request``'s prompt in the prefix cache; sets its
        ``cached_tokens``."""
        request.cached_tokens = 0
        cache = self.prefix_cache
        if cache is None or request.prefix_key is None:
            return None
        head = cache.lookup(self._usable_chain(request))
        request.cached_tokens = 0 if head is None else head.shape[3]
        cache.count(len(request.prompt_ids), request.cached_tokens)
        return head

    def _store(self, kv: PrefillKV | RunningKV, row: int, request: RequestState, tokens: list[int], n: int) -> None:
        """Keeps the full blocks of the first ``n`` of ``tokens`` (those in ``kv``'s ``row``) that
        the prefix cache lacks."""
        cache = self.prefix_cache
        if cache is None or request.prefix_key is None:
            return
        chain = cache.chain(request.prefix_key, tokens[:n])
        first = cache.match(chain)
        if first >= len(chain):
            return
        try:
            cache.store(chain, kv.read(row, first * cache.block_tokens, len(chain) * cache.block_tokens), first)
        except Exception as error:  # e.g. a model whose layers keep KV of different shapes: serve uncached
            logger.warning("prefix cache turned off: this model's KV cannot be kept in blocks (%s)", error)
            cache.clear()
            self.prefix_cache = None

    def _prefix_key(self, request: RequestState) -> str | None:
        """The prefix cache key of ``request``'s composition, or None if it cannot be told (then
        nothing of it is cached)."""
        routing = request.routing
        if routing.is_base:
            return "base"
        if self.composer is None:
            return None
        try:
            held = request.adapters.adapters() if request.adapters is not None else {}
            if routing.mode == "meteora":
                digests = dict(self.composer.gates[routing.gate].config.digests)
            else:
                digests = {n: (held.get(n) or self.composer.pool.get(n)).digest for n in routing.adapters}
            version = self.composer.gates.version(routing.gate) if routing.gate else None
        except Exception as error:  # an adapter or gate gone meanwhile: this request is just not cached
            logger.debug("no prefix cache key for prompt %d: %s", request.index, error)
            return None
        return composition_key(routing, digests, version)

    def clear(self) -> list[RequestState]:
        """Forgets both batches; returns their requests."""
        held = [r for batch in (self.running, self.prefilling) if batch is not None for r in batch.requests]
        self.running = self.prefilling = None
        return held

    def _forward(self, batch: RowBatch, input_ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        mask, positions = batch.kv.step_inputs(lengths)
        context = self.composer.use(batch.plan.view()) if batch.plan is not None else nullcontext()
        with context:  # a failed pass leaves the cache as it was: new tokens count only after advance()
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=batch.kv.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        batch.kv.advance(mask, input_ids.shape[1])
        return out.logits[:, -1, :]

    def _plan(self, requests: list[RequestState]) -> tuple[list[RequestState], BatchPlan | None]:
        """The composition plan of ``requests``, with the adapters each holds; a request whose
        routing cannot be planned (an adapter already gone when it was added, a gate that no longer
        fits) fails alone."""
        if self.composer is None:
            return requests, None

        def plan(group: list[RequestState]) -> BatchPlan:
            held = {n: a for r in group if r.adapters is not None for n, a in r.adapters.adapters().items()}
            return self.composer.build_plan([r.routing for r in group], held=held)

        try:
            return requests, plan(requests)
        except Exception:
            good = []
            for request in requests:
                try:
                    plan([request])
                    good.append(request)
                except Exception as error:
                    request.fail(error)
            if not good:
                return [], None
            return good, plan(good)

    def _running_plan(self, plan: BatchPlan | None, capacity: int) -> RunningPlan | None:
        if self.composer is None:
            return None
        return RunningPlan.adopt(self.composer, plan, capacity)


def _step_error(error: Exception, request: RequestState) -> StepError:
    failure = StepError(
        f"prompt {request.index} failed in the model's forward pass with routing [{request.routing}]: "
        f"{type(error).__name__}: {error}"
    )
    failure.__cause__ = error
    return failure
