"""train_lora on a tiny Llama: the adapter learns its examples, loads into the pool, leaves the base intact."""

from __future__ import annotations

import pytest
import torch

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine.generation import Generator
from loraretriever.engine.requests import GenerationConfig
from loraretriever.training.lora import LoraTrainingConfig, train_lora

EXAMPLES = [("Say the magic word.", "banana split"), ("What is the code?", "purple nine")]


def test_trained_lora_answers_its_examples_and_base_is_untouched(tiny_lm, smol_tokenizer, tmp_path):
    before = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    config = LoraTrainingConfig(
        r=8, alpha=16, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), steps=60, learning_rate=1e-2
    )
    path = train_lora(tiny_lm, smol_tokenizer, EXAMPLES, tmp_path / "magic", config)
    after = tiny_lm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "training must not change the base model"
    assert not tiny_lm.training

    pool = LoraPool(tiny_lm)
    pool.add(path)
    composer = Composer(tiny_lm, pool)
    try:
        generator = Generator(tiny_lm, smol_tokenizer, composer)
        cfg = GenerationConfig(max_new_tokens=6, chat_template=True)
        prompts = [x for x, _ in EXAMPLES]
        tuned = generator.generate(prompts, [Routing.pinned(["magic"])] * 2, cfg)
        base = generator.generate(prompts, config=cfg)
    finally:
        composer.remove_hooks()
    assert [c.text for c in tuned] == [y for _, y in EXAMPLES]
    assert all(c.finish_reason == "stop" for c in tuned), "the adapter learned to end its answer"
    assert [c.text for c in base] != [y for _, y in EXAMPLES]


def test_bad_training_settings_are_clear_errors(tiny_lm, smol_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="steps=0"):
        LoraTrainingConfig(steps=0)
    with pytest.raises(ValueError, match="learning_rate=-1"):
        LoraTrainingConfig(learning_rate=-1)
    with pytest.raises(ValueError, match="at least one"):
        train_lora(tiny_lm, smol_tokenizer, [], tmp_path / "none")
