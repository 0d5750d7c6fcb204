"""Fusion by TIES and DARE (PEFT's merge_utils on each A and B) per row, beside linear fusion and
mixtures in one batch, on a tiny Llama with real PEFT adapters."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from peft.utils import merge_utils

from loraretriever import Composer, RetrievalError, RouteOptions, Routing
from loraretriever.cli.route_flags import add_route_arguments, route_options_from
from loraretriever.engine.factors import FusionSpec, _fuse
from tests.conftest import TINY_CONFIG

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def composer(tiny_model, tiny_pool) -> Composer:
    return Composer(tiny_model, tiny_pool)


def parts(tiny_pool, names=("qv", "all"), weights=(0.7, 0.3)):
    return [(tiny_pool.get(n).modules[LAYER], w) for n, w in zip(names, weights, strict=True)]


def padded(tensors: list[torch.Tensor], rank: int, axis: int) -> list[torch.Tensor]:
    pad = [(0, 0, 0, rank - t.shape[0]) if axis == 0 else (0, rank - t.shape[1]) for t in tensors]
    return [torch.nn.functional.pad(t, p) for t, p in zip(tensors, pad, strict=True)]


def test_ties_is_peft_ties_on_each_factor_with_its_weights(tiny_pool):
    pairs = parts(tiny_pool)
    A, B = _fuse(pairs, FusionSpec("ties", 0.5))
    rank = max(w.rank for w, _ in pairs)
    # PEFT's add_weighted_adapter(combination_type="ties"): sqrt(weight * scaling) on each factor
    root = torch.tensor([math.sqrt(w * weights.scaling) for weights, w in pairs])
    expected_A = merge_utils.ties(padded([w.A for w, _ in pairs], rank, 0), root, 0.5)
    expected_B = merge_utils.ties(padded([w.B for w, _ in pairs], rank, 1), root, 0.5)
    torch.testing.assert_close(A, expected_A)
    torch.testing.assert_close(B, expected_B)
    linear_A, _ = _fuse(pairs, FusionSpec())
    assert not torch.allclose(A, linear_A), "trimmed and elected, not the linear merge"


def test_dare_keeps_density_of_entries_rescaled_and_draws_the_same_mask_for_a_seed(tiny_pool):
    alone = parts(tiny_pool, ("all",), (1.0,))
    weights = alone[0][0]
    A, _ = _fuse(alone, FusionSpec("dare_linear", 0.5, seed=7))
    kept = A != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(A[kept], weights.A[kept] * math.sqrt(weights.scaling) / 0.5)
    again, _ = _fuse(alone, FusionSpec("dare_linear", 0.5, seed=7))
    other, _ = _fuse(alone, FusionSpec("dare_linear", 0.5, seed=8))
    assert torch.equal(A, again) and not torch.equal(A, other)
    full = _fuse(parts(tiny_pool), FusionSpec("dare_linear", 1.0))
    pairs = parts(tiny_pool)
    root = torch.tensor([math.sqrt(w * weights.scaling) for weights, w in pairs])
    rank = max(w.rank for w, _ in pairs)
    summed = merge_utils.task_arithmetic(padded([w.A for w, _ in pairs], rank, 0), root)
    torch.testing.assert_close(full[0], summed)  # nothing dropped: PEFT's weighted sum


def test_every_fusion_method_in_one_batch_equals_each_row_alone(tiny_model, composer):
    routings = [
        Routing(("qv", "all"), (0.6, 0.4), mode="fusion", fusion=method, density=0.4)
        for method in ("linear", "ties", "dare_linear", "dare_ties")
    ] + [Routing.pinned(["q_only", "all"]), Routing.base()]
    prompt = torch.randint(0, TINY_CONFIG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    tokens = prompt.repeat(len(routings), 1)  # one prompt: the rows differ by their routing only
    with torch.no_grad(), composer.apply(routings):
        together = tiny_model(tokens).logits
    for row, routing in enumerate(routings):
        with torch.no_grad(), composer.apply([routing]):
            alone = tiny_model(tokens[row : row + 1]).logits
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=0)
    for row in range(1, 4):
        assert (together[row] - together[0]).abs().max() > 1e-3, f"{routings[row].fusion} fuses like linear"


def test_fusion_options_are_checked_and_reach_the_routing(tiny_model):
    with pytest.raises(RetrievalError, match=r"fusion='ties' merges .* only mode='fusion'.*Fix: pass mode='fusion'"):
        RouteOptions(fusion="ties")
    with pytest.raises(RetrievalError, match=r"density=0 must be a share in \(0, 1\]"):
        RouteOptions(mode="fusion", fusion="ties", density=0)
    with pytest.raises(RetrievalError, match="fusion='sum' is not one of"):
        RouteOptions(mode="fusion", fusion="sum")
    parser = argparse.ArgumentParser()
    add_route_arguments(parser)
    args = parser.parse_args(["--mode", "fusion", "--fusion", "dare_ties", "--density", "0.3"])
    assert route_options_from(args) == {"mode": "fusion", "fusion": "dare_ties", "density": 0.3}
    routing = Routing.pinned(["a", "b"], mode="fusion", fusion="dare_ties", density=0.3)
    assert str(routing).startswith("fusion[dare_ties, density 0.3]: a 0.50")
    assert routing.to_dict()["fusion"] == "dare_ties"
