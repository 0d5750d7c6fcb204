"""LoRA factors stacked per row, the data a :class:`~loraretriever.engine.composer.Composer` applies.

For a batch of rows, each with its own adapters and weights, one adapted layer gets one factor pair
per row, padded to the batch's largest rank and stacked, so its update is two batched matmuls
``(x @ A_t) @ B_t``: a mixture concatenates the row's LoRAs along the rank axis, a fusion averages
them into one LoRA of the largest rank (see the composer's module docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft.utils import merge_utils
from torch import nn

from loraretriever.engine.routing import Routing
from loraretriever.pool.adapter import LoraWeights

__all__ = ["FusionSpec", "LayerPlan", "build_layer_plan", "slot_index", "stack_factors"]


@dataclass(frozen=True)
class LayerPlan:
    """The stacked per-row factors of one layer, row by row: ``delta = (x @ A_t) @ B_t``.

    Stored transposed and contiguous (``A_t = A^T``, ``B_t = B^T``): the decoding-step matmuls
    then read the factors in memory order, measurably faster than transposed views.
    """

    A_t: torch.Tensor  # (batch, in_features, rank)
    B_t: torch.Tensor  # (batch, rank, out_features), weights and scaling folded in
    # flow rows: the slot of every rank column; other rows point at an always-1 column
    slot_index: torch.Tensor | None = None  # (batch, rank), long

    def select(self, index: torch.Tensor) -> LayerPlan:
        """The plan of some rows only (``index`` on the plan's device)."""
        slots = None if self.slot_index is None else self.slot_index.index_select(0, index)
        return LayerPlan(self.A_t.index_select(0, index), self.B_t.index_select(0, index), slots)


@dataclass(frozen=True)
class FusionSpec:
    """How one row's fusion merges its matrices (see :class:`~loraretriever.engine.routing.Routing`)."""

    method: str = "linear"
    density: float = 1.0
    seed: int = 0  # of dare's random drops


def build_layer_plan(
    parts: list[list[tuple[LoraWeights, float]]],
    modes: Sequence[str],
    layer: nn.Linear,
    fusions: Sequence[FusionSpec | None] | None = None,
) -> LayerPlan:
    """One layer's plan for rows given as ``(weights, weight)`` pairs, one mode per row (flow rows
    are mixtures at weight 1: their gate scales them per token), and for fusion rows how they merge
    (default: linear). Weights held in another dtype (as stored on disk) or elsewhere are cast to the
    layer's here, per use."""
    weight = layer.weight
    parts = [[(_placed(w, weight), x) for w, x in row] for row in parts]
    fusions = fusions or [None] * len(parts)
    linear = all(f is None or f.method == "linear" for f in fusions)
    shared = modes[0] if len(set(modes)) == 1 and linear else None
    plan = _uniform(parts, shared, layer) if shared is not None else None
    if plan is None:
        factors = [
            _fuse(p, fusion or FusionSpec()) if mode == "fusion" else _concatenate(p)
            for mode, p, fusion in zip(modes, parts, fusions, strict=True)
        ]
        plan = _stack(factors, layer)
    return plan


def _placed(weights: LoraWeights, like: torch.Tensor) -> LoraWeights:
    if weights.A.dtype == like.dtype and weights.A.device == like.device:
        return weights
    return LoraWeights(weights.A.to(like.device, like.dtype), weights.B.to(like.device, like.dtype), weights.scaling)


def stack_factors(present: Sequence[LoraWeights | None], layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapters' factors at one layer, side by side: ``A (N, r, in)`` and ``B (N, out, r)`` with the
    scaling folded into B, ranks zero-padded to the largest, zeros where an adapter is ``None``."""
    rank = max((w.rank for w in present if w is not None), default=1)
    A = layer.weight.new_zeros(len(present), rank, layer.in_features)
    B = layer.weight.new_zeros(len(present), layer.out_features, rank)
    for i, weights in enumerate(present):
        if weights is not None:
            A[i, : weights.rank] = weights.A
            B[i, :, : weights.rank] = weights.B * weights.scaling
    return A, B


def _concatenate(parts: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mixture: ``sum_j wj sj Bj Aj`` as one LoRA of rank ``sum_j rj``."""
    if not parts:
        return None
    A = torch.cat([weights.A for weights, _ in parts], dim=0)
    B = torch.cat([weights.B * (w * weights.scaling) for weights, w in parts], dim=1)
    return A, B


def _fuse(parts: list, fusion: FusionSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fusion: ``(sum_j wj sj Bj)(sum_j wj Aj)``, ranks zero-padded to the largest; or A and B each
    merged the TIES / DARE way with weights ``sqrt(wj sj)``, as PEFT's ``add_weighted_adapter`` does
    (its ``merge_utils``), DARE's drops seeded."""
    if not parts:
        return None
    rank = max(weights.rank for weights, _ in parts)
    first = parts[0][0]
    A = first.A.new_zeros(len(parts), rank, first.A.shape[1])
    B = first.B.new_zeros(len(parts), first.B.shape[0], rank)
    for j, (weights, _) in enumerate(parts):
        A[j, : weights.rank] = weights.A
        B[j, :, : weights.rank] = weights.B
    weight = torch.tensor([w for _, w in parts], dtype=A.dtype, device=A.device)
    scaled = weight * torch.tensor([weights.scaling for weights, _ in parts], dtype=A.dtype, device=A.device)
    if fusion.method == "linear":
        return (A * weight.view(-1, 1, 1)).sum(0), (B * scaled.view(-1, 1, 1)).sum(0)
    # PEFT's add_weighted_adapter: each factor weighted by sqrt(w s), the sign on A
    w_A, w_B = scaled.sign() * scaled.abs().sqrt(), scaled.abs().sqrt()
    if fusion.method in ("dare_linear", "dare_ties"):
        generator = torch.Generator().manual_seed(fusion.seed)
        A, B = _drop_at_random(A, fusion.density, generator), _drop_at_random(B, fusion.density, generator)
    elif fusion.method == "ties" and fusion.density < 1:
        A = torch.stack([merge_utils.magnitude_based_pruning(t, fusion.density) for t in A])
        B = torch.stack([merge_utils.magnitude_based_pruning(t, fusion.density) for t in B])
    if fusion.method in ("ties", "dare_ties"):
        return _elect(A, w_A), _elect(B, w_B)
    return (A * w_A.view(-1, 1, 1)).sum(0), (B * w_B.view(-1, 1, 1)).sum(0)


def _drop_at_random(tensors: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: each entry kept with probability ``density`` and rescaled by ``1/density``; the
    mask is drawn on the CPU from a seeded generator, so it is the same on every device."""
    if density >= 1:
        return tensors
    keep = torch.bernoulli(torch.full(tensors.shape, density), generator=generator)
    return tensors * keep.to(tensors.device, tensors.dtype) / density


def _elect(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' sign election (by the total of the pruned tensors) and disjoint mean of the weighted
    ``(k, ...)`` tensors, as PEFT's ``ties``."""
    mask = merge_utils.calculate_majority_sign_mask(tensors, method="total")
    weighted = tensors * weights.view(-1, *([1] * (tensors.dim() - 1)))
    return merge_utils.disjoint_merge(weighted, mask)


def _uniform(parts: list[list[tuple[LoraWeights, float]]], mode: str, layer: nn.Linear) -> LayerPlan | None:
    """The whole-batch build, when every row has the same number of adapters of one rank here.

    Returns None otherwise (the per-row build handles any mix of ranks, counts and modes).
    """
    k = len(parts[0])
    if k == 0 or any(len(p) != k for p in parts) or len({w.rank for p in parts for w, _ in p}) != 1:
        return None
    rows, rank = len(parts), parts[0][0][0].rank
    A = torch.stack([w.A for p in parts for w, _ in p]).view(rows, k, rank, layer.in_features)
    B = torch.stack([w.B for p in parts for w, _ in p]).view(rows, k, layer.out_features, rank)
    weights = torch.tensor([[weight for _, weight in p] for p in parts], dtype=A.dtype, device=A.device)
    scaled = weights * torch.tensor([[w.scaling for w, _ in p] for p in parts], dtype=A.dtype, device=A.device)
    if mode == "fusion":
        A_fused = (A * weights.view(rows, k, 1, 1)).sum(1)
        B_fused = (B * scaled.view(rows, k, 1, 1)).sum(1)
        return LayerPlan(A_fused.transpose(1, 2).contiguous(), B_fused.transpose(1, 2).contiguous())
    # mixture / single: the k LoRAs side by side along the rank axis
    A_t = A.permute(0, 3, 1, 2).reshape(rows, layer.in_features, k * rank)
    B_t = (B * scaled.view(rows, k, 1, 1)).permute(0, 1, 3, 2).reshape(rows, k * rank, layer.out_features)
    return LayerPlan(A_t, B_t)


def slot_index(
    rows: list[list[tuple[str, float]]],
    routings: Sequence[Routing],
    adapters: dict,
    module: str,
    plan: LayerPlan,
    k_max: int,
) -> torch.Tensor:
    """For every rank column of ``plan``, the flow slot it belongs to (``k_max``, the always-1
    column, for other rows and padding). Columns follow the row's adapters in order, as built."""
    index = torch.full((len(rows), plan.A_t.shape[2]), k_max, dtype=torch.long, device=plan.A_t.device)
    for row, (pairs, routing) in enumerate(zip(rows, routings, strict=True)):
        if routing.mode != "flow":
            continue
        column = 0
        for slot, (name, _) in enumerate(pairs):
            weights = adapters[name].modules.get(module)
            if weights is not None:
                index[row, column : column + weights.rank] = slot
                column += weights.rank
    return index


def _stack(factors: list, layer: nn.Linear) -> LayerPlan:
    """Pads every row's factors to the batch's largest rank (zeros add nothing) and stacks them."""
    rank = max((A.shape[0] for A, _ in (f for f in factors if f is not None)), default=0)
    weight = layer.weight
    A_t = weight.new_zeros(len(factors), layer.in_features, rank)
    B_t = weight.new_zeros(len(factors), rank, layer.out_features)
    for row, factor in enumerate(factors):
        if factor is not None:
            A, B = factor
            A_t[row, :, : A.shape[0]] = A.T
            B_t[row, : B.shape[1]] = B.T
    return LayerPlan(A_t, B_t)
