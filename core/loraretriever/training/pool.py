"""One LoRA per task split, stored as a pool directory with cards (``loraretriever train-pool``).

Resumable adapter by adapter (a task whose adapter is stored is skipped). Adapters are saved in
float16 to keep a committed pool small; the pool casts them to the model's dtype on load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraretriever.engine.base_model import model_source
from loraretriever.pool.adapter import SAFETENSORS_FILE
from loraretriever.pool.directory import adapter_dirs, store_adapter
from loraretriever.pool.layout import PoolLayout
from loraretriever.pool.manifest import check_pool_model, record_pool_model, record_prompt_format
from loraretriever.retrieval.cards import AdapterCard, CardStore
from loraretriever.training.lora import LoraTrainingConfig, train_lora

__all__ = ["train_pool"]


def train_pool(
    model, tokenizer, splits: dict[str, dict], out: Path, config: LoraTrainingConfig, log=print
) -> list[str]:
    """Trains the LoRAs that are not stored yet; writes their cards. Returns the tasks trained now."""
    cards = CardStore(PoolLayout(out).cards)
    if not check_pool_model(out, model, model_source(model)):  # refuses a resumed pool of another model
        record_pool_model(out, model, model_source(model))
    record_prompt_format(out, "chat" if config.chat_template else "plain")  # the LLM classes follow it
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
