"""Shared fixtures: real models built or loaded once per session, real PEFT adapters on disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TINY_CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_peft_adapter(
    model: torch.nn.Module,
    directory: Path,
    *,
    r: int = 4,
    alpha: int | None = None,
    targets: list[str] | None = None,
    seed: int = 0,
    **config_kwargs,
) -> Path:
    """Writes a real PEFT LoRA adapter for ``model`` (random, non-zero A and B) and returns its dir."""
    torch.manual_seed(seed)
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        target_modules=targets or ["q_proj", "v_proj"],
        init_lora_weights=False,  # random B too, so the adapter changes outputs
        **config_kwargs,
    )
    get_peft_model(clone, config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(TINY_CONFIG).eval()


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three adapters of different ranks, alphas and target modules."""
    root = tmp_path_factory.mktemp("tiny_adapters")
    return {
        "q_only": save_peft_adapter(tiny_model, root / "q_only", r=2, alpha=3, targets=["q_proj"], seed=1),
        "qv": save_peft_adapter(tiny_model, root / "qv", r=4, seed=2),
        "all": save_peft_adapter(tiny_model, root / "all", r=8, alpha=4, targets=ALL_LINEAR, seed=3),
    }


@pytest.fixture
def make_adapter(tiny_model, tmp_path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def make(name: str | None = None, **kwargs) -> Path:
        return save_peft_adapter(tiny_model, tmp_path / (name or f"adapter{next(counter)}"), **kwargs)

    return make


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer (no model weights needed), padding on the left."""
    from transformers import AutoTokenizer

    from loraretriever.base_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def tiny_lm(smol_tokenizer) -> LlamaForCausalLM:
    """A tiny random Llama with SmolLM2's vocabulary and a 64-token context, for fast generation tests."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **{
            **TINY_CONFIG.to_dict(),
            "vocab_size": len(smol_tokenizer),
            "max_position_embeddings": 64,
            "eos_token_id": smol_tokenizer.eos_token_id,
            "pad_token_id": smol_tokenizer.pad_token_id,
        }
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_lm_adapters(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lm_adapters")
    return {
        "a": save_peft_adapter(tiny_lm, root / "a", r=4, seed=1, targets=["q_proj", "v_proj", "o_proj"]),
        "b": save_peft_adapter(tiny_lm, root / "b", r=8, seed=2, targets=["gate_proj", "down_proj"]),
    }


@pytest.fixture(scope="session")
def smollm():
    """The default base model (SmolLM2-135M-Instruct, float32) and tokenizer, loaded once."""
    from loraretriever import load_base_model

    return load_base_model()


# ---- retrieval fixtures (below this line) ------------------------------------------------------
