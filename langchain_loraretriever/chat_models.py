"""ChatLoraRetriever: a LangChain chat model whose every conversation is routed to its own LoRAs."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.caches import BaseCache
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.load import dumps
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import PrivateAttr

from langchain_loraretriever.params import MODEL_CONFIG, RoutedLMParams, generation_info
from loraretriever.serving.calls import prompt_text
from loraretriever.serving.prefetch import Prefetched
from loraretriever.serving.routed_lm import Result, aflag_last, flag_last
from loraretriever.serving.tools import tool_call_text

__all__ = ["ChatLoraRetriever"]

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}
_AHEAD_LOCK = threading.Lock()


class ChatLoraRetriever(RoutedLMParams, BaseChatModel):
    """Input-aware LoRA routing as a LangChain chat model, using the base model's chat template.

    Each conversation is routed by its last user message. ``batch`` / ``abatch`` run the whole
    batch as ONE generation; concurrent ``invoke`` calls are merged into batches. The routing is in
    ``response_metadata["routing"]``. ``bind_tools`` and ``with_structured_output`` work on any base
    model: tools are described in a system message, a forced call (``tool_choice="any"`` or a tool's
    name) and a structured output are decoded under a grammar, so they always validate. Multimodal
    inputs are not supported.

    Example:
        .. code-block:: python

            from langchain_loraretriever import ChatLoraRetriever

            chat = ChatLoraRetriever.from_model_id(adapters={"sst2": "loras/sst2"})
            chat.invoke([("system", "Answer in one word."), ("human", "Is 'a dull film' positive?")])
    """

    model_config = MODEL_CONFIG

    stop: list[str] | None = None
    """Default stop strings (cut from the output)."""
    timeout: float | None = None
    """Seconds to wait for a queued call's answer before raising ``TimeoutError``."""
    max_retries: int = 0
    """Accepted for LangChain compatibility; generation is local, so there is nothing to retry."""
    streaming: bool = False
    """Stream tokens to callbacks during ``invoke``."""

    _ahead: Prefetched | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "loraretriever-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="loraretriever",
            ls_model_name=kwargs.get("model", self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _chat_kwargs(self, stop: Sequence[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._call_kwargs(stop if stop is not None else self.stop, kwargs)

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: str | dict | bool | None = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Binds tools (pydantic models, functions, LangChain tools or OpenAI specs).

        Args:
            tools: The tools.
            tool_choice: ``None`` / ``"auto"`` (the model chooses text or a call), ``"none"``,
                ``"any"`` / ``"required"`` / ``True`` (a call, always valid), or a tool's name.
        """
        kwargs.pop("strict", None)  # a forced call is decoded under its schema's grammar: always strict
        bound: dict[str, Any] = {"tools": [convert_to_openai_tool(t) for t in tools], **kwargs}
        if tool_choice is not None:
            bound["tool_choice"] = "required" if tool_choice is True else tool_choice
        return self.bind(**bound)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: str = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Answers as ``schema`` (a pydantic model, TypedDict or JSON schema): ``method="json_schema"``
        (the default) and ``"function_calling"`` decode under the schema's grammar, so the result always
        validates; ``"json_mode"`` asks for any JSON object. ``strict`` is accepted for OpenAI
        compatibility: decoding under the grammar is always strict."""
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if method not in ("json_schema", "json_mode"):
            raise ValueError(f"method={method!r} is not 'json_schema', 'function_calling' or 'json_mode'.")
        if kwargs:
            raise TypeError(f"unknown argument(s) {sorted(kwargs)} of with_structured_output.")
        if method == "json_mode":
            fmt: dict[str, Any] = {"type": "json_object"}
        else:
            fmt = {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema)}}
        # ls_structured_output_format: LangChain's tracing metadata (it pops it before our _generate)
        traced = {"kwargs": {"method": method}, "schema": schema}
        llm = self.bind(response_format=fmt, ls_structured_output_format=traced)
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=lambda x: parser.invoke(x["raw"]), parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")

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
        if kwargs.get("tools"):  # tool calls are parsed from the whole answer: one chunk
            yield _whole_chunk(self._generate(messages, stop, run_manager, **kwargs))
            return
        deltas, request = self.lm.stream_with_result(to_chat_messages(messages), **self._chat_kwargs(stop, kwargs))
        for delta, last in flag_last(deltas):  # the last chunk carries the routing and usage
            if last:
                chunk = _last_chunk(request.future.result(timeout=self.timeout), self.model_name, delta)
            else:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager and delta:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if kwargs.get("tools"):
            yield _whole_chunk(await self._agenerate(messages, stop, run_manager, **kwargs))
            return
        deltas, request = self.lm.astream_with_result(to_chat_messages(messages), **self._chat_kwargs(stop, kwargs))
        async for delta, last in aflag_last(deltas):
            if last:
                chunk = _last_chunk(await asyncio.wrap_future(request.future), self.model_name, delta)
            else:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager and delta:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

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
        keys = self._prefetch(inputs, config, kwargs)
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
        keys = await asyncio.to_thread(self._prefetch, inputs, config, kwargs)
        try:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        finally:
            self._drop_prefetched(keys)

    def _prefetch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None,
        kwargs: dict[str, Any],
    ) -> list[str]:
        """Runs the valid inputs that LangChain's cache does not hold as one generation (or one per
        ``max_concurrency`` of them) and stores each answer for its invoke."""
        kwargs = dict(kwargs)
        stop = kwargs.pop("stop", None)
        kwargs.pop("ls_structured_output_format", None)  # tracing metadata, popped by LangChain too
        try:
            call = self._chat_kwargs(stop, kwargs)
        except TypeError:
            return []  # each invoke raises the same clear error for its own row
        cached = self._cache_lookup(stop, kwargs)
        chats = []
        for i, item in enumerate(inputs):
            try:
                messages = self._convert_input(item).to_messages()
                chat = to_chat_messages(messages)
                prompt_text(chat, i)
            except Exception:  # not prefetched: its own invoke raises the error for its row
                continue
            if not cached(messages):
                chats.append(chat)
        if len(chats) < 2:
            return []
        limit = get_config_list(config, len(inputs))[0].get("max_concurrency")
        return self._prefetched().generate(chats, call, group=limit)

    def _cache_lookup(self, stop: Any, kwargs: dict[str, Any]) -> Callable[[list[BaseMessage]], bool]:
        """Whether LangChain's cache holds a conversation's answer, under the key its invoke will use."""
        cache = (
            self.cache if isinstance(self.cache, BaseCache) else (get_llm_cache() if self.cache is not False else None)
        )
        if cache is None:
            return lambda messages: False
        llm_string = self._get_llm_string(stop=stop, **kwargs)

        def cached(messages: list[BaseMessage]) -> bool:
            normalized = [
                m.model_copy(update={"id": None}) if getattr(m, "id", None) is not None else m for m in messages
            ]
            return cache.lookup(dumps(normalized), llm_string) is not None

        return cached

    def _prefetched(self) -> Prefetched:
        with _AHEAD_LOCK:  # one store per model, however many threads batch at once
            if self._ahead is None:
                self._ahead = Prefetched(self.lm)
            return self._ahead

    def _take_prefetched(self, chat: list[dict[str, str]], call: dict[str, Any]) -> Result | None:
        return self._ahead.take(chat, call) if self._ahead is not None else None

    def _drop_prefetched(self, keys: list[str]) -> None:
        """Forgets answers no invoke took (e.g. served from LangChain's cache)."""
        if keys:
            self._prefetched().drop(keys)


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
                f"{type(message).__name__} is not supported: ChatLoraRetriever reads system, human, ai and "
                "tool messages."
            )
        text = _text(message)
        if isinstance(message, AIMessage) and message.tool_calls:  # the calls as the model wrote them
            text = "".join([text, *(tool_call_text(c["name"], c["args"]) for c in message.tool_calls)])
        elif isinstance(message, ToolMessage) and not text.strip():
            text = "(no output)"
        chat.append({"role": role, "content": text})
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
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # an assistant's call as content (Anthropic's form): read from message.tool_calls
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"content block of type {kind!r} is not supported: ChatLoraRetriever reads text only.")
    return "".join(parts)


def _usage(result: Result) -> dict[str, Any]:
    return {
        "input_tokens": result.prompt_tokens,
        "output_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "input_token_details": {"cache_read": result.cached_tokens},
    }


def _chat_result(result: Result, model_name: str) -> ChatResult:
    info = {**generation_info(result), "model_name": model_name}
    message = AIMessage(
        content=result.text,
        tool_calls=[dict(c) for c in result.tool_calls],
        invalid_tool_calls=[{k: c[k] for k in ("name", "args", "id", "error")} for c in result.invalid_tool_calls],
        response_metadata=info,
        usage_metadata=_usage(result),
    )
    return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])


def _whole_chunk(result: ChatResult) -> ChatGenerationChunk:
    message = result.generations[0].message
    chunks = [
        {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
        for i, c in enumerate(message.tool_calls)
    ]
    chunk = AIMessageChunk(
        content=message.content,
        tool_call_chunks=chunks,
        response_metadata=message.response_metadata,
        usage_metadata=message.usage_metadata,
        chunk_position="last",
    )
    return ChatGenerationChunk(message=chunk, generation_info=result.generations[0].generation_info)


def _last_chunk(result: Result, model_name: str, delta: str) -> ChatGenerationChunk:
    info = {**generation_info(result), "model_name": model_name}
    message = AIMessageChunk(
        content=delta, response_metadata=info, usage_metadata=_usage(result), chunk_position="last"
    )
    return ChatGenerationChunk(message=message, generation_info=info)
