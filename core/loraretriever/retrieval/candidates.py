"""From nearest cards to routings: fetch enough candidates past the filtered ones, then weight them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from loraretriever.engine.routing import Routing
from loraretriever.retrieval.cards import RetrievalError
from loraretriever.retrieval.confidence import Confidence
from loraretriever.retrieval.index import LoraIndex
from loraretriever.retrieval.options import RouteOptions

__all__ = ["fetch_size", "make_routing", "nearest"]


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


def fetch_size(opts: RouteOptions) -> int:
    """How many nearest adapters a routing needs: ``top_k``, the soup's ``soup_k``, and two for the
    confidence's lead of the top-1 over the second."""
    if opts.uncertain == "keep":
        return opts.k
    soup = 0 if opts.uncertain != "soup" else opts.soup_k * (10 if opts.soup_of == "domain" else 1)
    return max(opts.k, 2, soup)


def _soup(nearby: list[tuple[str, float]], opts: RouteOptions, domains: Mapping[str, str | None]) -> list:
    """The soup's adapters: the ``soup_k`` nearest, or with ``soup_of='domain'`` the ``soup_k``
    nearest of the domain most common among the 3 nearest (ties: the nearer; no domains: nearest),
    looked for among the ``10 * soup_k`` nearest (see :func:`fetch_size`)."""
    voters = [domains[n] for n, _ in nearby[:3] if domains.get(n) is not None]
    if opts.soup_of == "domain" and voters:
        family = max(voters, key=voters.count)  # max keeps the first (nearest) of tied families
        return [(n, s) for n, s in nearby if domains.get(n) == family][: opts.soup_k]
    return nearby[: opts.soup_k]


def make_routing(
    found: list[tuple[str, float]],
    opts: RouteOptions,
    any_routable: bool,
    confidence: Confidence | None = None,
    domains: Mapping[str, str | None] | None = None,
) -> Routing:
    """The routing of one prompt from its nearest adapters (best first, ``fetch_size(opts)`` of them):
    the top ``k`` weighted by ``opts.weighting``; with ``opts.uncertain``, a prompt whose top-1 the
    router's ``confidence`` judges more likely wrong than right gets a soup (a uniform fusion,
    AdapterSoup's weight average) or the base model instead. ``domains`` (adapter -> card domain)
    serve ``soup_of='domain'``."""
    nearby, found = found, found[: opts.k]
    if not found:
        reason = "no routable adapter matched" if any_routable else "no routable adapters (no cards, or empty pool)"
        return Routing.base(reason)
    if opts.uncertain != "keep":
        if confidence is None:
            raise RetrievalError(
                f"uncertain={opts.uncertain!r} needs the pool's confidence calibration, which this router has not. "
                "Fix: `loraretriever calibrate --pool DIR --queries SPLITS`, or drop uncertain."
            )
        sure = confidence.probability([sim for _, sim in nearby])
        if sure < 0.5:  # the calibrated decision: the nearest adapter is more likely not the prompt's
            why = f"unsure of {nearby[0][0]} (confidence {sure:.2f})"
            if opts.uncertain == "base":
                return Routing.base(why)
            soup = _soup(nearby, opts, domains or {})
            return Routing(
                tuple(name for name, _ in soup),
                (1.0 / len(soup),) * len(soup),
                similarities=tuple(sim for _, sim in soup),
                mode="fusion",
                fallback=f"{why}: a soup of the {len(soup)} nearest",
            )
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
