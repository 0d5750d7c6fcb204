"""LoraRetrieverLLM for LlamaIndex: a CustomLLM whose every call is routed to its own LoRAs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import Field, PrivateAttr

from loraretriever.serving.fields import CallDefaults
from loraretriever.serving.routed_lm import Result, RoutedLM, split_load_options

__all__ = ["LoraRetrieverLLM"]


class LoraRetrieverLLM(CallDefaults, CustomLLM):
    """Input-aware LoRA routing as a LlamaIndex LLM.

    ``complete`` / ``chat`` route the prompt (a chat by its last user message), use the base
    model's chat template, and put the routing in ``additional_kwargs["routing"]``. ``acomplete``
    and ``achat`` never block the event loop, and concurrent calls (a query engine firing many
    ``apredict``) are merged into batched generations.

    Example:
        .. code-block:: python

            from llama_index.core import Settings
            from llamaindex_loraretriever import LoraRetrieverLLM

            Settings.llm = LoraRetrieverLLM.from_model_id(adapters={"squad": "loras/squad"})
            print(Settings.llm.complete("Who wrote Hamlet?").additional_kwargs["routing"])
    """

    max_new_tokens: int = Field(default=128, description="The most tokens to generate.")
    chat_template: bool = Field(default=True, description="Wrap completion prompts in the model's chat template.")
    is_chat_model: bool = Field(default=True, description="Let LlamaIndex send chat messages (templated by us).")

    _lm: RoutedLM = PrivateAttr()

    def __init__(self, lm: RoutedLM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lm = lm

    @classmethod
    def from_model_id(cls, model_id: str | Path | None = None, **kwargs: Any) -> LoraRetrieverLLM:
        """Loads the base model (hub id, local path, or the packaged default) with
        :meth:`RoutedLM.from_pretrained`, which takes the kwargs it knows (``pool_dir``,
        ``adapters``, ``max_batch_size``, ...); the others are this LLM's fields."""
        load, fields = split_load_options(kwargs)
        return cls(RoutedLM.from_pretrained(model_id, **load), **fields)

    @classmethod
    def class_name(cls) -> str:
        return "LoraRetrieverLLM"

    @property
    def lm(self) -> RoutedLM:
        return self._lm

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._lm.engine.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=self.is_chat_model,
            model_name=str(self._lm.fingerprint()["model"]),
        )

    # -- completion --------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(self._lm.complete(prompt, **self._kwargs(kwargs)))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        deltas, request = self._lm.stream_with_result(prompt, **self._kwargs(kwargs))

        def gen() -> CompletionResponseGen:
            text = ""
            for delta in deltas:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            yield _completion(request.future.result(), delta="")

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(await self._lm.acomplete(prompt, **self._kwargs(kwargs)))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        deltas, request = self._lm.astream_with_result(prompt, **self._kwargs(kwargs))

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for delta in deltas:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            yield _completion(await asyncio.wrap_future(request.future), delta="")

        return gen()

    # -- chat (the base model's chat template) -----------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat(self._lm.complete(_messages(messages), **self._kwargs(kwargs)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        deltas, request = self._lm.stream_with_result(_messages(messages), **self._kwargs(kwargs))

        def gen() -> ChatResponseGen:
            text = ""
            for delta in deltas:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            yield _chat(request.future.result(), delta="")

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat(await self._lm.acomplete(_messages(messages), **self._kwargs(kwargs)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        deltas, request = self._lm.astream_with_result(_messages(messages), **self._kwargs(kwargs))

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for delta in deltas:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            yield _chat(await asyncio.wrap_future(request.future), delta="")

        return gen()

    def _kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return self.call_kwargs(kwargs)


def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    chat = []
    for message in messages:
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        if role not in ("system", "user", "assistant"):
            raise ValueError(
                f"a {role!r} message is not supported: LoraRetrieverLLM reads system, user and assistant messages."
            )
        chat.append({"role": role, "content": message.content or ""})
    return chat


def _info(result: Result) -> dict[str, Any]:
    return {
        "routing": result.routing.to_dict(),
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "batch_size": result.batch_size,
    }


def _completion(result: Result, delta: str | None = None) -> CompletionResponse:
    return CompletionResponse(text=result.text, delta=delta, additional_kwargs=_info(result), raw=result.to_dict())


def _chat(result: Result, delta: str | None = None) -> ChatResponse:
    message = ChatMessage(role=MessageRole.ASSISTANT, content=result.text, additional_kwargs=_info(result))
    return ChatResponse(message=message, delta=delta, additional_kwargs=_info(result), raw=result.to_dict())
