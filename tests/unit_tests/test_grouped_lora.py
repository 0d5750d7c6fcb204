"""The grouped LoRA decoding kernel: what it adds equals PEFT and the batched-matmul path, row by row,
in one pass and through the engine's joins and leaves; anything it cannot serve takes the bmm path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine import composer as composer_module
from loraretriever.engine import grouped_lora
from loraretriever.engine.composer import BatchPlan
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.requests import GenerationConfig
from tests.conftest import TINY_CONFIG

# the kernel is built with the machine's C compiler; without one the bmm path serves (other suites)
pytestmark = pytest.mark.skipif(grouped_lora.c_compiler() is None, reason="no C compiler to build the kernel")

ATOL = 1e-5
MIXED = [  # ranks 2, 4 and 8 on different modules, k = 1 to 3, and a base row
    Routing(("all", "q_only", "qv"), (0.5, 0.3, 0.2)),
    Routing.pinned(["qv"], mode="single"),
    Routing.base(),
    Routing(("q_only", "all"), (0.7, 0.3)),
]


@pytest.fixture(scope="module")
def composer(tiny_model, tiny_pool):
    composer = Composer(tiny_model, tiny_pool)
    yield composer
    composer.remove_hooks()


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the composer's calls of the kernel that did run (a spy: the real kernel runs)."""
    calls: list[int] = []
    real = composer_module.grouped_lora_decode

    def spy(x, out, pairs):
        ran = real(x, out, pairs)
        calls.extend([x.shape[0]] if ran else [])
        return ran

    monkeypatch.setattr(composer_module, "grouped_lora_decode", spy)
    return calls


def one_token_logits(model, composer, plan, tokens) -> torch.Tensor:
    with torch.inference_mode(), composer.use(plan):
        return model(tokens).logits


def without_pairs(plan: BatchPlan) -> BatchPlan:
    layers = {m: dataclasses.replace(p, pairs=None) for m, p in plan.layers.items()}
    return BatchPlan(plan.routings, layers, plan.gated, plan.held)


def test_the_kernel_is_built_and_every_adapted_layer_gets_pairs(composer):
    assert grouped_lora.decode_kernel() is not None, "a C compiler is on this machine: the kernel must build"
    plan = composer.build_plan(MIXED)
    assert plan.layers and all(p.pairs is not None for p in plan.layers.values())
    pairs = plan.layers["model.layers.0.mlp.down_proj"].pairs  # only "all" adapts the MLP
    assert pairs.rank.tolist() == [[8], [0], [0], [8]]  # k: the most pairs a row has here
    torch.testing.assert_close(pairs.weight[0, 0], torch.tensor(0.5 * 4 / 8))  # weight x alpha / r


def test_a_mixed_decoding_step_equals_peft_and_the_bmm_path(tiny_model, tiny_adapters, composer, kernel_calls):
    tokens = torch.randint(0, TINY_CONFIG.vocab_size, (4, 1), generator=torch.Generator().manual_seed(1))
    plan = composer.build_plan(MIXED)
    ours = one_token_logits(tiny_model, composer, plan, tokens)
    assert len(kernel_calls) == len(plan.layers), "every adapted layer of a one-token pass runs the kernel"
    kernel_calls.clear()
    bmm = one_token_logits(tiny_model, composer, without_pairs(plan), tokens)
    assert not kernel_calls
    torch.testing.assert_close(ours, bmm, atol=ATOL, rtol=0)

    base = LlamaForCausalLM(TINY_CONFIG)
    base.load_state_dict(tiny_model.state_dict())
    peft = PeftModel.from_pretrained(base, tiny_adapters["qv"], adapter_name="qv").eval()
    with torch.inference_mode():
        reference = peft(tokens, adapter_names=["qv", "qv", "__base__", "qv"]).logits
        plain = tiny_model(tokens).logits
    torch.testing.assert_close(ours[1:3], reference[1:3], atol=ATOL, rtol=0)  # the single and base rows
    assert (ours[[0, 3]] - plain[[0, 3]]).abs().max() > 1e-2, "the mixtures must change the output"


def test_rows_the_kernel_cannot_serve_take_the_bmm_path(tiny_model, composer, kernel_calls):
    tokens = torch.randint(0, TINY_CONFIG.vocab_size, (4, 1), generator=torch.Generator().manual_seed(2))
    fused = [*MIXED[:3], Routing(("q_only", "all"), (0.7, 0.3), mode="fusion")]
    plan = composer.build_plan(fused)
    assert not plan.paired
    ours = one_token_logits(tiny_model, composer, plan, tokens)
    assert not kernel_calls
    for row, routing in enumerate(fused):
        alone = one_token_logits(tiny_model, composer, composer.build_plan([routing]), tokens[row : row + 1])
        torch.testing.assert_close(ours[row : row + 1], alone, atol=ATOL, rtol=0)
    kernel_calls.clear()  # (the paired rows alone ran it)
    # more than one token per row (a prefill), or autograd recording: the bmm path
    with composer.apply(MIXED), torch.no_grad():
        tiny_model(tokens.repeat(1, 3))
    with composer.apply(MIXED), torch.enable_grad():
        tiny_model(tokens)
    assert not kernel_calls


def test_engine_joins_and_leaves_give_the_same_tokens_as_the_bmm_path(
    tiny_lm, tiny_lm_adapters, smol_tokenizer, kernel_calls, monkeypatch
):
    pool = LoraPool(tiny_lm)
    for name, path in tiny_lm_adapters.items():
        pool.add(path, name=name)
    composer = Composer(tiny_lm, pool)
    prompts = ["Translate: the cat.", "Is it good?", "Name a colour:", "one two three four five six seven"]
    routings = [Routing.pinned(["a"]), Routing.pinned(["b", "a"]), Routing.base(), Routing(("a", "b"), (0.2, 0.8))]

    def run() -> list[str]:
        # a small token budget: prompts are prefilled in several groups and join a decoding batch
        engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_tokens=20))
        requests = [
            engine.new_request(p, GenerationConfig(max_new_tokens=n, ignore_eos=True), r, index=i)
            for i, (p, r, n) in enumerate(zip(prompts, routings, (9, 3, 12, 6), strict=True))
        ]
        return [r.done.text for r in engine.run(requests)]

    try:
        with_kernel = run()
        assert max(kernel_calls) > 1, "rows must have been decoded together by the kernel"
        monkeypatch.setenv(grouped_lora.KERNEL_ENV, "0")
        kernel_calls.clear()
        assert run() == with_kernel
        assert not kernel_calls
    finally:
        composer.remove_hooks()


def test_a_failed_build_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORARETRIEVER_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.raises(RuntimeError, match="false .*grouped_lora.c"):
        grouped_lora._build()
    assert not list((tmp_path / "kernels").iterdir()), "a failed build leaves no file behind"
