"""Fields and helpers shared by the LangChain LLM and chat model (one RoutedLM behind both)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from pydantic import AliasChoices, ConfigDict, Field

from loraretriever.serving.fields import CallDefaults
from loraretriever.serving.routed_lm import Result, RoutedLM, split_load_options

__all__ = ["MODEL_CONFIG", "RoutedLMParams", "generation_info", "token_usage"]

# Unknown constructor arguments (a typo) are errors. Each LangChain class sets it again: LangChain's
# Serializable base says extra="ignore", which would win in the merged config.
MODEL_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class RoutedLMParams(CallDefaults):
    """Settings of a LangChain model backed by a :class:`loraretriever.RoutedLM`.

    Every field is a default: any of them (and every other generation or routing option of
    ``RoutedLM.generate``, by the same name) can be overridden per call, as a kwarg or through
    ``.bind()``. The routing fields are :class:`loraretriever.RouteOptions`'s; None leaves the
    RoutedLM's default.
    """

    model_config = MODEL_CONFIG

    lm: RoutedLM = Field(exclude=True)
    """The engine: base model, LoRA pool, router, composer and batching queue."""
    max_new_tokens: int = Field(default=64, validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    """The most tokens to generate per prompt (``max_tokens``, LangChain's usual name, is accepted)."""
    temperature: float = 0.0
    """0 for greedy decoding; above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    chat_template: bool | None = None
    """Wrap each prompt in the base model's chat template. None: as the pool's LoRAs were trained
    (``pool.json``'s ``prompt_format``), else plain text."""

    @classmethod
    def from_model_id(cls, model_id: str | Path | None = None, **kwargs: Any) -> Self:
        """Loads the base model (hub id, local path, or the packaged default) with
        :meth:`RoutedLM.from_pretrained`, which takes the kwargs it knows (``pool_dir``,
        ``adapters``, ``max_batch_size``, ...: ``loraretriever.serving.routed_lm.LOAD_OPTIONS``);
        the others are this model's fields.

        Example:
            >>> llm = LoraRetrieverLLM.from_model_id(pool_dir="pools/bigbench", top_k=2)  # doctest: +SKIP
        """
        load, fields = split_load_options(kwargs)
        return cls(lm=RoutedLM.from_pretrained(model_id, **load), **fields)

    def _call_kwargs(self, stop: Sequence[str] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults of this object, overridden by the call's kwargs; unknown keys are refused."""
        call = self.call_kwargs(kwargs)
        if stop:
            call["stop"] = tuple(stop)
        return call

    @property
    def model_name(self) -> str:
        """The base model's id (a hub id, or a local model's directory name), never a filesystem path."""
        return self.lm.model_id

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            **self.lm.fingerprint(),
            **self.model_dump(exclude={"lm", "callbacks", "callback_manager", "tags", "metadata", "cache", "verbose"}),
        }

    def close(self) -> None:
        """Closes the RoutedLM (its worker thread, hooks, router); also a context manager. Dropping
        the object without closing it frees the same, when it is garbage-collected."""
        self.lm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        "cached_tokens": result.cached_tokens,
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
