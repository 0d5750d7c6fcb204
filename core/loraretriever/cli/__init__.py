"""The ``loraretriever`` command line: parse, call the library, print. Each module adds its sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["fail", "main"]

# Modules exposing ``register(subparsers)``; imported lazily so `--help` stays fast.
_COMMAND_MODULES = [
    "loraretriever.cli.setup",
    "loraretriever.cli.retrieval",
    "loraretriever.cli.tasks",
    "loraretriever.cli.train",
    "loraretriever.cli.bench",
    "loraretriever.cli.serve",
    "loraretriever.cli.pool",
]


def fail(problem: object) -> int:
    """Prints ``error: <problem>`` (an exception or a message naming the value and the fix) to
    stderr and returns 2, the exit status of a bad command line or input."""
    print(f"error: {problem}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraretriever", description="Input-aware LoRA retrieval and composition for mixed-task batches."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
