"""One call's options and its request: generation settings plus :class:`RouteOptions`, by name.

A call's keyword arguments are split into a :class:`~loraretriever.engine.generation.GenerationConfig`
and :class:`~loraretriever.retrieval.options.RouteOptions`, each over the RoutedLM's defaults. The
names are the same in ``RoutedLM.generate``, the LangChain and LlamaIndex fields and ``.bind()``.
It also re-exports :func:`~loraretriever.engine.requests.prompt_text` (a prompt's text, checked), so
that the integrations take what they need of a call from the serving layer alone.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loraretriever.engine.requests import GenerationConfig, Prompt, prompt_text
from loraretriever.engine.routing import Routing
from loraretriever.errors import InvalidOptionError, InvalidTypeError
from loraretriever.retrieval.options import ROUTE_OPTIONS, RouteOptions
from loraretriever.serving.tools import TOOL_OPTIONS, ToolSpec

__all__ = [
    "CALL_OPTIONS",
    "GENERATION_OPTIONS",
    "ROUTE_ON",
    "Request",
    "prompt_text",  # re-exported from loraretriever.engine.requests for the integrations
    "route_on_variable",
    "route_text",
    "split_call_options",
]

# chat_tools is set from tools= (loraretriever.serving.tools), not passed by callers
GENERATION_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GenerationConfig) if f.name != "chat_tools"
)
# route_on: which text of a prompt is routed ("last_user", "prompt", or a callable of the prompt)
ROUTE_ON = "route_on"
CALL_OPTIONS: tuple[str, ...] = GENERATION_OPTIONS + ROUTE_OPTIONS + TOOL_OPTIONS + (ROUTE_ON,)


@dataclass(frozen=True)
class Request:
    """One prompt to serve: its generation settings and either routing options or a given routing."""

    prompt: Prompt
    config: GenerationConfig
    options: RouteOptions
    routing: Routing | None = None  # given by the caller (generate_routed): not routed again
    tools: ToolSpec | None = None  # its answer is parsed for tool calls
    route_text: str | None = None  # the text it is routed by (route_on); None: prompt_text(prompt)


def split_call_options(
    kwargs: Mapping[str, Any], generation: GenerationConfig, routing: RouteOptions
) -> tuple[GenerationConfig, RouteOptions]:
    """``kwargs`` over the defaults ``generation`` and ``routing``; a value of None keeps the default.

    Raises:
        TypeError: a name that is neither a generation nor a routing option, naming both lists.
        RetrievalError: invalid routing options (a ValueError).
    """
    unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
    if unknown:
        raise InvalidTypeError(
            f"unknown argument(s) {unknown}; generation takes {list(GENERATION_OPTIONS)}, routing takes "
            f"{list(ROUTE_OPTIONS)} (and route_on) and tools take {list(TOOL_OPTIONS)}."
        )
    settings = {k: v for k, v in kwargs.items() if k in GENERATION_OPTIONS and v is not None}
    if "stop" in settings:
        settings["stop"] = (settings["stop"],) if isinstance(settings["stop"], str) else tuple(settings["stop"])
    config = dataclasses.replace(generation, **settings) if settings else generation
    return config, routing.replace(**{k: v for k, v in kwargs.items() if k in ROUTE_OPTIONS})


def route_text(prompt: Prompt, route_on: str | Callable[[Prompt], str] | None, index: int = 0) -> str:
    """The text ``prompt`` is routed by.

    Args:
        prompt: A string or chat messages.
        route_on: ``None`` / ``"last_user"``: the last user message of a chat, a string itself;
            ``"prompt"``: the whole prompt (every message of a chat); a callable: its return value
            for the prompt (e.g. :func:`route_on_variable`), so that a RAG prompt stuffed with
            retrieved context is routed by its question.
        index: The prompt's row, for errors.

    Raises:
        ValueError: an empty prompt, an unknown ``route_on``, or a callable that returns no text.
    """
    text = prompt_text(prompt, index)  # checks the prompt whatever is routed
    if route_on is None or route_on == "last_user":
        return text
    if route_on == "prompt":
        return prompt if isinstance(prompt, str) else "\n".join(str(m["content"]) for m in prompt)
    if callable(route_on):
        chosen = route_on(prompt)
        if not isinstance(chosen, str) or not chosen.strip():
            raise InvalidOptionError(
                f"route_on returned {chosen!r:.80} for prompt {index}; it must return the text to route by."
            )
        return chosen
    raise InvalidOptionError(
        f"route_on={route_on!r} is not 'last_user', 'prompt' or a callable of the prompt.", param="route_on"
    )


def route_on_variable(template: str, name: str) -> Callable[[Prompt], str]:
    """A ``route_on`` that routes a prompt made from the f-string ``template`` (LangChain's
    ``PromptTemplate.template``) by the value of its variable ``name``.

    Example:
        >>> template = "Context:\\n{context}\\n\\nQuestion: {question}"
        >>> route_on_variable(template, "question")(template.format(context="long text", question="Who?"))
        'Who?'

    Raises:
        ValueError: ``name`` is not a variable of ``template``; later, a prompt that the template
            did not make.
    """
    parts = list(string.Formatter().parse(template))
    fields = [field for _, field, _, _ in parts if field is not None]
    if name not in fields:
        raise InvalidOptionError(
            f"{name!r} is not a variable of the template; its variables are {sorted(set(fields))}."
        )
    groups: dict[str, str] = {}
    pattern = ""
    for literal, field, _, _ in parts:
        pattern += re.escape(literal)
        if field is None:
            continue
        if field in groups:  # the same variable again: the same text
            pattern += f"(?P={groups[field]})"
        else:
            groups[field] = f"v{len(groups)}"  # variable names need not be regex group names
            pattern += f"(?P<{groups[field]}>.*?)"
    compiled = re.compile(pattern, re.DOTALL)

    def extract(prompt: Prompt) -> str:
        texts = [prompt] if isinstance(prompt, str) else [str(m["content"]) for m in reversed(prompt)]
        for text in texts:
            if (match := compiled.fullmatch(text)) is not None:
                return match.group(groups[name])
        raise InvalidOptionError(f"the prompt {texts[0]!r:.80} was not made from the template, so it has no {name!r}.")

    return extract
