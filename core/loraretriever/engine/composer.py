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

Learned gates (:mod:`loraretriever.engine.gates`) ride on the same pass:

* ``flow`` rows are built like a mixture at weight 1; a pre-hook on each decoder layer computes the
  row's per-token slot weights from the layer's input and the row's retrieval weights (the gate's
  prior), and the layer's hooks scale each rank column
  of ``x @ A_t`` by its slot's weight before ``@ B_t``;
* ``meteora`` rows have no static factors: at each gated layer their tokens pick the top-2 adapters
  of the gate's pool and only those two LoRAs are applied (gathered per token while decoding,
  grouped by adapter for long prompts), so the cost per token is bounded by the top-k.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from loraretriever.engine.adapter import LoraWeights
from loraretriever.engine.gates import FlowGate, Gate, GateError, MeteoraGate, layer_index
from loraretriever.engine.pool import LoraPool
from loraretriever.engine.routing import Routing

__all__ = ["Composer", "LayerPlan", "stack_factors"]


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


@dataclass(frozen=True)
class _GatedRows:
    """Which rows of the active batch a flow or meteora gate serves."""

    flow: dict[str, torch.Tensor] = field(default_factory=dict)  # gate name -> row indices
    flow_prior: torch.Tensor | None = None  # (batch, k_max): log retrieval weights, -inf for empty slots
    k_max: int = 0
    meteora: dict[str, torch.Tensor] = field(default_factory=dict)  # gate name -> row indices


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
        self.gates: dict[str, Gate] = {}
        self._routings: list[Routing] = []
        self._gated = _GatedRows()
        self._token_weights: dict[int, torch.Tensor] = {}  # decoder layer -> (batch, tokens, k_max + 1)
        self._decoder_layers = {
            int(m[1]): module
            for name, module in model.named_modules()
            if (m := re.fullmatch(r"(?:.*\.)?layers\.(\d+)", name))
        }
        self._layer_hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._meteora_factors: dict[tuple[str, str], tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.gate_logits: list[tuple[str, str, torch.Tensor, torch.Tensor]] | None = None
        """When a list, meteora hooks append ``(gate, module, rows, logits)`` (for training losses)."""

    # -- gates -------------------------------------------------------------------------------
    def register_gate(self, name: str, gate: Gate) -> None:
        """Makes ``gate`` usable by routings that name it (replacing a gate of that name).

        Raises:
            GateError: a flow gate for another model shape, or a meteora gate over modules the
                model does not have.
        """
        if isinstance(gate, FlowGate):
            gate.check_model(self.model)
        elif isinstance(gate, MeteoraGate):
            unknown = sorted(m for m in gate.config.modules if m not in self._linear)
            if unknown:
                raise GateError(f"meteora gate {name!r} gates modules {unknown[:3]} that the model does not have.")
        else:
            raise TypeError(f"gate {name!r} is a {type(gate).__name__}, not a FlowGate or MeteoraGate.")
        with self._lock:
            self.gates[name] = gate
            self._meteora_factors = {k: v for k, v in self._meteora_factors.items() if k[0] != name}

    def unregister_gate(self, name: str) -> None:
        with self._lock:
            self.gates.pop(name, None)
            self._meteora_factors = {k: v for k, v in self._meteora_factors.items() if k[0] != name}

    def _gate(self, routing: Routing, row: int) -> Gate:
        gate = self.gates.get(routing.gate)
        if gate is None:
            raise GateError(
                f"routings[{row}] names gate {routing.gate!r}, which is not registered (known: {sorted(self.gates)})."
            )
        if gate.kind != routing.mode:
            raise GateError(
                f"routings[{row}] has mode {routing.mode!r} but gate {routing.gate!r} is a {gate.kind} gate."
            )
        if isinstance(gate, FlowGate) and len(routing.adapters) > gate.config.k:
            raise GateError(
                f"routings[{row}] has {len(routing.adapters)} adapters but flow gate {routing.gate!r} has "
                f"{gate.config.k} slots. Fix: route with top_k <= {gate.config.k}."
            )
        if isinstance(gate, MeteoraGate):
            reason = gate.mismatch(self.pool)
            if reason:
                raise GateError(
                    f"meteora gate {routing.gate!r} no longer matches the pool: {reason}. Fix: retrain it "
                    "(loraretriever train-gate --kind meteora) or route with mode='mixture'."
                )
        return gate

    def _gated_rows(self, routings: Sequence[Routing]) -> _GatedRows:
        flow: dict[str, list[int]] = {}
        meteora: dict[str, list[int]] = {}
        for row, routing in enumerate(routings):
            if routing.mode in ("flow", "meteora") and not routing.is_base:
                self._gate(routing, row)
                (flow if routing.mode == "flow" else meteora).setdefault(routing.gate, []).append(row)
        if not flow and not meteora:
            return _GatedRows()
        k_max = max((self.gates[name].config.k for name in flow), default=0)
        prior = torch.full((len(routings), k_max), float("-inf"))
        for rows in flow.values():
            for row in rows:
                weights = torch.tensor(routings[row].weights, dtype=torch.float32).clamp(min=0)
                if weights.sum() <= 0:
                    weights = torch.ones_like(weights)
                prior[row, : len(weights)] = (weights / weights.sum()).log()
        as_index = lambda groups: {n: torch.tensor(r, dtype=torch.long) for n, r in groups.items()}  # noqa: E731
        return _GatedRows(as_index(flow), prior, k_max, as_index(meteora))

    def build_plan(self, routings: Sequence[Routing]) -> dict[str, LayerPlan]:
        """The per-layer factors for a batch of routings (one per row)."""
        return self._build(routings)[0]

    def _build(self, routings: Sequence[Routing]) -> tuple[dict[str, LayerPlan], _GatedRows]:
        """The per-layer factors and which rows each gate serves."""
        rows: list[list[tuple[str, float]]] = []
        for i, routing in enumerate(routings):
            if not isinstance(routing, Routing):
                raise TypeError(f"routings[{i}] is a {type(routing).__name__}, not a Routing.")
            self.pool.check_names(list(routing.adapters))
            rows.append(routing.effective())
        gated = self._gated_rows(routings)
        adapters = {name: self.pool.get(name) for row in rows for name, _ in row}
        modules = sorted({m for adapter in adapters.values() for m in adapter.modules})
        # flow rows are mixtures at weight 1 (their gate scales them per token)
        modes = {"mixture" if routing.mode == "flow" else routing.mode for routing in routings}
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
            if gated.flow:
                layer_plan = LayerPlan(
                    layer_plan.A_t,
                    layer_plan.B_t,
                    _slot_index(rows, routings, adapters, module, layer_plan, gated.k_max),
                )
            plan[module] = layer_plan
        return plan, gated

    @contextmanager
    def apply(self, routings: Sequence[Routing]) -> Iterator[None]:
        """Within the block, every forward pass of the model composes ``routings`` row by row.

        The batch dimension of every input must equal ``len(routings)``. One plan is active at a
        time; concurrent callers wait for each other.
        """
        plan, gated = self._build(routings)
        with self._lock:
            self._install_hooks(plan, gated)
            self._plan, self._batch_size = plan, len(routings)
            self._routings, self._gated = list(routings), gated
            try:
                yield
            finally:
                self._plan, self._batch_size = None, 0
                self._routings, self._gated, self._token_weights = [], _GatedRows(), {}

    def select_rows(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keeps only some rows of the active plan (e.g. when finished rows leave a generation)."""
        if self._plan is None:
            raise RuntimeError("select_rows() needs an active plan: call it inside `with composer.apply(...)`.")
        index = torch.as_tensor(rows, dtype=torch.long)
        self._plan = {
            m: LayerPlan(
                p.A_t.index_select(0, index),
                p.B_t.index_select(0, index),
                None if p.slot_index is None else p.slot_index.index_select(0, index),
            )
            for m, p in self._plan.items()
        }
        self._batch_size = len(index)
        self._routings = [self._routings[i] for i in index.tolist()]
        self._gated = self._gated_rows(self._routings)

    def remove_hooks(self) -> None:
        """Detaches every hook; the model is left exactly as it was loaded."""
        for handle in [*self._hooks.values(), *self._layer_hooks.values()]:
            handle.remove()
        self._hooks.clear()
        self._layer_hooks.clear()

    def _install_hooks(self, plan: dict[str, LayerPlan], gated: _GatedRows) -> None:
        modules = set(plan) | {m for name in gated.meteora for m in self.gates[name].config.modules}
        for module in modules:
            if module not in self._hooks:
                self._hooks[module] = self._linear[module].register_forward_hook(self._make_hook(module))
        if gated.flow:
            for index, layer in self._decoder_layers.items():
                if index not in self._layer_hooks:
                    self._layer_hooks[index] = layer.register_forward_pre_hook(
                        self._make_layer_hook(index), with_kwargs=True
                    )

    def _make_layer_hook(self, index: int):
        """Computes the flow rows' per-token slot weights from the decoder layer's input."""

        def hook(_layer: nn.Module, args: tuple, kwargs: dict) -> None:
            gated = self._gated
            if self._plan is None or not gated.flow:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            rows, tokens = hidden.shape[:2]
            weights = hidden.new_ones(rows, tokens, gated.k_max + 1)
            for name, index_rows in gated.flow.items():
                gate = self.gates[name]
                k = gate.config.k
                slot_weights = gate(index, hidden.index_select(0, index_rows), gated.flow_prior[index_rows, :k])
                filler = weights.new_ones(len(index_rows), tokens, gated.k_max + 1 - k)
                weights = weights.index_copy(0, index_rows, torch.cat([slot_weights.to(weights.dtype), filler], -1))
            self._token_weights[index] = weights
            return None

        return hook

    def _make_hook(self, module: str):
        def hook(_layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            plan, gated = self._plan, self._gated
            if plan is None or (module not in plan and not gated.meteora):
                return output
            x = args[0]
            if x.shape[0] != self._batch_size:
                raise RuntimeError(
                    f"layer {module!r} got a batch of {x.shape[0]} rows but the active routing has "
                    f"{self._batch_size}; run the whole routed batch in one forward pass."
                )
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            result = output.reshape(x.shape[0], -1, output.shape[-1])
            layer_plan = plan.get(module)
            if layer_plan is not None:
                hidden = torch.bmm(flat, layer_plan.A_t)
                if layer_plan.slot_index is not None:
                    weights = self._token_weights[layer_index(module)]
                    slots = layer_plan.slot_index[:, None, :].expand(-1, hidden.shape[1], -1)
                    hidden = hidden * weights.gather(2, slots)
                result = torch.baddbmm(result, hidden, layer_plan.B_t)
            for name, rows in gated.meteora.items():
                if module in self.gates[name].config.modules:
                    result = result.index_add(0, rows, self._meteora_update(name, module, flat.index_select(0, rows)))
            return result.view(output.shape)

        return hook

    def _meteora_update(self, name: str, module: str, x: torch.Tensor) -> torch.Tensor:
        """The top-k LoRA update of meteora rows ``x`` ``(rows, tokens, in)`` at ``module``."""
        gate: MeteoraGate = self.gates[name]
        rows, tokens, _ = x.shape
        flat = x.reshape(rows * tokens, -1)
        logits = gate.logits(module, flat)
        if self.gate_logits is not None:
            self.gate_logits.append((name, module, rows, logits))
        top, index = logits.topk(gate.config.top_k, dim=-1)
        weights = torch.softmax(top / gate.config.temperature, dim=-1).to(x.dtype)
        A, B = self._meteora_stack(name, module)
        if index.numel() <= 512:  # decoding: gather each token's k factor pairs
            hidden = torch.einsum("mi,mkri->mkr", flat, A[index]) * weights[..., None]
            update = torch.einsum("mkr,mkor->mo", hidden, B[index])
        else:  # long prompts: one matmul pair per adapter the tokens chose
            chosen, token = index.reshape(-1), torch.arange(flat.shape[0]).repeat_interleave(gate.config.top_k)
            weight = weights.reshape(-1)
            update = flat.new_zeros(flat.shape[0], B.shape[1])
            for adapter in chosen.unique().tolist():
                picked = (chosen == adapter).nonzero().squeeze(1)
                tokens_of = token[picked]
                part = (flat.index_select(0, tokens_of) @ A[adapter].T) @ B[adapter].T
                update = update.index_add(0, tokens_of, part * weight[picked, None])
        return update.view(rows, tokens, -1)

    def _meteora_stack(self, name: str, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's pool at ``module`` as ``A (N, r, in)`` and scaled ``B (N, out, r)`` (zeros where an
        adapter does not adapt the module), cached per pool version."""
        cached = self._meteora_factors.get((name, module))
        if cached is not None and cached[0] == self.pool.version:
            return cached[1], cached[2]
        gate: MeteoraGate = self.gates[name]
        present = [self.pool.get(a).modules.get(module) for a in gate.config.adapters]
        A, B = stack_factors(present, self._linear[module])
        self._meteora_factors[(name, module)] = (self.pool.version, A, B)
        return A, B


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


def _slot_index(
    rows: list[list[tuple[str, float]]],
    routings: Sequence[Routing],
    adapters: dict,
    module: str,
    plan: LayerPlan,
    k_max: int,
) -> torch.Tensor:
    """For every rank column of ``plan``, the flow slot it belongs to (``k_max``, the always-1
    column, for other rows and padding). Columns follow the row's adapters in order, as built."""
    index = torch.full((len(rows), plan.A_t.shape[2]), k_max, dtype=torch.long)
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
