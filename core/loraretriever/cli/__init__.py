"""The ``loraretriever`` command line: parse, call the library, print. Each module adds its sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from loraretriever import __version__
from loraretriever.engine.extras import MissingExtraError, extra_error
from loraretriever.errors import LoraRetrieverError

__all__ = ["USER_ERRORS", "fail", "main", "missing_pool"]

# What a user's input causes: every library error (AdapterError, RetrievalError, GateError,
# EmbedderError, RequestError) is a ValueError, naming the value and the fix; OSError for files.
USER_ERRORS = (ValueError, OSError)

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


def missing_pool(pool: str) -> str | None:
    """The error of a ``--pool`` that is not a directory (commands never create one by accident),
    or None."""
    if Path(pool).expanduser().is_dir():
        return None
    return f"--pool {pool!r} is not a directory. Fix: pass an existing pool directory."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraretriever", description="Input-aware LoRA retrieval and composition for mixed-task batches."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ModuleNotFoundError as error:
        # A command whose optional package is missing names its extra; every other command works.
        missing = extra_error(error)
        if not isinstance(missing, MissingExtraError):
            raise
        return fail(MissingExtraError(missing.name, missing.extra, feature=f"loraretriever {args.command}"))
    except LoraRetrieverError as error:  # the library's own errors name the value and the fix
        return fail(error)


if __name__ == "__main__":
    sys.exit(main())
