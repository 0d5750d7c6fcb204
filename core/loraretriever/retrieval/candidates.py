"""From nearest cards to routings: fetch enough candidates past the filtered ones, then weight them."""

from __future__ import annotations

from typing import Any

import numpy as np

from loraretriever.engine.routing import Routing
from loraretriever.retrieval.index import LoraIndex
from loraretriever.retrieval.options import RouteOptions

__all__ = ["make_routing", "nearest"]


def nearest(
    index: LoraIndex,
    vectors: np.ndarray,
    k: int,
    where: dict[str, Any] | None,
    excludes: list[set[str]],
    routable: set[str],
) -> list[list[tuple[str, float]]]:
    """The k best routable, non-excluded adapters per vector; fetches more when some are filtered out."""
    total = index.count()
    out: list[list[tuple[str, float]]] = [[] for _ in range(len(vectors))]
    todo = list(range(len(vectors)))
    fetch = min(total, k + max((len(e) for e in excludes), default=0) + 4)
    while todo and fetch > 0:
        results = index.query(vectors[todo], fetch, where=where)
        again = []
        for row, found in zip(todo, results, strict=True):
            kept = [(name, sim) for name, sim in found if name in routable and name not in excludes[row]]
            out[row] = kept[:k]
            if len(kept) < k and len(found) == fetch and fetch < total:
                again.append(row)
        todo, fetch = again, min(total, fetch * 4)
    return out


def make_routing(found: list[tuple[str, float]], opts: RouteOptions, any_routable: bool) -> Routing:
    if not found:
        reason = "no routable adapter matched" if any_routable else "no routable adapters (no cards, or empty pool)"
        return Routing.base(reason)
    kept = found if opts.min_similarity is None else [(n, s) for n, s in found if s >= opts.min_similarity]
    if not kept:
        best_name, best_sim = found[0]
        return Routing.base(f"no adapter with similarity >= {opts.min_similarity:g} (best: {best_name} {best_sim:.3f})")
    names = tuple(name for name, _ in kept)
    sims = np.array([sim for _, sim in kept], dtype=np.float64)
    if opts.weighting == "uniform":
        weights = np.full(len(kept), 1.0 / len(kept))
    else:
        logits = (sims - sims.max()) / opts.routing_temperature
        weights = np.exp(logits) / np.exp(logits).sum()
    return Routing(
        names,
        tuple(weights.tolist()),
        similarities=tuple(sims.tolist()),
        mode=opts.mode,
        fusion=opts.fusion,
        density=opts.density,
    )
