"""Composer on a tiny Llama: every row of a mixed batch equals PEFT's own output / the row alone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from loraretriever import Composer, Routing
from loraretriever.engine.composer import RunningPlan
from tests.conftest import TINY_CONFIG

ATOL = 1e-5


@pytest.fixture(scope="module")
def composer(tiny_model, tiny_pool) -> Composer:
    return Composer(tiny_model, tiny_pool)


@pytest.fixture(scope="module")
def peft_model(tiny_model, tiny_adapters) -> PeftModel:
    base = LlamaForCausalLM(TINY_CONFIG)
    base.load_state_dict(tiny_model.state_dict())
    names = list(tiny_adapters)
    model = PeftModel.from_pretrained(base, tiny_adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tiny_adapters[name], adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY_CONFIG.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))


def logits(model, composer: Composer | None, routings, tokens) -> torch.Tensor:
    with torch.no_grad():
        if composer is None:
            return model(tokens).logits
        with composer.apply(routings):
            return model(tokens).logits


def test_single_adapter_rows_equal_peft(tiny_model, composer, peft_model, tokens):
    routings = [Routing.pinned([n]) for n in ("q_only", "qv", "all")] + [Routing.base()]
    ours = logits(tiny_model, composer, routings, tokens)
    with torch.no_grad():
        reference = peft_model(tokens, adapter_names=["q_only", "qv", "all", "__base__"]).logits
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    base = logits(tiny_model, None, None, tokens)
    assert (ours[:3] - base[:3]).abs().max() > 1e-2, "adapters must change the output"
    torch.testing.assert_close(ours[3], base[3], atol=0, rtol=0)


def test_model_is_untouched_outside_apply(tiny_model, composer, tokens):
    before = logits(tiny_model, None, None, tokens)
    logits(tiny_model, composer, [Routing.pinned(["all"])] * 4, tokens)
    torch.testing.assert_close(logits(tiny_model, None, None, tokens), before, atol=0, rtol=0)
    assert not any("lora" in name for name, _ in tiny_model.named_parameters())


@pytest.mark.parametrize("mode", ["mixture", "fusion", "single"])
def test_every_row_of_a_mixed_batch_equals_the_row_alone(tiny_model, composer, tokens, mode):
    routings = [
        Routing(("all", "q_only", "qv"), (0.5, 0.3, 0.2), mode=mode),
        Routing(("qv",), (1.0,), mode=mode),
        Routing.base(),
        Routing(("q_only", "all"), (0.7, 0.3), mode=mode),
    ]
    batch = logits(tiny_model, composer, routings, tokens)
    for row, routing in enumerate(routings):
        alone = logits(tiny_model, composer, [routing], tokens[row : row + 1])
        torch.testing.assert_close(batch[row : row + 1], alone, atol=ATOL, rtol=0)


def test_mixture_is_the_weighted_sum_of_adapter_outputs(tiny_model, tiny_pool, composer, tokens):
    """Per layer, mixture = sum_j w_j s_j B_j A_j x; checked on one Linear layer's output."""
    layer_name = "model.layers.1.self_attn.q_proj"
    layer = dict(tiny_model.named_modules())[layer_name]
    x = torch.randn(2, 5, layer.in_features)
    weights = {"all": 0.6, "q_only": 0.4}
    with torch.no_grad(), composer.apply([Routing(tuple(weights), tuple(weights.values()))] * 2):
        ours = layer(x)
    expected = layer(x)
    for name, w in weights.items():
        lora = tiny_pool.get(name).modules[layer_name]
        expected = expected + w * lora.scaling * (x @ lora.A.T @ lora.B.T)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_fusion_equals_explicitly_averaged_matrices(tiny_model, tiny_pool, composer, tokens):
    """Fusion with different ranks: zero-pad to the largest, average A and B, apply as one LoRA."""
    weights = {"all": 0.25, "qv": 0.75}  # ranks 8 and 4
    modules = dict(tiny_model.named_modules())
    fused_model = LlamaForCausalLM(TINY_CONFIG).eval()
    fused_model.load_state_dict(tiny_model.state_dict())
    fused_modules = dict(fused_model.named_modules())
    targets = {m for n in weights for m in tiny_pool.get(n).modules}
    with torch.no_grad():
        for module in targets:
            layer = modules[module]
            A = torch.zeros(8, layer.in_features)
            B = torch.zeros(layer.out_features, 8)
            for name, w in weights.items():
                lora = tiny_pool.get(name).modules.get(module)
                if lora is not None:
                    A[: lora.rank] += w * lora.A
                    B[:, : lora.rank] += w * lora.scaling * lora.B
            fused_modules[module].weight += B @ A
    ours = logits(tiny_model, composer, [Routing(tuple(weights), tuple(weights.values()), mode="fusion")] * 4, tokens)
    torch.testing.assert_close(ours, logits(fused_model, None, None, tokens), atol=ATOL, rtol=0)


def test_mixture_with_k1_equals_single(tiny_model, composer, tokens):
    mixture = logits(tiny_model, composer, [Routing(("qv",), (1.0,))] * 4, tokens)
    single = logits(tiny_model, composer, [Routing(("qv", "all"), (0.9, 0.1), mode="single")] * 4, tokens)
    torch.testing.assert_close(mixture, single, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["mixture", "fusion"])
def test_zero_weights_equal_the_base_model(tiny_model, composer, tokens, mode):
    zero = logits(tiny_model, composer, [Routing(("all", "qv"), (0.0, 0.0), mode=mode)] * 4, tokens)
    torch.testing.assert_close(zero, logits(tiny_model, None, None, tokens), atol=ATOL, rtol=0)


def test_cost_follows_each_rows_adapters_not_the_pool(tiny_model, tiny_pool, composer):
    """The stacked factors of a layer have the batch's largest per-row rank, whatever the pool holds."""
    plan = composer.build_plan([Routing.pinned(["q_only"]), Routing.pinned(["qv", "q_only"]), Routing.base()])
    q = plan.layers["model.layers.0.self_attn.q_proj"]
    assert q.A_t.shape == (3, 32, 6)  # qv (r=4) + q_only (r=2) concatenated; not 2+4+8 of the pool
    assert plan.layers["model.layers.0.self_attn.v_proj"].A_t.shape == (3, 32, 4)
    assert "model.layers.0.mlp.up_proj" not in plan.layers  # only 'all' adapts the MLP and no row uses it
    fusion = composer.build_plan([Routing(("qv", "q_only"), (0.5, 0.5), mode="fusion")])
    assert fusion.layers["model.layers.0.self_attn.q_proj"].A_t.shape == (1, 32, 4)


def test_bad_routings_are_clear_errors(tiny_model, composer, tokens):
    with pytest.raises(KeyError, match="no adapter named 'ghost'"):
        composer.build_plan([Routing.pinned(["ghost"])])
    with pytest.raises(ValueError, match="2 adapters .* but 1 weights"):
        Routing(("a", "b"), (1.0,))
    with pytest.raises(ValueError, match="mode='blend'"):
        Routing(("a",), (1.0,), mode="blend")
    with pytest.raises(ValueError, match="not finite"):
        Routing(("a",), (float("nan"),))
    with pytest.raises(RuntimeError, match="batch of 4 rows but the active routing has 2"):
        logits(tiny_model, composer, [Routing.pinned(["qv"])] * 2, tokens)


def test_adapters_added_and_removed_at_run_time(tiny_model, tiny_pool, composer, make_adapter, tokens):
    path = make_adapter("late", r=3, targets=["o_proj"], seed=9)
    tiny_pool.add(path)
    try:
        with_late = logits(tiny_model, composer, [Routing.pinned(["late"])] * 4, tokens)
        assert (with_late - logits(tiny_model, None, None, tokens)).abs().max() > 1e-3
    finally:
        tiny_pool.remove("late")
    with pytest.raises(KeyError, match="late"):
        composer.build_plan([Routing.pinned(["late"])])


def test_paper_union_einsum_baseline_computes_the_same_mixture(tiny_model, tiny_pool, composer, tokens):
    """The benchmark's baseline must be a faithful mixture, or its timings would mean nothing."""
    from loraretriever.evaluation.bench_serve import UnionEinsumComposer

    routings = [
        Routing(("all", "q_only", "qv"), (0.5, 0.3, 0.2)),
        Routing(("qv",), (1.0,)),
        Routing.base(),
        Routing(("q_only", "all"), (0.7, 0.3)),
    ]
    union = UnionEinsumComposer(tiny_model, tiny_pool)
    try:
        torch.testing.assert_close(
            logits(tiny_model, union, routings, tokens),
            logits(tiny_model, composer, routings, tokens),
            atol=ATOL,
            rtol=0,
        )
    finally:
        union.remove_hooks()


@pytest.mark.parametrize("mode", ["mixture", "fusion", "single"])
def test_whole_batch_build_equals_the_per_row_build(tiny_model, tiny_pool, composer, make_adapter, tokens, mode):
    """Same-rank adapters and one mode take the whole-batch build; a base row forces the per-row one."""
    for name, seed in (("same_x", 11), ("same_y", 12)):
        tiny_pool.add(make_adapter(name, r=4, targets=["q_proj", "v_proj", "down_proj"], seed=seed))
    try:
        routings = [
            Routing(("same_x", "same_y"), (0.3, 0.7), mode=mode),
            Routing(("same_y", "same_x"), (0.5, 0.5), mode=mode),
            Routing(("same_x", "same_y"), (1.0, 0.0), mode=mode),
            Routing(("same_y", "same_x"), (0.9, 0.2), mode=mode),
        ]
        fast = composer.build_plan(routings)
        slow = composer.build_plan([*routings, Routing.base()])
        for module, layer_plan in fast.layers.items():
            assert slow.layers[module].A_t.shape[2] == layer_plan.A_t.shape[2]
            torch.testing.assert_close(layer_plan.A_t, slow.layers[module].A_t[:4], atol=1e-6, rtol=0)
            torch.testing.assert_close(layer_plan.B_t, slow.layers[module].B_t[:4], atol=1e-6, rtol=0)
        batch = logits(tiny_model, composer, routings, tokens)
        with_base_row = logits(tiny_model, composer, [*routings, Routing.base()], torch.cat([tokens, tokens[:1]]))
        torch.testing.assert_close(batch, with_base_row[:4], atol=ATOL, rtol=0)
        if mode != "single":  # single keeps only the top-1, so the two orders differ there
            peft_like = logits(tiny_model, composer, [Routing(("same_x",), (1.0,), mode=mode)] * 4, tokens)
            torch.testing.assert_close(batch[2], peft_like[2], atol=ATOL, rtol=0)
    finally:
        tiny_pool.remove("same_x")
        tiny_pool.remove("same_y")


def test_selected_and_concatenated_plans_equal_plans_built_from_scratch(tiny_model, composer, tokens):
    """The engine keeps plans as rows leave and join; that must compose exactly like a fresh build."""
    first = [Routing(("all", "q_only"), (0.5, 0.5)), Routing.base()]
    second = [Routing(("qv", "all"), (0.4, 0.6), mode="fusion"), Routing.pinned(["q_only"])]
    running = RunningPlan.adopt(composer, composer.build_plan(first), capacity=4)
    running.extend(composer.build_plan(second))  # newcomers join
    joined = running.view()
    rows = [1, 2, 0]
    picked = composer.select(joined, rows)
    with torch.no_grad(), composer.use(joined):
        out_joined = tiny_model(tokens).logits
    with torch.no_grad(), composer.use(picked):
        out_picked = tiny_model(tokens[rows]).logits
    running.remove([0])  # a row leaves: the last one takes its slot
    with torch.no_grad(), composer.use(running.view()):
        out_left = tiny_model(tokens[[3, 1, 2]]).logits
    fresh = logits(tiny_model, composer, first + second, tokens)
    torch.testing.assert_close(out_joined, fresh, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_picked, fresh[rows], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_left, fresh[[3, 1, 2]], atol=ATOL, rtol=0)
