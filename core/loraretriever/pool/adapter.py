"""One LoRA adapter in memory, read from PEFT's file format and checked against a base model.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
whose keys look like ``base_model.model.<module>.lora_A.weight`` / ``...lora_B.weight``. We keep,
per adapted ``nn.Linear``, ``A`` (r × in), ``B`` (out × r) and the scaling ``alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA), in the base model's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from loraretriever.errors import ConflictError, InvalidOptionError

__all__ = [
    "AdapterError",
    "AdapterExistsError",
    "AdapterMismatchError",
    "LoraAdapter",
    "LoraWeights",
    "check_adapter_name",
    "check_file_size",
    "check_layout",
    "linear_modules",
    "read_adapter_config",
    "read_adapter_files",
    "read_safetensors",
    "read_safetensors_header",
]

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=:+\-]{0,127}$")
_KEY_PATTERN = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


MAX_SCALING = 1e3  # |lora_alpha / r| (or / sqrt(r)): trained adapters use ~0.1 to 64
MAX_WEIGHT = 1e4  # the largest |A| and |scaling * B| entry: trained adapters stay near 1
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class AdapterError(InvalidOptionError):
    """An adapter could not be read or does not fit the base model. Nothing was changed."""


class AdapterExistsError(AdapterError, ConflictError):
    """The pool already holds an adapter of that name (an HTTP 409, not a bad request)."""

    status = 409


class AdapterMismatchError(AdapterError):
    """The adapter is sound but was trained for another base model (its target modules or shapes
    do not fit this one): opening with the right model fixes it, so it is never quarantined."""


@dataclass(frozen=True)
class LoraWeights:
    """The low-rank update of one Linear layer: ``delta(x) = scaling * B @ A @ x``."""

    A: torch.Tensor = field(metadata={"help": "Down projection, shape (r, in_features)."})
    B: torch.Tensor = field(metadata={"help": "Up projection, shape (out_features, r)."})
    scaling: float = field(metadata={"help": "alpha / r, or alpha / sqrt(r) with rsLoRA."})

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter: per module name (as in ``model.named_modules()``), its weights."""

    name: str = field(metadata={"help": "Unique name in the pool."})
    modules: dict[str, LoraWeights] = field(metadata={"help": "Adapted Linear layers by module name."})
    config: dict[str, Any] = field(default_factory=dict, metadata={"help": "The PEFT adapter config."})
    source: str | None = field(default=None, metadata={"help": "Where it was loaded from, if anywhere."})
    known_digest: str | None = field(
        default=None, repr=False, metadata={"help": "The digest, if computed already (see :attr:`digest`)."}
    )

    @property
    def digest(self) -> str:
        """SHA-256 of the module names, scalings and weights as float32 (first 16 hex digits): the
        same for an adapter held in float16 or float32. Computed on first use (loading thousands of
        adapters needs none), then kept."""
        if self.known_digest is None:
            digest = hashlib.sha256()
            for module_name, weights in self.modules.items():
                digest.update(module_name.encode())
                digest.update(f"{weights.scaling}".encode())
                for tensor in (weights.A, weights.B):
                    digest.update(tensor.detach().cpu().float().contiguous().numpy())
            object.__setattr__(self, "known_digest", digest.hexdigest()[:16])
        return self.known_digest

    @property
    def ranks(self) -> set[int]:
        return {w.rank for w in self.modules.values()}

    @property
    def num_parameters(self) -> int:
        return sum(w.A.numel() + w.B.numel() for w in self.modules.values())

    @property
    def nbytes(self) -> int:
        """The bytes its weights take where they are held."""
        return sum(w.A.nbytes + w.B.nbytes for w in self.modules.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).A.dtype

    @classmethod
    def from_state_dict(
        cls,
        name: str,
        config: dict[str, Any],
        state_dict: dict[str, torch.Tensor],
        model: nn.Module,
        *,
        source: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        linear_layers: dict[str, nn.Linear] | None = None,
    ) -> LoraAdapter:
        """Builds an adapter from a PEFT config and state dict, checking both against ``model``.

        Args:
            name: The adapter's name (letters, digits and ``_ . = : + -``; no path separators).
            config: The content of ``adapter_config.json`` (or ``LoraConfig.to_dict()``).
            state_dict: PEFT-format weights (``...<module>.lora_A.weight`` / ``lora_B``).
            model: The base model the adapter must fit.
            source: Where the weights came from, used in error messages.
            dtype: The dtype to hold the weights in (default: as given, e.g. as stored on disk).
            device: Where to hold them (default: where they are).
            linear_layers: The model's Linear layers by name, if the caller keeps them
                (:func:`check_layout`).

        Raises:
            AdapterError: naming the adapter, the file or key, and the fix.
        """
        check_adapter_name(name)
        where = f"adapter {name!r}" + (f" ({source})" if source else "")
        shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
        layout = check_layout(where, config, shapes, model, linear_layers)
        pairs = [(module, state_dict[a], state_dict[b], scaling) for module, (a, b, scaling) in layout.items()]
        for module_name, A, B, _ in pairs:
            if not (A.is_floating_point() and B.is_floating_point()):
                raise AdapterError(
                    f"{where}: module {module_name!r} holds {A.dtype} / {B.dtype} weights, not floating point. "
                    "Fix: re-save the adapter with PEFT."
                )
        # every tensor's largest |entry| in one call (NaN and inf propagate): an adapter has hundreds
        flat = [t.detach() for _, A, B, _ in pairs for t in (A, B)]
        largest = torch.stack(torch._foreach_norm(flat, float("inf"))).float().cpu().tolist()
        for i, (module_name, _, _, scaling) in enumerate(pairs):
            a_max, b_max = largest[2 * i], largest[2 * i + 1]
            if not (math.isfinite(a_max) and math.isfinite(b_max)):
                raise AdapterError(
                    f"{where}: module {module_name!r} holds NaN or infinite weights. Fix: retrain or re-save it."
                )
            if max(a_max, b_max * abs(scaling)) > MAX_WEIGHT:
                raise AdapterError(
                    f"{where}: module {module_name!r} has scaling {scaling:g} and largest scaled weight "
                    f"{max(a_max, b_max * abs(scaling)):g}; the limit is {MAX_WEIGHT:g} (a trained LoRA is far "
                    "below it; beyond it its rows are garbage). Fix: check lora_alpha and the weights."
                )
        modules: dict[str, LoraWeights] = {}
        for module_name, A, B, scaling in pairs:
            modules[module_name] = LoraWeights(
                A=A.detach().to(dtype or A.dtype).contiguous(),
                B=B.detach().to(dtype or B.dtype).contiguous(),
                scaling=scaling,
            )
        digest = None
        if dtype is not None and any(_loses_precision(t.dtype, dtype) for _, A, B, _ in pairs for t in (A, B)):
            given = {m: LoraWeights(A.detach(), B.detach(), scaling) for m, A, B, scaling in pairs}
            digest = cls(name=name, modules=given).digest  # of the weights as given, not as narrowed
        adapter = cls(name=name, modules=modules, config=dict(config), source=source, known_digest=digest)
        return adapter if device is None else adapter.to(device, dtype or adapter.dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraAdapter:
        """This adapter with its weights on ``device`` in ``dtype`` (itself if they already are)."""
        device = torch.device(device)
        if all(w.A.device == device and w.A.dtype == dtype for w in self.modules.values()):
            return self
        moved = {
            m: LoraWeights(w.A.to(device, dtype), w.B.to(device, dtype), w.scaling) for m, w in self.modules.items()
        }
        lossy = any(_loses_precision(w.A.dtype, dtype) for w in self.modules.values())
        return dataclasses.replace(self, modules=moved, known_digest=self.digest if lossy else self.known_digest)


def check_layout(
    where: str,
    config: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    model: nn.Module,
    linear_layers: dict[str, nn.Linear] | None = None,
) -> dict[str, tuple[str, str, float]]:
    """Checks an adapter's config and the shapes of its weights against ``model`` (no weight is
    read, so a safetensors header is enough).

    Args:
        where: Names the adapter in errors.
        config: Its PEFT config.
        shapes: Its state dict's keys and shapes.
        model: The base model.
        linear_layers: Its ``nn.Linear`` modules by name, if the caller keeps them (checking many
            adapters: listing a model's modules costs about 1 ms).

    Returns:
        ``{module: (lora_A key, lora_B key, scaling)}`` for every adapted Linear layer.

    Raises:
        AdapterError: naming the adapter, the key or module, and the fix.
    """
    _check_config(config, where)
    if linear_layers is None:
        linear_layers = linear_modules(model)
    parts: dict[str, dict[str, str]] = {}
    for key in shapes:
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise AdapterError(
                f"{where}: weight {key!r} is not a LoRA A/B matrix of a Linear layer; loraretriever "
                "composes plain LoRA only (no modules_to_save, embedding LoRA or DoRA). "
                "Fix: save the adapter without those extras."
            )
        parts.setdefault(match["module"], {})[match["part"]] = key
    if not parts:
        raise AdapterError(f"{where}: the weights hold no lora_A/lora_B matrices. Fix: save a LoRA adapter.")

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    layout: dict[str, tuple[str, str, float]] = {}
    for module_name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterError(f"{where}: module {module_name!r} has no lora_{missing} weight; the file is incomplete.")
        if module_name not in linear_layers:
            found = dict(model.named_modules()).get(module_name)
            kind = type(found).__name__ if found is not None else "no such module"
            raise AdapterMismatchError(
                f"{where}: target module {module_name!r} is not a Linear layer of the base model "
                f"({kind}). Fix: train the adapter on this base model "
                f"({type(model).__name__}), or check its target_modules."
            )
        layer = linear_layers[module_name]
        a_shape, b_shape = shapes[ab["A"]], shapes[ab["B"]]
        if (
            len(a_shape) != 2
            or len(b_shape) != 2
            or a_shape[1] != layer.in_features
            or b_shape[0] != layer.out_features
        ):
            raise AdapterMismatchError(
                f"{where}: module {module_name!r} has lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)}, "
                f"but the base layer maps {layer.in_features} -> {layer.out_features}; the adapter was "
                "trained for another base model. Fix: load it with the model it was trained on."
            )
        if a_shape[0] != b_shape[1]:
            raise AdapterError(
                f"{where}: module {module_name!r} has lora_A rank {a_shape[0]} but lora_B rank {b_shape[1]}."
            )
        rank = a_shape[0]
        pattern_rank = _pattern_value(rank_pattern, module_name, r_default)
        if rank != pattern_rank:
            raise AdapterError(
                f"{where}: module {module_name!r} has rank {rank} but the config says r={pattern_rank}. "
                "Fix: the config and the weights must come from the same save."
            )
        if rank > min(layer.in_features, layer.out_features):
            raise AdapterError(
                f"{where}: module {module_name!r} has rank {rank}, over the limit of "
                f"{min(layer.in_features, layer.out_features)} (the smaller side of the "
                f"{layer.in_features} -> {layer.out_features} layer: a larger rank adds nothing but cost). "
                "Fix: train the adapter with a smaller r."
            )
        alpha = float(_pattern_value(alpha_pattern, module_name, alpha_default))
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        if abs(scaling) > MAX_SCALING:
            raise AdapterError(
                f"{where}: module {module_name!r} has scaling {scaling:g}; the limit is {MAX_SCALING:g} (a "
                "trained LoRA is far below it). Fix: check lora_alpha and r."
            )
        layout[module_name] = (ab["A"], ab["B"], scaling)
    return layout


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` by name: what an adapter may target."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """The tensors a safetensors file holds, from its header only: ``{key: (dtype, shape, nbytes)}``.

    Raises:
        AdapterError: a file too short, or a header that is not safetensors JSON.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 2 <= size <= _MAX_HEADER_BYTES or size + 8 > path.stat().st_size:
                raise AdapterError(f"{str(path)!r} is corrupt (a header of {size:,} bytes). Fix: re-save the adapter.")
            header = json.loads(file.read(size))
        return {
            key: (entry["dtype"], tuple(entry["shape"]), entry["data_offsets"][1] - entry["data_offsets"][0])
            for key, entry in header.items()
            if key != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise AdapterError(f"{str(path)!r} is corrupt ({err!r}). Fix: re-save the adapter.") from err


def _loses_precision(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether casting ``source`` to ``target`` can change a value (float16 -> float32 cannot)."""
    return source != target and target not in (torch.float32, torch.float64)


def check_adapter_name(name: object) -> str:
    """Returns ``name`` if it is a safe adapter name, else raises :class:`AdapterError`."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name) or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use 1-128 letters, digits and '_ . = : + -', starting "
            "with a letter or digit (no path separators, no '..')."
        )
    return name


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT adapter directory.

    Raises:
        AdapterError: a missing directory or file, or a file that is not a JSON object.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {str(directory)!r} does not exist.")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{str(config_path)!r} is missing. Fix: save the adapter with PEFT's save_pretrained.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise AdapterError(f"{str(config_path)!r} is not valid JSON ({err}). Fix: re-save the adapter.") from err
    if not isinstance(config, dict):
        raise AdapterError(f"{str(config_path)!r} must hold a JSON object, not {type(config).__name__}.")
    return config


def check_file_size(path: Path, max_bytes: int | None) -> int:
    """The size of weight file ``path`` in bytes, refused before it is read when over ``max_bytes``.

    Raises:
        AdapterError: naming the file, its size, the limit and the fix; or a file that is gone.
    """
    try:
        size = path.stat().st_size
    except OSError as err:
        raise AdapterError(f"{str(path)!r} cannot be read ({err}). Fix: check the adapter's files.") from err
    if max_bytes is not None and size > max_bytes:
        raise AdapterError(
            f"{str(path)!r} is {size:,} bytes, over the limit of {max_bytes:,} "
            "(max_adapter_bytes; by default the size of the base model's weights). Fix: check that this is a "
            "LoRA adapter, or raise the limit."
        )
    return size


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors weight file.

    Raises:
        AdapterError: a file that does not read as safetensors.
    """
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{str(path)!r} is corrupt ({err}). Fix: re-save the adapter.") from err


def read_adapter_files(
    directory: str | Path, *, allow_pickle: bool = False, max_bytes: int | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reads ``adapter_config.json`` and the weights of a PEFT adapter directory.

    Args:
        directory: A local directory as written by ``PeftModel.save_pretrained``.
        allow_pickle: Read ``adapter_model.bin`` (a pickle, which can run code) when there is no
            safetensors file. Off by default: such files are refused, never unpickled.
        max_bytes: Refuse weight files larger than this, before reading them.

    Raises:
        AdapterError: for a missing directory, missing, corrupt or oversize files, or a refused pickle.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)

    for weights_file in (directory / SAFETENSORS_FILE, directory / PICKLE_FILE):
        if weights_file.is_file():
            check_file_size(weights_file, max_bytes)
    weights_path = directory / SAFETENSORS_FILE
    if weights_path.is_file():
        return config, read_safetensors(weights_path)
    pickle_path = directory / PICKLE_FILE
    if pickle_path.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{str(pickle_path)!r} is a pickle, which can run arbitrary code when loaded, so it was not "
                "read. Fix: convert it to adapter_model.safetensors, or pass allow_pickle=True if you trust it."
            )
        try:
            state_dict = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad pickle
            raise AdapterError(f"{str(pickle_path)!r} could not be read ({err}).") from err
        return config, state_dict
    raise AdapterError(f"{str(directory)!r} has no {SAFETENSORS_FILE}. Fix: save the adapter with PEFT.")


def _check_config(config: dict[str, Any], where: str) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; only LORA adapters can be composed.")
    if config.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters (use_dora=True) cannot be composed. Fix: train plain LoRA.")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{where}: fan_in_fan_out=True (Conv1D layers) is not supported.")
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{where}: r={r!r} in the config must be a positive integer.")
    for name, value in (config.get("rank_pattern") or {}).items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{where}: rank_pattern[{name!r}]={value!r} must be a positive integer.")
    alphas = [("lora_alpha", config.get("lora_alpha", r))]
    alphas += [(f"alpha_pattern[{k!r}]", v) for k, v in (config.get("alpha_pattern") or {}).items()]
    for name, value in alphas:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise AdapterError(f"{where}: {name}={value!r} must be a finite number. Fix: re-save the adapter.")


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix as a regex."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
