"""The engine on the real default model (SmolLM2-135M-Instruct, float32) with real PEFT adapters."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine.generation import Generator
from loraretriever.engine.requests import GenerationConfig

pytestmark = pytest.mark.slow

ADAPTERS = {
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "attn_r4": dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp_r16": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def adapter_dirs(smollm, tmp_path_factory):
    model, _ = smollm
    root = tmp_path_factory.mktemp("smollm_adapters")
    dirs = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs), adapter_name=name)
        with torch.no_grad():  # PEFT's random B is large; keep the adapters in a realistic range
            for module in peft_model.modules():
                if hasattr(module, "lora_B") and name in module.lora_B:
                    module.lora_B[name].weight.mul_(0.05)
        peft_model.save_pretrained(root)  # PEFT saves a named (non-default) adapter under root/<name>
        peft_model.unload()  # restores the plain Linear layers of the shared base model
        dirs[name] = root / name
    assert not any("lora" in n for n, _ in model.named_modules())
    return dirs


@pytest.fixture(scope="module")
def engine(smollm, adapter_dirs):
    model, tokenizer = smollm
    pool = LoraPool(model)
    for name, path in adapter_dirs.items():
        pool.add(path, name=name)
    composer = Composer(model, pool)
    yield Generator(model, tokenizer, composer)
    composer.remove_hooks()


PROMPTS = [
    "Translate to German: The weather is nice today.",
    "Is the sentiment of this review positive or negative? The plot was dull.",
    "Answer the question: who wrote Hamlet?",
    "List three fruits.",
]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_each_adapter_equals_peft_on_smollm(smollm, engine, adapter_dirs, name):
    """Every adapted layer's output equals PEFT's LoRA layer at 1e-5; the logits after 30 layers too,
    within float32 rounding (both are ~1e-4 from a float64 run, as bmm and PEFT's linear sum in
    different orders for some shapes)."""
    model, tokenizer = smollm
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    routings = [Routing.pinned([name])] * len(PROMPTS)
    x = torch.randn(len(PROMPTS), 7, model.config.intermediate_size, generator=torch.Generator().manual_seed(0))
    layers = dict(model.named_modules())
    layer_inputs = {m: x[..., : layers[m].in_features] for m in engine.composer.pool.get(name).modules}
    with torch.no_grad(), engine.composer.apply(routings):
        ours = model(**batch).logits
        ours_layers = {m: layers[m](inputs) for m, inputs in layer_inputs.items()}
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[name], adapter_name=name)
    try:
        peft_layers = dict(peft_model.base_model.model.named_modules())
        with torch.no_grad():
            reference = peft_model(**batch).logits
            for module, output in ours_layers.items():
                expected = peft_layers[module](layer_inputs[module])
                torch.testing.assert_close(output, expected, atol=1e-5, rtol=0, msg=module)
    finally:
        peft_model.unload()
    assert len(ours_layers) == 30 * len(ADAPTERS[name]["target_modules"])
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], reference[mask], atol=1e-4, rtol=0)
    with torch.no_grad():
        base = model(**batch).logits
    assert (ours[mask] - base[mask]).abs().max() > 0.1


def test_mixed_batch_logits_equal_rows_alone(smollm, engine):
    """Each row of a mixed batch against the same row run alone.

    Different batch shapes take different float32 kernel paths, so the two differ by rounding only:
    both are within ~1e-4 of a float64 run on these logits (|logit| up to ~30), so 3e-4 (1e-5 relative)
    bounds their difference.
    """
    model, tokenizer = smollm
    routings = [
        Routing.pinned(["qv_r8"]),
        Routing(("attn_r4", "mlp_r16"), (0.6, 0.4)),
        Routing(("mlp_r16", "qv_r8"), (0.5, 0.5), mode="fusion"),
        Routing.base(),
    ]
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), engine.composer.apply(routings):
        mixed = model(**batch).logits
    for row, routing in enumerate(routings):
        alone_inputs = tokenizer(PROMPTS[row : row + 1], return_tensors="pt")
        with torch.no_grad(), engine.composer.apply([routing]):
            alone = model(**alone_inputs).logits[0]
        mask = batch["attention_mask"][row].bool()
        torch.testing.assert_close(mixed[row][mask], alone, atol=3e-4, rtol=0)


def test_mixed_batch_generation_equals_rows_alone(engine):
    routings = [
        Routing(("qv_r8", "attn_r4", "mlp_r16"), (0.5, 0.3, 0.2)),
        Routing(("mlp_r16", "qv_r8"), (0.5, 0.5), mode="fusion"),
        Routing.base(),
        Routing(("attn_r4", "qv_r8"), (0.9, 0.1), mode="single"),
    ]
    config = GenerationConfig(max_new_tokens=16, chat_template=True)
    batch = engine.generate(PROMPTS, routings, config)
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], [routings[i]], config)[0]
        assert batch[i].text == alone.text, f"row {i} ({routings[i]})"
        assert batch[i].completion_tokens > 0
    base_answer = engine.generate(PROMPTS[2:3], config=config)[0]
    assert base_answer.text == batch[2].text
    assert "Shakespeare" in base_answer.text
