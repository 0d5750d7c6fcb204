"""``loraretriever eval-tasks``: the paper's mixed-task benchmark (its Table 1) on a pool.

Every method answers the same mixed prompts in batched generations and is scored with the query's
own metric: normalised exact match, BLEU (sacrebleu) or ROUGE-L (rouge-score). Methods:

* ``base``: the base model alone;
* ``oracle``: the prompt's own task LoRA (the paper's *Perfect Selection*);
* ``retriever_single`` / ``retriever_mixture_k3`` / ``retriever_fusion_k3``: retrieved LoRAs;
* ``adaptersoup``: a uniform fusion of the whole pool;
* ``flow_k3``: the retrieved top-3 weighted per token by the pool's LoRA-Flow gate;
* ``meteora_top2``: the pool's MeteoRA gate, top-2 adapters per token (in-domain only: its gate is
  trained over the named pool, so it cannot be asked to ignore one adapter).

Out-of-domain (``--ood``, the paper's protocol): the prompt's own LoRA is removed from its candidates.

``--composite N``: prompts made of N tasks answered in sequence in one conversation (one row): each
sub-task is a user turn, the model's answer is kept and the next sub-task follows. Retrieval
methods route the row once, on all its sub-task texts (a prompt's routing is fixed); the MeteoRA
gate switches adapters token by token; ``oracle`` pins each turn's own LoRA (an upper bound that
re-routes every turn). The score is the share of sub-tasks answered exactly.
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

__all__ = [
    "METHODS",
    "available_methods",
    "build_composites",
    "evaluate_composite",
    "evaluate_tasks",
    "register",
    "score",
]

METHODS: tuple[str, ...] = (
    "base",
    "oracle",
    "retriever_single",
    "retriever_mixture_k3",
    "retriever_fusion_k3",
    "adaptersoup",
    "flow_k3",
    "meteora_top2",
)
GATED_METHODS = {"flow_k3": "flow", "meteora_top2": "meteora"}
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


def _routings(lm, method: str, queries: Sequence[dict], ood: bool, route_options: dict) -> list[Routing]:
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
    if method == "flow_k3":  # the retrieval weights are the gate's prior: same options as the mixture
        return lm.route(texts, **{**route_options, "top_k": 3}, mode="flow", exclude=own)
    if method == "meteora_top2":
        return lm.route(texts, mode="meteora")
    return lm.route(texts, **{"top_k": 3, **route_options}, mode=_RETRIEVER_MODES[method], exclude=own)


def available_methods(lm) -> list[str]:
    """Every method ``lm`` can run: the gated ones only when its pool has a gate of that kind."""
    kinds = {gate.kind for gate in lm.gates.values()}
    return [m for m in METHODS if m not in GATED_METHODS or GATED_METHODS[m] in kinds]


def _check_methods(lm, methods: Sequence[str], choices: Sequence[str] = METHODS) -> None:
    unknown = sorted(set(methods) - set(choices))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(choices)}.")
    kinds = {gate.kind for gate in lm.gates.values()}
    for method in methods:
        kind = GATED_METHODS.get(method)
        if kind is not None and kind not in kinds:
            raise ValueError(
                f"method {method!r} needs a {kind} gate in the pool; train one with "
                f"`loraretriever train-gate --kind {kind} --pool DIR --data data/bigbench`."
            )


def evaluate_tasks(
    lm,
    queries: Sequence[dict],
    methods: Sequence[str] = METHODS,
    *,
    ood: bool = False,
    max_new_tokens: int = 32,
    route_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Scores every method on ``queries`` (the paper's format: inputs, targets, task, domain, metric).

    ``route_options`` (e.g. ``{"weighting": "softmax", "routing_temperature": 0.02}``) apply to the
    retriever methods; their ``top_k`` defaults to 3.

    Returns:
        ``{"methods": {method: {"average", "by_domain", "by_task"}}, "routings": {...}, "n": ...}``.
    """
    _check_methods(lm, methods)
    missing = sorted({q["task"] for q in queries} - set(lm.pool.names))
    if missing and "oracle" in methods and not ood:
        raise ValueError(f"the pool has no LoRA for tasks {missing}, so 'oracle' cannot run; drop those queries.")
    report: dict[str, Any] = {
        "n": len(queries),
        "ood": ood,
        "route_options": dict(route_options or {}),
        "methods": {},
        "routings": {},
    }
    prompts = [q["inputs"] for q in queries]
    for method in methods:
        if method in ("oracle", "meteora_top2") and ood:
            continue  # the own LoRA is what OOD removes; a meteora gate cannot leave one adapter out
        routings = _routings(lm, method, queries, ood, route_options or {})
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


COMPOSITE_METHODS: tuple[str, ...] = ("base", "oracle", "retriever_mixture_k3", "flow_k3", "meteora_top2")


def build_composites(queries: Sequence[dict], n_tasks: int, n_prompts: int, seed: int = 0) -> list[list[dict]]:
    """``n_prompts`` composites of ``n_tasks`` queries of distinct tasks, each query used once at most.

    Raises:
        ValueError: fewer than ``n_tasks`` tasks among the queries.
    """
    import random

    by_task: dict[str, list[dict]] = defaultdict(list)
    for query in queries:
        by_task[query["task"]].append(query)
    if len(by_task) < n_tasks:
        raise ValueError(
            f"composites of {n_tasks} tasks need at least {n_tasks} tasks; the queries have {len(by_task)}."
        )
    rng = random.Random(f"{seed}:{n_tasks}")
    used: dict[str, int] = defaultdict(int)
    composites = []
    for _ in range(n_prompts):
        left = [t for t in sorted(by_task) if used[t] < len(by_task[t])]
        if len(left) < n_tasks:
            break
        tasks = rng.sample(left, n_tasks)
        composites.append([by_task[t][used[t]] for t in tasks])
        for task in tasks:
            used[task] += 1
    return composites


def evaluate_composite(
    lm,
    composites: Sequence[Sequence[dict]],
    methods: Sequence[str] = COMPOSITE_METHODS,
    *,
    max_new_tokens: int = 16,
    route_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Answers every composite turn by turn (one batched generation per turn, one row per composite).

    Returns:
        ``{method: {"subtask_score", "all_correct", "by_position"}}``.
    """
    _check_methods(lm, methods, COMPOSITE_METHODS)
    n_turns = len(composites[0])
    if any(len(c) != n_turns for c in composites):
        raise ValueError("every composite must have the same number of sub-tasks.")
    joined = ["\n\n".join(q["inputs"] for q in composite) for composite in composites]
    fixed: dict[str, Any] = {  # routings, or how to get them (only when the method runs)
        "base": [Routing.base("method: base")] * len(composites),
        "retriever_mixture_k3": lambda: lm.route(joined, **{"top_k": 3, **(route_options or {})}, mode="mixture"),
        "flow_k3": lambda: lm.route(joined, **{**(route_options or {}), "top_k": 3}, mode="flow"),
        "meteora_top2": lambda: lm.route(joined, mode="meteora"),
    }
    results: dict[str, Any] = {}
    for method in methods:
        chats: list[list[dict]] = [[] for _ in composites]
        correct = [[0.0] * n_turns for _ in composites]
        routings = None if method == "oracle" else fixed[method]
        routings = routings() if callable(routings) else routings
        for turn in range(n_turns):
            for chat, composite in zip(chats, composites, strict=True):
                chat.append({"role": "user", "content": composite[turn]["inputs"]})
            turn_routings = routings or [Routing.pinned([c[turn]["task"]]) for c in composites]
            answers = lm.generate_routed(
                [list(chat) for chat in chats], turn_routings, max_new_tokens=max_new_tokens, chat_template=True
            )
            for row, (chat, answer) in enumerate(zip(chats, answers, strict=True)):
                chat.append({"role": "assistant", "content": answer.text.strip()})
                query = composites[row][turn]
                correct[row][turn] = score(query["metric"], answer.text.strip(), query["targets"])
        flat = [v for row in correct for v in row]
        results[method] = {
            "subtask_score": round(sum(flat) / len(flat), 4),
            "all_correct": round(sum(all(v == 1.0 for v in row) for row in correct) / len(correct), 4),
            "by_position": [round(sum(row[t] for row in correct) / len(correct), 4) for t in range(n_turns)],
        }
        log(f"composite-{n_turns} {method}: {results[method]['subtask_score']:.4f}")
    return results


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


def write_composite_report(report: dict[str, Any], out_dir: Path) -> None:
    """``composite.md``: sub-task score and all-correct rate per method and composite size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = list(report["composite"])
    methods = list(next(iter(report["composite"].values())))
    head = " | ".join(f"{n} tasks: sub-task EM | {n} tasks: all correct" for n in sizes)
    lines = [f"| method | {head} |", "|---" * (1 + 2 * len(sizes)) + "|"]
    for method in methods:
        cells = []
        for n in sizes:
            row = report["composite"][n][method]
            cells += [f"{row['subtask_score']:.3f}", f"{row['all_correct']:.3f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (out_dir / "composite.md").write_text("\n".join(lines) + "\n")


def add_route_arguments(parser: argparse.ArgumentParser) -> None:
    """``--weighting`` and ``--routing-temperature``: how retrieved LoRAs are weighted."""
    parser.add_argument("--weighting", default=None, choices=("uniform", "softmax"), help="Retrieval weights.")
    parser.add_argument("--routing-temperature", type=float, default=None, help="Softmax temperature (cosine).")


def route_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The routing options :func:`add_route_arguments` parsed (those given)."""
    given = (("weighting", args.weighting), ("routing_temperature", args.routing_temperature))
    return {key: value for key, value in given if value is not None}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval-tasks", help="The paper's mixed-task benchmark on a pool (JSON).")
    parser.add_argument("--pool", required=True, help="Pool directory (adapters/, cards/, index/).")
    parser.add_argument(
        "--queries",
        required=True,
        help="A JSON file of queries in the paper's format (inputs, targets, task, domain, metric), or a directory "
        "of <task>.json splits (e.g. data/bigbench), whose --split is used.",
    )
    parser.add_argument("--split", default="test", help="The split to read when --queries is a directory.")
    add_route_arguments(parser)
    parser.add_argument(
        "--methods", nargs="*", default=None, choices=METHODS, help="Default: every method the pool supports."
    )
    parser.add_argument("--limit", type=int, default=None, help="At most N queries per task.")
    parser.add_argument("--only-pool-tasks", action="store_true", help="Drop queries whose task has no LoRA.")
    parser.add_argument("--ood", action="store_true", help="Remove each prompt's own LoRA from its candidates.")
    parser.add_argument("--model", default=None, help="Base model id or path (default: the packaged SmolLM2).")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--report", default=None, help="Directory for a Markdown table and PNG plots.")
    parser.add_argument(
        "--composite",
        type=int,
        nargs="*",
        default=[],
        help="Also evaluate composite prompts of these numbers of tasks (e.g. 3 5) instead of single prompts.",
    )
    parser.add_argument("--composite-prompts", type=int, default=20, help="Composite prompts per size.")
    parser.add_argument("--json", action="store_true", help="Progress to stderr; the JSON result is the last line.")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from loraretriever.routed_lm import RoutedLM

    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    from loraretriever.demo_pool import load_queries

    queries = load_queries(args.queries, args.split)
    route_options = route_options_from(args)
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
        if args.composite:
            methods = [m for m in (args.methods or available_methods(lm)) if m in COMPOSITE_METHODS]
            report = {"composite": {}, "n_prompts": args.composite_prompts}
            for n in args.composite:
                composites = build_composites(queries, n, args.composite_prompts)
                report["composite"][str(n)] = evaluate_composite(
                    lm, composites, methods, max_new_tokens=args.max_new_tokens, route_options=route_options, log=log
                )
            if args.report:
                write_composite_report(report, Path(args.report))
            print(json.dumps(report))
            return 0
        report = evaluate_tasks(
            lm,
            queries,
            args.methods or available_methods(lm),
            ood=args.ood,
            max_new_tokens=args.max_new_tokens,
            route_options=route_options,
            log=log,
        )
        if args.report:
            write_report(report, queries, Path(args.report))
    finally:
        lm.close()
    summary = {k: v for k, v in report.items() if k != "routings"}
    print(json.dumps(summary))
    return 0
