"""The engine: iteration-level (continuous) batching of routed requests over one base model.

Requests join the running batch between decoding steps and leave as they finish (as in Orca and
vLLM). The engine wires four rooms, each with one job (vLLM v1 keeps the same apart):

* :class:`~loraretriever.engine.scheduler.Scheduler`: the policy. It owns the waiting queue and
  returns a plain :class:`~loraretriever.engine.scheduler.StepPlan` (which group starts its
  prefill, how many prompt tokens this step computes);
* :class:`~loraretriever.engine.model_runner.ModelRunner`: execution. Forward passes over the
  persistent running and prefilling batches (KV caches, composition plans), and bisection when a
  pass fails;
* :class:`~loraretriever.engine.sampler.Sampler`: every row's next token, in tensor operations
  across the rows (penalties, grammar masks, temperature, top-p);
* :class:`~loraretriever.engine.outputs.OutputProcessor`: tokens to text, stop strings and the
  callers' callbacks, on a thread of its own once the worker (:mod:`loraretriever.engine.worker`)
  starts it.

One :meth:`Engine.step` is: drop cancelled and stopped rows; one decoding pass for every running
row (``rows x 1`` tokens, each row composed with its own adapters); the scheduler's plan; one
prefill chunk of the group being admitted (a long prompt is prefilled over several steps, so it
never stalls the others' decoding); sampling; the step's tokens posted to the output processor.

Each request is validated alone when it is made (:meth:`Engine.new_request`): a bad one raises
there and never reaches a shared batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraretriever.engine.composer import Composer
from loraretriever.engine.intake import RequestIntake
from loraretriever.engine.model_runner import ModelRunner, PrefillDone, RowBatch
from loraretriever.engine.outputs import OutputProcessor, TokenEvent
from loraretriever.engine.prefix_cache import PrefixCache
from loraretriever.engine.requests import GenerationConfig, Prompt, RequestState, StepError
from loraretriever.engine.routing import Routing
from loraretriever.engine.sampler import Sampler
from loraretriever.engine.scheduler import Scheduler
from loraretriever.errors import InvalidOptionError

__all__ = ["ENGINE_OPTIONS", "Engine", "EngineConfig", "Policy", "cancelled_error"]

logger = logging.getLogger(__name__)

Policy = Literal["continuous", "static"]


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
    prefix_cache_gb: float = field(
        default=1.0,
        metadata={
            "help": "GiB of the model's device memory kept for the KV of prompt prefixes, reused by later "
            "requests with the same routing and prefix (least recently used out first); 0 turns it off."
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
                raise InvalidOptionError(f"{name}={value!r} must be a positive integer.", param=name)
        for name in ("max_prompt_tokens", "max_new_tokens_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidOptionError(f"{name}={value!r} must be a positive integer or None.", param=name)
        if (
            not isinstance(self.max_load_wait, int | float)
            or isinstance(self.max_load_wait, bool)
            or not (0 <= self.max_load_wait < float("inf"))
        ):
            raise InvalidOptionError(
                f"max_load_wait={self.max_load_wait!r} must be a number of seconds >= 0.", param="max_load_wait"
            )
        gb = self.prefix_cache_gb
        if isinstance(gb, bool) or not isinstance(gb, int | float) or not (0 <= gb < float("inf")):
            raise InvalidOptionError(
                f"prefix_cache_gb={gb!r} must be a number of GiB >= 0 (0 turns the prefix cache off).",
                param="prefix_cache_gb",
            )
        if self.policy not in ("continuous", "static"):
            raise InvalidOptionError(f"policy={self.policy!r} must be 'continuous' or 'static'.", param="policy")


ENGINE_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EngineConfig))
"""The engine's options by name: RoutedLM's keywords, the integrations' load options and
``serve``'s flags are derived from :class:`EngineConfig`, never listed again."""


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
        if tokenizer.pad_token_id is None:
            raise InvalidOptionError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token).")
        self.intake = RequestIntake(
            tokenizer,
            self.context_window,
            max_prompt_tokens=self.config.max_prompt_tokens,
            max_new_tokens_limit=self.config.max_new_tokens_limit,
            device=model.device,
        )
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self.scheduler = Scheduler(self.config, composer.pool if composer is not None else None)
        gib = self.config.prefix_cache_gb
        self.prefix_cache = PrefixCache(int(gib * 2**30)) if gib > 0 else None
        self.runner = ModelRunner(
            model, composer, self.config.max_batch_size, int(tokenizer.pad_token_id), self.prefix_cache
        )
        self.sampler = Sampler(self.intake.grammars)
        self.outputs = OutputProcessor(tokenizer)
        self.steps = 0
        self.busy_periods = 0  # times the engine went from idle to busy

    @property
    def waiting(self) -> deque[RequestState]:
        """Requests not admitted yet (the scheduler's queue)."""
        return self.scheduler.waiting

    @property
    def running(self) -> RowBatch | None:
        """The decoding batch."""
        return self.runner.running

    @property
    def prefilling(self) -> RowBatch | None:
        """The group being prefilled."""
        return self.runner.prefilling

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
                raise InvalidOptionError(f"request {request.index} was already added to an engine; make a new one.")
            if request.routing is None:
                raise InvalidOptionError("a request must be routed before it is added to the engine.")
            if self.composer is None and not request.routing.is_base:
                raise InvalidOptionError("requests are routed to adapters but the engine has no Composer.")
        if requests and not self.has_work:
            self.busy_periods += 1
        for request in requests:
            request.queued = True
            request.outputs = self.outputs
        self.scheduler.add(requests)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def run(self, requests: Sequence[RequestState]) -> list[RequestState]:
        """Adds those of ``requests`` not added yet and steps until each has finished (inline);
        their text is complete when it returns."""
        self.add([r for r in requests if not r.queued])
        while not all(r.finished for r in requests):
            self.step()
        self.outputs.drain()
        return list(requests)

    def fail_all(self, error: BaseException) -> None:
        """Fails every request the engine holds (the worker's last resort when a step raises)."""
        held = list(self.waiting) + self.runner.clear()
        self.waiting.clear()
        for request in held:
            request.fail(error)

    # -- one iteration -----------------------------------------------------------------------
    def step(self) -> None:
        """One iteration: drop cancelled and stopped rows, decode one token for the running batch,
        and prefill one chunk of the requests being admitted."""
        with torch.inference_mode():
            for request in self.scheduler.drop_cancelled() + self.runner.drop():
                request.fail(cancelled_error())
            if self.runner.running is not None:
                decoded = self.runner.decode()
                if decoded is not None:
                    self.runner.running = self._advance(*decoded)
            plan = self.scheduler.schedule(self.runner.decoding, self.runner.progress())
            if plan.admitted:
                # a static batch is prefilled whole (nothing joins it later)
                continuous = self.config.policy == "continuous"
                self.scheduler.defer(self.runner.start_prefill(plan.admitted, defer=continuous))
                progress = self.runner.progress()
                if progress is not None:  # some could not be planned, or prompt heads came from the prefix cache
                    plan = self.scheduler.schedule(self.runner.decoding, progress)
            if self.runner.prefilling is not None and plan.prefill_tokens:
                self._prefill(plan.prefill_tokens)
        self.steps += 1

    def _prefill(self, tokens: int) -> None:
        outcome = self.runner.prefill(tokens)
        if isinstance(outcome, list):
            self.scheduler.retry_alone(outcome)
        elif isinstance(outcome, PrefillDone):
            kept = self._advance(outcome.batch, outcome.logits)
            if kept is not None:
                self.runner.join(kept, self.scheduler.window())

    def _advance(self, batch: RowBatch, logits: torch.Tensor) -> RowBatch | None:
        """Samples each row's next token, hands it to its request and the output processor;
        returns the batch with its unfinished rows."""
        sampled = self.sampler(batch.requests, logits)
        events, keep, left = [], [], []
        for row, request in enumerate(batch.requests):
            if request.finished:  # its grammar refused the token, or it stopped meanwhile
                continue
            request.batch_rows = max(request.batch_rows, len(batch))
            if not sampled.finite[row]:
                request.fail(
                    StepError(
                        f"prompt {request.index}: the model produced non-finite logits with routing "
                        f"[{request.routing}]; the request was stopped. Fix: check the adapters' weights, or "
                        "use float32."
                    )
                )
                continue
            token = sampled.ids[row]
            ended = request.append_token(token, self._eos_ids)
            events.append(TokenEvent(request, None if ended == "stop" else token, ended))
        self.outputs.post(events)  # inline, a stop string or a failed callback ends its row right here
        for row, request in enumerate(batch.requests):
            if request.finished:
                request.release()
                left.append(row)
            else:
                keep.append(row)
        self.runner.remember(batch, left)
        batch.last = sampled.tokens
        return batch.keep(keep)


def cancelled_error() -> CancelledError:
    """The error a cancelled request ends with."""
    return CancelledError("the request was cancelled")


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
