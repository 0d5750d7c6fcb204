"""Instruction fine-tuning of the retriever's embedder (the paper's contrastive recipe, on CPU).

Pairs are ``(instruction + text, instruction + another text of the same task)``: sample-sample
pairs from the cards, plus optional extra queries paired with a sample of their task. The loss is
``MultipleNegativesRankingLoss`` (in-batch negatives); a batch sampler puts at most one pair of
each task in a batch, so that every in-batch negative comes from another task. Only a chosen
fraction of the tasks is trained on, which makes the paper's unseen-task experiment possible.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

from loraretriever.engine.extras import import_optional
from loraretriever.retrieval.cards import AdapterCard, RetrievalError, check_task_names
from loraretriever.retrieval.embedder import DEFAULT_INSTRUCTION, EMBEDDER_INFO_FILE, Embedder

__all__ = ["DistinctTaskBatchSampler", "choose_tasks", "make_pairs", "train_retriever"]

logger = logging.getLogger(__name__)

TRAIN_TASKS_FILE = "train_tasks.txt"
HELDOUT_TASKS_FILE = "heldout_tasks.txt"


def choose_tasks(task_names: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded random ``fraction`` of the tasks (at least one), sorted.

    Example:
        >>> choose_tasks(["a", "b", "c", "d", "e"], 0.4, seed=0)
        ['d', 'e']
    """
    if not 0.0 < fraction <= 1.0:
        raise RetrievalError(f"train fraction {fraction!r} must lie in (0, 1], e.g. 0.4 for 40% of the tasks.")
    names = sorted(set(task_names))
    count = max(1, round(fraction * len(names)))
    return sorted(random.Random(seed).sample(names, count))


def make_pairs(
    cards: Sequence[AdapterCard],
    queries: Sequence[dict[str, Any]] = (),
    *,
    pairs_per_sample: int = 1,
    seed: int = 0,
) -> tuple[list[str], list[str], list[int]]:
    """Anchors, positives and task ids of the training pairs (no instruction prefix yet).

    Each sample is paired ``pairs_per_sample`` times with another sample of its card; each query
    with a sample of its task's card. Queries of tasks without a card are skipped.
    """
    rng = random.Random(seed)
    task_ids = {card.name: i for i, card in enumerate(cards)}
    anchors: list[str] = []
    positives: list[str] = []
    labels: list[int] = []
    for card in cards:
        if len(card.samples) < 2 and not queries:
            raise RetrievalError(f"card {card.name!r} has one sample; contrastive training needs two per task.")
        for i, sample in enumerate(card.samples):
            others = [s for j, s in enumerate(card.samples) if j != i]
            for _ in range(pairs_per_sample if others else 0):
                anchors.append(sample)
                positives.append(rng.choice(others))
                labels.append(task_ids[card.name])
    by_name = {card.name: card for card in cards}
    for query in queries:
        card = by_name.get(query["task"])
        if card is not None:
            anchors.append(query["inputs"])
            positives.append(rng.choice(card.samples))
            labels.append(task_ids[card.name])
    return anchors, positives, labels


class DistinctTaskBatchSampler(DefaultBatchSampler):
    """Shuffled batches in which no two pairs share a task (so in-batch negatives are true negatives)."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        labels: Sequence[int],
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
        )
        if len(labels) != len(dataset):
            raise RetrievalError(f"{len(labels)} labels for a dataset of {len(dataset)} pairs.")
        self.labels = list(labels)

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(int(self.seed) + int(getattr(self, "epoch", 0)))
        remaining = torch.randperm(len(self.labels), generator=generator).tolist()
        batches = []
        while remaining:
            batch: list[int] = []
            seen: set[int] = set()
            rest: list[int] = []
            for index in remaining:
                if len(batch) < self.batch_size and self.labels[index] not in seen:
                    batch.append(index)
                    seen.add(self.labels[index])
                else:
                    rest.append(index)
            if len(batch) < 2 or (self.drop_last and len(batch) < self.batch_size):
                break  # a lone pair has no negatives
            batches.append(batch)
            remaining = rest
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


def train_retriever(
    cards: Sequence[AdapterCard],
    out: str | Path,
    *,
    queries: Sequence[dict[str, Any]] = (),
    train_fraction: float = 1.0,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    base: str | Path | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    epochs: float = 1.0,
    batch_size: int = 32,
    learning_rate: float = 5e-5,
    pairs_per_sample: int = 1,
    max_seq_length: int = 128,
    max_steps: int = -1,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Fine-tunes the embedder on a fraction of the tasks and saves it, ready for ``Embedder(out)``.

    Args:
        cards: One card per task (``lora_samples.json``).
        out: The output directory (a sentence-transformers model, plus ``train_tasks.txt``,
            ``heldout_tasks.txt`` and ``loraretriever_embedder.json``).
        queries: Extra ``{"inputs", "task"}`` training queries (e.g. the tuning half of ``test_dev.json``);
            only those of the chosen tasks are used.
        train_fraction: The fraction of tasks trained on, chosen at random with ``seed``.
        tasks: Train on exactly these tasks instead (e.g. one fold of a cross-validation); every
            name must have a card.
        seed: Seeds the task choice, the pairs and the training.
        base: The embedder to start from (default: the packaged all-MiniLM-L6-v2).
        instruction: Prepended to every training text, and recorded for inference.
        epochs: Passes over the pairs.
        batch_size: Pairs per batch (at most one per task, so capped at the number of tasks).
        learning_rate: AdamW's peak learning rate (linear decay, 10% warm-up).
        pairs_per_sample: Pairs formed with each card sample.
        max_seq_length: Truncation while training (speed); the saved model keeps its own limit.
        max_steps: Stop after this many steps (tests); -1 for the full epochs.
        show_progress_bar: The trainer's progress bar.

    Returns:
        A summary: tasks trained on and held out, pair count, steps, seconds, output directory.
    """
    try:
        Dataset = import_optional("datasets").Dataset
    except ImportError as err:
        raise RetrievalError(
            "train-retriever needs the 'datasets' package (sentence-transformers' trainer uses it). "
            "Fix: `pip install datasets`."
        ) from err
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    started = time.perf_counter()
    if batch_size < 2:
        raise RetrievalError(f"batch_size={batch_size!r} must be at least 2 (in-batch negatives).")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RetrievalError(f"output {str(out)!r} exists and is not an empty directory. Fix: choose a new --out.")
    if tasks is None:
        chosen = choose_tasks([card.name for card in cards], train_fraction, seed)
    else:
        chosen = sorted(check_task_names(tasks, cards))
        train_fraction = len(chosen) / len(cards)
    heldout = sorted({card.name for card in cards} - set(chosen))
    train_cards = [card for card in cards if card.name in set(chosen)]
    anchors, positives, labels = make_pairs(train_cards, queries, pairs_per_sample=pairs_per_sample, seed=seed)
    batch_size = min(batch_size, len(train_cards))
    if batch_size < 2:
        raise RetrievalError(
            f"only {len(train_cards)} task(s) chosen; training needs at least 2. Raise --train-fraction."
        )

    embedder = Embedder(base, instruction=instruction, share=False)  # training changes its weights
    model = embedder.model
    full_length = model.max_seq_length
    model.max_seq_length = min(max_seq_length, full_length)
    dataset = Dataset.from_dict(
        {"anchor": [instruction + text for text in anchors], "positive": [instruction + text for text in positives]}
    )

    def sampler(data: Any, **kwargs: Any) -> DistinctTaskBatchSampler:
        return DistinctTaskBatchSampler(data, labels=labels, **kwargs)

    steps_per_epoch = len(DistinctTaskBatchSampler(dataset, batch_size, False, seed=seed, labels=labels))
    with tempfile.TemporaryDirectory(prefix="loraretriever-train-") as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch,
            num_train_epochs=epochs,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=max(1, math.ceil(0.1 * steps_per_epoch * epochs)),
            batch_sampler=sampler,
            seed=seed,
            data_seed=seed,
            save_strategy="no",
            report_to="none",
            logging_steps=max(1, steps_per_epoch // 5),
            disable_tqdm=not show_progress_bar,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model)
        )
        result = trainer.train()

    model.max_seq_length = full_length
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    summary = {
        "base": embedder.name,
        "instruction": instruction,
        "train_tasks": chosen,
        "heldout_tasks": heldout,
        "train_fraction": train_fraction,
        "seed": seed,
        "pairs": len(anchors),
        "queries_used": len(anchors) - sum(len(c.samples) for c in train_cards) * pairs_per_sample,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "steps": int(result.global_step),
        "train_loss": round(float(result.training_loss), 4),
        "seconds": None,
        "out": str(out),
    }
    try:
        model.save(str(staging))
        (staging / TRAIN_TASKS_FILE).write_text("\n".join(chosen) + "\n")
        (staging / HELDOUT_TASKS_FILE).write_text("\n".join(heldout) + ("\n" if heldout else ""))
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (staging / EMBEDDER_INFO_FILE).write_text(json.dumps(summary, indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared
        shutil.move(str(staging), str(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved the fine-tuned embedder to %s (%d steps)", out, summary["steps"])
    return summary
