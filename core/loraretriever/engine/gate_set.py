"""The gates a composer can apply, by name, and which rows of a batch each one serves."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loraretriever.engine.gates import FlowGate, Gate, GateError, MeteoraGate
from loraretriever.engine.routing import Routing
from loraretriever.errors import InvalidTypeError
from loraretriever.pool.lora_pool import LoraPool

__all__ = ["GateSet", "GatedRows"]


@dataclass(frozen=True)
class GatedRows:
    """Which rows of a batch a flow or meteora gate serves."""

    flow: dict[str, torch.Tensor] = field(default_factory=dict)  # gate name -> row indices
    flow_prior: torch.Tensor | None = None  # (batch, k_max): log retrieval weights, -inf for empty slots
    k_max: int = 0
    meteora: dict[str, torch.Tensor] = field(default_factory=dict)  # gate name -> row indices


class GateSet(Mapping[str, Gate]):
    """Name -> gate, checked against the model and the pool when registered and when used.

    Args:
        model: The base model; a registered gate is moved to its device and dtype.
        pool: The adapters; a MeteoRA gate must still match them when a routing names it.
    """

    def __init__(self, model: nn.Module, pool: LoraPool) -> None:
        self.model = model
        self.pool = pool
        self._linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._gates: dict[str, Gate] = {}
        self._versions: dict[str, int] = {}  # registrations so far, per name (prefix cache keys)
        self._registered = 0
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Gate:
        return self._gates[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._gates))

    def __len__(self) -> int:
        return len(self._gates)

    def register(self, name: str, gate: Gate) -> None:
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
            raise InvalidTypeError(f"gate {name!r} is a {type(gate).__name__}, not a FlowGate or MeteoraGate.")
        weight = next(self.model.parameters())
        gate.to(device=weight.device, dtype=weight.dtype)
        with self._lock:
            self._gates = {**self._gates, name: gate}
            self._registered += 1
            self._versions[name] = self._registered

    def version(self, name: str) -> int | None:
        """Which registration the gate ``name`` is (a gate replaced under its name differs)."""
        return self._versions.get(name)

    def follow_model(self) -> None:
        """Moves the gates to the model's device and dtype if the model moved since they were registered."""
        weight = next(self.model.parameters())
        for gate in self._gates.values():
            own = next(gate.parameters(), None)
            if own is not None and (own.device, own.dtype) != (weight.device, weight.dtype):
                gate.to(device=weight.device, dtype=weight.dtype)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._gates = {k: v for k, v in self._gates.items() if k != name}

    def check(self, routing: Routing, row: int) -> Gate:
        """The gate ``routing`` names, if it can serve it.

        Raises:
            GateError: an unknown gate, a gate of another kind, more adapters than flow slots, or a
                meteora gate that no longer matches the pool; naming the row and the fix.
        """
        gate = self._gates.get(routing.gate)
        if gate is None:
            raise GateError(
                f"routings[{row}] names gate {routing.gate!r}, which is not registered (known: {sorted(self)})."
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

    def rows(self, routings: Sequence[Routing], device: torch.device) -> GatedRows:
        """Which rows of ``routings`` each gate serves, and the flow rows' priors (on ``device``)."""
        flow: dict[str, list[int]] = {}
        meteora: dict[str, list[int]] = {}
        for row, routing in enumerate(routings):
            if routing.mode in ("flow", "meteora") and not routing.is_base:
                self.check(routing, row)
                (flow if routing.mode == "flow" else meteora).setdefault(routing.gate, []).append(row)
        if not flow and not meteora:
            return GatedRows()
        k_max = max((self._gates[name].config.k for name in flow), default=0)
        prior = torch.full((len(routings), k_max), float("-inf"))
        for rows in flow.values():
            for row in rows:
                weights = torch.tensor(routings[row].weights, dtype=torch.float32).clamp(min=0)
                if weights.sum() <= 0:
                    weights = torch.ones_like(weights)
                prior[row, : len(weights)] = (weights / weights.sum()).log()

        def as_index(groups: dict[str, list[int]]) -> dict[str, torch.Tensor]:
            return {n: torch.tensor(r, dtype=torch.long, device=device) for n, r in groups.items()}

        return GatedRows(as_index(flow), prior.to(device), k_max, as_index(meteora))
