"""Requests as they arrive: tokenized and checked alone, so a bad one fails before it can reach
a shared batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from loraretriever.engine.constraints import Grammars
from loraretriever.engine.requests import (
    GenerationConfig,
    Prompt,
    PromptTooLong,
    RequestError,
    RequestState,
    StreamEvent,
    prompt_text,
)
from loraretriever.engine.routing import Routing
from loraretriever.errors import InvalidTypeError

__all__ = ["RequestIntake"]


class RequestIntake:
    """Turns a prompt and its settings into a :class:`RequestState`, checking the limits.

    Args:
        tokenizer: The model's tokenizer.
        context_window: The model's context window, in tokens.
        max_prompt_tokens: The longest prompt (default: the context window minus ``max_new_tokens``).
        max_new_tokens_limit: The most ``max_new_tokens`` (default: the context window minus one).
        device: Where sampling generators live (the model's device).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        context_window: int,
        *,
        max_prompt_tokens: int | None = None,
        max_new_tokens_limit: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.device = device
        self.grammars = Grammars(tokenizer)

    def new_request(
        self,
        prompt: Prompt,
        config: GenerationConfig,
        routing: Routing | None = None,
        *,
        index: int = 0,
        on_event: Callable[[StreamEvent], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        payload: Any = None,
    ) -> RequestState:
        """Tokenizes and checks one request against the limits; it has not been queued yet.

        Raises:
            RequestError: an unencodable or empty prompt, a prompt over ``max_prompt_tokens`` with
                ``truncation="error"``, ``max_new_tokens`` over the limit; naming the value and the fix.
        """
        if not isinstance(config, GenerationConfig):
            raise InvalidTypeError(f"config is a {type(config).__name__}, not a GenerationConfig.")
        ids = self.encode(prompt, config, index)
        limit = self.max_new_tokens_limit or self.context_window - 1
        if config.max_new_tokens > limit:
            raise RequestError(
                f"prompt {index}: max_new_tokens={config.max_new_tokens} is over the limit of {limit} "
                f"(the {self.context_window}-token context window or max_new_tokens_limit); lower it."
            )
        budget = min(self.max_prompt_tokens or self.context_window, self.context_window - config.max_new_tokens)
        truncated = len(ids) > budget
        if truncated:
            message = (
                f"prompt {index} has {len(ids)} tokens but the limit is {budget} (max_prompt_tokens, or the "
                f"{self.context_window}-token context window minus max_new_tokens={config.max_new_tokens})"
            )
            if config.truncation == "error":
                raise PromptTooLong(message + "; shorten it or set truncation='left'.")
            warnings.warn(message + "; its oldest tokens were dropped.", stacklevel=3)
            ids = ids[-budget:]
        matcher = None
        if config.grammar is not None:
            try:
                matcher = self.grammars.matcher(config.grammar)
            except ValueError as error:
                raise RequestError(f"prompt {index}: {error}. Fix: check the schema or Lark text.") from None
        rng = None
        if config.temperature > 0:
            rng = torch.Generator(device=self.device)
            rng.manual_seed(config.seed if config.seed is not None else int(torch.randint(2**62, ()).item()))
        return RequestState(
            prompt_ids=ids,
            config=config,
            routing=routing,
            on_event=on_event,
            on_error=on_error,
            truncated=truncated,
            index=index,
            payload=payload,
            rng=rng,
            matcher=matcher,
        )

    def encode(self, prompt: Prompt, config: GenerationConfig, index: int = 0) -> list[int]:
        """The prompt's token ids (through the chat template for chats or ``chat_template=True``)."""
        prompt_text(prompt, index)  # raises for an empty prompt or malformed messages
        texts = [prompt] if isinstance(prompt, str) else [str(m["content"]) for m in prompt]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise RequestError(
                    f"prompt {index} is not valid Unicode text: {err.reason} at character {err.start} "
                    f"({text[err.start : err.end]!r}). Fix: remove lone surrogates (e.g. decode bytes with "
                    "errors='replace')."
                ) from None
        if isinstance(prompt, str) and not config.chat_template:
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            if self.tokenizer.chat_template is None:
                raise RequestError(
                    "chat messages or chat_template=True need a tokenizer with a chat template; this one has none."
                )
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
            if "tool" not in self.tokenizer.chat_template:  # a template without a tool role: the Hermes form
                messages = [
                    {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
                    if m["role"] == "tool"
                    else m
                    for m in messages
                ]
            if config.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": config.system_prompt})
            tools = [dict(t) for t in config.chat_tools] if config.chat_tools else None
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError(f"prompt {index} encodes to no tokens; pass some text.")
        return ids
