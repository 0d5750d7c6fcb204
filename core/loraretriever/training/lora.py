"""Training one task LoRA with PEFT on (input, target) pairs, on the CPU in minutes.

The prompt is formatted as the model will see it at serving time (the chat template, by default);
the loss covers only the target tokens and the end-of-turn token, so the adapter learns to answer
and to stop.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["LoraTrainingConfig", "collate", "encode_example", "format_prompt", "train_lora"]


@dataclass(frozen=True)
class LoraTrainingConfig:
    """How one LoRA is trained."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    targets: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "Adapted Linear layers."})
    steps: int = field(default=20, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Examples per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate."})
    max_length: int = field(default=160, metadata={"help": "Tokens per example (prompt truncated from the left)."})
    chat_template: bool = field(default=True, metadata={"help": "Format prompts with the model's chat template."})
    seed: int = field(default=0, metadata={"help": "Sampling and initialisation seed."})

    def __post_init__(self) -> None:
        for name in ("r", "alpha", "steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be positive.")


def format_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool) -> str:
    """The prompt text the model sees: the chat template around a user turn, or the raw text."""
    if not chat_template:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    out_dir: str | Path,
    config: LoraTrainingConfig | None = None,
    *,
    description: str = "training",
) -> Path:
    """Trains a LoRA on ``(input, target)`` pairs and saves it in PEFT's format at ``out_dir``.

    The base model is left exactly as it was (the LoRA layers are unloaded after saving).

    Returns:
        ``out_dir``, holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    """
    config = config or LoraTrainingConfig()
    if not examples:
        raise ValueError("train_lora needs at least one (input, target) example.")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    encoded = [encode_example(tokenizer, x, y, config.max_length, config.chat_template) for x, y in examples]
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=list(config.targets), lora_dropout=0.0)
    was_training = model.training
    peft_model = get_peft_model(model, lora)
    try:
        peft_model.train()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.learning_rate)
        progress = tqdm(range(config.steps), desc=description, leave=False)
        for _ in progress:
            batch, labels = collate([rng.choice(encoded) for _ in range(config.batch_size)], tokenizer.pad_token_id)
            # Targets sit at the end of every (left-padded) row, so the vocabulary projection is only
            # needed for the last positions: most of a step's cost on a small model.
            keep = int((labels != -100).sum(-1).max()) + 1
            logits = peft_model(**batch, logits_to_keep=keep).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels[:, -(keep - 1) :].reshape(-1), ignore_index=-100
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            progress.set_postfix(loss=f"{loss.item():.3f}")
        peft_model.save_pretrained(out_dir)
    finally:
        peft_model.unload()
        model.train(was_training)
    return Path(out_dir)


def encode_example(
    tokenizer: PreTrainedTokenizerBase, text: str, target: str, max_length: int, chat_template: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target + end of turn, and labels that are -100 on the prompt.

    The target keeps at most half of ``max_length``; the prompt loses its start if it is too long.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, text, chat_template), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    target_ids = target_ids[: max_length // 2]
    prompt_ids = prompt_ids[-(max_length - len(target_ids)) :]
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Left-padded inputs (with position ids) and labels aligned so that labels[t] is token t."""
    length = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), length), pad_id)
    labels = torch.full((len(items), length), -100)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(items):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        labels[row, length - len(lab) :] = torch.tensor(lab)
        attention[row, length - len(ids) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions}, labels
