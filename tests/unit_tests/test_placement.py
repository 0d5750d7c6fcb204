"""Device and dtype: every composition mode runs on the ``meta`` device (a tensor left on the CPU
raises there, no GPU needed), bfloat16 matches float32, and CUDA runs when a GPU is present."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine.base_model import resolve_device, resolve_dtype
from loraretriever.engine.composer import RunningPlan
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.gates import FlowGate, FlowGateConfig, MeteoraGate, MeteoraGateConfig
from loraretriever.engine.requests import GenerationConfig
from tests.conftest import TINY_CONFIG

# bfloat16 keeps 8 bits of mantissa: logits of this tiny model agree to about 2% of their range
BF16_TOLERANCE = 0.02


def gated_pool(model: torch.nn.Module, adapters) -> tuple[Composer, list[Routing]]:
    """A pool of the tiny adapters, a flow and a meteora gate, and one routing per mode."""
    pool = LoraPool(model)
    for name, path in adapters.items():
        pool.add(path, name=name)
    composer = Composer(model, pool)
    names = pool.names
    composer.gates.register(
        "flow",
        FlowGate(FlowGateConfig(k=2, hidden_size=TINY_CONFIG.hidden_size, num_layers=TINY_CONFIG.num_hidden_layers)),
    )
    modules = {m: model.get_submodule(m).in_features for n in names for m in pool.get(n).modules}
    meteora = MeteoraGate(MeteoraGateConfig(tuple(names), {n: pool.get(n).digest for n in names}, modules))
    with torch.no_grad():
        for weight in meteora.weights.values():
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    composer.gates.register("moe", meteora)
    routings = [
        Routing((names[0], names[1]), (0.6, 0.4)),
        Routing((names[1], names[2]), (0.5, 0.5), mode="fusion"),
        Routing((names[0], names[2]), (0.5, 0.5), mode="fusion", fusion="ties"),
        Routing((names[1], names[0]), (0.5, 0.5), mode="fusion", fusion="dare_ties"),
        Routing.pinned([names[2]], mode="single"),
        Routing((names[0], names[2]), (0.7, 0.3), mode="flow", gate="flow"),
        Routing.meteora("moe"),
        Routing.base(),
    ]
    return composer, routings


def test_every_mode_runs_on_the_meta_device(tiny_model, tiny_adapters):
    with torch.device("meta"):
        model = LlamaForCausalLM(TINY_CONFIG).eval()
    composer, routings = gated_pool(model, tiny_adapters)
    assert {w.A.device.type for n in composer.pool.names for w in composer.pool.get(n).modules.values()} == {"meta"}
    tokens = torch.zeros((len(routings), 5), dtype=torch.long, device="meta")
    with torch.no_grad(), composer.apply(routings):
        out = model(tokens).logits
    assert out.device.type == "meta" and out.shape[:2] == (len(routings), 5)
    # plans kept by the engine (rows leaving and joining) stay on the device too
    running = RunningPlan.adopt(composer, composer.build_plan(routings[:3]), capacity=len(routings))
    running.extend(composer.build_plan(routings[3:]))
    running.remove([1])
    with torch.no_grad(), composer.use(running.view()):
        assert model(tokens[: len(routings) - 1]).logits.device.type == "meta"
    with torch.no_grad(), composer.use(composer.select(running.view(), [3, 0, 4])):
        assert model(tokens[:3]).logits.device.type == "meta"


def test_a_model_moved_after_loading_takes_its_adapters_and_gates_along(tiny_model, tiny_adapters):
    model = copy.deepcopy(tiny_model)
    composer, routings = gated_pool(model, tiny_adapters)
    model.to("meta")
    tokens = torch.zeros((len(routings), 3), dtype=torch.long, device="meta")
    with torch.no_grad(), composer.apply(routings):
        assert model(tokens).logits.device.type == "meta"


def test_bfloat16_matches_float32_within_tolerance(tiny_model, tiny_adapters):
    tokens = torch.randint(0, TINY_CONFIG.vocab_size, (8, 7), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(tiny_model).to(dtype)
        composer, routings = gated_pool(model, tiny_adapters)
        # adapters stay in their file's dtype (float32 here); what the hooks apply is in the model's
        assert {p.A_t.dtype for p in composer.build_plan(routings).layers.values()} == {dtype}
        with torch.no_grad(), composer.apply(routings):
            outputs[dtype] = model(tokens).logits.float()
        base = model(tokens).logits.float()
        assert (outputs[dtype] - base).abs().max() > 1e-2, "the adapters change the logits"
    reference = outputs[torch.float32]
    error = (outputs[torch.bfloat16] - reference).abs().max() / reference.abs().max()
    assert error < BF16_TOLERANCE


def test_bfloat16_generation_runs_every_mode(tiny_lm, smol_tokenizer, tiny_lm_adapters):
    model = copy.deepcopy(tiny_lm).to(torch.bfloat16)
    pool = LoraPool(model)
    for name, path in tiny_lm_adapters.items():
        pool.add(path, name=name)
    engine = Engine(model, smol_tokenizer, Composer(model, pool), EngineConfig(max_batch_tokens=32))
    routings = [Routing.pinned(["a", "b"]), Routing(("a", "b"), (0.5, 0.5), mode="fusion"), Routing.base()]
    requests = [
        engine.new_request(f"Count to {i}:", GenerationConfig(max_new_tokens=5, ignore_eos=True), r, index=i)
        for i, r in enumerate(routings)
    ]
    engine.run(requests)
    assert [r.done.completion_tokens for r in requests] == [5, 5, 5]


def test_device_and_dtype_names_are_checked():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='float8'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="device='gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:0' but CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_batch_equals_cpu(tiny_model, tiny_adapters):
    tokens = torch.randint(0, TINY_CONFIG.vocab_size, (8, 7), generator=torch.Generator().manual_seed(2))
    outputs = []
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(tiny_model).to(device)
        composer, routings = gated_pool(model, tiny_adapters)
        with torch.no_grad(), composer.apply(routings):
            outputs.append(model(tokens.to(device)).logits.cpu())
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
