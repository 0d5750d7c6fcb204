"""A small demo pool the demo builds itself: task LoRAs trained on the paper's FLAN task samples.

Each LoRA is trained for a few steps on its task's 20 ``lora_samples.json`` examples (the same
inputs are its card), so it learns the task's answer format; ``test_dev.json`` supplies unseen
prompts. Training takes about a minute per task on 2 CPU cores and resumes task by task. The real
demo pool (BIG-bench task LoRAs) supersedes this one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraretriever.cards import AdapterCard, CardStore
from loraretriever.lora_training import LoraTrainingConfig, train_lora
from loraretriever.pool_dir import adapter_dirs, store_adapter

__all__ = [
    "DEMO_TASKS",
    "FLAN48_ENV",
    "build_demo_pool",
    "demo_parser",
    "find_flan48",
    "load_flan48_queries",
    "open_demo_lm",
]

FLAN48_ENV = "LORARETRIEVER_FLAN48"
# Short inputs and short, checkable answers of different kinds.
DEMO_TASKS: dict[str, str] = {
    "sst2": "sentiment",
    "glue_qqp": "paraphrase",
    "snli": "nli",
    "wmt16_translate_deen": "translation",
}


def find_flan48(start: str | Path | None = None) -> Path:
    """The paper's data directory: ``$LORARETRIEVER_FLAN48``, else ``shared/data/loraretriever-flan48``
    in this directory or one of its parents' siblings (``../shared`` beside a checkout)."""
    if os.environ.get(FLAN48_ENV):
        path = Path(os.environ[FLAN48_ENV]).expanduser()
    else:
        here = Path(start or Path.cwd()).resolve()
        candidates = [p / "shared" / "data" / "loraretriever-flan48" for p in (here, *here.parents)]
        path = next((c for c in candidates if c.is_dir()), candidates[0])
    if not (path / "lora_samples.json").is_file():
        raise FileNotFoundError(
            f"the paper's FLAN data is not at {str(path)!r}. Fix: set {FLAN48_ENV} to the directory holding "
            "lora_samples.json and test_dev.json."
        )
    return path


def load_flan48_queries(flan_dir: Path, tasks: Mapping[str, str] | None = None) -> list[dict]:
    """``test_dev.json`` prompts, optionally only those of ``tasks``."""
    queries = json.loads((flan_dir / "test_dev.json").read_text())
    return [q for q in queries if tasks is None or q["task"] in tasks]


def build_demo_pool(
    pool_dir: str | Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    flan_dir: Path,
    tasks: Mapping[str, str] = DEMO_TASKS,
    config: LoraTrainingConfig | None = None,
) -> list[str]:
    """Trains the missing task LoRAs into ``POOL_DIR/adapters`` and writes their cards.

    Returns:
        The names of the LoRAs trained now (empty when the pool was complete).
    """
    config = config or LoraTrainingConfig(steps=16, batch_size=4)
    samples = {
        entry["model_name"]: entry["sample"] for entry in json.loads((flan_dir / "lora_samples.json").read_text())
    }
    unknown = sorted(set(tasks) - set(samples))
    if unknown:
        raise ValueError(f"tasks {unknown} are not in {flan_dir / 'lora_samples.json'}.")
    cards = CardStore(Path(pool_dir) / "cards")
    stored = adapter_dirs(pool_dir)
    trained = []
    for name, domain in tasks.items():
        examples = [(s["inputs"], s["targets"]) for s in samples[name]]
        if name not in stored:
            with tempfile.TemporaryDirectory() as scratch:
                train_lora(model, tokenizer, examples, Path(scratch) / name, config, description=f"LoRA {name}")
                store_adapter(pool_dir, Path(scratch) / name, name)
            trained.append(name)
        if name not in cards:
            cards.put(AdapterCard(name, [x for x, _ in examples], domain=domain, description=f"FLAN task {name}"))
    return trained


def open_demo_lm(
    pool_dir: str | Path | None = None,
    *,
    train_steps: int = 16,
    tasks: Mapping[str, str] = DEMO_TASKS,
    flan_dir: Path | None = None,
    **lm_kwargs,
):
    """The default model with the demo pool (trained on first use, then cached) and its router.

    Args:
        pool_dir: Where the pool lives; default ``$LORARETRIEVER_HOME/demo_pool``.
        train_steps: Optimizer steps per LoRA when one has to be trained.
        tasks: ``{task: domain}`` of the FLAN tasks to include.
        flan_dir: The paper's data directory (default: :func:`find_flan48`).
        **lm_kwargs: Passed to :class:`~loraretriever.routed_lm.RoutedLM`.
    """
    from loraretriever.base_model import load_base_model
    from loraretriever.home import loraretriever_home
    from loraretriever.routed_lm import RoutedLM

    pool_dir = Path(pool_dir) if pool_dir is not None else loraretriever_home() / "demo_pool"
    model, tokenizer = load_base_model()
    config = LoraTrainingConfig(steps=train_steps, batch_size=4)
    build_demo_pool(pool_dir, model, tokenizer, flan_dir or find_flan48(), tasks, config)
    return RoutedLM.from_model(model, tokenizer, pool_dir=pool_dir, **lm_kwargs)


def demo_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line the examples share: where the demo pool lives and how long to train it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--pool-dir", default=None, help="Demo pool directory (default under $LORARETRIEVER_HOME).")
    parser.add_argument("--train-steps", type=int, default=16, help="Steps per LoRA, if one must be trained.")
    return parser
