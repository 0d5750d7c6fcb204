"""The per-call defaults an integration exposes as pydantic fields: generation settings and every
:class:`~loraretriever.retrieval.options.RouteOptions` option, under the same names.

Both are derived (type, help) from where they are declared, :class:`GenerationConfig` and
RouteOptions, never listed twice. LangChain's ``.bind(top_k=2)`` and a LlamaIndex call's kwargs
override them per call, by the same names.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, create_model, model_validator

from loraretriever.engine.requests import GenerationConfig
from loraretriever.errors import InvalidTypeError
from loraretriever.retrieval.options import ROUTE_OPTIONS, RouteOptions

__all__ = ["DEFAULT_GENERATION_OPTIONS", "CallDefaults", "RouteFields"]

DEFAULT_GENERATION_OPTIONS: tuple[str, ...] = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "repetition_penalty",
    "seed",
    "chat_template",
)
"""The generation settings an integration object holds as defaults (the others, such as ``stop``
and ``grammar``, are per call)."""


def _optional_fields(source: type, names: tuple[str, ...]) -> dict[str, Any]:
    hints = typing.get_type_hints(source)
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(source)}
    return {name: (hints[name] | None, Field(default=None, description=helps[name])) for name in names}


RouteFields: type[BaseModel] = create_model(
    "RouteFields",
    __doc__="Every RouteOptions option as an optional field (None: the RoutedLM's default).",
    **_optional_fields(RouteOptions, ROUTE_OPTIONS),
)

_CallFields: type[BaseModel] = create_model(
    "CallFields",
    __base__=RouteFields,
    __doc__="RouteFields and the default generation settings (None: the RoutedLM's default).",
    **_optional_fields(GenerationConfig, DEFAULT_GENERATION_OPTIONS),
)


class CallDefaults(_CallFields):
    """Generation and routing defaults of an integration's calls (None: the RoutedLM's default).

    Raises:
        pydantic.ValidationError: routing fields that RouteOptions refuses, with its message.
    """

    @model_validator(mode="after")
    def _check_routing(self) -> CallDefaults:
        RouteOptions.coerce(self.route_fields())
        return self

    def route_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ROUTE_OPTIONS if getattr(self, name) is not None}

    def call_kwargs(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """This object's defaults (those set) overridden by one call's kwargs, for ``RoutedLM`` calls
        (which refuse unknown names, naming the known ones). ``max_tokens``, the name LangChain and
        OpenAI users pass, is ``max_new_tokens``."""
        overrides = dict(overrides)
        if "max_tokens" in overrides:
            if "max_new_tokens" in overrides:
                raise InvalidTypeError("pass max_new_tokens or its alias max_tokens, not both.")
            overrides["max_new_tokens"] = overrides.pop("max_tokens")
        names = (*ROUTE_OPTIONS, *DEFAULT_GENERATION_OPTIONS)
        defaults = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        return {**defaults, **overrides}
