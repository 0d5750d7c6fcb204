"""``loraretriever train-pool``: one LoRA per task split, stored as a pool directory with cards.

Resumable adapter by adapter (a task whose adapter is stored is skipped). Adapters are saved in
float16 to keep a committed pool small; the pool casts them to the model's dtype on load.
``--evaluate`` then scores every LoRA against the base model on its own task's test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loraretriever.adapter import SAFETENSORS_FILE
from loraretriever.cards import AdapterCard, CardStore
from loraretriever.lora_training import LoraTrainingConfig, train_lora
from loraretriever.pool_dir import adapter_dirs, store_adapter

__all__ = ["evaluate_own_tasks", "register", "train_pool"]


def _load_splits(splits_dir: Path, tasks: list[str] | None) -> dict[str, dict]:
    files = sorted(splits_dir.glob("*.json"))
    splits = {f.stem: json.loads(f.read_text()) for f in files}
    if not splits:
        raise FileNotFoundError(f"no <task>.json splits in {str(splits_dir)!r}; run `loraretriever bigbench-splits`.")
    if tasks:
        unknown = sorted(set(tasks) - set(splits))
        if unknown:
            raise ValueError(f"tasks {unknown} have no split in {str(splits_dir)!r}.")
        splits = {t: splits[t] for t in tasks}
    return splits


def train_pool(
    model, tokenizer, splits: dict[str, dict], out: Path, config: LoraTrainingConfig, log=print
) -> list[str]:
    """Trains the LoRAs that are not stored yet; writes their cards. Returns the tasks trained now."""
    cards = CardStore(out / "cards")
    stored = adapter_dirs(out)
    trained = []
    for task, split in splits.items():
        if task not in stored:
            examples = [(e["inputs"], e["targets"]) for e in split["train"]]
            with tempfile.TemporaryDirectory() as scratch:
                path = train_lora(model, tokenizer, examples, Path(scratch) / task, config, description=task)
                weights = load_file(path / SAFETENSORS_FILE)
                save_file({k: v.to(torch.float16) for k, v in weights.items()}, path / SAFETENSORS_FILE)
                store_adapter(out, path, task)
            trained.append(task)
            log(f"trained {task} ({len(trained)} this run)")
        if task not in cards:
            samples = [e["inputs"] for e in split["cards"]]
            cards.put(AdapterCard(task, samples, domain=split["kind"], description=f"BIG-bench task {task}"))
    return trained


def evaluate_own_tasks(lm, splits: dict[str, dict], max_new_tokens: int = 16) -> dict[str, Any]:
    """Normalised exact match of the base model and of each task's own LoRA on its test split."""
    from loraretriever.routing import Routing
    from loraretriever.task_eval import score

    table = {}
    for task, split in splits.items():
        prompts = [e["inputs"] for e in split["test"]]
        targets = [e["targets"] for e in split["test"]]
        runs = {}
        for label, routing in (("base", Routing.base()), ("lora", Routing.pinned([task]))):
            results = lm.generate_routed(
                prompts, [routing] * len(prompts), max_new_tokens=max_new_tokens, chat_template=True
            )
            runs[label] = sum(score("em", r.text, t) for r, t in zip(results, targets, strict=True)) / len(prompts)
        table[task] = {
            "kind": split["kind"],
            "n_test": len(prompts),
            "base_em": round(runs["base"], 3),
            "lora_em": round(runs["lora"], 3),
        }
    wins = sum(row["lora_em"] > row["base_em"] for row in table.values())
    return {"tasks": table, "lora_beats_base": wins, "n_tasks": len(table)}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train-pool", help="Train one LoRA per task split into a pool directory.")
    parser.add_argument("--splits", default="data/bigbench", help="Directory of <task>.json splits.")
    parser.add_argument("--out", required=True, help="The pool directory to write.")
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", action="store_true", help="Then score each LoRA vs base on its test split.")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from loraretriever.base_model import load_base_model
    from loraretriever.routed_lm import RoutedLM

    splits = _load_splits(Path(args.splits), args.tasks)
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
