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
tensor operations per layer rather than per row. A plan (:class:`BatchPlan`) is a value: the engine
builds one per group of requests when they are admitted; the running batch keeps its rows in a
:class:`RunningPlan`, which requests join and leave without factors being rebuilt.

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
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from loraretriever.engine.factors import FusionSpec, LayerPlan, build_layer_plan, slot_index, stack_factors
from loraretriever.engine.gate_set import GatedRows, GateSet
from loraretriever.engine.gates import MeteoraGate, layer_index
from loraretriever.engine.kv import move_rows, swap_moves
from loraretriever.engine.routing import Routing
from loraretriever.errors import InvalidOptionError, InvalidTypeError
from loraretriever.pool.adapter import LoraAdapter
from loraretriever.pool.lora_pool import LoraPool

__all__ = ["BatchPlan", "Composer", "RunningPlan"]


@dataclass(frozen=True)
class BatchPlan:
    """What the hooks apply to a batch: row ``i`` of every input is composed as ``routings[i]``."""

    routings: tuple[Routing, ...]
    layers: dict[str, LayerPlan]  # adapted module -> its stacked per-row factors
    gated: GatedRows

    def __len__(self) -> int:
        return len(self.routings)


class Composer:
    """Applies a batch of routings to a base model's forward pass.

    The model's modules are not replaced: a forward hook on each adapted ``nn.Linear`` adds the
    row-wise LoRA update while a plan is active, and does nothing otherwise (so the model is the
    plain base model outside :meth:`apply` / :meth:`use`).

    Example:
        >>> composer = Composer(model, pool)  # doctest: +SKIP
        >>> routings = [Routing.pinned(["sst2"]), Routing.pinned(["sst2", "imdb"]), Routing.base()]
        >>> with composer.apply(routings):  # doctest: +SKIP
        ...     logits = model(**batch).logits
    """

    def __init__(self, model: nn.Module, pool: LoraPool) -> None:
        if pool.model is not model:
            raise InvalidOptionError(
                "the pool was built for another model object; pass the model the pool validates against."
            )
        self.model = model
        self.pool = pool
        self.gates = GateSet(model, pool)
        self._linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        # The active plan is per thread: several RoutedLMs may share one base model (hooks of each on
        # the same modules), and one's hooks must never act on another's forward pass.
        self._local = threading.local()
        self._lock = threading.RLock()
        self._decoder_layers = {
            int(m[1]): module
            for name, module in model.named_modules()
            if (m := re.fullmatch(r"(?:.*\.)?layers\.(\d+)", name))
        }
        self._layer_hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._meteora_factors: dict[tuple[str, str], tuple[int, MeteoraGate, torch.Tensor, torch.Tensor]] = {}
        self.gate_logits: list[tuple[str, str, torch.Tensor, torch.Tensor]] | None = None
        """When a list, meteora hooks append ``(gate, module, rows, logits)`` (for training losses)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- plans -------------------------------------------------------------------------------
    def build_plan(self, routings: Sequence[Routing], held: Mapping[str, LoraAdapter] | None = None) -> BatchPlan:
        """The per-layer factors of a batch of routings (one per row), on the model's device.

        Args:
            routings: One per row.
            held: Adapters the rows hold by name (taken from the pool when they were admitted),
                used even if the pool has dropped them since.

        Raises:
            TypeError: a row that is not a Routing. AdapterError: an adapter not in the pool.
            GateError: a gate that is unknown or cannot serve its row.
        """
        held = held or {}
        rows: list[list[tuple[str, float]]] = []
        for i, routing in enumerate(routings):
            if not isinstance(routing, Routing):
                raise InvalidTypeError(f"routings[{i}] is a {type(routing).__name__}, not a Routing.")
            self.pool.check_names([n for n in routing.adapters if n not in held])
            rows.append(routing.effective())
        self.pool.follow_model()  # adapters and gates on the model's device and dtype, if it moved
        self.gates.follow_model()
        gated = self.gates.rows(routings, self.device)
        adapters = {name: held.get(name) or self.pool.get(name) for row in rows for name, _ in row}
        modules = sorted({m for adapter in adapters.values() for m in adapter.modules})
        modes = ["mixture" if routing.mode == "flow" else routing.mode for routing in routings]
        layers: dict[str, LayerPlan] = {}
        for module in modules:
            parts = [
                [(adapters[n].modules[module], w) for n, w in row if module in adapters[n].modules] for row in rows
            ]
            fusions = [
                FusionSpec(r.fusion, r.density, zlib.crc32(f"{module}|{'|'.join(r.adapters)}".encode()))
                if r.mode == "fusion" and r.fusion != "linear"
                else None
                for r in routings
            ]
            plan = build_layer_plan(parts, modes, self._linear[module], fusions)
            if gated.flow:
                plan = LayerPlan(plan.A_t, plan.B_t, slot_index(rows, routings, adapters, module, plan, gated.k_max))
            layers[module] = plan
        return BatchPlan(tuple(routings), layers, gated)

    def select(self, plan: BatchPlan, rows: torch.Tensor | Sequence[int]) -> BatchPlan:
        """The plan of some rows of ``plan`` (e.g. when finished requests leave the batch)."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        routings = tuple(plan.routings[i] for i in rows)
        return _without_idle_slots(
            BatchPlan(
                routings, {m: p.select(index) for m, p in plan.layers.items()}, self.gates.rows(routings, self.device)
            )
        )

    @property
    def _active(self) -> BatchPlan | None:
        return getattr(self._local, "plan", None)

    @_active.setter
    def _active(self, plan: BatchPlan | None) -> None:
        self._local.plan = plan

    @property
    def _token_weights(self) -> dict[int, torch.Tensor]:
        """Decoder layer -> (batch, tokens, k_max + 1) slot weights of the flow rows (this thread's)."""
        if getattr(self._local, "token_weights", None) is None:
            self._local.token_weights = {}
        return self._local.token_weights

    @_token_weights.setter
    def _token_weights(self, weights: dict[int, torch.Tensor]) -> None:
        self._local.token_weights = weights

    @contextmanager
    def use(self, plan: BatchPlan) -> Iterator[None]:
        """Within the block, every forward pass of the model composes ``plan`` row by row.

        The batch dimension of every input must equal ``len(plan)``. One plan is active at a time;
        concurrent callers wait for each other.
        """
        with self._lock:
            self._install_hooks(plan)
            self._active = plan
            try:
                yield
            finally:
                self._active, self._token_weights = None, {}

    @contextmanager
    def apply(self, routings: Sequence[Routing]) -> Iterator[None]:
        """:meth:`use` of the plan of ``routings``."""
        with self.use(self.build_plan(routings)):
            yield

    def remove_hooks(self) -> None:
        """Detaches every hook; the model is left exactly as it was loaded."""
        for handle in [*self._hooks.values(), *self._layer_hooks.values()]:
            handle.remove()
        self._hooks.clear()
        self._layer_hooks.clear()

    # -- hooks -------------------------------------------------------------------------------
    def _install_hooks(self, plan: BatchPlan) -> None:
        modules = set(plan.layers) | {m for name in plan.gated.meteora for m in self.gates[name].config.modules}
        for module in modules:
            if module not in self._hooks:
                self._hooks[module] = self._linear[module].register_forward_hook(self._make_hook(module))
        if plan.gated.flow:
            for index, layer in self._decoder_layers.items():
                if index not in self._layer_hooks:
                    self._layer_hooks[index] = layer.register_forward_pre_hook(
                        self._make_layer_hook(index), with_kwargs=True
                    )

    def _make_layer_hook(self, index: int):
        """Computes the flow rows' per-token slot weights from the decoder layer's input."""

        def hook(_layer: nn.Module, args: tuple, kwargs: dict) -> None:
            plan = self._active
            if plan is None or not plan.gated.flow:
                return None
            gated = plan.gated
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
            plan = self._active
            if plan is None:
                return output
            layer_plan = plan.layers.get(module)
            if layer_plan is None and not plan.gated.meteora:
                return output
            x = args[0]
            if x.shape[0] != len(plan):
                raise RuntimeError(
                    f"layer {module!r} got a batch of {x.shape[0]} rows but the active routing has "
                    f"{len(plan)}; run the whole routed batch in one forward pass."
                )
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            result = output.reshape(x.shape[0], -1, output.shape[-1])
            if layer_plan is not None:
                hidden = torch.bmm(flat, layer_plan.A_t)
                if layer_plan.slot_index is not None:
                    weights = self._token_weights[layer_index(module)]
                    slots = layer_plan.slot_index[:, None, :].expand(-1, hidden.shape[1], -1)
                    hidden = hidden * weights.gather(2, slots)
                result = torch.baddbmm(result, hidden, layer_plan.B_t)
            for name, rows in plan.gated.meteora.items():
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
            chosen = index.reshape(-1)
            token = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(gate.config.top_k)
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
        gate: MeteoraGate = self.gates[name]
        cached = self._meteora_factors.get((name, module))
        if cached is not None and cached[0] == self.pool.version and cached[1] is gate:
            return cached[2], cached[3]
        present = [self.pool.get(a).modules.get(module) for a in gate.config.adapters]
        A, B = stack_factors(present, self._linear[module])
        self._meteora_factors[(name, module)] = (self.pool.version, gate, A, B)
        return A, B


def _without_idle_slots(plan: BatchPlan) -> BatchPlan:
    """Drops the flow slot indices of a plan that no longer has flow rows (no gate weighs them)."""
    if plan.gated.flow or not any(p.slot_index is not None for p in plan.layers.values()):
        return plan
    layers = {m: LayerPlan(p.A_t, p.B_t) for m, p in plan.layers.items()}
    return BatchPlan(plan.routings, layers, plan.gated)


class RunningPlan:
    """The plan of a batch whose rows change in place between steps (a persistent batch): the
    factors of up to ``capacity`` rows in preallocated buffers, the active rows first. A newcomer's
    rows are copied in after the last row, a leaving row is replaced by the last one, so a join
    or a leave copies only the rows that change; :meth:`view` is the :class:`BatchPlan` to apply.

    Args:
        composer: Builds the gated rows of the view.
        capacity: Rows to allocate (the buffers grow if more join).
    """

    def __init__(self, composer: Composer, capacity: int) -> None:
        self.composer, self.capacity, self.n = composer, capacity, 0
        self.room = capacity  # the rows to make room for when the buffers first grow
        self.routings: list[Routing] = []
        self._A: dict[str, torch.Tensor] = {}
        self._B: dict[str, torch.Tensor] = {}
        self._slots: dict[str, torch.Tensor] = {}  # flow slot of each rank column; -1: the always-1 column
        self._view: BatchPlan | None = None

    def __len__(self) -> int:
        return self.n

    @classmethod
    def adopt(cls, composer: Composer, plan: BatchPlan, capacity: int) -> RunningPlan:
        """A running plan over ``plan``'s rows; its tensors are used as they are when they fill
        ``capacity`` (no copy), else copied into buffers with room for ``capacity`` rows."""
        running = cls(composer, max(capacity, len(plan)))
        if len(plan) < running.capacity:
            running.extend(plan)
            return running
        for module, layer in plan.layers.items():
            running._A[module], running._B[module] = layer.A_t, layer.B_t
            if layer.slot_index is not None:
                slots = layer.slot_index
                running._slots[module] = torch.where(slots == plan.gated.k_max, -1, slots)
        running.routings, running.n = list(plan.routings), len(plan)
        return running

    def view(self) -> BatchPlan:
        """The active rows as a BatchPlan (views of the buffers, rebuilt only after a change)."""
        if self._view is None:
            n, routings = self.n, tuple(self.routings)
            gated = self.composer.gates.rows(routings, self.composer.device)
            layers = {}
            for module, A in self._A.items():
                slots = self._slots.get(module) if gated.flow else None
                if slots is not None:  # -1 marks the always-1 column, which is k_max here
                    slots = torch.where(slots[:n] < 0, gated.k_max, slots[:n])
                layers[module] = LayerPlan(A[:n], self._B[module][:n], slots)
            self._view = BatchPlan(routings, layers, gated)
        return self._view

    def extend(self, plan: BatchPlan) -> None:
        """Appends the rows of ``plan`` (copied)."""
        m, start = len(plan), self.n
        if start + m > self.capacity:
            self._resize(max(start + m, self.room if self.capacity < self.room else 2 * self.capacity))
        rows = slice(start, start + m)
        for module, layer in plan.layers.items():
            rank = layer.A_t.shape[2]
            if module not in self._A:  # rows past n are never read and joining rows are written whole,
                # so only the rows already here need zeros (they do not adapt this module)
                self._A[module] = layer.A_t.new_empty(self.capacity, layer.A_t.shape[1], rank)
                self._B[module] = layer.B_t.new_empty(self.capacity, rank, layer.B_t.shape[2])
                self._A[module][:start] = 0
                self._B[module][:start] = 0
            elif rank > self._A[module].shape[2]:
                self._widen(module, rank)
            A, B = self._A[module], self._B[module]
            A[rows, :, rank:] = 0
            B[rows, rank:] = 0
            A[rows, :, :rank] = layer.A_t
            B[rows, :rank] = layer.B_t
            if layer.slot_index is not None or module in self._slots:
                slots = self._slots.setdefault(module, torch.full(A.shape[::2], -1, dtype=torch.long, device=A.device))
                slots[rows] = -1
                if layer.slot_index is not None:
                    slots[rows, :rank] = torch.where(layer.slot_index == plan.gated.k_max, -1, layer.slot_index)
        for module in self._A.keys() - plan.layers.keys():  # rows that do not adapt this module
            self._A[module][rows] = 0
            self._B[module][rows] = 0
        self.routings.extend(plan.routings)
        self.n += m
        self._view = None

    def absorb(self, other: RunningPlan) -> None:
        """Appends the rows of ``other``, which is not used afterwards: into an empty plan its
        buffers move as they are (no copy: a prefilled group joining an idle batch), else the rows
        are copied (:meth:`extend`)."""
        if self.n or not other.n:
            self.extend(other.view())
            return
        self._A, self._B, self._slots = other._A, other._B, other._slots
        self.routings, self.n, self.capacity = list(other.routings), other.n, other.capacity
        other._A, other._B, other._slots, other.routings, other.n = {}, {}, {}, [], 0
        self._view = other._view = None

    def remove(self, leaving: Sequence[int]) -> None:
        """Drops rows; the last rows move into the holes (:func:`~loraretriever.engine.kv.swap_moves`)."""
        destinations, sources, n = swap_moves(self.n, leaving)
        move_rows([*self._A.values(), *self._B.values(), *self._slots.values()], destinations, sources)
        routings = list(self.routings)
        for d, s in zip(destinations, sources, strict=True):
            routings[d] = self.routings[s]
        self.routings = routings[:n]
        self.n = n
        self._view = None

    def take(self, rows: Sequence[int]) -> RunningPlan:
        """A new running plan holding copies of some rows."""
        out = RunningPlan(self.composer, len(rows))
        out.extend(self.composer.select(self.view(), list(rows)))
        return out

    def _resize(self, capacity: int) -> None:
        for buffers in (self._A, self._B, self._slots):
            for module, buffer in buffers.items():
                grown = buffer.new_empty((capacity, *buffer.shape[1:]))  # rows past n are never read
                grown[: self.n] = buffer[: self.n]
                buffers[module] = grown
        self.capacity = capacity

    def _widen(self, module: str, rank: int) -> None:
        A, B = self._A[module], self._B[module]
        self._A[module] = torch.nn.functional.pad(A, (0, rank - A.shape[2]))
        self._B[module] = torch.nn.functional.pad(B, (0, 0, 0, rank - B.shape[1]))
        if module in self._slots:
            self._slots[module] = torch.nn.functional.pad(self._slots[module], (0, rank - A.shape[2]), value=-1)
