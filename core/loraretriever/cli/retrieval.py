"""Retrieval commands: ``eval-retrieval``, ``train-retriever``, ``reindex``, ``route`` and ``calibrate``.

Every command that reports numbers prints one JSON object as its last line with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from typing import Any

from loraretriever.cli import fail
from loraretriever.cli.route_flags import add_route_arguments, route_options_from
from loraretriever.retrieval.cards import RetrievalError

# What a Router alone does: retrieval (gated modes and pinned adapters need a RoutedLM).
RETRIEVAL_OPTIONS = (
    "mode",
    "top_k",
    "filter",
    "exclude",
    "weighting",
    "routing_temperature",
    "min_similarity",
    "uncertain",
    "soup_k",
    "soup_of",
)

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_eval(subparsers)
    _register_train(subparsers)
    _register_reindex(subparsers)
    _register_route(subparsers)
    _register_calibrate(subparsers)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object as the last line.")


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))


# -- eval-retrieval ----------------------------------------------------------------------------
def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-retrieval",
        help="Retrieval accuracy on the paper's files (own task at top-1 / top-k, domain at top-1).",
        description="Routes every query over the cards in a throwaway in-memory index (a user's pool is never "
        "touched) and scores whether its own task's LoRA is retrieved.",
    )
    parser.add_argument(
        "--cards", required=True, help="JSON list of {model_name, sample: [{inputs}, ...]}, or a pool directory."
    )
    parser.add_argument("--queries", required=True, help="JSON list of {inputs, task, domain, ...}.")
    parser.add_argument("--embedder", default=None, help="Model id or directory (default: all-MiniLM-L6-v2).")
    parser.add_argument("--instruction", default=None, help="Instruction prefix (default: the embedder's own).")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--exclude-own-task", action="store_true", help="The paper's out-of-domain protocol.")
    parser.add_argument("--tasks-file", default=None, help="Only score queries of these tasks (one per line).")
    parser.add_argument("--split", choices=["all", "even", "odd"], default="all", help="Every other query per task.")
    _common(parser)
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.retrieval import evaluate_retrieval, read_task_names, split_queries
    from loraretriever.retrieval.cards import load_paper_cards
    from loraretriever.retrieval.embedder import Embedder, EmbedderError
    from loraretriever.retrieval.queries import load_queries

    _set_threads(args)
    try:
        cards = load_paper_cards(args.cards)
        queries = split_queries(load_queries(args.queries), args.split)
        tasks = read_task_names(args.tasks_file) if args.tasks_file else None
        embedder = Embedder(args.embedder, instruction=args.instruction)
        result = evaluate_retrieval(
            cards, queries, embedder=embedder, top_k=args.top_k, exclude_own_task=args.exclude_own_task, tasks=tasks
        )
    except (RetrievalError, EmbedderError) as err:
        return fail(err)
    result.update(split=args.split, tasks_file=args.tasks_file, cards_file=args.cards, queries_file=args.queries)
    if not args.json:
        print(
            f"n={result['n']} top1={result['top1']:.3f} top{args.top_k}={result['top3']:.3f} "
            f"domain_top1={result['domain_top1']:.3f}"
        )
        for domain, scores in result["per_domain"].items():
            print(f"  {domain:>26}: n={scores['n']:4d} top1={scores['top1']:.3f} top{args.top_k}={scores['top3']:.3f}")
    print(json.dumps(result))
    return 0


# -- train-retriever ---------------------------------------------------------------------------
def _register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-retriever",
        help="Contrastive instruction fine-tuning of the retriever's embedder (CPU minutes).",
        description="Trains on a fraction of the tasks (same-task positives, other-task in-batch negatives) and "
        "saves a sentence-transformers model usable as --embedder DIR.",
    )
    parser.add_argument(
        "--cards", required=True, help="JSON list of {model_name, sample: [{inputs}, ...]}, or a pool directory."
    )
    parser.add_argument(
        "--queries",
        default=None,
        help="Extra training queries: a JSON list of {inputs, task} or a splits directory (e.g. data/bigbench).",
    )
    parser.add_argument("--split", default="train", help="The split to read when --queries is a directory.")
    parser.add_argument(
        "--query-split",
        choices=["all", "even", "odd"],
        default="all",
        help="Use only this half of --queries (keep the other half for evaluation).",
    )
    parser.add_argument("--train-fraction", type=float, default=1.0, help="Fraction of tasks trained on (e.g. 0.4).")
    parser.add_argument(
        "--tasks-file", default=None, help="Train on exactly these tasks (one per line) instead of a random fraction."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="Output directory (new or empty).")
    parser.add_argument("--base", default=None, help="Embedder to start from (default: all-MiniLM-L6-v2).")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--pairs-per-sample", type=int, default=1)
    parser.add_argument("--max-seq-length", type=int, default=128, help="Truncation while training.")
    parser.add_argument("--max-steps", type=int, default=-1, help="Stop early (smoke tests).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    _common(parser)
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.retrieval import read_task_names, split_queries
    from loraretriever.retrieval.cards import load_paper_cards
    from loraretriever.retrieval.embedder import EmbedderError
    from loraretriever.retrieval.queries import load_queries
    from loraretriever.training.retriever import train_retriever

    _set_threads(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cards = load_paper_cards(args.cards)
        queries = split_queries(load_queries(args.queries, args.split), args.query_split) if args.queries else []
        summary = train_retriever(
            cards,
            args.out,
            queries=queries,
            train_fraction=args.train_fraction,
            tasks=read_task_names(args.tasks_file) if args.tasks_file else None,
            seed=args.seed,
            base=args.base,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            pairs_per_sample=args.pairs_per_sample,
            max_seq_length=args.max_seq_length,
            max_steps=args.max_steps,
            show_progress_bar=not args.no_progress,
        )
    except (RetrievalError, EmbedderError) as err:
        return fail(err)
    summary.update(queries_file=args.queries, query_split=args.query_split, cards_file=args.cards)
    if not args.json:
        print(
            f"saved {args.out}: {summary['steps']} steps on {len(summary['train_tasks'])} tasks "
            f"({summary['pairs']} pairs) in {summary['seconds']} s"
        )
    print(json.dumps(summary))
    return 0


# -- reindex / route ---------------------------------------------------------------------------
def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", required=True, help="The pool directory (cards in POOL/cards).")
    parser.add_argument("--embedder", default=None, help="Model id or directory (default: all-MiniLM-L6-v2).")
    parser.add_argument("--chroma-path", default=None, help="Embedded index directory (default: POOL/index).")
    parser.add_argument("--chroma-host", default=None, help="Shared server (`chroma run --path DIR`) host.")
    parser.add_argument("--chroma-port", type=int, default=8000)
    parser.add_argument("--collection", default=None, help="Collection name (default: loraretriever-adapters).")


def _open_router(args: argparse.Namespace, *, reindex: bool = False) -> Any:

    from loraretriever.pool.layout import PoolLayout
    from loraretriever.retrieval.cards import CardStore
    from loraretriever.retrieval.index import DEFAULT_COLLECTION
    from loraretriever.retrieval.router import Router
    from loraretriever.serving.adapters import ready_pool_dir

    layout = PoolLayout(args.pool)
    if not layout.cards.is_dir():
        raise RetrievalError(f"{str(layout.cards)!r} does not exist; is --pool a pool directory?")
    cards = CardStore(layout.cards)
    ready_pool_dir(args.pool, cards)  # a bad card is quarantined, not the end of the command
    return Router.open(
        args.pool,
        store=cards,
        embedder=args.embedder,
        chroma_path=args.chroma_path,
        host=args.chroma_host,
        port=args.chroma_port,
        collection=args.collection or DEFAULT_COLLECTION,
        reindex=reindex,
    )


def _register_reindex(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reindex", help="Rebuild a pool's Chroma index from its cards (e.g. after changing the embedder)."
    )
    _index_arguments(parser)
    _common(parser)
    parser.set_defaults(handler=_run_reindex)


def _run_reindex(args: argparse.Namespace) -> int:
    from loraretriever.retrieval.embedder import EmbedderError

    _set_threads(args)
    try:
        router = _open_router(args, reindex=True)
    except (RetrievalError, EmbedderError) as err:
        return fail(err)
    result = {"indexed": router.index.count(), "embedder": router.embedder.name, "index": router.index.where}
    print(json.dumps(result) if args.json else f"indexed {result['indexed']} cards with {result['embedder']}")
    return 0


def _register_route(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("route", help="Show the adapters a pool's router picks for prompts.")
    _index_arguments(parser)
    parser.add_argument("prompts", nargs="+")
    add_route_arguments(parser, RETRIEVAL_OPTIONS)
    _common(parser)
    parser.set_defaults(handler=_run_route)


def _run_route(args: argparse.Namespace) -> int:
    from loraretriever.retrieval.embedder import EmbedderError

    _set_threads(args)
    try:
        options = route_options_from(args)
        routings = _open_router(args).route(args.prompts, **options)
    except (RetrievalError, EmbedderError) as err:
        return fail(err)
    if not args.json:
        for prompt, routing in zip(args.prompts, routings, strict=True):
            print(f"{prompt[:60]!r} -> {routing}")
    print(json.dumps([routing.to_dict() for routing in routings]))
    return 0


def _register_calibrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="Fit the pool's routing confidence (for --uncertain soup/base) on prompts of known tasks.",
        description="Routes each prompt with and without its own task's adapter and fits the chance that the "
        "top-1 is right from the similarity profile; writes POOL/confidence.json. Use a train split.",
    )
    _index_arguments(parser)
    parser.add_argument("--queries", required=True, help="A splits directory (e.g. data/bigbench) or a JSON list.")
    parser.add_argument("--split", default="train", help="The split to read when --queries is a directory.")
    parser.add_argument(
        "--query-split",
        choices=["all", "even", "odd"],
        default="all",
        help="Use only this half of the queries (the half a fine-tuned --embedder was not trained on).",
    )
    parser.add_argument("--tasks-file", default=None, help="Only calibrate on queries of these tasks (one per line).")
    parser.add_argument("--limit", type=int, default=None, help="At most N queries per task.")
    _common(parser)
    parser.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:

    from loraretriever.evaluation.retrieval import read_task_names, split_queries
    from loraretriever.evaluation.tasks import select_queries
    from loraretriever.pool.layout import PoolLayout
    from loraretriever.retrieval.confidence import calibrate_router
    from loraretriever.retrieval.embedder import EmbedderError
    from loraretriever.retrieval.queries import load_queries

    _set_threads(args)
    try:
        queries = split_queries(load_queries(args.queries, args.split), args.query_split)
        only = read_task_names(args.tasks_file) if args.tasks_file else None
        queries = select_queries(queries, None, args.limit, only)
        router = _open_router(args)
        confidence = calibrate_router(router, queries)
    except (RetrievalError, EmbedderError, ValueError) as err:
        return fail(err)
    path = PoolLayout(args.pool).confidence
    confidence.save(path)
    result = {"path": str(path), **asdict(confidence)}
    print(json.dumps(result) if args.json else f"wrote {path}: {result}")
    return 0
