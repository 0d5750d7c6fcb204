"""RouteOptions: how prompts are routed, one name per concept across the CLI, library and integrations.

The same names are the fields of :class:`RouteOptions`, the keyword arguments of
``RoutedLM.route`` / ``generate`` / ``stream`` and ``Router.route``, the fields and ``.bind()``
arguments of the LangChain and LlamaIndex LLMs, and the ``--flags`` of the CLI (``_`` -> ``-``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from loraretriever.engine.routing import FUSIONS, GATED_MODES, MODES, Fusion, Mode
from loraretriever.errors import InvalidTypeError
from loraretriever.retrieval.cards import RetrievalError

__all__ = [
    "DEFAULT_TOP_K",
    "ROUTE_OPTIONS",
    "SOUP_OF",
    "UNCERTAIN",
    "WEIGHTINGS",
    "RouteOptions",
    "SoupOf",
    "Uncertain",
    "Weighting",
]

Weighting = Literal["uniform", "softmax"]
WEIGHTINGS: tuple[str, ...] = ("uniform", "softmax")
Uncertain = Literal["keep", "soup", "base"]
UNCERTAIN: tuple[str, ...] = ("keep", "soup", "base")
SoupOf = Literal["nearest", "domain"]
SOUP_OF: tuple[str, ...] = ("nearest", "domain")
DEFAULT_TOP_K = 3  # the paper's k

# The options that choose WHICH adapters serve a prompt; each mode honours them or refuses them.
_RETRIEVAL_ONLY = ("top_k", "filter", "exclude", "min_similarity")


@dataclass(frozen=True, eq=False)
class RouteOptions:
    """How prompts are routed. Validated on construction; every error names the value and the fix.

    Every mode honours every option it is given or refuses it:

    * ``mixture`` / ``fusion`` / ``single``: retrieve ``top_k`` adapters (``single`` applies the
      best one) among those matching ``filter`` and not in ``exclude``, weighted by ``weighting``;
      or apply the pinned ``adapters`` (with ``adapter_weights``), which refuses the retrieval
      options ``top_k``, ``filter``, ``exclude`` and ``min_similarity``; ``adapters=[]`` is the base model.
    * ``flow``: the same adapters become the slots of the LoRA-Flow ``gate``, their weights its prior.
    * ``meteora``: the ``gate`` picks adapters per token among all of its own, so it refuses
      ``adapters``, ``adapter_weights``, ``top_k``, ``filter``, ``exclude`` and ``min_similarity``;
      ``weighting`` and ``routing_temperature`` apply when a gate that no longer matches the pool
      falls back to the retrieval mixture.

    ``weighting`` and ``routing_temperature`` have nothing to weigh for pinned adapters, so they
    may stay at any value there (a pool's defaults need not be cleared to pin adapters).

    Example:
        >>> RouteOptions(top_k=2, weighting="softmax").replace(mode="fusion").top_k
        2
        >>> RouteOptions(adapters=["sst2"], filter={"customer": "a"})
        Traceback (most recent call last):
        ...
        loraretriever.retrieval.cards.RetrievalError: filter={'customer': 'a'} chooses among retrieved adapters, but adapters=('sst2',) pins them. Fix: pass one of the two.
    """

    mode: Mode = field(default="mixture", metadata={"help": "mixture, fusion, single, flow or meteora."})
    top_k: int | None = field(
        default=None, metadata={"help": "Adapters retrieved per prompt (default 3, or a flow gate's slots)."}
    )
    adapters: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Pin these adapters instead of retrieving (best first)."}
    )
    adapter_weights: tuple[float, ...] | None = field(
        default=None, metadata={"help": "One weight per pinned adapter (default 1/k each)."}
    )
    filter: Mapping[str, Any] | None = field(
        default=None, metadata={"help": "Card metadata filter, e.g. {'customer': 'a'} or {'domain': {'$in': [...]}}."}
    )
    exclude: tuple[str, ...] | tuple[tuple[str, ...], ...] | None = field(
        default=None, metadata={"help": "Adapters never retrieved: one list, or one list per prompt."}
    )
    weighting: Weighting = field(
        default="uniform", metadata={"help": "uniform (1/k, the paper) or softmax over similarities."}
    )
    routing_temperature: float = field(
        default=0.05, metadata={"help": "The softmax temperature over cosine similarities."}
    )
    min_similarity: float | None = field(
        default=None, metadata={"help": "Drop adapters below this cosine; none left -> the base model."}
    )
    gate: str | None = field(default=None, metadata={"help": "The flow or meteora gate (default: the only one)."})
    fusion: Fusion = field(
        default="linear",
        metadata={"help": "With mode=fusion, how matrices merge: linear, ties, dare_linear or dare_ties."},
    )
    density: float = field(
        default=0.5, metadata={"help": "The share of each matrix's entries ties / dare keep, in (0, 1]."}
    )
    uncertain: Uncertain = field(
        default="keep",
        metadata={
            "help": "When the pool's calibrated confidence that the nearest adapter is the prompt's own is below "
            "one half: keep the top_k routing anyway, use a soup of the soup_k nearest (a uniform fusion) or the "
            "base model."
        },
    )
    soup_k: int = field(default=10, metadata={"help": "The nearest adapters in the soup of uncertain='soup'."})
    soup_of: SoupOf = field(
        default="nearest",
        metadata={
            "help": "The soup's adapters: the soup_k nearest, or the soup_k nearest of the task family (card "
            "domain) most common among the 3 nearest (a prompt of an unknown task still has a known answer format)."
        },
    )

    def __post_init__(self) -> None:
        self._normalise()
        if self.mode not in MODES:
            raise RetrievalError(f"mode={self.mode!r} is not one of {MODES}.")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise RetrievalError(f"top_k={self.top_k!r} must be a positive integer (e.g. 3).")
        if self.weighting not in WEIGHTINGS:
            raise RetrievalError(f"weighting={self.weighting!r} is not one of {WEIGHTINGS}.")
        temperature = self.routing_temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not (temperature > 0 and math.isfinite(temperature))
        ):
            raise RetrievalError(f"routing_temperature={temperature!r} must be a positive number (e.g. 0.05).")
        if self.min_similarity is not None and not (
            isinstance(self.min_similarity, int | float) and -1.0 <= self.min_similarity <= 1.0
        ):
            raise RetrievalError(f"min_similarity={self.min_similarity!r} must lie in [-1, 1] (a cosine similarity).")
        if self.filter is not None and not isinstance(self.filter, Mapping):
            raise RetrievalError(f"filter={self.filter!r} must be a mapping, e.g. {{'customer': 'a'}}.")
        if self.fusion not in FUSIONS:
            raise RetrievalError(f"fusion={self.fusion!r} is not one of {FUSIONS}.")
        if self.fusion != "linear" and self.mode != "fusion":
            raise RetrievalError(
                f"fusion={self.fusion!r} merges the adapters' matrices, which only mode='fusion' does (mode is "
                f"{self.mode!r}). Fix: pass mode='fusion', or drop fusion."
            )
        density = self.density
        if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
            raise RetrievalError(f"density={density!r} must be a share in (0, 1], e.g. 0.5.")
        if self.uncertain not in UNCERTAIN:
            raise RetrievalError(f"uncertain={self.uncertain!r} is not one of {UNCERTAIN}.")
        if isinstance(self.soup_k, bool) or not isinstance(self.soup_k, int) or self.soup_k < 1:
            raise RetrievalError(f"soup_k={self.soup_k!r} must be a positive integer (e.g. 10).")
        if self.soup_of not in SOUP_OF:
            raise RetrievalError(f"soup_of={self.soup_of!r} is not one of {SOUP_OF}.")
        if self.uncertain != "keep" and (self.adapters is not None or self.mode in GATED_MODES):
            why = (
                f"adapters={self.adapters!r} pins them"
                if self.adapters is not None
                else f"mode={self.mode!r} gates them"
            )
            raise RetrievalError(
                f"uncertain={self.uncertain!r} reweighs retrieved adapters by the router's confidence, but {why}. "
                "Fix: drop uncertain, or route with mode='mixture' / 'fusion' / 'single'."
            )
        if self.gate is not None and self.mode not in GATED_MODES:
            raise RetrievalError(f"gate={self.gate!r} needs mode='flow' or 'meteora' (mode is {self.mode!r}).")
        self._check_pinned()
        if self.mode == "meteora":
            given = [
                name for name in ("adapters", "adapter_weights", *_RETRIEVAL_ONLY) if getattr(self, name) is not None
            ]
            if given:
                raise RetrievalError(
                    f"mode='meteora' picks adapters per token among all of its gate's, so it takes no {', '.join(given)} "
                    f"(got {', '.join(f'{n}={getattr(self, n)!r}' for n in given)}). Fix: drop them, or use "
                    "mode='flow' or 'mixture' to retrieve among chosen adapters."
                )

    def _normalise(self) -> None:
        """Lists become tuples (so options are hashable and cannot change after validation)."""
        if isinstance(self.adapters, str):
            object.__setattr__(self, "adapters", (self.adapters,))
        if self.adapters is not None:
            if not isinstance(self.adapters, Sequence) or not all(isinstance(a, str) for a in self.adapters):
                raise RetrievalError(f"adapters={self.adapters!r} must be a list of adapter names.")
            object.__setattr__(self, "adapters", tuple(self.adapters))
        if self.adapter_weights is not None:
            try:
                weights = tuple(float(w) for w in self.adapter_weights)
            except (TypeError, ValueError):
                raise RetrievalError(f"adapter_weights={self.adapter_weights!r} must be a list of numbers.") from None
            object.__setattr__(self, "adapter_weights", weights)
        if self.exclude is not None:
            if isinstance(self.exclude, str):
                raise RetrievalError(f"exclude={self.exclude!r} must be a list of names (or one list per prompt).")
            items = list(self.exclude)
            if all(isinstance(item, str) for item in items):
                object.__setattr__(self, "exclude", tuple(items))
            elif all(isinstance(item, list | tuple | set | frozenset) for item in items):
                object.__setattr__(self, "exclude", tuple(tuple(sorted(item)) for item in items))
            else:
                raise RetrievalError(
                    f"exclude={self.exclude!r:.100} must be one list of adapter names, or one list per prompt."
                )
        if self.filter is not None and isinstance(self.filter, Mapping):
            object.__setattr__(self, "filter", dict(self.filter))

    def _check_pinned(self) -> None:
        if self.adapter_weights is not None and self.adapters is None:
            raise RetrievalError(
                f"adapter_weights={list(self.adapter_weights)} needs adapters=[...] (one weight per pinned adapter)."
            )
        if self.adapters is None:
            return
        if len(set(self.adapters)) != len(self.adapters):
            raise RetrievalError(f"adapters={self.adapters} names an adapter twice.")
        if self.adapter_weights is not None:
            if len(self.adapter_weights) != len(self.adapters):
                raise RetrievalError(
                    f"adapter_weights={list(self.adapter_weights)} has {len(self.adapter_weights)} weights for "
                    f"{len(self.adapters)} adapters {list(self.adapters)}; pass one weight per adapter."
                )
            if not all(math.isfinite(w) for w in self.adapter_weights):
                raise RetrievalError(f"adapter_weights={list(self.adapter_weights)} must be finite numbers.")
        for name in _RETRIEVAL_ONLY:
            value = getattr(self, name)
            if value is not None and self.mode != "meteora":
                raise RetrievalError(
                    f"{name}={value!r} chooses among retrieved adapters, but adapters={self.adapters!r} pins them. "
                    "Fix: pass one of the two."
                )

    # -- use ---------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """The number of adapters to retrieve: ``top_k`` or :data:`DEFAULT_TOP_K`."""
        return self.top_k or DEFAULT_TOP_K

    def replace(self, **changes: Any) -> RouteOptions:
        """A validated copy with ``changes``; a change to ``None`` keeps the current value.

        Raises:
            TypeError: an unknown option, naming the known ones.
        """
        check_names(changes)
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def coerce(cls, options: RouteOptions | Mapping[str, Any] | None) -> RouteOptions:
        """``options`` as RouteOptions (a mapping of option names, or None for the defaults)."""
        if isinstance(options, RouteOptions):
            return options
        return cls().replace(**dict(options or {}))

    def excludes_for(self, n_prompts: int) -> list[set[str]]:
        """``exclude`` per prompt: one set for all prompts, or the prompt's own list."""
        if self.exclude is None:
            return [set() for _ in range(n_prompts)]
        if all(isinstance(item, str) for item in self.exclude):
            return [set(self.exclude) for _ in range(n_prompts)]
        if len(self.exclude) != n_prompts:
            raise RetrievalError(
                f"exclude holds {len(self.exclude)} lists for {n_prompts} prompts; pass one list per prompt, "
                "or one list of names for all."
            )
        return [set(item) for item in self.exclude]

    def given(self) -> dict[str, Any]:
        """The options that differ from the defaults (for logs, reports and fingerprints)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    @property
    def key(self) -> tuple:
        """A hashable identity: requests with equal keys are routed together."""
        return tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouteOptions) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"RouteOptions({', '.join(f'{k}={v!r}' for k, v in self.given().items())})"


ROUTE_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RouteOptions))


def check_names(options: Mapping[str, Any]) -> None:
    """Raises TypeError for a key that is not a routing option, naming the known ones."""
    unknown = sorted(set(options) - set(ROUTE_OPTIONS))
    if unknown:
        raise InvalidTypeError(f"unknown routing option(s) {unknown}; the routing options are {list(ROUTE_OPTIONS)}.")


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        items = [_freeze(v) for v in value]
        return tuple(sorted(items, key=repr) if isinstance(value, set | frozenset) else items)
    return value
