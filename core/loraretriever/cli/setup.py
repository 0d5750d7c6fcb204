"""``loraretriever setup``: prepares the packaged default models once (idempotent)."""

from __future__ import annotations

import argparse

from loraretriever.engine.base_model import default_model_path

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("setup", help="Convert and cache the default base model (once).")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    print(f"default base model: {default_model_path()}")
    return 0
