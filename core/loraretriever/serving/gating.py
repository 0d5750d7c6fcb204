"""The gate policy: which gate serves ``mode="flow"`` / ``"meteora"``, and what retrieval it needs.

A flow gate weighs, per token, the adapters retrieval found (its slots); a MeteoRA gate picks per
token among all of its own adapters and needs no retrieval, unless it no longer matches the pool,
in which case the call falls back to the retrieval mixture and each routing says why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from loraretriever.engine.gates import FlowGate, Gate, GateError, MeteoraGate
from loraretriever.engine.routing import GATED_MODES, Routing
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.options import RouteOptions

__all__ = ["GatePlan", "plan_gated", "select_gate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatePlan:
    """How to route a call: retrieve (or pin) with ``retrieval``, then ``finish`` each routing.

    ``retrieval`` is None when no adapters are needed (a matching MeteoRA gate): then every
    prompt gets ``finish(Routing.base())``.
    """

    retrieval: RouteOptions | None
    finish: Callable[[Routing], Routing]


def _unchanged(routing: Routing) -> Routing:
    return routing


def select_gate(gates: Mapping[str, Gate], mode: str, name: str | None) -> tuple[str, Gate]:
    """The gate named ``name``, or the only gate of ``mode``'s kind.

    Raises:
        GateError: no such gate, a gate of the other kind, or not exactly one of the kind when unnamed.
    """
    kind = FlowGate if mode == "flow" else MeteoraGate
    if name is not None:
        gate = gates.get(name)
        if gate is None:
            raise GateError(f"no gate named {name!r} (known: {sorted(gates)}).")
        if not isinstance(gate, kind):
            raise GateError(f"gate {name!r} is a {gate.kind} gate, not a {mode} gate.")
        return name, gate
    matching = [(n, g) for n, g in gates.items() if isinstance(g, kind)]
    if len(matching) != 1:
        raise GateError(
            f"mode={mode!r} needs gate=<name>: {len(matching)} {mode} gates are registered "
            f"({sorted(gates)}). Train one with `loraretriever train-gate --kind {mode} --pool DIR`."
        )
    return matching[0]


def plan_gated(options: RouteOptions, gates: Mapping[str, Gate], pool: LoraPool) -> GatePlan:
    """The plan for ``options``: plain modes retrieve as asked; gated modes as their gate needs."""
    if options.mode not in GATED_MODES:
        return GatePlan(options, _unchanged)
    name, gate = select_gate(gates, options.mode, options.gate)
    if isinstance(gate, MeteoraGate):
        reason = gate.mismatch(pool)
        if reason is None:
            return GatePlan(None, lambda _: Routing.meteora(name))
        fallback = f"meteora gate {name!r}: {reason}; retrieval mixture used"
        return GatePlan(
            dataclasses.replace(options, mode="mixture", gate=None),
            lambda r: dataclasses.replace(r, fallback=r.fallback or fallback),
        )
    slots = gate.config.k
    if options.top_k is not None and options.top_k > slots:
        raise GateError(
            f"top_k={options.top_k} is more than flow gate {name!r}'s {slots} slots. Fix: top_k <= {slots}."
        )
    if options.adapters is not None and len(options.adapters) > slots:
        raise GateError(
            f"adapters={list(options.adapters)} are more than flow gate {name!r}'s {slots} slots. "
            f"Fix: pin at most {slots}."
        )
    retrieval = dataclasses.replace(
        options, mode="mixture", gate=None, top_k=None if options.adapters is not None else options.top_k or slots
    )
    return GatePlan(retrieval, lambda r: r if r.is_base else dataclasses.replace(r, mode="flow", gate=name))


def warn_if_mismatched(name: str, gate: Gate, pool: LoraPool) -> None:
    """A meteora gate that does not match the pool is kept; its calls fall back to retrieval."""
    if isinstance(gate, MeteoraGate) and gate.mismatch(pool):
        logger.warning("meteora gate %r: %s; its calls fall back to retrieval.", name, gate.mismatch(pool))
