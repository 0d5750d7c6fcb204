"""LoRA-Flow and MeteoRA gates in the composer, checked against a per-token reference written plainly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine.gates import (
    FlowGate,
    FlowGateConfig,
    GateError,
    MeteoraGate,
    MeteoraGateConfig,
    gate_dirs,
    layer_index,
    load_gate,
    save_gate,
)
from tests.conftest import TINY_CONFIG

ATOL = 1e-5


@pytest.fixture
def composer(tiny_model, tiny_pool):
    composer = Composer(tiny_model, tiny_pool)
    yield composer
    composer.remove_hooks()


def tokens(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_CONFIG.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def flow_gate(seed: int | None = None, k: int = 3) -> FlowGate:
    gate = FlowGate(FlowGateConfig(k=k, hidden_size=TINY_CONFIG.hidden_size, num_layers=TINY_CONFIG.num_hidden_layers))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator))
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=generator))
    return gate


def meteora_gate(tiny_pool: LoraPool, seed: int = 0, top_k: int = 2) -> MeteoraGate:
    modules = {
        m: tiny_pool.model.get_submodule(m).in_features for n in tiny_pool.names for m in tiny_pool.get(n).modules
    }
    config = MeteoraGateConfig(
        tuple(tiny_pool.names), {n: tiny_pool.get(n).digest for n in tiny_pool.names}, modules, top_k=top_k
    )
    gate = MeteoraGate(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in gate.weights.values():
            weight.copy_(torch.randn(weight.shape, generator=generator))
    return gate


def run(model, composer, routings, ids) -> torch.Tensor:
    with torch.no_grad(), composer.apply(routings):
        return model(ids).logits


def reference(model, tiny_pool, gate, routing: Routing, ids: torch.Tensor) -> torch.Tensor:
    """One row, token by token in plain loops: the gate's weights, then sum_j w_tj s_j B_j A_j x_t."""
    hooks, weights_by_layer = [], {}
    decoder_layers = model.model.layers

    def layer_hook(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            normed = hidden[0] / hidden[0].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            logits = (normed @ gate.weight[index].T + gate.bias[index]) / gate.config.temperature
            prior = torch.full((gate.config.k,), float("-inf"))
            prior[: len(routing.weights)] = torch.tensor(routing.weights).log()
            weights_by_layer[index] = torch.softmax(logits + prior, -1)

        return hook

    def linear_hook(name):
        def hook(_module, args, output):
            x = args[0][0]
            update = torch.zeros_like(output[0])
            for t in range(x.shape[0]):
                if isinstance(gate, FlowGate):
                    chosen = [
                        (tiny_pool.get(a), w)
                        for a, w in zip(routing.adapters, weights_by_layer[layer_index(name)][t], strict=False)
                    ]
                else:
                    logits = gate.logits(name, x[t : t + 1])[0]
                    top, index = logits.topk(gate.config.top_k)
                    probs = torch.softmax(top / gate.config.temperature, -1)
                    chosen = [
                        (tiny_pool.get(gate.config.adapters[i]), w) for i, w in zip(index.tolist(), probs, strict=True)
                    ]
                for adapter, w in chosen:
                    lora = adapter.modules.get(name)
                    if lora is not None:
                        update[t] += w * lora.scaling * (lora.B @ (lora.A @ x[t]))
            return output + update

        return hook

    if isinstance(gate, FlowGate):
        hooks += [
            layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(decoder_layers)
        ]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            hooks.append(module.register_forward_hook(linear_hook(name)))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for handle in hooks:
            handle.remove()


def test_untrained_flow_gate_is_the_retrieval_mixture_and_a_biased_one_is_top1(tiny_model, composer):
    ids = tokens(3, 7)
    composer.gates.register("flow", flow_gate())
    flow = Routing(("qv", "all", "q_only"), (0.5, 0.3, 0.2), mode="flow", gate="flow")
    mixed = run(tiny_model, composer, [flow, Routing.pinned(["qv"]), Routing.base()], ids)
    mixture = run(tiny_model, composer, [Routing(("qv", "all", "q_only"), (0.5, 0.3, 0.2))] * 3, ids)
    torch.testing.assert_close(mixed[0], mixture[0], atol=ATOL, rtol=0)
    biased = flow_gate()
    with torch.no_grad():
        biased.bias[:, 0] = 50.0
    composer.gates.register("flow", biased)
    top1 = run(tiny_model, composer, [flow, Routing.pinned(["qv"]), Routing.base()], ids)
    single = run(tiny_model, composer, [Routing.pinned(["qv"], mode="single")], ids[:1])
    torch.testing.assert_close(top1[0], single[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("slots", [("qv", "all", "q_only"), ("all", "q_only")])
def test_flow_rows_follow_the_per_token_reference_in_a_mixed_batch(tiny_model, tiny_pool, composer, slots):
    gate = flow_gate(seed=1)
    composer.gates.register("g", gate)
    other = flow_gate(seed=2, k=2)
    composer.gates.register("other", other)
    ids = tokens(4, 8, seed=3)
    flow = Routing(slots, (0.6, 0.3, 0.1)[: len(slots)], mode="flow", gate="g")  # the prior, not normalised
    routings = [
        flow,
        Routing(("q_only", "qv"), (0.5, 0.5), mode="flow", gate="other"),
        Routing.pinned(["all", "qv"], mode="fusion"),
        Routing.base(),
    ]
    ours = run(tiny_model, composer, routings, ids)
    torch.testing.assert_close(ours[0], reference(tiny_model, tiny_pool, gate, flow, ids[:1])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        ours[1], reference(tiny_model, tiny_pool, other, routings[1], ids[1:2])[0], atol=ATOL, rtol=0
    )
    alone = run(tiny_model, composer, [routings[2]], ids[2:3])
    torch.testing.assert_close(ours[2], alone[0], atol=ATOL, rtol=0)
    uniform = run(tiny_model, composer, [Routing.pinned(slots)], ids[:1])
    assert (ours[0] - uniform[0]).abs().max() > 1e-3, "a trained-looking gate must not be the retrieval mixture"


@pytest.mark.parametrize("length", [5, 80])  # 80 tokens x 4 rows x top-2 > 512: the grouped path
def test_meteora_rows_follow_the_per_token_reference(tiny_model, tiny_pool, composer, length):
    gate = meteora_gate(tiny_pool, seed=4)
    composer.gates.register("moe", gate)
    ids = tokens(4, length, seed=5)
    routings = [Routing.meteora("moe"), Routing.pinned(["qv", "all"]), Routing.meteora("moe"), Routing.base()]
    ours = run(tiny_model, composer, routings, ids)
    for row in (0, 2):
        torch.testing.assert_close(
            ours[row], reference(tiny_model, tiny_pool, gate, routings[0], ids[row : row + 1])[0], atol=ATOL, rtol=0
        )
    torch.testing.assert_close(ours[1], run(tiny_model, composer, [routings[1]], ids[1:2])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[3], run(tiny_model, composer, [Routing.base()], ids[3:4])[0], atol=ATOL, rtol=0)


def test_meteora_tokens_switch_adapters(tiny_model, tiny_pool, composer):
    gate = meteora_gate(tiny_pool, seed=6, top_k=1)
    composer.gates.register("moe", gate)
    composer.gate_logits = []
    run(tiny_model, composer, [Routing.meteora("moe")], tokens(1, 40, seed=7))
    picked = {int(i) for _, _, _, logits in composer.gate_logits for i in logits.argmax(-1)}
    composer.gate_logits = None
    assert len(picked) > 1, "different tokens pick different adapters"


def test_gates_train_through_the_composer(tiny_model, tiny_pool, composer):
    flow, moe = flow_gate(), meteora_gate(tiny_pool)
    composer.gates.register("flow", flow)
    composer.gates.register("moe", moe)
    routings = [Routing(("qv", "all"), (0.5, 0.5), mode="flow", gate="flow"), Routing.meteora("moe")]
    tiny_model.requires_grad_(False)  # frozen, as train-gate freezes it
    try:
        with composer.apply(routings):
            tiny_model(tokens(2, 6)).logits.pow(2).mean().backward()
    finally:
        tiny_model.requires_grad_(True)
    assert flow.weight.grad is not None and flow.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.weights.values())


def test_a_meteora_gate_over_another_pool_is_refused(tiny_model, tiny_adapters, tiny_pool, composer, make_adapter):
    gate = meteora_gate(tiny_pool)
    grown = LoraPool(tiny_model)
    for name, path in tiny_adapters.items():
        grown.add(path, name=name)
    grown.add(make_adapter("extra"), name="extra")
    assert gate.mismatch(tiny_pool) is None
    assert gate.mismatch(grown) == "the pool changed since the gate was trained (added ['extra'])"
    grown.remove("qv")
    assert "removed ['qv']" in gate.mismatch(grown)
    composer = Composer(tiny_model, grown)
    composer.gates.register("moe", gate)
    with pytest.raises(
        GateError, match=r"meteora gate 'moe' no longer matches the pool: .*removed \['qv'\].*Fix: retrain"
    ):
        composer.build_plan([Routing.meteora("moe")])


def test_bad_gate_routings_name_the_problem(composer):
    composer.gates.register("flow", flow_gate(k=2))
    with pytest.raises(GateError, match=r"3 adapters but flow gate 'flow' has 2 slots"):
        composer.build_plan([Routing(("qv", "all", "q_only"), (1, 1, 1), mode="flow", gate="flow")])
    with pytest.raises(GateError, match=r"gate 'nope', which is not registered \(known: \['flow'\]\)"):
        composer.build_plan([Routing.meteora("nope")])
    with pytest.raises(GateError, match="mode 'meteora' but gate 'flow' is a flow gate"):
        composer.build_plan([Routing.meteora("flow")])
    with pytest.raises(ValueError, match="need a gate name"):
        Routing(("qv",), (1.0,), mode="flow")
    with pytest.raises(ValueError, match="need a gate name"):
        Routing(("qv",), (1.0,), gate="flow")
    with pytest.raises(ValueError, match="lists no adapters"):
        Routing(("qv",), (1.0,), mode="meteora", gate="m")
    with pytest.raises(GateError, match="hidden_size=64"):
        composer.gates.register("wide", FlowGate(FlowGateConfig(k=2, hidden_size=64, num_layers=2)))


def test_gate_files_round_trip_and_bad_files_are_refused(tiny_pool, tmp_path):
    for gate in (flow_gate(seed=1), meteora_gate(tiny_pool, seed=2)):
        directory = save_gate(gate, tmp_path / "gates" / gate.kind)
        again = load_gate(directory)
        assert type(again) is type(gate) and again.config == gate.config
        for (name, a), (_, b) in zip(gate.state_dict().items(), again.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, msg=name)
    assert sorted(gate_dirs(tmp_path)) == ["flow", "meteora"]
    (tmp_path / "gates" / "flow" / "gate.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(GateError, match="cannot be read"):
        load_gate(tmp_path / "gates" / "flow")
    with pytest.raises(GateError, match="top_k=5 must be an integer in \\[1, 3\\]"):
        MeteoraGateConfig(("a", "b", "c"), {"a": "", "b": "", "c": ""}, {"layers.0.q": 4}, top_k=5)
    with pytest.raises(GateError, match="temperature=0 must be a positive number"):
        FlowGateConfig(k=2, hidden_size=4, num_layers=1, temperature=0)
