"""How sure the router is: the calibrated chance that a prompt's nearest adapter is its own.

Retrieval always returns the nearest cards, even for a prompt of a task no adapter was trained on
(the paper's out-of-domain setting). There the nearest adapters are merely the least unrelated
ones, and weighting them as if they were right costs more than a soup of many (AdapterSoup). What
tells the two cases apart is the similarity profile: a prompt of a known task has one adapter
clearly nearest (on the demo pool's train split the top-1 cosine leads the second by 0.17 in the
median), an unknown one a flat profile (0.02).

:class:`Confidence` is a logistic model of ``P(top-1 is the prompt's own adapter)`` on two
features of the profile, the top-1 similarity and its lead over the second, fitted by
:func:`calibrate` on prompts whose task is known: each prompt is routed twice, with its own adapter
among the candidates and with it left out (so the model sees both in-domain and out-of-domain
profiles). With ``RouteOptions.uncertain``, a prompt whose ``p`` is below one half (its top-1 more
likely wrong than right) gets a uniform soup of the ``soup_k`` nearest adapters, or the base
model, instead of its top-k. (A soft blend, ``p * top-k + (1 - p) * soup``, was tried first on the
train split and lost to this switch both in domain and out of it: a confident prompt's own LoRA
scaled by 0.9 already loses points.) A pool keeps its calibration in ``POOL_DIR/confidence.json``
(``loraretriever calibrate``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraretriever.retrieval.cards import RetrievalError

__all__ = ["Confidence", "calibrate", "calibrate_router", "profile_features"]


def profile_features(similarities: Sequence[float]) -> tuple[float, float]:
    """``(top-1 similarity, its lead over the second)``; a lone candidate leads by its own similarity."""
    if not similarities:
        raise ValueError("a similarity profile needs at least one similarity.")
    top = float(similarities[0])
    return top, top - float(similarities[1]) if len(similarities) > 1 else top


@dataclass(frozen=True)
class Confidence:
    """``P(top-1 is right) = sigmoid(intercept + coef . profile_features(similarities))``.

    Args:
        coef: The weights of the top-1 similarity and of its lead.
        intercept: The logistic intercept.
        embedder: The embedder whose similarities it was fitted on (another one's do not fit).
        fitted_on: What it was fitted on (prompts, accuracy), for the record.

    Example:
        >>> confidence = Confidence(coef=(10.0, 20.0), intercept=-8.5, embedder="all-MiniLM-L6-v2")
        >>> round(confidence.probability([0.80, 0.62]), 2), round(confidence.probability([0.60, 0.59]), 2)
        (0.96, 0.09)
    """

    coef: tuple[float, float]
    intercept: float
    embedder: str
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = [*self.coef, self.intercept]
        if len(self.coef) != 2 or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise RetrievalError(
                f"confidence coef={self.coef!r}, intercept={self.intercept!r} must be 2 + 1 finite numbers."
            )
        object.__setattr__(self, "coef", tuple(float(c) for c in self.coef))

    def probability(self, similarities: Sequence[float]) -> float:
        """The chance that the first of these (best-first) similarities is the prompt's own adapter."""
        top, lead = profile_features(similarities)
        z = self.intercept + self.coef[0] * top + self.coef[1] * lead
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def save(self, path: str | Path) -> None:
        path = Path(path)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=1) + "\n")
        temporary.replace(path)  # a crash leaves the old file or the new one, never half of one

    @classmethod
    def load(cls, path: str | Path) -> Confidence:
        """Raises RetrievalError for an unreadable or malformed file, naming it."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(tuple(data["coef"]), data["intercept"], data["embedder"], data.get("fitted_on", {}))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RetrievalError(
                f"confidence file {str(path)!r} is unreadable ({err}). Fix: `loraretriever calibrate --pool DIR "
                "--queries SPLITS` rewrites it."
            ) from err


def calibrate(
    profiles: Sequence[Sequence[float]], right: Sequence[bool], embedder: str, *, regularisation: float = 1.0
) -> Confidence:
    """Fits :class:`Confidence` to similarity profiles (best first) and whether each one's top-1
    was the prompt's own adapter (L2-regularised logistic regression, scikit-learn's).

    Raises:
        ValueError: fewer than 2 profiles of each outcome (nothing to tell apart).
    """
    from sklearn.linear_model import LogisticRegression

    labels = np.array([bool(r) for r in right])
    if len(profiles) != len(labels):
        raise ValueError(f"{len(profiles)} profiles but {len(labels)} labels.")
    if labels.sum() < 2 or (~labels).sum() < 2:
        raise ValueError(
            f"calibration needs at least 2 prompts whose top-1 is right and 2 whose is wrong (got {int(labels.sum())} "
            f"and {int((~labels).sum())}); route more prompts, with and without their own adapter."
        )
    features = np.array([profile_features(p) for p in profiles])
    # standardised, so that the regularisation does not depend on the cosines' scale; the fitted
    # weights are folded back onto the raw features
    mean, scale = features.mean(0), features.std(0) + 1e-12
    model = LogisticRegression(C=regularisation).fit((features - mean) / scale, labels)
    predicted = model.predict((features - mean) / scale)
    coef = model.coef_[0] / scale
    intercept = float(model.intercept_[0] - (coef * mean).sum())
    return Confidence(
        coef=tuple(coef.tolist()),
        intercept=intercept,
        embedder=embedder,
        fitted_on={
            "profiles": len(labels),
            "right": int(labels.sum()),
            "accuracy": round(float((predicted == labels).mean()), 4),
        },
    )


def calibrate_router(router: Any, queries: Sequence[dict], *, regularisation: float = 1.0) -> Confidence:
    """Fits a router's :class:`Confidence` on queries of known tasks (``inputs``, ``task``): each is
    routed with its own adapter among the candidates and again without it (the out-of-domain
    case), and whether the top-1 is its own adapter is the label. Queries whose task has no
    routable adapter are used only without it. Fit on a train split, never on test prompts.

    Raises:
        ValueError: too few right or wrong top-1s to fit (see :func:`calibrate`).
    """
    texts, own = [q["inputs"] for q in queries], [q["task"] for q in queries]
    profiles: list[Sequence[float]] = []
    right: list[bool] = []
    for exclude in (None, [[task] for task in own]):
        routings = router.route(texts, top_k=2, uncertain="keep", exclude=exclude)
        for routing, task in zip(routings, own, strict=True):
            if routing.similarities:
                profiles.append(routing.similarities)
                right.append(routing.adapters[0] == task)
    return calibrate(profiles, right, router.embedder.name, regularisation=regularisation)
