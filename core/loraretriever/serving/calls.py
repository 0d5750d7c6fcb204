"""One call's options and its request: generation settings plus :class:`RouteOptions`, by name.

A call's keyword arguments are split into a :class:`~loraretriever.engine.generation.GenerationConfig`
and :class:`~loraretriever.retrieval.options.RouteOptions`, each over the RoutedLM's defaults. The
names are the same in ``RoutedLM.generate``, the LangChain and LlamaIndex fields and ``.bind()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraretriever.engine.requests import GenerationConfig, Prompt
from loraretriever.engine.routing import Routing
from loraretriever.retrieval.options import ROUTE_OPTIONS, RouteOptions
from loraretriever.serving.tools import TOOL_OPTIONS, ToolSpec

__all__ = ["CALL_OPTIONS", "GENERATION_OPTIONS", "Request", "split_call_options"]

GENERATION_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GenerationConfig))
CALL_OPTIONS: tuple[str, ...] = GENERATION_OPTIONS + ROUTE_OPTIONS + TOOL_OPTIONS


@dataclass(frozen=True)
class Request:
    """One prompt to serve: its generation settings and either routing options or a given routing."""

    prompt: Prompt
    config: GenerationConfig
    options: RouteOptions
    routing: Routing | None = None  # given by the caller (generate_routed): not routed again
    tools: ToolSpec | None = None  # its answer is parsed for tool calls


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
        raise TypeError(
            f"unknown argument(s) {unknown}; generation takes {list(GENERATION_OPTIONS)}, routing takes "
            f"{list(ROUTE_OPTIONS)} and tools take {list(TOOL_OPTIONS)}."
        )
    settings = {k: v for k, v in kwargs.items() if k in GENERATION_OPTIONS and v is not None}
    if "stop" in settings:
        settings["stop"] = (settings["stop"],) if isinstance(settings["stop"], str) else tuple(settings["stop"])
    config = dataclasses.replace(generation, **settings) if settings else generation
    return config, routing.replace(**{k: v for k, v in kwargs.items() if k in ROUTE_OPTIONS})
