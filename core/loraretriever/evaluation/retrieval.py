"""Retrieval accuracy on the paper's files: does each prompt reach its own task's LoRA?

Cards come in the paper's ``lora_samples.json`` format and queries in its ``test_dev.json``
format, so any such file works. The evaluation builds a throwaway in-memory index; it never
touches a user's pool.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from loraretriever.retrieval.cards import AdapterCard, RetrievalError, check_task_names
from loraretriever.retrieval.embedder import Embedder
from loraretriever.retrieval.router import Router

__all__ = ["SPLITS", "evaluate_retrieval", "read_task_names", "split_queries"]

Split = Literal["all", "even", "odd"]
MAX_CONFUSIONS = 20  # the most frequent (task, routed_to) misses an evaluation reports
SPLITS: tuple[str, ...] = ("all", "even", "odd")


def split_queries(queries: Sequence[dict[str, Any]], split: Split) -> list[dict[str, Any]]:
    """Every other query of each task: ``even`` keeps the 0th, 2nd, ... of each task, ``odd`` the rest.

    Tune on one half and report on the other.

    Example:
        >>> qs = [{"inputs": str(i), "task": t} for i, t in enumerate("aabab")]
        >>> [q["inputs"] for q in split_queries(qs, "even")], [q["inputs"] for q in split_queries(qs, "odd")]
        (['0', '2', '3'], ['1', '4'])
    """
    if split not in SPLITS:
        raise RetrievalError(f"split={split!r} is not one of {SPLITS}.")
    if split == "all":
        return list(queries)
    seen: Counter[str] = Counter()
    out = []
    for query in queries:
        position = seen[query["task"]]
        seen[query["task"]] += 1
        if (position % 2 == 0) == (split == "even"):
            out.append(query)
    return out


def read_task_names(path: str | Path) -> list[str]:
    """Task names from a text file, one per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"tasks file {str(path)!r} does not exist.")
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [name for name in names if name]
    if not names:
        raise RetrievalError(f"tasks file {str(path)!r} names no tasks (one name per line).")
    return names


def evaluate_retrieval(
    cards: Sequence[AdapterCard],
    queries: Sequence[dict[str, Any]],
    *,
    embedder: Embedder | str | Path | None = None,
    top_k: int = 3,
    exclude_own_task: bool = False,
    tasks: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Routes every query over the cards and scores the routings against the queries' own tasks.

    Args:
        cards: One card per task (``model_name`` = task).
        queries: ``{"inputs", "task", "domain", ...}`` objects.
        embedder: The embedder (default: all-MiniLM-L6-v2), or a model id / directory.
        top_k: Adapters retrieved per query; ``top3`` counts the own task within these.
        exclude_own_task: The paper's out-of-domain protocol: each query's own task is no candidate
            (then only ``domain_top1`` is meaningful).
        tasks: Only score queries of these tasks (the unseen-task experiment); all cards stay candidates.

    Returns:
        ``n``, ``top1``, ``top3`` (own task within the top ``top_k``), ``domain_top1`` (the top-1
        adapter's domain is the query's), ``per_domain`` (``n``, ``top1``, ``top3``,
        ``domain_top1`` per domain), ``confusions`` (the most frequent misses, ``{"task",
        "routed_to", "n"}``: which tasks a router cannot tell apart), plus the settings and the time taken.

    Raises:
        RetrievalError: a query whose task has no card, an unknown task in ``tasks``, or no queries left.
    """
    started = time.perf_counter()
    domains = _card_domains(cards, queries)  # from all queries, before any filtering
    card_names = {card.name for card in cards}
    if tasks is not None:
        tasks = check_task_names(tasks, cards)
        queries = [query for query in queries if query["task"] in tasks]
    if not queries:
        raise RetrievalError("no queries to evaluate (check --tasks-file and --split).")
    missing = sorted({query["task"] for query in queries} - card_names)
    if missing:
        raise RetrievalError(f"queries of tasks {missing[:5]} have no card among the {len(card_names)} cards.")
    if not isinstance(embedder, Embedder):
        embedder = Embedder(embedder)
    prompts = [query["inputs"] for query in queries]
    exclude = [[query["task"]] for query in queries] if exclude_own_task else None
    with Router.from_cards(cards, embedder=embedder) as router:
        routings = router.route(prompts, top_k=top_k, exclude=exclude)

    totals: dict[str, Counter[str]] = defaultdict(Counter)
    misses: Counter[tuple[str, str]] = Counter()
    for query, routing in zip(queries, routings, strict=True):
        domain = query.get("domain") or domains.get(query["task"], "?")
        hit1 = bool(routing.adapters) and routing.adapters[0] == query["task"]
        if routing.adapters and not hit1:
            misses[query["task"], routing.adapters[0]] += 1
        hitk = query["task"] in routing.adapters
        dom1 = bool(routing.adapters) and domains.get(routing.adapters[0]) == domain
        for key in ("_all", domain):
            totals[key].update(n=1, top1=hit1, topk=hitk, domain_top1=dom1)

    def score(counts: Counter[str]) -> dict[str, Any]:
        n = counts["n"]
        return {
            "n": n,
            "top1": round(counts["top1"] / n, 4),
            "top3": round(counts["topk"] / n, 4),
            "domain_top1": round(counts["domain_top1"] / n, 4),
        }

    overall = score(totals.pop("_all"))
    return {
        **overall,
        "top_k": top_k,
        "per_domain": {domain: score(counts) for domain, counts in sorted(totals.items())},
        "confusions": [
            {"task": task, "routed_to": routed_to, "n": n}
            for (task, routed_to), n in sorted(misses.items(), key=lambda item: (-item[1], item[0]))[:MAX_CONFUSIONS]
        ],
        "embedder": embedder.name,
        "instruction": embedder.instruction,
        "n_cards": len(cards),
        "exclude_own_task": exclude_own_task,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _card_domains(cards: Sequence[AdapterCard], queries: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Each card's domain: its own, else the most common domain of its task's queries."""
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for query in queries:
        if query.get("domain"):
            votes[query["task"]][query["domain"]] += 1
    out = {task: counts.most_common(1)[0][0] for task, counts in votes.items()}
    out.update({card.name: card.domain for card in cards if card.domain})
    return out
