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

import re
import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from loraretriever.engine.extras import import_optional
from loraretriever.engine.routing import Routing
from loraretriever.retrieval.cards import RetrievalError

__all__ = [
    "METHODS",
    "available_methods",
    "build_composites",
    "evaluate_composite",
    "evaluate_composites",
    "evaluate_own_tasks",
    "evaluate_tasks",
    "routing_accuracy",
    "score",
    "select_queries",
]

METHODS: tuple[str, ...] = (
    "base",
    "oracle",
    "retriever_single",
    "retriever_mixture_k3",
    "retriever_fusion_k3",
    "retriever_fusion_ties_k3",
    "retriever_fusion_dare_linear_k3",
    "retriever_fusion_dare_ties_k3",
    "adaptersoup",
    "flow_k3",
    "meteora_top2",
)
GATED_METHODS = {"flow_k3": "flow", "meteora_top2": "meteora"}
# fusion by TIES / DARE (their density: the route options', 0.5 unless given)
_FUSION_METHODS = {
    "retriever_fusion_ties_k3": "ties",
    "retriever_fusion_dare_linear_k3": "dare_linear",
    "retriever_fusion_dare_ties_k3": "dare_ties",
}
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
        return import_optional("sacrebleu").sentence_bleu(prediction, [target]).score / 100.0
    if metric == "rouge":
        scorer = import_optional("rouge_score.rouge_scorer").RougeScorer(["rougeL"], use_stemmer=True)
        return scorer.score(target, prediction)["rougeL"].fmeasure
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
    if method == "flow_k3":  # the retrieval weights are the gate's prior: same options as the mixture,
        # but its gate weighs its own slots (no confidence blend)
        options = {k: v for k, v in route_options.items() if k not in ("uncertain", "soup_k", "soup_of")}
        return lm.route(texts, **{**options, "top_k": 3}, mode="flow", exclude=own)
    if method == "meteora_top2":
        return lm.route(texts, mode="meteora")
    if method in _FUSION_METHODS:
        options = {"top_k": 3, **route_options, "mode": "fusion", "fusion": _FUSION_METHODS[method]}
        return lm.route(texts, **options, exclude=own)
    return lm.route(texts, **{"top_k": 3, **route_options}, mode=_RETRIEVER_MODES[method], exclude=own)


# the methods whose adapters come from retrieval (the others pin theirs, or pick them per token)
ROUTED_METHODS = (*_RETRIEVER_MODES, *_FUSION_METHODS, "flow_k3")


def routing_accuracy(queries: Sequence[dict], routings: Sequence[Routing], k: int = 3) -> dict[str, float]:
    """The share of prompts whose own task's LoRA has the routing's largest weight (``top1``) and
    is among its ``k`` largest (``top3``); ties are ranked in the routing's order (best first)."""
    top1 = topk = 0
    for query, routing in zip(queries, routings, strict=True):
        # by weight; equal weights (uniform weighting) keep the routing's order, best first
        ranked = [name for name, _ in sorted(zip(routing.adapters, routing.weights, strict=True), key=lambda p: -p[1])]
        top1 += ranked[:1] == [query["task"]]
        topk += query["task"] in ranked[:k]
    return {"top1": round(top1 / len(queries), 4), f"top{k}": round(topk / len(queries), 4)}


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
        if method in ROUTED_METHODS and not ood:
            report["methods"][method]["routing_accuracy"] = routing_accuracy(queries, routings)
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
    """A Markdown table (scores per domain, and for retrieved routings the share of prompts whose own
    LoRA is weighted first / in the top 3) and three PNG plots: scores per method and domain, per
    task (base, oracle, retriever mixture, soup), and the routing weights heatmap."""
    import_optional("matplotlib").use("Agg")
    plt = import_optional("matplotlib.pyplot")
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(report["methods"])
    domains = sorted({d for m in methods for d in report["methods"][m]["by_domain"]})
    head = ["method", "average", *domains, "own LoRA top-1", "own LoRA in top-3"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method in methods:
        row = report["methods"][method]
        cells = [f"{row['by_domain'].get(d, float('nan')):.3f}" for d in domains]
        accuracy = row.get("routing_accuracy")
        cells += [f"{accuracy['top1']:.3f}", f"{accuracy['top3']:.3f}"] if accuracy else ["-", "-"]
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

    shown = [m for m in ("base", "oracle", "retriever_mixture_k3", "adaptersoup") if m in methods]
    tasks = sorted({t for m in shown for t in report["methods"][m]["by_task"]})
    if shown and tasks:  # per task: what routing earns against the base model, the oracle and a soup
        figure, axis = plt.subplots(figsize=(max(8, 0.45 * len(tasks) * len(shown) / 2), 4.5))
        width = 0.8 / len(shown)
        for i, method in enumerate(shown):
            values = [report["methods"][method]["by_task"].get(t, 0.0) for t in tasks]
            axis.bar(np.arange(len(tasks)) + i * width, values, width, label=method)
        axis.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=60, ha="right", fontsize=7)
        axis.set_ylabel("score")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out_dir / f"tasks{suffix}.png", dpi=120)
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


def select_queries(
    queries: Sequence[dict], pool=None, limit: int | None = None, tasks: Iterable[str] | None = None
) -> list[dict]:
    """The queries to evaluate: only tasks in ``pool`` and in ``tasks`` (when given), at most ``limit`` per task.

    Raises:
        RetrievalError: a name in ``tasks`` that no query has (a typo would silently drop a task).
    """
    wanted = None if tasks is None else set(tasks)
    if wanted is not None and (unknown := sorted(wanted - {query["task"] for query in queries})):
        raise RetrievalError(f"tasks {unknown[:5]} have no queries; fix the tasks file (one task name per line).")
    kept: dict[str, int] = defaultdict(int)
    out = []
    for query in queries:
        if (pool is not None and query["task"] not in pool) or (wanted is not None and query["task"] not in wanted):
            continue
        if limit is None or kept[query["task"]] < limit:
            kept[query["task"]] += 1
            out.append(query)
    return out


def evaluate_composites(
    lm,
    queries: Sequence[dict],
    sizes: Sequence[int],
    methods: Sequence[str],
    *,
    n_prompts: int = 20,
    max_new_tokens: int = 32,
    route_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`evaluate_composite` for composite prompts of each number of tasks in ``sizes``
    (``n_prompts`` at most per size; ``n_composites`` says how many the queries made, each query
    used once at most)."""
    report: dict[str, Any] = {"composite": {}, "n_prompts": n_prompts, "n_composites": {}}
    for n in sizes:
        composites = build_composites(queries, n, n_prompts)
        report["n_composites"][str(n)] = len(composites)
        report["composite"][str(n)] = evaluate_composite(
            lm,
            composites,
            methods,
            max_new_tokens=max_new_tokens,
            route_options=route_options or {},
            log=log,
        )
    return report


def evaluate_own_tasks(lm, splits: dict[str, dict], max_new_tokens: int = 16) -> dict[str, Any]:
    """Normalised exact match of the base model and of each task's own LoRA on its test split."""
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
