"""The benchmarks' synthetic workload: task-like prompts and random non-zero LoRAs of the base model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.cards import AdapterCard

__all__ = [
    "PROMPT_SUBJECTS",
    "PROMPT_TEMPLATES",
    "TARGETS",
    "lora_config",
    "random_lora_state_dict",
    "task_pool",
    "timed_in_turns",
    "tokens_per_second",
    "tokens_per_second_in_turns",
]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT_SUBJECTS = [
    "the river",
    "a quiet library",
    "the new phone",
    "our team meeting",
    "a rainy morning",
    "the old bridge",
]
PROMPT_TEMPLATES = [
    "Translate to French: {} was better than expected.",
    "Is the sentiment of this review positive or negative? I loved {}.",
    "Write one sentence about {}.",
    "Answer the question: what is {} known for?",
    "Summarize: {} changed everything for the town last year.",
    "Paraphrase this sentence: {} is closed on Sundays.",
]


def random_lora_state_dict(model: nn.Module, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """PEFT-format LoRA weights on q, k, v, o with non-zero A and B (so they change outputs)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            state[f"base_model.model.{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            )
            state[f"base_model.model.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.02
            )
    return state


def lora_config(rank: int) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS}


def tokens_per_second(fn: Callable[[], int], repeats: int = 2) -> float:
    """Tokens per second, the best of ``repeats`` runs (the first also warms caches and kernels)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def timed_in_turns(methods: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, list[tuple[float, Any]]]:
    """``(seconds, returned value)`` of each method per round: one warm-up run each, then every
    round runs every method once, one after the other."""
    for fn in methods.values():
        fn()
    runs: dict[str, list[tuple[float, Any]]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            value = fn()
            runs[name].append((time.perf_counter() - start, value))
    return runs


def tokens_per_second_in_turns(
    methods: Mapping[str, Callable[[], int]], reference: str, rounds: int = 5
) -> tuple[dict[str, float], dict[str, float]]:
    """Tokens per second of methods timed in turns, and each one's ratio to ``reference``.

    After one warm-up run each, every round runs every method once, one after the other, so a
    method and its reference are timed seconds apart in every round; a ratio is the median over
    rounds of the per-round ratios (a machine whose speed drifts moves both sides of a round alike).

    Returns:
        ``(median tokens/s per method, median ratio to reference per method)``.
    """
    runs = timed_in_turns(methods, rounds)
    rates = {name: [tokens / seconds for seconds, tokens in values] for name, values in runs.items()}
    ratios = {
        name: statistics.median(r / b for r, b in zip(values, rates[reference], strict=True))
        for name, values in rates.items()
    }
    return {name: statistics.median(values) for name, values in rates.items()}, ratios


def task_pool(model: nn.Module, generator: torch.Generator, rank: int = 8) -> tuple[LoraPool, list[AdapterCard]]:
    """One random LoRA per prompt template (a "task"), and its card from that task's prompts."""
    pool = LoraPool(model)
    cards = []
    for i, template in enumerate(PROMPT_TEMPLATES):
        name = f"task{i}"
        pool.add_state_dict(name, lora_config(rank), random_lora_state_dict(model, rank, generator))
        cards.append(AdapterCard(name, [template.format(s) for s in PROMPT_SUBJECTS]))
    return pool, cards
