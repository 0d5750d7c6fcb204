"""The per-call defaults an integration exposes as pydantic fields: generation settings and every
:class:`~loraretriever.retrieval.options.RouteOptions` option, under the same names.

The routing fields are derived from RouteOptions (type, help), never listed twice. LangChain's
``.bind(top_k=2)`` and a LlamaIndex call's kwargs override them per call, by the same names.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, create_model, model_validator

from loraretriever.errors import InvalidTypeError
from loraretriever.retrieval.options import ROUTE_OPTIONS, RouteOptions

__all__ = ["CallDefaults", "RouteFields"]

_HINTS = typing.get_type_hints(RouteOptions)

RouteFields: type[BaseModel] = create_model(
    "RouteFields",
    __doc__="Every RouteOptions option as an optional field (None: the RoutedLM's default).",
    **{
        f.name: (_HINTS[f.name] | None, Field(default=None, description=f.metadata["help"]))
        for f in dataclasses.fields(RouteOptions)
    },
)


class CallDefaults(RouteFields):
    """Generation and routing defaults of an integration's calls (None: the RoutedLM's default).

    Raises:
        pydantic.ValidationError: routing fields that RouteOptions refuses, with its message.
    """

    max_new_tokens: int | None = Field(default=None, description="The most tokens to generate per prompt.")
    temperature: float | None = Field(default=None, description="0 for greedy decoding; above 0 samples.")
    top_p: float | None = Field(default=None, description="Nucleus sampling mass, in (0, 1].")
    repetition_penalty: float | None = Field(
        default=None, description="Above 1 discourages repeating prompt or output tokens; 1 is off."
    )
    seed: int | None = Field(default=None, description="Sampling seed, for reproducible sampled text.")
    chat_template: bool | None = Field(
        default=None, description="Wrap each prompt in the base model's chat template (instruction-tuned models)."
    )

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
        names = (*ROUTE_OPTIONS, *_GENERATION_FIELDS)
        defaults = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        return {**defaults, **overrides}


_GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed", "chat_template")
