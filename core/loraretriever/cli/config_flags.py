"""Flags derived from a config dataclass (:class:`~loraretriever.engine.engine.EngineConfig`,
:class:`~loraretriever.server.config.ServerConfig`): one name per concept (``--max-batch-tokens``
is ``max_batch_tokens``), with the field's help, type and default, never listed again."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

__all__ = ["add_config_arguments", "config_options_from"]


def _parser_type(hint: Any) -> dict[str, Any]:
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": typing.get_args(hint)}
    base = next((t for t in (int, float) if t is hint or t in typing.get_args(hint)), str)
    return {"type": base}


def add_config_arguments(parser: argparse.ArgumentParser, config: type, title: str, skip: Sequence[str] = ()) -> None:
    """Adds ``--<field>`` for every field of ``config`` but ``skip``. Unset flags are None: the
    config's default."""
    hints = typing.get_type_hints(config)
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        default = "" if field.default is None else f" (default: {field.default})"
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=None,
            help=field.metadata["help"] + default,
            **_parser_type(hints[field.name]),
        )


def config_options_from(args: argparse.Namespace, config: type, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The fields of ``config`` given on the command line, checked now (a bad flag fails before any
    model is loaded).

    Raises:
        InvalidOptionError: a value the config refuses, naming it.
    """
    names = [f.name for f in dataclasses.fields(config) if f.name not in skip]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    config(**given)
    return given
