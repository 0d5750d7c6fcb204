"""LoraRetrieverLLM for LlamaIndex: a FunctionCallingLLM whose every call is routed to its own LoRAs."""

from __future__ import annotations

import asyncio
import json
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
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import BaseTool, ToolSelection
from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr

from loraretriever.serving.fields import CallDefaults
from loraretriever.serving.routed_lm import Result, RoutedLM, aflag_last, flag_last, split_load_options
from loraretriever.serving.tools import tool_call_text

__all__ = ["LoraRetrieverLLM", "RoutingLog"]


class LoraRetrieverLLM(CallDefaults, FunctionCallingLLM):
    """Input-aware LoRA routing as a LlamaIndex LLM.

    ``complete`` / ``chat`` route the prompt (a chat by its last user message), use the base
    model's chat template, and put the routing in ``additional_kwargs["routing"]``. ``acomplete``
    and ``achat`` never block the event loop, and concurrent calls (a query engine firing many
    ``apredict``) are merged into batched generations.

    It is a ``FunctionCallingLLM``: ``chat_with_tools`` (and so ``FunctionAgent``,
    ``structured_predict`` and ``as_structured_llm``) works on any base model; a required call
    (``tool_required=True``, ``tool_choice="<tool name>"``) is decoded under a grammar and always
    validates against the tool's schema. Tool calls are ``ToolCallBlock`` s of the message.

    Example:
        .. code-block:: python

            from llama_index.core import Settings
            from llamaindex_loraretriever import LoraRetrieverLLM

            Settings.llm = LoraRetrieverLLM.from_model_id(adapters={"squad": "loras/squad"})
            print(Settings.llm.complete("Who wrote Hamlet?").additional_kwargs["routing"])
    """

    model_config = ConfigDict(extra="forbid")  # a typo is an error, not a silently dropped setting

    max_new_tokens: int = Field(
        default=128,
        validation_alias=AliasChoices("max_new_tokens", "max_tokens"),
        description="The most tokens to generate (``max_tokens`` is accepted).",
    )
    chat_template: bool | None = Field(
        default=None,
        description="Wrap completion prompts in the model's chat template. None: as the pool's LoRAs were "
        "trained (pool.json's prompt_format), else the template.",
    )
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

    def close(self) -> None:
        """Closes the RoutedLM (its worker thread, hooks, router); also a context manager."""
        self._lm.close()

    def __enter__(self) -> LoraRetrieverLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._lm.engine.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=self.is_chat_model,
            is_function_calling_model=True,
            model_name=self._lm.model_id,
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
            for delta, last in flag_last(deltas):  # the last response carries the routing
                text += delta
                yield (
                    _completion(request.future.result(), delta) if last else CompletionResponse(text=text, delta=delta)
                )

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(await self._lm.acomplete(prompt, **self._kwargs(kwargs)))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        deltas, request = self._lm.astream_with_result(prompt, **self._kwargs(kwargs))

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for delta, last in aflag_last(deltas):
                text += delta
                if last:
                    yield _completion(await asyncio.wrap_future(request.future), delta)
                else:
                    yield CompletionResponse(text=text, delta=delta)

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
            for delta, last in flag_last(deltas):
                text += delta
                if last:
                    yield _chat(request.future.result(), delta)
                else:
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat(await self._lm.acomplete(_messages(messages), **self._kwargs(kwargs)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        deltas, request = self._lm.astream_with_result(_messages(messages), **self._kwargs(kwargs))

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for delta, last in aflag_last(deltas):
                text += delta
                if last:
                    yield _chat(await asyncio.wrap_future(request.future), delta)
                else:
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)

        return gen()

    # -- tools (FunctionCallingLLM) ---------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        specs = [tool.metadata.to_openai_tool() for tool in tools]
        if not specs:
            return {"messages": messages, **kwargs}
        choice = tool_choice if tool_choice is not None else ("required" if tool_required else "auto")
        return {"messages": messages, "tools": specs, "tool_choice": choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        if not allow_parallel_tool_calls:  # LlamaIndex's contract: the first call only
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            others = [b for b in response.message.blocks if not isinstance(b, ToolCallBlock)]
            response.message.blocks = others + calls[:1]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError(
                f"the model answered without a tool call ({response.message.content!r}); pass "
                "tool_required=True (or FunctionAgent(initial_tool_choice=...)) to force one."
            )
        return [
            ToolSelection(tool_id=c.tool_call_id or "", tool_name=c.tool_name, tool_kwargs=c.tool_kwargs) for c in calls
        ]

    def _kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        call = self.call_kwargs(kwargs)
        if self._lm.prompt_format is None:  # a pool that does not say: instruction-tuned models want the template
            call.setdefault("chat_template", True)
        return call


def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages for the chat template: an assistant's tool calls as the model writes them,
    a tool's result as a ``tool`` turn."""
    chat = []
    for message in messages:
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(
                f"a {role!r} message is not supported: LoraRetrieverLLM reads system, user, assistant and tool "
                "messages."
            )
        text = message.content or ""
        for block in message.blocks:
            if isinstance(block, ToolCallBlock):
                args = (
                    block.tool_kwargs if isinstance(block.tool_kwargs, dict) else json.loads(block.tool_kwargs or "{}")
                )
                text += tool_call_text(block.tool_name, args)
        chat.append({"role": role, "content": text if text.strip() or role != "tool" else "(no output)"})
    return chat


def _info(result: Result) -> dict[str, Any]:
    return {
        "routing": result.routing.to_dict(),
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
        "batch_size": result.batch_size,
    }


def _completion(result: Result, delta: str | None = None) -> CompletionResponse:
    return CompletionResponse(text=result.text, delta=delta, additional_kwargs=_info(result), raw=result.to_dict())


def _chat(result: Result, delta: str | None = None) -> ChatResponse:
    calls = [ToolCallBlock(tool_call_id=c["id"], tool_name=c["name"], tool_kwargs=c["args"]) for c in result.tool_calls]
    blocks = [TextBlock(text=result.text), *calls]
    message = ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=_info(result))
    return ChatResponse(message=message, delta=delta, additional_kwargs=_info(result), raw=result.to_dict())


class RoutingLog(BaseEventHandler):
    """Records the routing of every LoraRetrieverLLM call, from LlamaIndex's instrumentation events:
    what a query engine's ``Response`` cannot carry (its LLM calls happen inside the synthesizer).

    Example:
        .. code-block:: python

            with RoutingLog() as log:
                response = index.as_query_engine(llm=llm).query("Who wrote Hamlet?")
            log.routings[-1]["adapters"]
    """

    routings: list[dict[str, Any]] = Field(default_factory=list, description="Each call's routing, in order.")

    @classmethod
    def class_name(cls) -> str:
        return "RoutingLog"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, LLMCompletionEndEvent | LLMChatEndEvent) and event.response is not None:
            routing = (event.response.additional_kwargs or {}).get("routing")
            if routing is not None:  # another LLM's calls carry none
                self.routings.append(routing)

    def __enter__(self) -> RoutingLog:
        get_dispatcher().add_event_handler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        handlers = get_dispatcher().event_handlers
        if self in handlers:
            handlers.remove(self)
