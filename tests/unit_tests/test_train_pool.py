"""train-pool on a tiny Llama: float16 PEFT adapters + cards, resumable, own-task evaluation."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from loraretriever.evaluation.tasks import evaluate_own_tasks, score
from loraretriever.pool.directory import adapter_dirs
from loraretriever.pool.manifest import model_fingerprint, read_manifest
from loraretriever.retrieval.cards import CardStore
from loraretriever.retrieval.queries import load_splits
from loraretriever.serving.routed_lm import RoutedLM
from loraretriever.training.lora import LoraTrainingConfig
from loraretriever.training.pool import train_pool


def _split(task: str, kind: str) -> dict:
    rows = [{"inputs": f"{task} item {i}", "targets": f"answer {i % 3}"} for i in range(12)]
    return {"task": task, "kind": kind, "metric": "em", "train": rows[:6], "cards": rows[6:9], "test": rows[9:]}


def test_train_pool_writes_loadable_float16_adapters_and_cards(tiny_lm, smol_tokenizer, tmp_path):
    splits_dir = tmp_path / "splits"
    splits_dir.mkdir()
    for task, kind in (("alpha", "classification"), ("beta", "short QA")):
        (splits_dir / f"{task}.json").write_text(json.dumps(_split(task, kind)))
    splits = load_splits(splits_dir)
    out = tmp_path / "pool"
    config = LoraTrainingConfig(steps=2, batch_size=2)
    assert train_pool(tiny_lm, smol_tokenizer, splits, out, config, log=lambda _: None) == ["alpha", "beta"]
    assert train_pool(tiny_lm, smol_tokenizer, splits, out, config, log=lambda _: None) == [], "resumable"
    manifest = read_manifest(out)
    assert manifest["base_model"]["fingerprint"] == model_fingerprint(tiny_lm) and manifest["prompt_format"] == "chat"
    assert sorted(adapter_dirs(out)) == ["alpha", "beta"]
    weights = load_file(adapter_dirs(out)["alpha"] / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    cards = CardStore(out / "cards")
    assert cards.get("beta").domain == "short QA" and len(cards.get("beta").samples) == 3

    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=out, embedder=None)
    try:
        assert lm.pool.get("alpha").modules  # float16 on disk and in the pool's cache; cast per use
        assert next(iter(lm.pool.get("alpha").modules.values())).A.dtype == torch.float16
        report = evaluate_own_tasks(lm, splits, max_new_tokens=2)
        prompts = [e["inputs"] for e in splits["alpha"]["test"]]
        pinned = lm.generate(prompts, adapters=["alpha"], max_new_tokens=2, chat_template=True)
        targets = [e["targets"] for e in splits["alpha"]["test"]]
        expected = sum(score("em", r.text, t) for r, t in zip(pinned, targets, strict=True)) / len(targets)
    finally:
        lm.close()
    assert report["n_tasks"] == 2 and set(report["tasks"]) == {"alpha", "beta"}
    assert report["tasks"]["alpha"]["n_test"] == 3 and report["tasks"]["alpha"]["lora_em"] == round(expected, 3)
