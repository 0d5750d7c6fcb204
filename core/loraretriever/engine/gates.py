"""Learned per-token gates over LoRAs: LoRA-Flow fusion gates and MeteoRA MoE gates.

* :class:`FlowGate` (LoRA-Flow, arXiv 2402.11455): per decoder layer ``l`` a linear map from the
  layer's input hidden state to ``k`` logits, ``w_t = softmax((W_l h_t + b_l) / T + log r)``,
  weighting the ``k`` LoRAs retrieved for the prompt (slot 1 = best retrieved) at every adapted
  projection of the layer. ``r`` are the retrieval weights of the prompt: an untrained gate is
  exactly the retrieval mixture, and training learns per-token corrections to it. Its slots are
  retrieval ranks, not adapter names, so it fits any pool of its base model.
* :class:`MeteoraGate` (MeteoRA, arXiv 2405.13053): per adapted Linear layer a linear map from the
  layer's input to one logit per pool adapter; each token takes its top-2 adapters with weights
  ``softmax(top logits / T)``. It names the adapters it was trained on (with their weight digests),
  so it fits only that pool: :meth:`MeteoraGate.mismatch` says how a pool differs.

Both are stored as a directory: ``gate_config.json`` and ``gate.safetensors``, by default under
``POOL_DIR/gates/<name>``. Only the gates are trained; the base model and the LoRAs stay frozen.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraretriever.errors import InvalidOptionError
from loraretriever.pool.layout import PoolLayout

__all__ = [
    "FlowGate",
    "FlowGateConfig",
    "Gate",
    "GateError",
    "MeteoraGate",
    "MeteoraGateConfig",
    "gate_dirs",
    "layer_index",
    "load_gate",
    "save_gate",
]

CONFIG_FILE = "gate_config.json"
WEIGHTS_FILE = "gate.safetensors"
GateKind = Literal["flow", "meteora"]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class GateError(InvalidOptionError):
    """A gate could not be read, or does not fit the model, the pool or a routing."""


def layer_index(module: str) -> int:
    """The decoder layer a module belongs to, from its name (``model.layers.3.self_attn.q_proj`` -> 3)."""
    match = _LAYER.search(module)
    if match is None:
        raise GateError(f"module {module!r} is not inside a decoder layer ('layers.<i>.' in its name).")
    return int(match[1])


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise GateError(f"temperature={temperature!r} must be a positive number (1.0 is a plain softmax).")


@dataclass(frozen=True)
class FlowGateConfig:
    """A LoRA-Flow gate's shape."""

    k: int = field(metadata={"help": "LoRA slots per prompt (the retrieval top-k)."})
    hidden_size: int = field(metadata={"help": "The base model's hidden size (the gate's input)."})
    num_layers: int = field(metadata={"help": "Decoder layers (one gate each)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature over the k logits."})
    kind: str = field(default="flow", init=False)

    def __post_init__(self) -> None:
        for name in ("k", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GateError(f"FlowGateConfig.{name}={value!r} must be a positive integer.")
        _check_temperature(self.temperature)


class FlowGate(nn.Module):
    """Per-layer fusion gates of LoRA-Flow: ``k`` weights per token over the prompt's LoRA slots.

    Starts at zero weights and bias, so an untrained gate is exactly the retrieval mixture it is
    given as ``prior``.

    Example:
        >>> gate = FlowGate(FlowGateConfig(k=3, hidden_size=16, num_layers=2))
        >>> prior = torch.tensor([[0.75, 0.25, 0.0]]).log()
        >>> gate(0, torch.ones(1, 4, 16), prior)[0, 0]
        tensor([0.7500, 0.2500, 0.0000], grad_fn=<SelectBackward0>)
    """

    def __init__(self, config: FlowGateConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_layers, config.k, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_layers, config.k))

    @property
    def kind(self) -> GateKind:
        return "flow"

    @property
    def num_parameters(self) -> int:
        return self.weight.numel() + self.bias.numel()

    def forward(self, layer: int, hidden: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Per-token weights ``(rows, tokens, k)`` given each row's log retrieval weights ``prior``
        ``(rows, k)`` (``-inf`` for an empty slot).

        The gate reads the hidden state RMS-normalised (without a learned scale), as the layer's own
        input norm does: the residual stream's scale grows with depth, and a raw input would make one
        learning rate too large for late layers or too small for early ones.
        """
        hidden = hidden.to(self.weight.dtype)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        logits = torch.nn.functional.linear(hidden, self.weight[layer], self.bias[layer])
        logits = logits / self.config.temperature + prior[:, None, :].to(logits.dtype)
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no slot gets zeros

    def check_model(self, model: nn.Module) -> None:
        """Raises :class:`GateError` when the gate does not fit ``model``'s hidden size or depth."""
        config = model.config
        hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
        if (hidden, layers) != (self.config.hidden_size, self.config.num_layers):
            raise GateError(
                f"this flow gate was trained for hidden_size={self.config.hidden_size}, "
                f"num_layers={self.config.num_layers}; the model has {hidden}, {layers}. Fix: train a gate for it."
            )


@dataclass(frozen=True)
class MeteoraGateConfig:
    """A MeteoRA gate's pool and shape."""

    adapters: tuple[str, ...] = field(metadata={"help": "The pool's adapters, in gate-logit order."})
    digests: dict[str, str] = field(metadata={"help": "Each adapter's weight digest when the gate was trained."})
    modules: dict[str, int] = field(metadata={"help": "Gated Linear layers and their in_features."})
    top_k: int = field(default=2, metadata={"help": "Adapters per token."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature over the top-k logits."})
    kind: str = field(default="meteora", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        if len(self.adapters) < 1 or len(set(self.adapters)) != len(self.adapters):
            raise GateError(f"MeteoraGateConfig.adapters={list(self.adapters)} must be distinct names, at least one.")
        if set(self.digests) != set(self.adapters):
            raise GateError("MeteoraGateConfig.digests must have exactly one digest per adapter.")
        if not self.modules:
            raise GateError("MeteoraGateConfig.modules is empty: name the Linear layers the pool's adapters adapt.")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= len(self.adapters):
            raise GateError(f"top_k={self.top_k!r} must be an integer in [1, {len(self.adapters)}] (the pool size).")
        _check_temperature(self.temperature)


class MeteoraGate(nn.Module):
    """MeteoRA's gates: per adapted Linear layer, top-k adapters per token over a named pool.

    Example:
        >>> config = MeteoraGateConfig(("a", "b", "c"), {"a": "1", "b": "2", "c": "3"}, {"layers.0.q": 4})
        >>> gate = MeteoraGate(config)
        >>> index, weights = gate.select("layers.0.q", torch.ones(5, 4))
        >>> index.shape, weights.sum(-1).tolist() == [1.0] * 5
        (torch.Size([5, 2]), True)
    """

    def __init__(self, config: MeteoraGateConfig) -> None:
        super().__init__()
        self.config = config
        self.module_keys = {module: f"m{i}" for i, module in enumerate(sorted(config.modules))}
        n = len(config.adapters)
        # Small random init: zero logits would tie every adapter and make top-k arbitrary.
        generator = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterDict(
            {
                key: nn.Parameter(torch.randn(n, config.modules[module], generator=generator) * 1e-3)
                for module, key in self.module_keys.items()
            }
        )

    @property
    def kind(self) -> GateKind:
        return "meteora"

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.weights.values())

    def logits(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """Gate logits ``(tokens, pool size)`` for the inputs ``x`` ``(tokens, in_features)`` of ``module``."""
        weight = self.weights[self.module_keys[module]]
        return x.to(weight.dtype) @ weight.T

    def select(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k adapter indices and their weights (softmax over the top-k logits)."""
        top, index = self.logits(module, x).topk(self.config.top_k, dim=-1)
        return index, torch.softmax(top / self.config.temperature, dim=-1)

    def mismatch(self, pool: Any) -> str | None:
        """How ``pool`` differs from the pool the gate was trained on, or None when it matches."""
        names = set(pool.names)
        removed = sorted(set(self.config.adapters) - names)
        added = sorted(names - set(self.config.adapters))
        changed = sorted(n for n in set(self.config.adapters) & names if pool.get(n).digest != self.config.digests[n])
        if not (removed or added or changed):
            return None
        parts = [
            f"{label} {items}"
            for label, items in (("removed", removed), ("added", added), ("replaced", changed))
            if items
        ]
        return "the pool changed since the gate was trained (" + "; ".join(parts) + ")"


Gate = FlowGate | MeteoraGate


def save_gate(gate: Gate, directory: str | Path) -> Path:
    """Writes ``gate_config.json`` and ``gate.safetensors`` (float32) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = asdict(gate.config)
    if isinstance(gate, MeteoraGate):
        config["adapters"] = list(config["adapters"])
    tensors = {name: p.detach().float().contiguous() for name, p in gate.state_dict().items()}
    save_file(tensors, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return directory


def load_gate(directory: str | Path) -> Gate:
    """Reads a gate saved by :func:`save_gate`.

    Raises:
        GateError: missing or unreadable files, an unknown kind, or weights that do not fit the config.
    """
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(directory / WEIGHTS_FILE)
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise GateError(
            f"gate at {str(directory)!r} cannot be read ({err}). Fix: train it again (train-gate)."
        ) from err
    kind = config.pop("kind", None)
    if kind == "flow":
        gate: Gate = FlowGate(FlowGateConfig(**config))
    elif kind == "meteora":
        gate = MeteoraGate(MeteoraGateConfig(**config))
    else:
        raise GateError(f"{directory / CONFIG_FILE} has kind={kind!r}; expected 'flow' or 'meteora'.")
    try:
        gate.load_state_dict(tensors)
    except RuntimeError as err:
        raise GateError(f"gate weights in {directory / WEIGHTS_FILE} do not fit its config: {err}") from err
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise GateError(f"gate weight {name!r} in {directory / WEIGHTS_FILE} has NaN or inf values.")
    gate.requires_grad_(False)
    return gate


def gate_dirs(pool_dir: str | Path) -> dict[str, Path]:
    """The gates stored with a pool: ``{name: POOL_DIR/gates/<name>}``."""
    root = PoolLayout(pool_dir).gates
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / CONFIG_FILE).is_file()}
