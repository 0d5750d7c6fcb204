"""Training commands: ``train-pool`` (one LoRA per task split) and ``train-gate`` (LoRA-Flow, MeteoRA)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraretriever.cli import USER_ERRORS, fail, missing_pool
from loraretriever.cli.route_flags import add_route_arguments, route_options_from

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    pool = subparsers.add_parser("train-pool", help="Train one LoRA per task split into a pool directory.")
    pool.add_argument("--splits", default="data/bigbench", help="Directory of <task>.json splits.")
    pool.add_argument("--out", required=True, help="The pool directory to write.")
    pool.add_argument("--tasks", nargs="*", default=None)
    pool.add_argument("--steps", type=int, default=24)
    pool.add_argument("--batch-size", type=int, default=4)
    pool.add_argument("--rank", type=int, default=8)
    pool.add_argument("--seed", type=int, default=0)
    pool.add_argument("--evaluate", action="store_true", help="Then score each LoRA vs base on its test split.")
    pool.set_defaults(handler=_run_pool)

    gate = subparsers.add_parser("train-gate", help="Train a LoRA-Flow or MeteoRA gate for a pool directory.")
    gate.add_argument("--kind", required=True, choices=("flow", "meteora"))
    gate.add_argument("--pool", required=True, help="The pool directory; the gate is stored in its gates/.")
    gate.add_argument("--data", required=True, help="A JSON list (inputs, targets, task) or a splits directory.")
    gate.add_argument("--split", default="train", help="The split to read when --data is a directory.")
    gate.add_argument("--examples", type=int, default=200, help="Examples to train on (round-robin over tasks).")
    gate.add_argument("--name", default=None, help="The gate's name (default: the kind).")
    gate.add_argument("--steps", type=int, default=50)
    gate.add_argument("--batch-size", type=int, default=8)
    gate.add_argument("--learning-rate", type=float, default=2e-3)
    gate.add_argument("--k", type=int, default=3, help="flow: slots (retrieval top-k).")
    gate.add_argument("--top-k", type=int, default=2, help="meteora: adapters per token.")
    gate.add_argument("--aux-weight", type=float, default=1.0, help="meteora: task cross-entropy weight.")
    add_route_arguments(
        gate, ("weighting", "routing_temperature")
    )  # flow: the retrieval weights that are the gate's prior
    gate.add_argument("--seed", type=int, default=0)
    gate.add_argument(
        "--model",
        default=None,
        help="Base model: hub id or path (default: the one the pool records in pool.json, else the packaged SmolLM2).",
    )
    gate.set_defaults(handler=_run_gate)


def _run_pool(args: argparse.Namespace) -> int:
    from loraretriever.engine.base_model import load_base_model
    from loraretriever.evaluation.tasks import evaluate_own_tasks
    from loraretriever.retrieval.queries import load_splits
    from loraretriever.serving.routed_lm import RoutedLM
    from loraretriever.training.lora import LoraTrainingConfig
    from loraretriever.training.pool import train_pool

    splits = load_splits(args.splits, args.tasks or None)
    model, tokenizer = load_base_model()
    config = LoraTrainingConfig(
        r=args.rank, alpha=2 * args.rank, steps=args.steps, batch_size=args.batch_size, seed=args.seed
    )
    out = Path(args.out)
    train_pool(model, tokenizer, splits, out, config, log=lambda m: print(m, file=sys.stderr))
    if args.evaluate:
        lm = RoutedLM.from_model(model, tokenizer, pool_dir=out)
        try:
            report = evaluate_own_tasks(lm, splits)
        finally:
            lm.close()
        (out / "eval_own_task.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
    return 0


def _run_gate(args: argparse.Namespace) -> int:
    if problem := missing_pool(args.pool):
        return fail(problem)
    try:
        return _train_gate(args)
    except USER_ERRORS as error:  # a bad file, option or pool: one line, no traceback
        return fail(error)


def _train_gate(args: argparse.Namespace) -> int:
    from loraretriever.engine.gates import save_gate
    from loraretriever.pool.layout import PoolLayout
    from loraretriever.serving.routed_lm import RoutedLM
    from loraretriever.training.gates import GateTrainingConfig, load_examples, train_gate

    config = GateTrainingConfig(
        kind=args.kind,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        k=args.k,
        top_k=args.top_k,
        aux_weight=args.aux_weight,
        seed=args.seed,
    )
    examples = load_examples(args.data, args.examples, args.split, args.seed)
    name = args.name or args.kind
    # --top-k here is MeteoRA's adapters per token, not the routing's top_k (the flow gate routes k)
    route_options = {key: value for key, value in route_options_from(args).items() if key != "top_k"}
    lm = RoutedLM.from_pretrained(args.model, pool_dir=args.pool)
    try:
        gate, record = train_gate(
            lm, examples, name, config, route_options=route_options, log=lambda m: print(m, file=sys.stderr)
        )
    finally:
        lm.close()
    directory = save_gate(gate, PoolLayout(args.pool).gates / name)
    (directory / "training.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({**record, "path": str(directory)}))
    return 0
