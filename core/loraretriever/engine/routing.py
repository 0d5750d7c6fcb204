"""A routing: which adapters serve one prompt, with which weights, composed how."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from loraretriever.errors import InvalidOptionError

__all__ = ["FUSIONS", "GATED_MODES", "MODES", "Fusion", "Mode", "Routing"]

Mode = Literal["mixture", "fusion", "single", "flow", "meteora"]
MODES: tuple[str, ...] = ("mixture", "fusion", "single", "flow", "meteora")
GATED_MODES: tuple[str, ...] = ("flow", "meteora")
Fusion = Literal["linear", "ties", "dare_linear", "dare_ties"]
FUSIONS: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class Routing:
    """The adapters of one prompt (best first), their weights and the composition mode.

    * ``mixture``: ``y = W0 x + sum_j w_j s_j B_j A_j x`` (the weighted sum of the LoRAs' outputs).
    * ``fusion``: ``y = W0 x + (sum_j w_j s_j B_j)(sum_j w_j A_j) x`` (one LoRA from averaged
      matrices; ranks differ -> smaller ones are zero-padded to the largest).
      ``fusion`` says how the matrices are merged: ``linear`` as above; ``ties``, ``dare_linear``
      and ``dare_ties`` merge each of A and B as PEFT's ``add_weighted_adapter`` does (weights
      ``sqrt(w_j s_j)`` on each, its ``merge_utils``; LoRAX offers them per request): ``ties``
      keeps each adapter's ``density`` largest entries, elects each entry's sign by their total
      and averages the agreeing weighted entries; ``dare_linear`` drops entries at random
      (keeping ``density``, rescaled by ``1/density``; seeded by the adapters and layer, so a
      routing always fuses alike) before a weighted sum; ``dare_ties`` drops them so before TIES.
    * ``single``: the first adapter alone, at weight 1.
    * ``flow``: the adapters are the slots of the LoRA-Flow ``gate``, which gives every token its
      own weights over them, starting from ``weights`` (the gate's prior).
    * ``meteora``: no adapters listed: the MeteoRA ``gate`` picks the top-2 of its pool per token.

    No adapters (and no meteora gate) means the base model. ``fallback`` says why the routing is
    not what was asked for: why a prompt got no adapter, or why a gate was replaced by retrieval.

    Example:
        >>> print(Routing(("sst2", "imdb"), (0.5, 0.5), similarities=(0.81, 0.77)))
        mixture: sst2 0.50 (sim 0.810), imdb 0.50 (sim 0.770)
    """

    adapters: tuple[str, ...] = field(default=(), metadata={"help": "Adapter names, best first."})
    weights: tuple[float, ...] = field(default=(), metadata={"help": "One weight per adapter."})
    similarities: tuple[float, ...] | None = field(
        default=None, metadata={"help": "Retrieval similarity per adapter, when a router chose them."}
    )
    mode: Mode = field(default="mixture", metadata={"help": "mixture, fusion or single."})
    fallback: str | None = field(default=None, metadata={"help": "Why the routing differs from the request."})
    gate: str | None = field(default=None, metadata={"help": "The gate of a flow or meteora routing."})
    fusion: Fusion = field(
        default="linear", metadata={"help": "How a fusion merges matrices: linear, ties, dare_linear or dare_ties."}
    )
    density: float = field(
        default=0.5, metadata={"help": "The share of entries ties / dare keep of each matrix, in (0, 1]."}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.similarities is not None:
            object.__setattr__(self, "similarities", tuple(float(s) for s in self.similarities))
        if self.mode not in MODES:
            raise InvalidOptionError(f"mode={self.mode!r} is not one of {MODES}.", param="mode")
        if len(self.weights) != len(self.adapters):
            raise InvalidOptionError(
                f"Routing has {len(self.adapters)} adapters {self.adapters} but {len(self.weights)} weights."
            )
        if self.similarities is not None and len(self.similarities) != len(self.adapters):
            raise InvalidOptionError(
                f"Routing has {len(self.adapters)} adapters but {len(self.similarities)} similarities."
            )
        if (self.mode in GATED_MODES) != (self.gate is not None):
            raise InvalidOptionError(
                f"mode={self.mode!r} with gate={self.gate!r}: the modes {GATED_MODES} need a gate name, "
                "the others take none.",
                param="mode",
            )
        if self.mode == "meteora" and self.adapters:
            raise InvalidOptionError(
                f"a meteora routing lists no adapters (its gate picks them per token); got {self.adapters}."
            )
        if self.fusion not in FUSIONS:
            raise InvalidOptionError(f"fusion={self.fusion!r} is not one of {FUSIONS}.", param="fusion")
        if self.fusion != "linear" and self.mode != "fusion":
            raise InvalidOptionError(
                f"fusion={self.fusion!r} merges matrices, so it needs mode='fusion' (got {self.mode!r}).",
                param="fusion",
            )
        density = self.density
        if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
            raise InvalidOptionError(f"density={density!r} must be a share in (0, 1], e.g. 0.5.", param="density")
        if len(set(self.adapters)) != len(self.adapters):
            raise InvalidOptionError(f"Routing names an adapter twice: {self.adapters}.")
        for name, weight in zip(self.adapters, self.weights, strict=True):
            if not math.isfinite(weight):
                raise InvalidOptionError(f"weight {weight!r} of adapter {name!r} is not finite.")

    @classmethod
    def base(cls, reason: str | None = None) -> Routing:
        """The base model alone."""
        return cls(fallback=reason)

    @classmethod
    def pinned(
        cls,
        adapters: Sequence[str],
        weights: Sequence[float] | None = None,
        mode: Mode = "mixture",
        fusion: Fusion = "linear",
        density: float = 0.5,
    ) -> Routing:
        """Fixed adapters, by default with uniform weights ``1/k``."""
        adapters = tuple(adapters)
        if weights is None:
            weights = tuple(1.0 / len(adapters) for _ in adapters) if adapters else ()
        return cls(adapters, tuple(weights), mode=mode, fusion=fusion, density=density)

    @classmethod
    def meteora(cls, gate: str) -> Routing:
        """The MeteoRA gate ``gate`` picks adapters per token."""
        return cls(mode="meteora", gate=gate)

    @property
    def is_base(self) -> bool:
        return not self.adapters and self.mode != "meteora"

    def effective(self) -> list[tuple[str, float]]:
        """The (adapter, weight) pairs the composer applies: the top-1 at weight 1 for ``single``, every
        slot at weight 1 for ``flow`` (its gate weighs them per token), none for ``meteora``."""
        if self.mode == "single":
            return [(self.adapters[0], 1.0)] if self.adapters else []
        if self.mode == "flow":
            return [(name, 1.0) for name in self.adapters]
        return list(zip(self.adapters, self.weights, strict=True))

    def to_dict(self) -> dict:
        return {
            "adapters": list(self.adapters),
            "weights": list(self.weights),
            "similarities": None if self.similarities is None else list(self.similarities),
            "mode": self.mode,
            "fallback": self.fallback,
            "gate": self.gate,
            **({"fusion": self.fusion, "density": self.density} if self.fusion != "linear" else {}),
        }

    def __str__(self) -> str:
        if self.is_base:
            return "base model" + (f" ({self.fallback})" if self.fallback else "")
        if self.mode == "meteora":
            return f"meteora[{self.gate}]: top-k adapters per token"
        sims = self.similarities or (None,) * len(self.adapters)
        parts = [
            f"{name} {weight:.2f}" + (f" (sim {sim:.3f})" if sim is not None else "")
            for name, weight, sim in zip(self.adapters, self.weights, sims, strict=True)
        ]
        mode = f"flow[{self.gate}]" if self.mode == "flow" else self.mode
        if self.fusion != "linear":
            mode = f"fusion[{self.fusion}, density {self.density:g}]"
        text = f"{mode}: " + ", ".join(parts)
        return text + (f" ({self.fallback})" if self.fallback else "")
