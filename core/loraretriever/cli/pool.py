"""``loraretriever pool add | remove | list | check``: a pool directory's adapters and health."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraretriever.cli import fail

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pool", help="Add, remove, list and check the adapters of a pool directory.")
    commands = parser.add_subparsers(dest="pool_command", required=True)

    add = commands.add_parser(
        "add", help="Store an adapter (and its card) in the pool; routers pick it up at their next sync."
    )
    add.add_argument("name", help="The adapter's name in the pool.")
    add.add_argument("path", help="A PEFT adapter directory (adapter_config.json, adapter_model.safetensors).")
    add.add_argument("--card", help="A card JSON file ({'samples': [...], 'domain': ..., 'tags': {...}}).")
    add.add_argument("--create", action="store_true", help="Create the pool directory if it does not exist.")
    _common(add, model=True)
    add.set_defaults(handler=_run_add)

    add_dir = commands.add_parser(
        "add-dir",
        help="Add every PEFT adapter directory under DIR, each with its card; one that fails does not stop the rest.",
    )
    add_dir.add_argument("directory", help="Holds one PEFT adapter directory per adapter (its name: the directory's).")
    add_dir.add_argument(
        "--samples",
        default=None,
        metavar="FILE.jsonl",
        help="Where an adapter directory has no card.json: draw its card from DIR/<name>/FILE.jsonl.",
    )
    add_dir.add_argument("--prompt-field", default="prompt", help="The field of --samples lines that holds a prompt.")
    add_dir.add_argument("--n", type=int, default=20, help="Samples drawn per card (the paper uses 20).")
    add_dir.add_argument("--create", action="store_true", help="Create the pool directory if it does not exist.")
    _common(add_dir, model=True)
    add_dir.set_defaults(handler=_run_add_dir)

    remove = commands.add_parser("remove", help="Remove an adapter and its card (routers drop it at their next sync).")
    remove.add_argument("name")
    _common(remove)
    remove.set_defaults(handler=_run_remove)

    listing = commands.add_parser("list", help="The stored adapters, one per line (quarantined ones marked).")
    _common(listing)
    listing.set_defaults(handler=_run_list)

    check = commands.add_parser("check", help="Exit 0 when the pool is consistent; else list each problem, exit 1.")
    check.add_argument("--repair", action="store_true", help="Fix what can be fixed (undo, clean, quarantine).")
    _common(check)
    check.set_defaults(handler=_run_check)


def _common(parser: argparse.ArgumentParser, model: bool = False) -> None:
    parser.add_argument("--pool", required=True, help="The pool directory.")
    if model:
        parser.add_argument(
            "--model",
            default=None,
            help="Base model: hub id or path (default: the one the pool records in pool.json, else the packaged SmolLM2).",
        )


def _pool(args: argparse.Namespace, create: bool = False) -> Path | None:
    pool = Path(args.pool).expanduser()
    if pool.is_dir() or create:
        return pool
    return None


def _no_pool(args: argparse.Namespace) -> int:
    return fail(
        f"--pool {args.pool!r} is not a directory. Fix: pass an existing pool directory (or --create with add)."
    )


def _run_add(args: argparse.Namespace) -> int:
    from loraretriever.pool.adapter import AdapterError
    from loraretriever.retrieval.cards import RetrievalError
    from loraretriever.serving.adapters import add_to_pool_dir

    pool = _pool(args, create=args.create)
    if pool is None:
        return _no_pool(args)
    card = None
    if args.card is not None:
        try:
            card = json.loads(Path(args.card).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return fail(f"--card {args.card!r} is not a readable JSON file ({error}). Fix: pass a card JSON file.")
    try:
        name = add_to_pool_dir(pool, args.path, card, name=args.name, model_id=args.model)
    except (AdapterError, RetrievalError, ValueError, KeyError) as error:
        return fail(error)
    print(f"added {name!r} to {pool} (routable once a router syncs: at once for a new process)")
    return 0


def _run_add_dir(args: argparse.Namespace) -> int:
    from loraretriever.pool.adapter import AdapterError
    from loraretriever.serving.adapters import add_dir_to_pool_dir

    pool = _pool(args, create=args.create)
    if pool is None:
        return _no_pool(args)
    try:
        report = add_dir_to_pool_dir(
            pool,
            args.directory,
            samples=args.samples,
            prompt_field=args.prompt_field,
            n=args.n,
            model_id=args.model,
            log=lambda line: print(line, flush=True),
        )
    except (AdapterError, ValueError) as error:
        return fail(error)
    print(
        f"{len(report['added'])} added ({len(report['without_card'])} without a card), "
        f"{len(report['failed'])} failed: {pool}"
    )
    return 1 if report["failed"] else 0


def _run_remove(args: argparse.Namespace) -> int:
    from loraretriever.pool.adapter import AdapterError
    from loraretriever.retrieval.cards import RetrievalError
    from loraretriever.serving.adapters import remove_from_pool_dir

    pool = _pool(args)
    if pool is None:
        return _no_pool(args)
    try:
        remove_from_pool_dir(pool, args.name)
    except (AdapterError, RetrievalError, KeyError) as error:
        return fail(error.args[0] if isinstance(error, KeyError) else error)
    print(f"removed {args.name!r} from {pool}")
    return 0


def _run_list(args: argparse.Namespace) -> int:
    from loraretriever.pool.directory import adapter_dirs, quarantined
    from loraretriever.pool.layout import PoolLayout
    from loraretriever.retrieval.cards import CardStore

    pool = _pool(args)
    if pool is None:
        return _no_pool(args)
    cards = set(CardStore(PoolLayout(pool).cards, create=False).names) if PoolLayout(pool).cards.is_dir() else set()
    for name in adapter_dirs(pool):
        print(name if name in cards else f"{name}\t(no card: pinned calls only)")
    for name, reason in quarantined(pool).items():
        print(f"{name}\t(quarantined: {reason})")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from loraretriever.serving.adapters import check_pool_dir

    pool = _pool(args)
    if pool is None:
        return _no_pool(args)
    problems = check_pool_dir(pool, repair=args.repair)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{pool}: consistent")
    return 1 if problems else 0
