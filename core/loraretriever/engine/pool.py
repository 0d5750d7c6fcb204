"""The LoRA pool: name-keyed adapters of one base model, changed at run time."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraretriever.engine.adapter import (
    CONFIG_FILE,
    PICKLE_FILE,
    SAFETENSORS_FILE,
    AdapterError,
    LoraAdapter,
    check_adapter_name,
    read_adapter_files,
)

__all__ = ["LoraPool", "PoolListener", "UnknownAdapterError"]


class UnknownAdapterError(KeyError, ValueError):
    """A name that is not in the pool: a KeyError for lookups, and a ValueError like every other bad
    value a caller passes (so a request naming an unknown adapter fails with the library's errors)."""


PoolListener = Callable[[str, str], None]
"""Called as ``listener(event, name)`` with event ``"added"`` or ``"removed"`` after a change."""


class LoraPool:
    """Holds LoRA adapters of one base model under unique names.

    Adapters are validated against the model when added (shapes, target modules, finite weights)
    and held once, in the model's dtype. A failed add leaves the pool exactly as it was. The base
    model is never modified: composition happens in :class:`loraretriever.Composer`.

    Args:
        model: The base model every adapter must fit.
        max_adapter_bytes: Weight files larger than this are refused before they are read
            (default: the size of the base model's weights).

    Example:
        >>> pool = LoraPool(model)  # doctest: +SKIP
        >>> pool.add("adapters/sst2")  # name defaults to the directory name  # doctest: +SKIP
        'sst2'
        >>> pool.names  # doctest: +SKIP
        ['sst2']
    """

    def __init__(self, model: nn.Module, *, max_adapter_bytes: int | None = None) -> None:
        self.model = model
        # an adapter file larger than its base model's weights is not a LoRA of it
        self.max_adapter_bytes = max_adapter_bytes or sum(p.numel() * p.element_size() for p in model.parameters())
        self._adapters: dict[str, LoraAdapter] = {}
        self._listeners: list[PoolListener] = []
        self._lock = threading.RLock()
        self._version = 0
        weight = next(model.parameters())
        self._placement = (weight.device, weight.dtype)  # where added adapters are put

    # -- reading -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    @property
    def version(self) -> int:
        """Increases with every change; lets caches of composed weights know they are stale."""
        return self._version

    def get(self, name: str) -> LoraAdapter:
        with self._lock:
            try:
                return self._adapters[name]
            except KeyError:
                raise UnknownAdapterError(self._unknown(name)) from None

    def __getitem__(self, name: str) -> LoraAdapter:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def fingerprint(self) -> str:
        """A short hash of the adapters' names and weights; changes whenever the pool does."""
        with self._lock:
            digest = hashlib.sha256()
            for name in sorted(self._adapters):
                digest.update(f"{name}\0{self._adapters[name].digest}\n".encode())
            return digest.hexdigest()[:16]

    def follow_model(self) -> None:
        """Moves every adapter to the model's device and dtype, if the model moved since they were
        added (e.g. ``model.to("cuda")``); cheap when nothing moved."""
        weight = next(self.model.parameters())
        placement = (weight.device, weight.dtype)
        if placement == self._placement:
            return
        with self._lock:
            self._adapters = {n: a.to(*placement) for n, a in self._adapters.items()}
            self._placement = placement
            self._version += 1

    def check_names(self, names: list[str]) -> None:
        """Raises :class:`UnknownAdapterError` naming the first adapter not in the pool."""
        for name in names:
            if name not in self._adapters:
                raise UnknownAdapterError(self._unknown(name))

    # -- changing ----------------------------------------------------------------------------
    def add(
        self,
        source: str | Path,
        name: str | None = None,
        *,
        allow_pickle: bool = False,
        revision: str | None = None,
    ) -> str:
        """Adds a PEFT LoRA adapter from a local directory or a Hugging Face hub id.

        Args:
            source: A directory with ``adapter_config.json`` and ``adapter_model.safetensors``,
                or a hub repo id such as ``"org/my-lora"``.
            name: The name to register it under; defaults to the directory or repo name.
            allow_pickle: Also accept ``adapter_model.bin`` (a pickle). Off by default.
            revision: The hub revision, for hub ids.

        Returns:
            The registered name.

        Raises:
            AdapterError: bad files, a name already taken, or weights that do not fit the model.
        """
        directory = _resolve_source(source, revision=revision)
        name = name if name is not None else Path(str(source).rstrip("/")).name
        self._check_free(name)
        config, state_dict = read_adapter_files(directory, allow_pickle=allow_pickle, max_bytes=self.max_adapter_bytes)
        adapter = LoraAdapter.from_state_dict(name, config, state_dict, self.model, source=str(source))
        return self.add_adapter(adapter)

    def add_state_dict(self, name: str, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> str:
        """Adds an adapter from a PEFT config dict and state dict already in memory.

        Example:
            >>> from peft import get_peft_model_state_dict  # doctest: +SKIP
            >>> pool.add_state_dict("mine", peft_model.peft_config["default"].to_dict(),
            ...                     get_peft_model_state_dict(peft_model))  # doctest: +SKIP
        """
        self._check_free(name)
        return self.add_adapter(LoraAdapter.from_state_dict(name, config, state_dict, self.model))

    def add_adapter(self, adapter: LoraAdapter) -> str:
        """Registers an already validated adapter."""
        with self._lock:
            self._check_free(adapter.name)
            self._adapters[adapter.name] = adapter
            self._version += 1
        self._notify("added", adapter.name)
        return adapter.name

    def remove(self, name: str) -> LoraAdapter:
        """Removes an adapter and returns it; :class:`UnknownAdapterError` if there is none of that name."""
        with self._lock:
            adapter = self.get(name)
            del self._adapters[name]
            self._version += 1
        self._notify("removed", name)
        return adapter

    def subscribe(self, listener: PoolListener) -> None:
        """Calls ``listener(event, name)`` after each add or remove (e.g. to update an index)."""
        self._listeners.append(listener)

    # -- internals ---------------------------------------------------------------------------
    def _check_free(self, name: str) -> None:
        check_adapter_name(name)
        if name in self._adapters:
            raise AdapterError(
                f"an adapter named {name!r} is already in the pool. Fix: pass another name=, or "
                f"remove({name!r}) first to replace it."
            )

    def _notify(self, event: str, name: str) -> None:
        for listener in self._listeners:
            listener(event, name)

    def _unknown(self, name: str) -> str:
        known = ", ".join(sorted(self._adapters)[:10]) or "none"
        return f"no adapter named {name!r} in the pool (it has {len(self._adapters)}: {known})"


def _resolve_source(source: str | Path, *, revision: str | None) -> Path:
    """A local directory as is; otherwise a hub repo id, fetched (adapter files only) into HF's cache."""
    path = Path(source).expanduser()
    if path.exists() or isinstance(source, Path) or str(source).startswith((".", "/", "~")):
        return path
    if str(source).count("/") != 1:
        raise AdapterError(
            f"adapter source {str(source)!r} is neither an existing directory nor a hub id ('org/name')."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                str(source), revision=revision, allow_patterns=[CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE]
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise AdapterError(
            f"adapter {str(source)!r} is not a local directory and could not be fetched from the Hugging "
            f"Face hub ({type(err).__name__}: {err}). Fix: pass a local path, or check the id and network."
        ) from err
