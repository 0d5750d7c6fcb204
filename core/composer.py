"""Per-row LoRA composition in one forward pass, through forward hooks on the base Linear layers.

For a batch, every row has its own routing. Before the pass we build, for every adapted layer,
one low-rank factor pair per row:

* mixture: the row's k LoRAs concatenated along the rank axis,
  ``[w1 s1 B1 | ... | wk sk Bk] @ [A1; ...; Ak] = sum_j wj sj Bj Aj`` (ranks may differ);
* fusion: ``(sum_j wj sj Bj) @ (sum_j wj Aj)``, smaller ranks zero-padded to the largest;

then pad the rows to the batch's largest rank and stack them, so the layer's update is two batched
matmuls ``(x @ A_t) @ B_t``. The cost grows with the ranks each row uses, never with the pool size
or with the union of adapters in the batch. Routing is fixed for a whole generation, so the factors
are built once per batch and reused at every decoding step. In the common case (every row has the
same number of adapters of one rank at a layer, one mode) they are built with a few whole-batch
tensor operations per layer rather than per row.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from loraretriever.adapter import LoraWeights
from loraretriever.pool import LoraPool
from loraretriever.routing import Routing

__all__ = ["Composer", "LayerPlan"]


@dataclass(frozen=True)
class LayerPlan:
    """The stacked per-row factors of one layer, row by row: ``delta = (x @ A_t) @ B_t``.

    Stored transposed and contiguous (``A_t = A^T``, ``B_t = B^T``): the decoding-step matmuls
    then read the factors in memory order, measurably faster than transposed views.
    """

    A_t: torch.Tensor  # (batch, in_features, rank)
    B_t: torch.Tensor  # (batch, rank, out_features), weights and scaling folded in


class Composer:
    """Applies a batch of routings to a base model's forward pass.

    The model's modules are not replaced: a forward hook on each adapted ``nn.Linear`` adds the
    row-wise LoRA update while a plan is active, and does nothing otherwise (so the model is the
    plain base model outside :meth:`apply`).

    Example:
        >>> composer = Composer(model, pool)  # doctest: +SKIP
        >>> routings = [Routing.pinned(["sst2"]), Routing.pinned(["sst2", "imdb"]), Routing.base()]
        >>> with composer.apply(routings):  # doctest: +SKIP
        ...     logits = model(**batch).logits
    """

    def __init__(self, model: nn.Module, pool: LoraPool) -> None:
        if pool.model is not model:
            raise ValueError("the pool was built for another model object; pass the model the pool validates against.")
        self.model = model
        self.pool = pool
        self._linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._plan: dict[str, LayerPlan] | None = None
        self._batch_size = 0
        self._lock = threading.RLock()

    def build_plan(self, routings: Sequence[Routing]) -> dict[str, LayerPlan]:
        """The per-layer factors for a batch of routings (one per row)."""
        rows: list[list[tuple[str, float]]] = []
        for i, routing in enumerate(routings):
            if not isinstance(routing, Routing):
                raise TypeError(f"routings[{i}] is a {type(routing).__name__}, not a Routing.")
            self.pool.check_names(list(routing.adapters))
            rows.append(routing.effective())
        adapters = {name: self.pool.get(name) for row in rows for name, _ in row}
        modules = sorted({m for adapter in adapters.values() for m in adapter.modules})
        modes = {routing.mode for routing in routings}
        shared_mode = next(iter(modes)) if len(modes) == 1 else None
        plan: dict[str, LayerPlan] = {}
        for module in modules:
            parts = [
                [(adapters[n].modules[module], w) for n, w in row if module in adapters[n].modules] for row in rows
            ]
            layer = self._linear[module]
            layer_plan = _uniform(parts, shared_mode, layer) if shared_mode is not None else None
            if layer_plan is None:
                factors = [
                    _fuse(p) if routing.mode == "fusion" else _concatenate(p)
                    for routing, p in zip(routings, parts, strict=True)
                ]
                layer_plan = _stack(factors, layer)
            plan[module] = layer_plan
        return plan

    @contextmanager
    def apply(self, routings: Sequence[Routing]) -> Iterator[None]:
        """Within the block, every forward pass of the model composes ``routings`` row by row.

        The batch dimension of every input must equal ``len(routings)``. One plan is active at a
        time; concurrent callers wait for each other.
        """
        plan = self.build_plan(routings)
        with self._lock:
            self._install_hooks(plan)
            self._plan, self._batch_size = plan, len(routings)
            try:
                yield
            finally:
                self._plan, self._batch_size = None, 0

    def select_rows(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keeps only some rows of the active plan (e.g. when finished rows leave a generation)."""
        if self._plan is None:
            raise RuntimeError("select_rows() needs an active plan: call it inside `with composer.apply(...)`.")
        index = torch.as_tensor(rows, dtype=torch.long)
        self._plan = {
            m: LayerPlan(p.A_t.index_select(0, index), p.B_t.index_select(0, index)) for m, p in self._plan.items()
        }
        self._batch_size = len(index)

    def remove_hooks(self) -> None:
        """Detaches every hook; the model is left exactly as it was loaded."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    def _install_hooks(self, plan: dict[str, LayerPlan]) -> None:
        for module in plan:
            if module not in self._hooks:
                self._hooks[module] = self._linear[module].register_forward_hook(self._make_hook(module))

    def _make_hook(self, module: str):
        def hook(_layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            plan = self._plan
            if plan is None or module not in plan:
                return output
            layer_plan = plan[module]
            x = args[0]
            if x.shape[0] != self._batch_size:
                raise RuntimeError(
                    f"layer {module!r} got a batch of {x.shape[0]} rows but the active routing has "
                    f"{self._batch_size}; run the whole routed batch in one forward pass."
                )
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            hidden = torch.bmm(flat, layer_plan.A_t)
            result = torch.baddbmm(output.reshape(x.shape[0], -1, output.shape[-1]), hidden, layer_plan.B_t)
            return result.view(output.shape)

        return hook


def _concatenate(parts: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mixture: ``sum_j wj sj Bj Aj`` as one LoRA of rank ``sum_j rj``."""
    if not parts:
        return None
    A = torch.cat([weights.A for weights, _ in parts], dim=0)
    B = torch.cat([weights.B * (w * weights.scaling) for weights, w in parts], dim=1)
    return A, B


def _fuse(parts: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fusion: ``(sum_j wj sj Bj)(sum_j wj Aj)``, ranks zero-padded to the largest."""
    if not parts:
        return None
    rank = max(weights.rank for weights, _ in parts)
    first = parts[0][0]
    A = first.A.new_zeros(rank, first.A.shape[1])
    B = first.B.new_zeros(first.B.shape[0], rank)
    for weights, w in parts:
        A[: weights.rank] += w * weights.A
        B[:, : weights.rank] += (w * weights.scaling) * weights.B
    return A, B


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
