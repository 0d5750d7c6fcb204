"""The engine: iteration-level (continuous) batching of routed requests over one base model.

Requests join the running batch between decoding steps and leave as they finish (as in Orca and
vLLM). One :meth:`Engine.step` is

1. drop cancelled requests (their KV rows and factors are freed);
2. one decoding forward pass for every running request (``rows x 1`` tokens, each row composed
   with its own adapters by the :class:`~loraretriever.engine.composer.Composer`);
3. one prefill chunk for the requests being admitted, within the step's token budget
   (``max_batch_tokens`` minus the decoding rows): short prompts are prefilled together in one
   chunk, a long prompt alone over several steps (chunked prefill), so it never stalls the
   others' decoding. The oldest waiting request is admitted first; it takes along the waiting
   requests (among the next ``max_batch_size``) whose prompt lengths are closest to its own, so little
   of a prefill is padding and a request can be overtaken only by that window.

Requests that finish their prefill join the running batch, and finished ones leave it; the KV
cache and the plan are persistent batches, so only the rows that change are copied
(:mod:`loraretriever.engine.kv`, :class:`~loraretriever.engine.composer.RunningPlan`). A forward pass that raises is retried on halves of
the batch until only the request that causes it fails; a row whose logits are not finite fails
alone. ``policy="static"`` keeps the old behaviour for benchmarks: admit a whole batch only when
nothing runs, prefill it in one pass, decode it to the end.

Each request is validated alone when it is made (:meth:`Engine.new_request`): a bad one raises
there and never reaches a shared batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import CancelledError
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraretriever.engine.composer import BatchPlan, Composer, RunningPlan
from loraretriever.engine.intake import RequestIntake
from loraretriever.engine.kv import PrefillKV, RunningKV, swap_moves
from loraretriever.engine.requests import GenerationConfig, Prompt, RequestError, RequestState
from loraretriever.engine.routing import Routing

__all__ = ["Engine", "EngineConfig", "Policy", "cancelled_error"]

logger = logging.getLogger(__name__)

Policy = Literal["continuous", "static"]
_MIN_CHUNK = 16  # prefill tokens per step even when decoding rows use the whole budget
_RESERVE = 256  # answer tokens of a request that the running KV cache reserves columns for


@dataclass(frozen=True)
class EngineConfig:
    """Limits and policy of the engine.

    Example:
        >>> EngineConfig(max_batch_tokens=512).max_batch_size
        32
    """

    max_batch_size: int = field(default=32, metadata={"help": "The most requests decoding at once."})
    max_batch_tokens: int = field(
        default=512,
        metadata={"help": "Tokens per step: one per decoding request plus the prefill chunk of new ones."},
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "The longest prompt in tokens; default: the context window minus max_new_tokens."},
    )
    max_new_tokens_limit: int | None = field(
        default=None, metadata={"help": "The most max_new_tokens a request may ask for; default: the context window."}
    )
    max_load_wait: float = field(
        default=1.0,
        metadata={
            "help": "Seconds a request whose adapters are still loading lets requests with loaded ones go first."
        },
    )
    policy: Policy = field(
        default="continuous",
        metadata={"help": "continuous: join and leave between steps; static: whole batches (a reference)."},
    )

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        for name in ("max_prompt_tokens", "max_new_tokens_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer or None.")
        if (
            not isinstance(self.max_load_wait, int | float)
            or isinstance(self.max_load_wait, bool)
            or not (0 <= self.max_load_wait < float("inf"))
        ):
            raise ValueError(f"max_load_wait={self.max_load_wait!r} must be a number of seconds >= 0.")
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"policy={self.policy!r} must be 'continuous' or 'static'.")


class _Batch:
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

    def take(self, rows: Sequence[int]) -> _Batch:
        """A new batch holding copies of some rows (to retry them apart)."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.kv.device)
        batch = _Batch(
            [self.requests[i] for i in rows], self.kv.take(rows), self.plan.take(rows) if self.plan else None
        )
        batch.last = None if self.last is None else self.last.index_select(0, index)
        return batch

    def extend(self, other: _Batch, reserve: int = 0) -> None:
        """Appends the rows of ``other``, which is not used afterwards (only its rows are copied);
        ``reserve``: KV columns to make room for."""
        self.requests += other.requests
        self.kv.extend(other.kv, reserve)
        if self.plan is not None:
            self.plan.absorb(other.plan)
        self.last = other.last if self.last is None else torch.cat([self.last, other.last])


class Engine:
    """Serves :class:`RequestState` s of one model, each with its own routing, in shared steps.

    Args:
        model: A causal LM (eval mode).
        tokenizer: Its tokenizer (with a pad token).
        composer: Applies routings; without one, every request must be routed to the base model.
        config: Limits and policy.

    Example:
        >>> engine = Engine(model, tokenizer, Composer(model, pool))  # doctest: +SKIP
        >>> request = engine.new_request("Is 'great film' positive?", GenerationConfig(max_new_tokens=4),
        ...                              Routing.pinned(["sst2"]))  # doctest: +SKIP
        >>> engine.run([request])[0].text  # doctest: +SKIP
        'positive'
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        composer: Composer | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.composer = composer
        self.config = config or EngineConfig()
        self.context_window = int(getattr(model.config, "max_position_embeddings", 2048))
        self._layers = int(model.config.get_text_config().num_hidden_layers)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token).")
        self._pad_id = int(tokenizer.pad_token_id)
        self.intake = RequestIntake(
            tokenizer,
            self.context_window,
            max_prompt_tokens=self.config.max_prompt_tokens,
            max_new_tokens_limit=self.config.max_new_tokens_limit,
            device=model.device,
        )
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self.waiting: deque[RequestState] = deque()
        self.running: _Batch | None = None
        self.prefilling: _Batch | None = None
        self.steps = 0
        self.busy_periods = 0  # times the engine went from idle to busy
        self._solo: set[int] = set()  # requests whose shared prefill failed: prefilled alone

    # -- requests ----------------------------------------------------------------------------
    def new_request(self, prompt: Prompt, config: GenerationConfig, routing: Routing | None = None, **kwargs: Any):
        """:meth:`RequestIntake.new_request <loraretriever.engine.intake.RequestIntake.new_request>`."""
        return self.intake.new_request(prompt, config, routing, **kwargs)

    def encode(self, prompt: Prompt, config: GenerationConfig, index: int = 0) -> list[int]:
        """:meth:`RequestIntake.encode <loraretriever.engine.intake.RequestIntake.encode>`."""
        return self.intake.encode(prompt, config, index)

    def add(self, requests: Sequence[RequestState]) -> None:
        """Queues routed requests (first come, first served)."""
        for request in requests:
            if request.queued:
                raise ValueError(f"request {request.index} was already added to an engine; make a new one.")
            if request.routing is None:
                raise ValueError("a request must be routed before it is added to the engine.")
            if self.composer is None and not request.routing.is_base:
                raise ValueError("requests are routed to adapters but the engine has no Composer.")
        if requests and not self.has_work:
            self.busy_periods += 1
        for request in requests:
            request.queued = True
        self.waiting.extend(requests)
        self._hold_ahead()

    def _hold_ahead(self) -> None:
        """The next ``max_batch_size`` waiting requests hold their adapters: loading starts (a
        prefetch, as soon as they are routed and queued), and from then on an adapter stays theirs
        until they end, whether the pool's cache would evict it or the pool drops it. Only that
        window holds, so a long queue never pins more than a batch's worth of adapters."""
        if self.composer is None:
            return
        pool = self.composer.pool
        for request in self._window():
            if request.adapters is None:
                gone = [n for n in request.routing.adapters if n not in pool]
                if gone and request.reroute is not None:
                    self._reroute(request, gone)
                request.adapters = pool.hold([n for n in request.routing.adapters if n in pool])

    @staticmethod
    def _reroute(request: RequestState, gone: list[str]) -> None:
        """Routes again a request whose adapters ``gone`` were removed between its routing and its
        hold (the router no longer offers a removed adapter); if that fails, the old routing stays
        and the request fails alone when it is planned, naming the missing adapter."""
        try:
            routing = request.reroute()
        except Exception:
            logger.warning("routing request %d again failed", request.index, exc_info=True)
            return
        why = f"routed again: {', '.join(gone)} left the pool"
        request.routing = dataclasses.replace(
            routing, fallback=f"{routing.fallback}; {why}" if routing.fallback else why
        )

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def run(self, requests: Sequence[RequestState]) -> list[RequestState]:
        """Adds those of ``requests`` not added yet and steps until each has finished (inline)."""
        self.add([r for r in requests if not r.queued])
        while not all(r.finished for r in requests):
            self.step()
        return list(requests)

    # -- one iteration -----------------------------------------------------------------------
    def step(self) -> None:
        """One iteration: drop cancelled requests, decode one token for the running batch, and
        prefill one chunk of the requests being admitted."""
        with torch.inference_mode():
            self._drop_cancelled()
            if self.running is not None:
                self.running = self._decode(self.running)
            if self.prefilling is None:
                self._hold_ahead()
                self.prefilling = self._admit()
            if self.prefilling is not None:
                self._prefill_chunk()
        self.steps += 1

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            request.fail(cancelled_error())
        for name in ("running", "prefilling"):
            batch = getattr(self, name)
            if batch is not None and any(r.cancelled for r in batch.requests):
                for request in batch.requests:
                    if request.cancelled:
                        request.fail(cancelled_error())
                setattr(self, name, self._keep(batch, [i for i, r in enumerate(batch.requests) if not r.cancelled]))

    def _admit(self) -> _Batch | None:
        """The next requests to prefill: the oldest waiting one first, within the step's token budget."""
        running = len(self.running) if self.running is not None else 0
        if not self.waiting or running >= self.config.max_batch_size:
            return None
        if self.config.policy == "static":
            if running:
                return None
            group = self._window()
            solo = [r for r in group if id(r) in self._solo]
            group = solo[:1] or group  # requests whose shared prefill failed go one by one
        else:
            group = self._continuous_group(running)
            if not group:
                return None
        picked = {id(r) for r in group}
        self.waiting = deque(r for r in self.waiting if id(r) not in picked)
        self._solo.difference_update(picked)
        group, plan = self._plan(group)
        return self._new_batch(group, plan) if group else None

    def _window(self) -> list[RequestState]:
        """The next ``max_batch_size`` waiting requests: those that hold their adapters, and among
        which a batch is formed (without copying a long queue)."""
        return list(itertools.islice(self.waiting, self.config.max_batch_size))

    def _head(self, running: int) -> RequestState | None:
        """The request to admit first: the oldest, unless its adapters are still loading from disk
        and it has waited less than ``max_load_wait``; then the oldest whose adapters are loaded,
        or, with none and a batch decoding, no one this step (the batch decodes on)."""
        oldest = self.waiting[0]
        if _loaded(oldest) or time.perf_counter() - oldest.arrived_at >= self.config.max_load_wait:
            return oldest
        ready = next((r for r in self._window() if _loaded(r)), None)
        if ready is not None:
            return ready
        return None if running else oldest

    def _continuous_group(self, running: int) -> list[RequestState]:
        """The oldest waiting request, and with it, from the next ``max_batch_size`` waiting ones,
        those of the closest prompt lengths while the padded group fits the step's budget (so
        little of the prefill is padding, and a request is overtaken only by that window)."""
        budget = max(self.config.max_batch_tokens - running, _MIN_CHUNK)
        room = self.config.max_batch_size - running
        head = self._head(running)
        if head is None:
            return []
        group, longest = [head], len(head.prompt_ids)
        if id(head) in self._solo:
            return group
        window = [r for r in self._window() if r is not head and id(r) not in self._solo and _loaded(r)]
        for request in sorted(window, key=lambda r: abs(len(r.prompt_ids) - len(head.prompt_ids))):
            if len(group) >= room:
                break
            widest = max(longest, len(request.prompt_ids))
            if (len(group) + 1) * widest <= budget:
                group.append(request)
                longest = widest
        return group

    def _plan(self, requests: list[RequestState]) -> tuple[list[RequestState], BatchPlan | None]:
        """The composition plan of ``requests``, with the adapters each held since :meth:`add`; a
        request whose routing cannot be planned (an adapter already gone when it was added, a gate
        that no longer fits) fails alone."""
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

    def _new_batch(self, requests: list[RequestState], plan: BatchPlan | None) -> _Batch:
        device = self.model.device
        length = max(len(r.prompt_ids) for r in requests)
        prompt = torch.full((len(requests), length), self._pad_id, dtype=torch.long)
        for row, request in enumerate(requests):
            prompt[row, length - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            request.prefilled = 0
        kv = PrefillKV(len(requests), length, self._layers, device)
        return _Batch(requests, kv, self._running_plan(plan, len(requests)), prompt.to(device))

    def _running_plan(self, plan: BatchPlan | None, capacity: int) -> RunningPlan | None:
        if self.composer is None:
            return None
        return RunningPlan.adopt(self.composer, plan, capacity)

    def _prefill_chunk(self) -> None:
        group = self.prefilling
        total = group.prompt.shape[1]
        done = group.kv.length
        if self.config.policy == "static":
            size = total - done
        else:
            running = len(self.running) if self.running is not None else 0
            budget = max(self.config.max_batch_tokens - running, _MIN_CHUNK)
            size = min(total - done, max(budget // len(group), 1))
        lengths = [max(0, min(size, len(r.prompt_ids) - (total - done - size))) for r in group.requests]
        try:
            logits = self._forward(group, group.prompt[:, done : done + size], lengths)
        except Exception as error:
            self.prefilling = None
            if len(group) == 1:
                group.requests[0].fail(_step_error(error, group.requests[0]))
            else:  # retry them one by one, at the head of the queue, to find the one that fails
                logger.warning("prefill of %d requests failed (%s); retrying them one by one", len(group), error)
                self.waiting.extendleft(reversed(group.requests))
                self._solo.update(id(r) for r in group.requests)
            return
        for request, n in zip(group.requests, lengths, strict=True):
            request.prefilled += n
        if group.kv.length < total:
            return
        self.prefilling = None
        group.prompt = None
        kept = self._sample_and_advance(group, logits)
        if kept is None:
            return
        if self.running is None:  # a batch with room for the most rows, so joins copy only themselves
            self.running = _Batch(
                [],
                RunningKV(self.config.max_batch_size, self._layers, self.model.device),
                self._running_plan(self._empty_plan(), self.config.max_batch_size),
            )
        # KV room for the newcomers' and the next waiting requests' prompts and answers (up to
        # _RESERVE answer tokens), so that neither decoding nor the next joins regrow the cache
        soon = kept.requests + self._window()
        self.running.extend(kept, max(len(r.prompt_ids) + min(r.config.max_new_tokens, _RESERVE) for r in soon))

    def _empty_plan(self) -> BatchPlan | None:
        return None if self.composer is None else self.composer.build_plan([])

    def _decode(self, batch: _Batch) -> _Batch | None:
        """One token for every row; a failing forward pass is retried on halves of the batch."""
        try:
            logits = self._forward(batch, batch.last[:, None], [1] * len(batch))
        except Exception as error:
            if len(batch) == 1:
                batch.requests[0].fail(_step_error(error, batch.requests[0]))
                return None
            logger.warning("a decoding step of %d rows failed (%s); splitting the batch", len(batch), error)
            half = len(batch) // 2
            parts = [batch.take(range(half)), batch.take(range(half, len(batch)))]
            survivors = [p for p in (self._decode(part) for part in parts) if p is not None]
            if not survivors:
                return None
            for part in survivors[1:]:
                survivors[0].extend(part)
            return survivors[0]
        return self._sample_and_advance(batch, logits)

    def _forward(self, batch: _Batch, input_ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
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
        batch.kv.advance(mask)
        return out.logits[:, -1, :]

    def _sample_and_advance(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Chooses each row's next token, hands it to its request; returns the unfinished rows."""
        # NaN and +inf reach a row's maximum: one reduction, not a full-vocabulary isfinite mask
        finite = torch.isfinite(logits.amax(dim=-1)).tolist()
        for row, request in enumerate(batch.requests):
            if request.config.repetition_penalty != 1.0:
                _penalize_repeats(logits[row], request.prompt_ids + request.ids, request.config.repetition_penalty)
        constrained = [(row, r.matcher) for row, r in enumerate(batch.requests) if r.matcher is not None]
        if constrained:
            self.intake.grammars.mask(logits, [row for row, _ in constrained], [m for _, m in constrained])
        chosen = logits.argmax(dim=-1)
        for row, request in enumerate(batch.requests):
            if request.config.temperature > 0 and finite[row]:
                cfg = request.config
                chosen[row] = _sample(logits[row], cfg.temperature, cfg.top_p, request.rng)
        tokens = chosen.tolist()
        for row, matcher in constrained:
            if finite[row] and not matcher.consume_token(tokens[row]):
                batch.requests[row].fail(
                    RequestError(f"the grammar refused token {tokens[row]}: {matcher.get_error()}")
                )
        keep = []
        for row, request in enumerate(batch.requests):
            if request.finished:  # failed above
                continue
            request.batch_rows = max(request.batch_rows, len(batch))
            if not finite[row]:
                request.fail(
                    RequestError(
                        f"prompt {request.index}: the model produced non-finite logits with routing "
                        f"[{request.routing}]; the request was stopped. Fix: check the adapters' weights, or "
                        "use float32."
                    )
                )
                continue
            try:
                request.advance(tokens[row], self.tokenizer, self._eos_ids)
            except Exception as error:  # a caller's callback or detokenisation failed: only this request
                request.fail(error)
            if not request.finished:
                keep.append(row)
        batch.last = chosen
        return self._keep(batch, keep)

    # -- batch surgery -----------------------------------------------------------------------
    def _keep(self, batch: _Batch, rows: Sequence[int]) -> _Batch | None:
        """``batch`` with only ``rows`` (changed in place), or None when none are left."""
        keep = set(rows)
        if not keep:
            return None
        leaving = [i for i in range(len(batch)) if i not in keep]
        if leaving:
            batch.remove(leaving)
        return batch


def _loaded(request: RequestState) -> bool:
    """Whether the request's adapters are loaded (planning it will not wait for the disk)."""
    return request.adapters is None or request.adapters.ready


def cancelled_error() -> CancelledError:
    """The error a cancelled request ends with."""
    return CancelledError("the request was cancelled")


def _step_error(error: Exception, request: RequestState) -> RequestError:
    failure = RequestError(
        f"prompt {request.index} failed in the model's forward pass with routing [{request.routing}]: "
        f"{type(error).__name__}: {error}"
    )
    failure.__cause__ = error
    return failure


def _penalize_repeats(logits: torch.Tensor, seen: list[int], penalty: float) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor on one row, in place: a seen token's logit is
    divided by ``penalty`` when positive, multiplied when negative."""
    ids = torch.tensor(sorted(set(seen)), device=logits.device)
    values = logits[ids]
    logits[ids] = torch.where(values > 0, values / penalty, values * penalty)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
