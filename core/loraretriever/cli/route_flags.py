"""The routing flags, derived from :class:`~loraretriever.retrieval.options.RouteOptions` (one name
per concept: ``--routing-temperature`` is ``routing_temperature``, help from the field's metadata)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from loraretriever.engine.routing import FUSIONS, MODES
from loraretriever.retrieval.cards import RetrievalError
from loraretriever.retrieval.options import ROUTE_OPTIONS, SOUP_OF, UNCERTAIN, WEIGHTINGS, RouteOptions

__all__ = ["add_route_arguments", "route_options_from"]

_HOW: dict[str, dict[str, Any]] = {
    "mode": {"choices": MODES},
    "top_k": {"type": int},
    "adapters": {"nargs": "+", "metavar": "NAME"},
    "adapter_weights": {"nargs": "+", "type": float, "metavar": "W"},
    "filter": {"action": "append", "metavar": "KEY=VALUE"},
    "exclude": {"nargs": "+", "metavar": "NAME"},
    "weighting": {"choices": WEIGHTINGS},
    "routing_temperature": {"type": float},
    "min_similarity": {"type": float},
    "gate": {},
    "fusion": {"choices": FUSIONS},
    "density": {"type": float},
    "uncertain": {"choices": UNCERTAIN},
    "soup_k": {"type": int},
    "soup_of": {"choices": SOUP_OF},
}


def add_route_arguments(parser: argparse.ArgumentParser, names: Sequence[str] = ROUTE_OPTIONS) -> None:
    """Adds ``--<option>`` for each routing option in ``names`` (default: all). Unset flags are None,
    so that only the options given on the command line override a pool's defaults."""
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(RouteOptions)}
    group = parser.add_argument_group("routing (see RouteOptions)")
    for name in names:
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=helps[name], **_HOW[name])


def route_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The routing options given on the command line, by name (``--filter k=v`` becomes a dict).

    Raises:
        RetrievalError: a ``--filter`` item that is not KEY=VALUE, or an invalid combination.
    """
    given = {name: getattr(args, name) for name in ROUTE_OPTIONS if getattr(args, name, None) is not None}
    if "filter" in given:
        where = {}
        for item in given["filter"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise RetrievalError(f"--filter {item!r} must look like KEY=VALUE, e.g. customer=a.")
            where[key] = value
        given["filter"] = where
    RouteOptions.coerce(given)  # validate now: a bad flag fails before any model is loaded
    return given
