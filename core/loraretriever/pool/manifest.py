"""A pool's manifest, ``POOL_DIR/pool.json``: what the pool belongs to and how its LoRAs were
trained, so that every command opens it with the right model and refuses another.

::

    {"format": 1, "created": ..., "updated": ...,
     "base_model": {"id": "<hub id, local path or the packaged default's name>",
                    "fingerprint": {"architecture", "layers", "hidden_size", "linear_shapes"}},
     "embedder": {"id", "name", "dimension"}, "prompt_format": "chat" | "plain"}
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from loraretriever.errors import ConflictError
from loraretriever.pool.adapter import AdapterError
from loraretriever.pool.directory import pool_change
from loraretriever.pool.home import with_umask
from loraretriever.pool.layout import MANIFEST_FILE, PoolLayout

__all__ = [
    "MANIFEST_FORMAT",
    "PROMPT_FORMATS",
    "PoolMismatchError",
    "check_pool_model",
    "model_fingerprint",
    "prompt_format",
    "read_manifest",
    "record_pool_model",
    "record_prompt_format",
    "recorded_model",
    "update_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
PROMPT_FORMATS = ("chat", "plain")


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What an adapter must fit, independent of where the model came from: its class, layer count,
    hidden size, and a hash of every Linear layer's name and shape (what a LoRA may target).

    Example:
        >>> sorted(model_fingerprint(torch.nn.Sequential(torch.nn.Linear(2, 3))))
        ['architecture', 'hidden_size', 'layers', 'linear_shapes']
    """
    config = getattr(model, "config", None)
    shapes = sorted(
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    return {
        "architecture": type(model).__name__,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "linear_shapes": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
    }


def read_manifest(pool_dir: str | Path) -> dict[str, Any]:
    """The pool's manifest (``pool.json``): what it belongs to and how its LoRAs were trained;
    ``{}`` for a pool that has none yet.

    Raises:
        AdapterError: a ``pool.json`` that is not a JSON object, or of a newer format (names the fix).
    """
    path = PoolLayout(pool_dir).manifest
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise AdapterError(
            f"{path} is not valid JSON ({error}). Fix: restore it, or delete it to record it anew."
        ) from None
    if not isinstance(manifest, dict):
        raise AdapterError(f"{path} must hold a JSON object. Fix: restore it, or delete it to record it anew.")
    if manifest.get("format", MANIFEST_FORMAT) > MANIFEST_FORMAT:
        raise AdapterError(
            f"{path} has format {manifest['format']}, newer than this loraretriever reads ({MANIFEST_FORMAT}). "
            "Fix: upgrade loraretriever."
        )
    value = manifest.get("prompt_format")
    if value is not None and value not in PROMPT_FORMATS:
        raise AdapterError(f"{path}: prompt_format={value!r} is not one of {PROMPT_FORMATS}; fix it.")
    return manifest


def update_manifest(pool_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Sets ``fields`` in the pool's manifest (written whole and atomically, under the pool lock),
    with the format and the ``created`` / ``updated`` times; returns the manifest."""
    root = Path(pool_dir).expanduser()
    with pool_change(root):
        manifest = read_manifest(root)
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        manifest = {"format": MANIFEST_FORMAT, "created": manifest.get("created", now), **manifest, **fields}
        manifest["format"], manifest["updated"] = MANIFEST_FORMAT, now
        fd, staging = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}-", dir=root)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(manifest, out, indent=1)
            out.write("\n")
        with_umask(staging)
        os.replace(staging, PoolLayout(root).manifest)
    return manifest


class PoolMismatchError(AdapterError, ConflictError):
    """The pool belongs to another base model; nothing in it was touched (a 409)."""

    status = 409


def _describe(fingerprint: dict[str, Any]) -> str:
    return f"{fingerprint.get('architecture')}, {fingerprint.get('layers')} layers, hidden size {fingerprint.get('hidden_size')}"


def recorded_model(pool_dir: str | Path) -> str | None:
    """The base model the pool's manifest records (a hub id, a path, or the packaged default's
    name), or None.

    Raises:
        AdapterError: it records a local directory that is not there any more (moved or deleted).
    """
    recorded = (read_manifest(pool_dir).get("base_model") or {}).get("id")
    if recorded is not None and Path(recorded).is_absolute() and not Path(recorded).is_dir():
        raise AdapterError(
            f"the pool {str(pool_dir)!r} belongs to the base model at {recorded!r}, which is not there any more. "
            "Fix: pass the same model from where it is now (--model / model_id=)."
        )
    return recorded


def check_pool_model(pool_dir: str | Path, model: torch.nn.Module, model_id: str) -> bool:
    """Whether the pool records its base model; refuses ``model`` (loaded from ``model_id``) if it
    is another one.

    Raises:
        PoolMismatchError: the manifest's fingerprint is not ``model``'s, naming both models.
    """
    recorded = read_manifest(pool_dir).get("base_model") or {}
    if not recorded.get("fingerprint"):
        return False
    found = model_fingerprint(model)
    if recorded["fingerprint"] != found:
        raise PoolMismatchError(
            f"the pool {str(pool_dir)!r} belongs to base model {recorded.get('id')!r} "
            f"({_describe(recorded['fingerprint'])}), not to {model_id!r} ({_describe(found)}); its "
            f"adapters do not fit it. Fix: open it with {recorded.get('id')!r} (the default when no model is "
            "given), or use another pool directory for this model."
        )
    old = recorded.get("id")
    if old != model_id and old is not None and Path(old).is_absolute() and not Path(old).is_dir():
        update_manifest(pool_dir, base_model={**recorded, "id": model_id})  # the model moved: follow it
        logger.warning("the pool %s records its base model at %r now (it was at %r)", pool_dir, model_id, old)
    elif old != model_id:
        logger.info("the pool %s records %r; opened with %r (the same shapes)", pool_dir, old, model_id)
    return True


def record_pool_model(pool_dir: str | Path, model: torch.nn.Module, model_id: str) -> None:
    """Records ``model`` as the pool's base model in its manifest (a pool without one gets it on
    its first open with a model)."""
    update_manifest(pool_dir, base_model={"id": model_id, "fingerprint": model_fingerprint(model)})
    logger.warning("recorded base model %r in %s", model_id, PoolLayout(pool_dir).manifest)


def prompt_format(pool_dir: str | Path) -> str | None:
    """How the pool's LoRAs saw their prompts in training: ``"chat"`` (the base model's chat
    template) or ``"plain"``; None for a pool that does not record it.

    Raises:
        AdapterError: a ``pool.json`` that cannot be read (:func:`read_manifest`).
    """
    return read_manifest(pool_dir).get("prompt_format")


def record_prompt_format(pool_dir: str | Path, value: str) -> None:
    """Records how the pool's LoRAs were trained (see :func:`prompt_format`)."""
    if value not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={value!r} is not one of {PROMPT_FORMATS}.")
    update_manifest(pool_dir, prompt_format=value)
