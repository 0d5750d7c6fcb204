"""LoraRetrieverLLM: a LangChain text-completion LLM whose every prompt is routed to its own LoRAs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LanguageModelInput
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list

from langchain_loraretriever.params import RoutedLMParams, generation_info, token_usage
from loraretriever.engine.requests import prompt_text

__all__ = ["LoraRetrieverLLM"]


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

    @property
    def _llm_type(self) -> str:
        return "loraretriever"

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
        for delta in deltas:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=generation_info(request.future.result()))

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        deltas, request = self.lm.astream_with_result(prompt, **self._call_kwargs(stop, kwargs))
        async for delta in deltas:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        result = await asyncio.wrap_future(request.future)
        yield GenerationChunk(text="", generation_info=generation_info(result))

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
