"""Prompts with their tasks, from the paper's query files or from a directory of task splits.

Two formats, one loader (:func:`load_queries`):

* a JSON list of ``{"inputs", "task", ...}`` objects, the paper's ``test_dev.json``;
* a directory of ``<task>.json`` splits (``loraretriever bigbench-splits``), each
  ``{"task", "kind", "metric", "<split>": [{"inputs", "targets"}, ...]}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loraretriever.retrieval.cards import RetrievalError, read_json

__all__ = ["load_queries", "load_split_queries", "load_splits"]


def load_splits(splits_dir: str | Path, tasks: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every ``<task>.json`` of a splits directory, by task name (all tasks, or ``tasks`` in that order).

    Raises:
        RetrievalError: no splits in ``splits_dir``, or a task without a split.
    """
    splits_dir = Path(splits_dir)
    splits = {f.stem: read_json(f, "splits") for f in sorted(splits_dir.glob("*.json"))}
    if not splits:
        raise RetrievalError(
            f"no <task>.json splits in {str(splits_dir)!r}. Fix: run `loraretriever bigbench-splits --out DIR`."
        )
    if tasks is None:
        return splits
    tasks = list(tasks)
    unknown = sorted(set(tasks) - set(splits))
    if unknown:
        raise RetrievalError(f"tasks {unknown} have no split in {str(splits_dir)!r}; it has {sorted(splits)}.")
    return {task: splits[task] for task in tasks}


def load_split_queries(
    splits_dir: str | Path, split: str = "test", tasks: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """One split of every task as queries ``{"inputs", "targets", "task", "domain", "metric"}``.

    The task's kind is its domain; tasks come in name order.

    Example:
        >>> queries = load_split_queries("data/bigbench", "test")  # doctest: +SKIP
        >>> sorted(queries[0])  # doctest: +SKIP
        ['domain', 'inputs', 'metric', 'targets', 'task']
    """
    queries = []
    for name, data in sorted(load_splits(splits_dir, tasks).items()):
        if split not in data:
            have = [key for key, value in data.items() if isinstance(value, list)]
            raise RetrievalError(f"task {name!r} in {str(splits_dir)!r} has no split {split!r}; it has {have}.")
        metric = data.get("metric", "em")
        queries += [{**e, "task": data["task"], "domain": data["kind"], "metric": metric} for e in data[split]]
    return queries


def load_queries(source: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """Queries from a JSON list (``test_dev.json``) or a splits directory (its ``split``).

    Every query has at least ``inputs`` (a string) and ``task``.

    Raises:
        RetrievalError: a missing or malformed file, naming the file and the bad item.
    """
    path = Path(source)
    if path.is_dir():
        return load_split_queries(path, split)
    data = read_json(path, "queries")
    if not isinstance(data, list):
        raise RetrievalError(f"queries file {str(path)!r} must hold a JSON list, not {type(data).__name__}.")
    for i, item in enumerate(data):
        if not isinstance(item, Mapping) or not isinstance(item.get("inputs"), str) or "task" not in item:
            raise RetrievalError(f"queries file {str(path)!r}: item {i} ({item!r:.80}) needs 'inputs' and 'task'.")
    return data
