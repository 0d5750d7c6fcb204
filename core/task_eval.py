"""``loraretriever eval-tasks``: the paper's mixed-task benchmark (its Table 1) on a pool.

Every method answers the same mixed prompts in batched generations and is scored with the query's
own metric: normalised exact match, BLEU (sacrebleu) or ROUGE-L (rouge-score). Methods:

* ``base``: the base model alone;
* ``oracle``: the prompt's own task LoRA (the paper's *Perfect Selection*);
* ``retriever_single`` / ``retriever_mixture_k3`` / ``retriever_fusion_k3``: retrieved LoRAs;
* ``adaptersoup``: a uniform fusion of the whole pool.

Out-of-domain (``--ood``, the paper's protocol): the prompt's own LoRA is removed from its candidates.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loraretriever.routing import Routing

__all__ = ["METHODS", "evaluate_tasks", "register", "score"]

METHODS: tuple[str, ...] = (
    "base",
    "oracle",
    "retriever_single",
    "retriever_mixture_k3",
    "retriever_fusion_k3",
    "adaptersoup",
)
_RETRIEVER_MODES = {"retriever_single": "single", "retriever_mixture_k3": "mixture", "retriever_fusion_k3": "fusion"}


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces (the usual exact-match normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\s+", " ", text).strip()


def score(metric: str, prediction: str, target: str) -> float:
    """One prediction's score in [0, 1] under ``metric`` (``em``, ``bleu`` or ``rouge``)."""
    if metric == "em":
        return float(normalise(prediction) == normalise(target))
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(prediction, [target]).score / 100.0
    if metric == "rouge":
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(target, prediction)["rougeL"].fmeasure
    raise ValueError(f"metric {metric!r} is not one of 'em', 'bleu', 'rouge'.")


def _routings(lm, method: str, queries: Sequence[dict], ood: bool) -> list[Routing]:
    own = [[q["task"]] if ood else [] for q in queries]
    if method == "base":
        return [Routing.base("method: base")] * len(queries)
    if method == "oracle":
        return [Routing.pinned([q["task"]]) for q in queries]
    if method == "adaptersoup":
        routings = []
        for excluded in own:
            names = [n for n in lm.pool.names if n not in excluded]
            routings.append(Routing.pinned(names, mode="fusion"))
        return routings
    texts = [q["inputs"] for q in queries]
    return lm.route(texts, top_k=3, mode=_RETRIEVER_MODES[method], exclude=own)


def evaluate_tasks(
    lm,
    queries: Sequence[dict],
    methods: Sequence[str] = METHODS,
    *,
    ood: bool = False,
    max_new_tokens: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Scores every method on ``queries`` (the paper's format: inputs, targets, task, domain, metric).

    Returns:
        ``{"methods": {method: {"average", "by_domain", "by_task"}}, "routings": {...}, "n": ...}``.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}.")
    missing = sorted({q["task"] for q in queries} - set(lm.pool.names))
    if missing and "oracle" in methods and not ood:
        raise ValueError(f"the pool has no LoRA for tasks {missing}, so 'oracle' cannot run; drop those queries.")
    report: dict[str, Any] = {"n": len(queries), "ood": ood, "methods": {}, "routings": {}}
    prompts = [q["inputs"] for q in queries]
    for method in methods:
        if method == "oracle" and ood:
            continue  # the own LoRA is what OOD removes
        routings = _routings(lm, method, queries, ood)
        results = lm.generate_routed(prompts, routings, max_new_tokens=max_new_tokens, chat_template=True)
        scores = [score(q["metric"], r.text.strip(), q["targets"]) for q, r in zip(queries, results, strict=True)]
        by_domain: dict[str, list[float]] = defaultdict(list)
        by_task: dict[str, list[float]] = defaultdict(list)
        for query, value in zip(queries, scores, strict=True):
            by_domain[query["domain"]].append(value)
            by_task[query["task"]].append(value)
        report["methods"][method] = {
            "average": round(sum(scores) / len(scores), 4),
            "by_domain": {d: round(sum(v) / len(v), 4) for d, v in sorted(by_domain.items())},
            "by_task": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())},
        }
        report["routings"][method] = [r.to_dict() for r in routings]
        log(f"{method}{' (OOD)' if ood else ''}: {report['methods'][method]['average']:.4f}")
    return report


def write_report(report: dict[str, Any], queries: Sequence[dict], out_dir: Path) -> None:
    """A Markdown table and two PNG plots (scores per method and domain; routing weights heatmap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(report["methods"])
    domains = sorted({d for m in methods for d in report["methods"][m]["by_domain"]})
    lines = ["| method | average | " + " | ".join(domains) + " |", "|---" * (len(domains) + 2) + "|"]
    for method in methods:
        row = report["methods"][method]
        cells = [f"{row['by_domain'].get(d, float('nan')):.3f}" for d in domains]
        lines.append(f"| {method} | {row['average']:.3f} | " + " | ".join(cells) + " |")
    suffix = "_ood" if report["ood"] else ""
    (out_dir / f"results{suffix}.md").write_text("\n".join(lines) + "\n")

    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(domains) * len(methods) / 3), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [report["methods"][method]["by_domain"].get(d, 0.0) for d in domains]
        axis.bar(np.arange(len(domains)) + i * width, values, width, label=method)
    axis.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, rotation=30, ha="right")
    axis.set_ylabel("score")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / f"scores{suffix}.png", dpi=120)
    plt.close(figure)

    if "retriever_mixture_k3" in report["routings"]:
        routings = report["routings"]["retriever_mixture_k3"][:48]
        adapters = sorted({a for r in routings for a in r["adapters"]})
        weights = np.zeros((len(routings), len(adapters)))
        for row, routing in enumerate(routings):
            for name, weight in zip(routing["adapters"], routing["weights"], strict=True):
                weights[row, adapters.index(name)] = weight
        figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(adapters)), max(4, 0.18 * len(routings))))
        axis.imshow(weights, aspect="auto", cmap="viridis")
        axis.set_xticks(range(len(adapters)), adapters, rotation=90, fontsize=6)
        axis.set_yticks(range(len(routings)), [q["task"] for q in queries[: len(routings)]], fontsize=6)
        axis.set_title("retriever_mixture_k3 routing weights (prompt x adapter)")
        figure.tight_layout()
        figure.savefig(out_dir / f"routing_heatmap{suffix}.png", dpi=120)
        plt.close(figure)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval-tasks", help="The paper's mixed-task benchmark on a pool (JSON).")
    parser.add_argument("--pool", required=True, help="Pool directory (adapters/, cards/, index/).")
    parser.add_argument("--queries", required=True, help="Queries in the paper's format (inputs, targets, task, ...).")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--limit", type=int, default=None, help="At most N queries per task.")
    parser.add_argument("--only-pool-tasks", action="store_true", help="Drop queries whose task has no LoRA.")
    parser.add_argument("--ood", action="store_true", help="Remove each prompt's own LoRA from its candidates.")
    parser.add_argument("--model", default=None, help="Base model id or path (default: the packaged SmolLM2).")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--report", default=None, help="Directory for a Markdown table and PNG plots.")
    parser.add_argument("--json", action="store_true", help="Progress to stderr; the JSON result is the last line.")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from loraretriever.routed_lm import RoutedLM

    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    queries = json.loads(Path(args.queries).read_text())
    lm = RoutedLM.from_pretrained(args.model, pool_dir=args.pool)
    try:
        if args.only_pool_tasks:
            queries = [q for q in queries if q["task"] in lm.pool]
        if args.limit is not None:
            kept: dict[str, int] = defaultdict(int)
            limited = []
            for query in queries:
                if kept[query["task"]] < args.limit:
                    kept[query["task"]] += 1
                    limited.append(query)
            queries = limited
        if not queries:
            print("error: no queries left to evaluate (check --queries, --only-pool-tasks, --limit).", file=sys.stderr)
            return 2
        report = evaluate_tasks(lm, queries, args.methods, ood=args.ood, max_new_tokens=args.max_new_tokens, log=log)
        if args.report:
            write_report(report, queries, Path(args.report))
    finally:
        lm.close()
    summary = {k: v for k, v in report.items() if k != "routings"}
    print(json.dumps(summary))
    return 0
