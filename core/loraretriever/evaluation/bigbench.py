"""Task splits from BIG-bench (Apache-2.0) for the demo LoRA pool, read straight from the sdist.

BIG-bench ships on PyPI as ``bigbench==1.0.0``: a 358 MB sdist holding 1,041 ``task.json`` files.
``pip download`` fails on it (its metadata names a ``file://`` dependency), so the sdist is fetched
from PyPI's simple index and checked against the sha256 the index gives. Each chosen task becomes
deterministic, non-overlapping ``train`` / ``cards`` / ``test`` splits of ``{"inputs", "targets"}``:

* ``target`` examples keep their (first) target;
* ``target_scores`` (multiple choice) examples list the options after the input, in an order
  shuffled deterministically per input (BIG-bench often lists the right option first, which a LoRA
  would learn instead of the task), and the target is the best-scoring option's text.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tarfile
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEMO_BIGBENCH_TASKS", "TaskSplits", "fetch_sdist", "make_splits", "read_task_files", "to_examples"]

SDIST_NAME = "bigbench-1.0.0.tar.gz"
SIMPLE_INDEX = "https://pypi.org/simple/bigbench/"
ATTRIBUTION = (
    "Derived from BIG-bench (https://github.com/google/BIG-bench), Apache License 2.0, "
    "as published on PyPI as bigbench==1.0.0."
)
# Short inputs and short, checkable answers, across kinds; >= 200 examples each.
DEMO_BIGBENCH_TASKS: dict[str, str] = {
    "sports_understanding": "classification",
    "strategyqa": "classification",
    "metaphor_boolean": "classification",
    "anachronisms": "classification",
    "misconceptions": "classification",
    "implicatures": "classification",
    "navigate": "classification",
    "hyperbaton": "classification",
    "winowhy": "classification",
    "epistemic_reasoning": "classification",
    "presuppositions_as_nli": "classification",
    "intent_recognition": "multiple choice",
    "disambiguation_qa": "multiple choice",
    "movie_recommendation": "multiple choice",
    "ruin_names": "multiple choice",
    "social_iqa": "multiple choice",
    "date_understanding": "multiple choice",
    "geometric_shapes": "multiple choice",
    "logical_fallacy_detection": "multiple choice",
    "language_identification": "multiple choice",
    "temporal_sequences": "multiple choice",
    "reasoning_about_colored_objects": "multiple choice",
    "qa_wikidata": "short QA",
    "object_counting": "short QA",
    "operators": "short QA",
    "auto_categorization": "short QA",
    "word_unscrambling": "transformation",
    "word_sorting": "transformation",
    "tense": "transformation",
}


@dataclass(frozen=True)
class TaskSplits:
    """One task's non-overlapping splits."""

    task: str
    kind: str
    train: list[dict[str, str]] = field(metadata={"help": "Examples to train the task's LoRA on."})
    cards: list[dict[str, str]] = field(metadata={"help": "Sample inputs that represent the LoRA (20)."})
    test: list[dict[str, str]] = field(metadata={"help": "Held-out prompts to evaluate on."})
    metric: str = "em"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "kind": self.kind,
            "metric": self.metric,
            "source": ATTRIBUTION,
            "train": self.train,
            "cards": self.cards,
            "test": self.test,
        }


def fetch_sdist(directory: str | Path) -> Path:
    """The BIG-bench sdist in ``directory``, downloaded from PyPI (sha256-checked) if absent."""
    target = Path(directory) / SDIST_NAME
    if target.is_file():
        return target
    page = urllib.request.urlopen(SIMPLE_INDEX, timeout=60).read().decode()
    match = re.search(rf'href="([^"]*/{re.escape(SDIST_NAME)})#sha256=([0-9a-f]{{64}})"', page)
    if match is None:
        raise FileNotFoundError(f"{SDIST_NAME} is not listed on {SIMPLE_INDEX}; download it by hand into {directory}.")
    url, sha256 = match.groups()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as response, partial.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ValueError(f"{url} did not match its sha256 {sha256}; the download was discarded.")
    partial.rename(target)
    return target


def read_task_files(sdist: str | Path, tasks: set[str] | None = None) -> Iterator[tuple[str, dict]]:
    """``(task, task.json content)`` for the top-level JSON tasks in the sdist (no subtasks)."""
    with tarfile.open(sdist) as archive:
        for member in archive:
            parts = member.name.split("/")
            if len(parts) != 5 or parts[2] != "benchmark_tasks" or parts[4] != "task.json":
                continue
            if tasks is not None and parts[3] not in tasks:
                continue
            yield parts[3], json.load(archive.extractfile(member))


def to_examples(task_json: Mapping[str, Any]) -> list[dict[str, str]]:
    """The task's examples as ``{"inputs", "targets"}``, duplicates of an input dropped."""
    examples, seen = [], set()
    for example in task_json.get("examples", []):
        text = str(example.get("input", "")).strip()
        if not text or text in seen:
            continue
        if "target_scores" in example:
            options = list(example["target_scores"])
            if not options:
                continue
            best = max(options, key=lambda o: example["target_scores"][o])
            random.Random(hashlib.sha256(text.encode()).hexdigest()).shuffle(options)
            text = text + "\nOptions:\n" + "\n".join(f"- {o}" for o in options)
            target = best
        else:
            target = example.get("target")
            if isinstance(target, list):
                target = target[0] if target else None
            if not isinstance(target, str) or not target.strip():
                continue
        seen.add(str(example.get("input", "")).strip())
        examples.append({"inputs": text, "targets": str(target).strip()})
    return examples


def make_splits(
    task: str,
    kind: str,
    examples: list[dict[str, str]],
    *,
    n_cards: int = 20,
    n_test: int = 50,
    n_train: int = 200,
    seed: int = 0,
) -> TaskSplits:
    """Deterministic, non-overlapping splits (test first, then cards, then train).

    Raises:
        ValueError: fewer examples than ``n_cards + n_test + 1``.
    """
    if len(examples) < n_cards + n_test + 1:
        raise ValueError(
            f"task {task!r} has {len(examples)} usable examples; it needs at least {n_cards + n_test + 1} "
            f"({n_test} test + {n_cards} card samples + training)."
        )
    order = list(examples)
    random.Random(f"{seed}:{task}").shuffle(order)
    test, cards = order[:n_test], order[n_test : n_test + n_cards]
    train = order[n_test + n_cards : n_test + n_cards + n_train]
    return TaskSplits(task, kind, train=train, cards=cards, test=test)


def write_splits(
    sdist: Path, out_dir: Path, tasks: Mapping[str, str] = DEMO_BIGBENCH_TASKS, seed: int = 0
) -> list[str]:
    """Writes ``out_dir/<task>.json`` for every task; returns the tasks written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, task_json in read_task_files(sdist, set(tasks)):
        splits = make_splits(task, tasks[task], to_examples(task_json), seed=seed)
        (out_dir / f"{task}.json").write_text(json.dumps(splits.to_dict(), ensure_ascii=False, indent=0))
        written.append(task)
    missing = sorted(set(tasks) - set(written))
    if missing:
        raise ValueError(f"tasks {missing} are not top-level JSON tasks of {sdist.name}.")
    return sorted(written)
