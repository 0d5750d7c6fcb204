"""Fields and helpers shared by the LangChain LLM and chat model (one RoutedLM behind both)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from loraretriever.routed_lm import Result, RoutedLM, RoutesPrompts, call_options

__all__ = ["RoutedLMParams", "generation_info", "token_usage"]


class RoutedLMParams(BaseModel):
    """Settings of a LangChain model backed by a :class:`loraretriever.RoutedLM`.

    Every field is a default: any of them (and every other generation or routing option of
    ``RoutedLM.generate``) can be overridden per call, as a kwarg or through ``.bind()``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    lm: RoutedLM = Field(exclude=True)
    """The engine: base model, LoRA pool, router, composer and batching queue."""
    max_new_tokens: int = 64
    """The most tokens to generate per prompt."""
    temperature: float = 0.0
    """0 for greedy decoding; above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    seed: int | None = None
    """Sampling seed, for reproducible sampled text."""
    chat_template: bool = False
    """Wrap each prompt in the base model's chat template (instruction-tuned models answer better)."""
    top_k: int | None = None
    """LoRAs retrieved per prompt (None: the router's default, 3)."""
    mode: Literal["mixture", "fusion", "single", "flow", "meteora"] | None = None
    """How a prompt's LoRAs are composed (None: mixture); ``flow`` / ``meteora`` use the pool's gate."""
    gate: str | None = None
    """The LoRA-Flow or MeteoRA gate for ``mode="flow"`` / ``"meteora"`` (None: the pool's only one)."""
    adapters: list[str] | None = None
    """Pin these adapters instead of retrieving (e.g. ``.bind(adapters=["sst2"])``)."""
    filter: dict[str, Any] | None = None
    """Metadata filter on the candidate adapters, e.g. ``{"customer": "a"}``."""

    @classmethod
    def from_model_id(
        cls,
        model_id: str | Path | None = None,
        *,
        pool_dir: str | Path | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        router: RoutesPrompts | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 10.0,
        **kwargs: Any,
    ) -> Self:
        """Loads the base model (hub id, local path, or the packaged default), a pool directory
        (adapters, cards, gates) and more adapters.

        Example:
            >>> llm = LoraRetrieverLLM.from_model_id(pool_dir="pools/bigbench")  # doctest: +SKIP
        """
        lm = RoutedLM.from_pretrained(
            model_id,
            pool_dir=pool_dir,
            adapters=adapters,
            router=router,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
        )
        return cls(lm=lm, **kwargs)

    def _call_kwargs(self, stop: Sequence[str] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults of this object, overridden by the call's kwargs; unknown keys are refused."""
        call = call_options(self, kwargs)
        if stop:
            call["stop"] = tuple(stop)
        return call

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            **self.lm.fingerprint(),
            **self.model_dump(exclude={"lm", "callbacks", "callback_manager", "tags", "metadata", "cache", "verbose"}),
        }

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the base model's own tokenizer (LangChain's default would fetch GPT-2's)."""
        return self.lm.tokenizer.encode(text, add_special_tokens=False)


def generation_info(result: Result) -> dict[str, Any]:
    """What a LangChain generation carries besides its text: the routing, why it ended, usage."""
    return {
        "routing": result.routing.to_dict(),
        "routing_str": str(result.routing),
        "finish_reason": result.finish_reason,
        "stop_sequence": result.stop_sequence,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "batch_size": result.batch_size,
        "timings": {
            "queue_s": result.timings.queue_s,
            "route_s": result.timings.route_s,
            "generate_s": result.timings.generate_s,
        },
    }


def token_usage(results: Sequence[Result]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
