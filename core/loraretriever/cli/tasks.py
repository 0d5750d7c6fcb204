"""Task commands: ``eval-tasks`` (the paper's mixed-task benchmark) and ``bigbench-splits``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraretriever.cli import USER_ERRORS, fail, missing_pool
from loraretriever.cli.route_flags import add_route_arguments, route_options_from

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from loraretriever.evaluation.tasks import METHODS

    parser = subparsers.add_parser("eval-tasks", help="The paper's mixed-task benchmark on a pool (JSON).")
    parser.add_argument("--pool", required=True, help="Pool directory (adapters/, cards/, index/).")
    parser.add_argument(
        "--queries",
        required=True,
        help="A JSON file of queries in the paper's format (inputs, targets, task, domain, metric), or a directory "
        "of <task>.json splits (e.g. data/bigbench), whose --split is used.",
    )
    parser.add_argument("--split", default="test", help="The split to read when --queries is a directory.")
    add_route_arguments(parser, ("weighting", "routing_temperature", "density", "uncertain", "soup_k", "soup_of"))
    parser.add_argument(
        "--methods", nargs="*", default=None, choices=METHODS, help="Default: every method the pool supports."
    )
    parser.add_argument("--limit", type=int, default=None, help="At most N queries per task.")
    parser.add_argument("--only-pool-tasks", action="store_true", help="Drop queries whose task has no LoRA.")
    parser.add_argument("--tasks-file", default=None, help="Only evaluate queries of these tasks (one per line).")
    parser.add_argument("--ood", action="store_true", help="Remove each prompt's own LoRA from its candidates.")
    parser.add_argument(
        "--model",
        default=None,
        help="Base model: hub id or path (default: the one the pool records in pool.json, else the packaged SmolLM2).",
    )
    parser.add_argument(
        "--embedder",
        default=None,
        help="The router's embedder, a model id or directory (default: all-MiniLM-L6-v2); the pool's index must "
        "be built with it (`loraretriever reindex --embedder`).",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--report", default=None, help="Directory for a Markdown table and PNG plots.")
    parser.add_argument(
        "--composite",
        type=int,
        nargs="*",
        default=[],
        help="Also evaluate composite prompts of these numbers of tasks (e.g. 3 5) instead of single prompts.",
    )
    parser.add_argument(
        "--composite-prompts",
        type=int,
        default=20,
        help="Composite prompts per size, at most (each query is used once at most: a number above "
        "queries / size uses them all).",
    )
    parser.add_argument("--json", action="store_true", help="Progress to stderr; the JSON result is the last line.")
    parser.set_defaults(handler=_run_eval)

    splits = subparsers.add_parser("bigbench-splits", help="Write the demo pool's BIG-bench task splits.")
    splits.add_argument("--sdist-dir", default=None, help="Where the BIG-bench sdist is (fetched if absent).")
    splits.add_argument("--out", required=True, help="Directory for <task>.json files.")
    splits.add_argument("--seed", type=int, default=0)
    splits.set_defaults(handler=_run_splits)


def _run_eval(args: argparse.Namespace) -> int:
    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    if problem := missing_pool(args.pool):
        return fail(problem)
    try:
        return _evaluate(args, log)
    except USER_ERRORS as error:  # a bad file, option or pool: one line, no traceback
        return fail(error)


def _evaluate(args: argparse.Namespace, log) -> int:
    from loraretriever.evaluation import tasks
    from loraretriever.evaluation.retrieval import read_task_names
    from loraretriever.retrieval.queries import load_queries
    from loraretriever.serving.routed_lm import RoutedLM

    queries = load_queries(args.queries, args.split)
    only = read_task_names(args.tasks_file) if args.tasks_file else None
    route_options = route_options_from(args)
    lm = RoutedLM.from_pretrained(args.model, pool_dir=args.pool, embedder=args.embedder)
    try:
        queries = tasks.select_queries(queries, lm.pool if args.only_pool_tasks else None, args.limit, only)
        if not queries:
            print(
                "error: no queries left to evaluate (check --queries, --only-pool-tasks, --tasks-file, --limit).",
                file=sys.stderr,
            )
            return 2
        methods = args.methods or tasks.available_methods(lm)
        if args.composite:
            report = tasks.evaluate_composites(
                lm,
                queries,
                args.composite,
                [m for m in methods if m in tasks.COMPOSITE_METHODS],
                n_prompts=args.composite_prompts,
                max_new_tokens=args.max_new_tokens,
                route_options=route_options,
                log=log,
            )
            if args.report:
                tasks.write_composite_report(report, Path(args.report))
            print(json.dumps(report))
            return 0
        report = tasks.evaluate_tasks(
            lm,
            queries,
            methods,
            ood=args.ood,
            max_new_tokens=args.max_new_tokens,
            route_options=route_options,
            log=log,
        )
        if args.report:
            tasks.write_report(report, queries, Path(args.report))
    finally:
        lm.close()
    print(json.dumps({k: v for k, v in report.items() if k != "routings"}))
    return 0


def _run_splits(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.bigbench import fetch_sdist, write_splits
    from loraretriever.pool.home import loraretriever_home

    sdist = fetch_sdist(args.sdist_dir or loraretriever_home() / "bigbench")
    written = write_splits(sdist, Path(args.out), seed=args.seed)
    print(f"wrote {len(written)} tasks to {args.out}")
    return 0
