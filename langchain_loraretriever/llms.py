"""LoraRetrieverLLM: a LangChain text-completion LLM whose every prompt is routed to its own LoRAs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LanguageModelInput
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list

from langchain_loraretriever.params import MODEL_CONFIG, RoutedLMParams, generation_info, token_usage
from loraretriever.serving.calls import CALL_OPTIONS, prompt_text
from loraretriever.serving.routed_lm import aflag_last, flag_last

__all__ = ["LoraRetrieverLLM"]

# The call options of the generate() running in this context. LangChain keys an LLM's cache on its
# identifying params alone, without the call's kwargs: without these, llm.bind(adapters=[...]) would
# be served the unpinned answer from the cache.
_CALL_OPTIONS: ContextVar[str] = ContextVar("loraretriever_call_options", default="{}")


def _options_key(kwargs: Mapping[str, Any]) -> str:
    options = {k: v for k, v in kwargs.items() if k in CALL_OPTIONS or k == "max_tokens"}
    return json.dumps(options, sort_keys=True, default=str)


class LoraRetrieverLLM(RoutedLMParams, BaseLLM):
    """Input-aware LoRA routing as a LangChain LLM.

    ``.batch()`` over mixed prompts is ONE batched generation in which every prompt has its own
    LoRAs; concurrent ``invoke`` / ``ainvoke`` calls are merged into batches. Each generation's
    ``generation_info`` holds its routing (adapters, weights, similarities).

    Example:
        .. code-block:: python

            from langchain_loraretriever import LoraRetrieverLLM

            llm = LoraRetrieverLLM.from_model_id(adapters={"sst2": "loras/sst2", "wmt": "loras/wmt"})
            llm.batch(["Translate to German: good morning", "Is 'a dull film' positive?"])
            llm.bind(adapters=["sst2"]).invoke("great acting, weak plot")  # pinned, no retrieval
    """

    model_config = MODEL_CONFIG

    @property
    def _llm_type(self) -> str:
        return "loraretriever"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "call_options": _CALL_OPTIONS.get()}

    def generate(self, prompts: list[str], stop: list[str] | None = None, callbacks: Any = None, **kwargs: Any):
        """LangChain's generate, with this call's routing and generation options in the cache key."""
        token = _CALL_OPTIONS.set(_options_key(kwargs))
        try:
            return super().generate(prompts, stop, callbacks, **kwargs)
        finally:
            _CALL_OPTIONS.reset(token)

    async def agenerate(self, prompts: list[str], stop: list[str] | None = None, callbacks: Any = None, **kwargs: Any):
        """Async :meth:`generate`."""
        token = _CALL_OPTIONS.set(_options_key(kwargs))
        try:
            return await super().agenerate(prompts, stop, callbacks, **kwargs)
        finally:
            _CALL_OPTIONS.reset(token)

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        results = self.lm.generate(prompts, **self._call_kwargs(stop, kwargs))
        return _llm_result(results)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        results = await self.lm.agenerate(prompts, **self._call_kwargs(stop, kwargs))
        return _llm_result(results)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        deltas, request = self.lm.stream_with_result(prompt, **self._call_kwargs(stop, kwargs))
        for delta, last in flag_last(deltas):  # the last chunk carries the routing and usage
            chunk = GenerationChunk(
                text=delta, generation_info=generation_info(request.future.result()) if last else None
            )
            if run_manager and delta:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        deltas, request = self.lm.astream_with_result(prompt, **self._call_kwargs(stop, kwargs))
        async for delta, last in aflag_last(deltas):
            info = generation_info(await asyncio.wrap_future(request.future)) if last else None
            chunk = GenerationChunk(text=delta, generation_info=info)
            if run_manager and delta:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """One batched generation; with ``return_exceptions=True`` a bad input fails alone."""
        if not return_exceptions:
            return super().batch(inputs, config, **kwargs)
        valid, configs, outputs = self._split_bad_inputs(inputs, config)
        if valid:
            answers = super().batch([inputs[i] for i in valid], configs, return_exceptions=True, **kwargs)
            _place(outputs, valid, answers)
        return outputs

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Async :meth:`batch`."""
        if not return_exceptions:
            return await super().abatch(inputs, config, **kwargs)
        valid, configs, outputs = self._split_bad_inputs(inputs, config)
        if valid:
            answers = await super().abatch([inputs[i] for i in valid], configs, return_exceptions=True, **kwargs)
            _place(outputs, valid, answers)
        return outputs

    def _split_bad_inputs(
        self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None
    ) -> tuple[list[int], list[RunnableConfig], list[Any]]:
        """The indices of inputs that can be generated and their configs, and a result list that
        already holds the other inputs' errors."""
        configs = get_config_list(config, len(inputs))
        valid: list[int] = []
        outputs: list[Any] = [None] * len(inputs)
        for i, item in enumerate(inputs):
            try:
                prompt_text(self._convert_input(item).to_string(), i)
                valid.append(i)
            except Exception as error:
                outputs[i] = error
        return valid, [configs[i] for i in valid], outputs


def _place(outputs: list[Any], indices: list[int], answers: list[Any]) -> None:
    for i, answer in zip(indices, answers, strict=True):
        outputs[i] = answer


def _llm_result(results) -> LLMResult:
    return LLMResult(
        generations=[[Generation(text=r.text, generation_info=generation_info(r))] for r in results],
        llm_output={"token_usage": token_usage(results)},
    )
