"""ChatLoraRetriever: a LangChain chat model whose every conversation is routed to its own LoRAs."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from pydantic import PrivateAttr

from langchain_loraretriever.params import RoutedLMParams, generation_info
from loraretriever.engine.requests import prompt_text
from loraretriever.serving.routed_lm import Result

__all__ = ["ChatLoraRetriever"]

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


class ChatLoraRetriever(RoutedLMParams, BaseChatModel):
    """Input-aware LoRA routing as a LangChain chat model, using the base model's chat template.

    Each conversation is routed by its last user message. ``batch`` / ``abatch`` run the whole
    batch as ONE generation; concurrent ``invoke`` calls are merged into batches. The routing is in
    ``response_metadata["routing"]``. Tool calling, structured output and multimodal inputs are not
    supported (a small local model with LoRAs; the standard tests declare this).

    Example:
        .. code-block:: python

            from langchain_loraretriever import ChatLoraRetriever

            chat = ChatLoraRetriever.from_model_id(adapters={"sst2": "loras/sst2"})
            chat.invoke([("system", "Answer in one word."), ("human", "Is 'a dull film' positive?")])
    """

    max_tokens: int | None = None
    """LangChain's standard name for the most new tokens; overrides ``max_new_tokens`` when set."""
    stop: list[str] | None = None
    """Default stop strings (cut from the output)."""
    timeout: float | None = None
    """Seconds to wait for a queued call's answer before raising ``TimeoutError``."""
    max_retries: int = 0
    """Accepted for LangChain compatibility; generation is local, so there is nothing to retry."""
    streaming: bool = False
    """Stream tokens to callbacks during ``invoke``."""

    _prefetched: dict[str, deque[Result]] = PrivateAttr(default_factory=dict)
    _prefetch_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "loraretriever-chat"

    @property
    def model_name(self) -> str:
        return str(self.lm.fingerprint()["model"])

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="loraretriever",
            ls_model_name=kwargs.get("model", self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_new_tokens", self.max_tokens or self.max_new_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _chat_kwargs(self, stop: Sequence[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        call = self._call_kwargs(stop if stop is not None else self.stop, kwargs)
        if self.max_tokens is not None and "max_new_tokens" not in kwargs:
            call["max_new_tokens"] = self.max_tokens
        return call

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chat = to_chat_messages(messages)
        call = self._chat_kwargs(stop, kwargs)
        result = self._take_prefetched(chat, call)
        if result is None:
            result = self.lm.submit(chat, **call).future.result(timeout=self.timeout)
        return _chat_result(result, self.model_name)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chat = to_chat_messages(messages)
        call = self._chat_kwargs(stop, kwargs)
        result = self._take_prefetched(chat, call)
        if result is None:
            future = asyncio.wrap_future(self.lm.submit(chat, **call).future)
            result = await asyncio.wait_for(future, self.timeout)
        return _chat_result(result, self.model_name)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        deltas, request = self.lm.stream_with_result(to_chat_messages(messages), **self._chat_kwargs(stop, kwargs))
        for delta in deltas:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield _last_chunk(request.future.result(timeout=self.timeout), self.model_name)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        deltas, request = self.lm.astream_with_result(to_chat_messages(messages), **self._chat_kwargs(stop, kwargs))
        async for delta in deltas:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield _last_chunk(await asyncio.wrap_future(request.future), self.model_name)

    # -- one generation per batch ------------------------------------------------------------
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """Generates every conversation in ONE batched pass, then hands each invoke its answer
        (so callbacks, tracing and ``return_exceptions`` behave as LangChain defines them)."""
        keys = self._prefetch(inputs, kwargs)
        try:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        finally:
            self._drop_prefetched(keys)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """Async :meth:`batch`: the one batched pass runs in a worker thread."""
        keys = await asyncio.to_thread(self._prefetch, inputs, kwargs)
        try:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        finally:
            self._drop_prefetched(keys)

    def _prefetch(self, inputs: list[LanguageModelInput], kwargs: dict[str, Any]) -> list[str]:
        """Runs the valid inputs as one generation and stores each answer for its invoke."""
        kwargs = dict(kwargs)
        stop = kwargs.pop("stop", None)
        try:
            call = self._chat_kwargs(stop, kwargs)
        except TypeError:
            return []  # each invoke raises the same clear error for its own row
        chats = []
        for i, item in enumerate(inputs):
            try:
                chat = to_chat_messages(self._convert_input(item).to_messages())
                prompt_text(chat, i)
                chats.append(chat)
            except Exception:
                continue
        if len(chats) < 2:
            return []
        try:
            results = self.lm.generate(chats, **call)
        except Exception:
            return []  # the invokes surface the error row by row
        keys = []
        with self._prefetch_lock:
            for chat, result in zip(chats, results, strict=True):
                key = _prefetch_key(chat, call)
                self._prefetched.setdefault(key, deque()).append(result)
                keys.append(key)
        return keys

    def _take_prefetched(self, chat: list[dict[str, str]], call: dict[str, Any]) -> Result | None:
        key = _prefetch_key(chat, call)
        with self._prefetch_lock:
            waiting = self._prefetched.get(key)
            if not waiting:
                return None
            result = waiting.popleft()
            if not waiting:
                del self._prefetched[key]
            return result

    def _drop_prefetched(self, keys: list[str]) -> None:
        """Forgets answers no invoke took (e.g. served from LangChain's cache)."""
        with self._prefetch_lock:
            for key in keys:
                waiting = self._prefetched.get(key)
                if waiting:
                    waiting.popleft()
                    if not waiting:
                        del self._prefetched[key]


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``{"role", "content"}`` dicts for the chat template.

    Raises:
        ValueError: for tool messages or non-text content, which this model cannot read.
    """
    chat = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type)
        if role is None:
            raise ValueError(
                f"{type(message).__name__} is not supported: ChatLoraRetriever reads system, human and ai "
                "messages only (no tool calling)."
            )
        chat.append({"role": role, "content": _text(message)})
    return chat


def _text(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block["text"])
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"content block of type {kind!r} is not supported: ChatLoraRetriever reads text only.")
    return "".join(parts)


def _prefetch_key(chat: list[dict[str, str]], call: dict[str, Any]) -> str:
    return json.dumps([chat, call], sort_keys=True, default=str)


def _usage(result: Result) -> dict[str, int]:
    return {
        "input_tokens": result.prompt_tokens,
        "output_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _chat_result(result: Result, model_name: str) -> ChatResult:
    info = {**generation_info(result), "model_name": model_name}
    message = AIMessage(content=result.text, response_metadata=info, usage_metadata=_usage(result))
    return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])


def _last_chunk(result: Result, model_name: str) -> ChatGenerationChunk:
    info = {**generation_info(result), "model_name": model_name}
    message = AIMessageChunk(content="", response_metadata=info, usage_metadata=_usage(result), chunk_position="last")
    return ChatGenerationChunk(message=message, generation_info=info)
