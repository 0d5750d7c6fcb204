"""The LoRA pool's registry: name-keyed adapters of one base model, changed at run time, loaded
from disk by a loader thread into byte-budgeted host and device caches (:mod:`~loraretriever.pool.cache`)
as requests hold them; adapters come from local directories or the hub (:mod:`~loraretriever.pool.sources`)."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraretriever.errors import NotFoundError
from loraretriever.pool.adapter import (
    SAFETENSORS_FILE,
    AdapterError,
    AdapterExistsError,
    LoraAdapter,
    check_adapter_name,
    check_file_size,
    check_layout,
    linear_modules,
    read_adapter_config,
    read_adapter_files,
    read_safetensors,
    read_safetensors_header,
)
from loraretriever.pool.cache import AdapterCache
from loraretriever.pool.sources import resolve_source

__all__ = ["AdapterHold", "LoraPool", "PoolListener", "StoredAdapter", "UnknownAdapterError"]


class UnknownAdapterError(NotFoundError, ValueError):
    """A name that is not in the pool (404): a KeyError for lookups, and a ValueError like every
    other bad value a caller passes (so a request naming an unknown adapter fails with the
    library's errors)."""

    def __init__(self, message: str = "", *, param: str | None = "model") -> None:
        super().__init__(message, param=param)


PoolListener = Callable[[str, str], None]
"""Called as ``listener(event, name)`` with event ``"added"`` or ``"removed"`` after a change."""

LoadErrorListener = Callable[[str, AdapterError], None]
"""Called as ``listener(name, error)`` when a stored adapter fails its first load (it has left the pool)."""


@dataclass(frozen=True)
class StoredAdapter:
    """What the pool knows of an adapter kept on disk, read without its weights (config and the
    safetensors header: names, shapes and size), and how to load it."""

    name: str
    directory: Path
    config: dict[str, Any] = field(repr=False)
    nbytes: int = field(metadata={"help": "Its weights' bytes as stored (the host cache's cost)."})
    identity: str = field(metadata={"help": "Its weights' digest if known when registered, else the file's signature."})

    @property
    def weights_file(self) -> Path:
        return self.directory / SAFETENSORS_FILE


class AdapterHold:
    """Adapters a request holds from when it is queued until it ends: pinned in the pool's caches
    (never evicted meanwhile) and loading in the background from the start (prefetch). Made by
    :meth:`LoraPool.hold`; :meth:`release` once the request has ended."""

    def __init__(self, pool: LoraPool, names: list[str], futures: dict[str, Future]) -> None:
        self._pool, self.names, self._futures = pool, names, futures
        self._released = False

    @property
    def ready(self) -> bool:
        """Every adapter is loaded (or failed): :meth:`adapters` will not wait."""
        return all(f.done() for f in self._futures.values())

    def adapters(self) -> dict[str, LoraAdapter]:
        """The held adapters, waiting for loads still under way.

        Raises:
            AdapterError: an adapter whose file failed its first load.
        """
        return {name: future.result() for name, future in self._futures.items()}

    def release(self) -> None:
        """Unpins the adapters (once; later calls do nothing)."""
        if not self._released:
            self._released = True
            self._pool._unpin(self.names)


class LoraPool:
    """Holds LoRA adapters of one base model under unique names.

    Adapters are validated against the model (shapes, target modules, finite weights); a failed add
    leaves the pool exactly as it was. The base model is never modified: composition happens in
    :class:`loraretriever.Composer`.

    An adapter read from a directory (:meth:`add`, :meth:`register`) is kept on disk and loaded
    into a host cache when used, in the dtype it is stored in (float16 / bfloat16 weights stay so;
    plans cast them to the model's dtype), and, for a model on another device, copied into a device
    cache. Each cache keeps its byte budget by evicting the least recently used adapters that no
    request holds (:meth:`hold`). :meth:`register` reads only the config and the safetensors header,
    so a pool of 10,000 adapters opens in seconds; the weights are checked at their first load, and
    an adapter that fails it leaves the pool. Adapters given as state dicts are held in memory, in
    the model's dtype, and never evicted.

    Args:
        model: The base model every adapter must fit.
        max_adapter_bytes: Weight files larger than this are refused before they are read
            (default: the size of the base model's weights).
        host_cache_bytes: The host cache's budget (default: no limit, every adapter stays loaded
            once used).
        device_cache_bytes: The device cache's budget, for a model not on the CPU (default: no limit).

    Example:
        >>> pool = LoraPool(model, host_cache_bytes=2 * 2**30)  # doctest: +SKIP
        >>> pool.add("adapters/sst2")  # name defaults to the directory name  # doctest: +SKIP
        'sst2'
        >>> pool.names  # doctest: +SKIP
        ['sst2']
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_adapter_bytes: int | None = None,
        host_cache_bytes: int | None = None,
        device_cache_bytes: int | None = None,
    ) -> None:
        self.model = model
        # an adapter file larger than its base model's weights is not a LoRA of it
        self.max_adapter_bytes = max_adapter_bytes or sum(p.numel() * p.element_size() for p in model.parameters())
        self._linear_layers = linear_modules(model)  # listed once: registering 10,000 adapters checks each
        self._adapters: dict[str, LoraAdapter] = {}  # held in memory, never evicted
        self._stored: dict[str, StoredAdapter] = {}  # on disk, loaded into the caches when used
        self.host_cache = AdapterCache(host_cache_bytes)
        self.device_cache = AdapterCache(device_cache_bytes)
        self._loading: dict[str, Future] = {}
        self._loader: ThreadPoolExecutor | None = None
        self.loads = 0  # loads from disk (cold misses) so far
        # the latest loads' seconds, for benchmarks (bounded: a server runs for months)
        self.recent_load_seconds: deque[float] = deque(maxlen=4096)
        self._listeners: list[PoolListener] = []
        self._load_error_listeners: list[LoadErrorListener] = []
        self._lock = threading.RLock()
        self._version = 0
        weight = next(model.parameters())
        self._placement = (weight.device, weight.dtype)  # where added adapters are put

    # -- reading -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted([*self._adapters, *self._stored])

    @property
    def version(self) -> int:
        """Increases with every change; lets caches of composed weights know they are stale."""
        return self._version

    def get(self, name: str) -> LoraAdapter:
        """The adapter, loaded if it is not (waiting for its load); on the model's device.

        Raises:
            UnknownAdapterError: no adapter of that name. AdapterError: its file failed its first load.
        """
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is not None:
                return adapter
            if name not in self._stored:
                raise UnknownAdapterError(self._unknown(name))
            future = self._fetch(name)
        return future.result()

    def __getitem__(self, name: str) -> LoraAdapter:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters or name in self._stored

    def __len__(self) -> int:
        return len(self._adapters) + len(self._stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def stored(self, name: str) -> StoredAdapter | None:
        """The disk entry of a stored adapter (None for one held in memory only)."""
        return self._stored.get(name)

    def fingerprint(self) -> str:
        """A short hash of the adapters' names and weights; changes whenever the pool does."""
        with self._lock:
            digest = hashlib.sha256()
            identities = {n: a.digest for n, a in self._adapters.items()}
            identities.update({n: s.identity for n, s in self._stored.items()})
            for name in sorted(identities):
                digest.update(f"{name}\0{identities[name]}\n".encode())
            return digest.hexdigest()[:16]

    def cache_stats(self) -> dict[str, Any]:
        """Hits, misses, bytes and budget of the host and device caches; loads from disk."""
        with self._lock:
            return {
                "host": self.host_cache.stats(),
                "device": self.device_cache.stats() if self._cache_for_use() is not None else None,
                "loads": self.loads,
            }

    def follow_model(self) -> None:
        """Moves every adapter to the model's device and dtype, if the model moved since they were
        added (e.g. ``model.to("cuda")``); cheap when nothing moved. Stored adapters stay in their
        own dtype; the device cache is emptied (refilled on use)."""
        weight = next(self.model.parameters())
        placement = (weight.device, weight.dtype)
        if placement == self._placement:
            return
        with self._lock:
            self._adapters = {n: a.to(*placement) for n, a in self._adapters.items()}
            self.device_cache.clear()
            self._placement = placement
            self._version += 1

    def check_names(self, names: list[str], param: str = "model") -> None:
        """Raises :class:`UnknownAdapterError` naming the first adapter not in the pool (and, for a
        caller's option other than the served ``model``, that option)."""
        for name in names:
            if name not in self:
                where = "" if param == "model" else f"{param}={list(names)!r}: "
                raise UnknownAdapterError(where + self._unknown(name), param=param)

    # -- holding -----------------------------------------------------------------------------
    def hold(self, names: list[str]) -> AdapterHold:
        """Pins ``names`` in the caches and starts loading those not loaded (in the background);
        the returned hold gives the adapters to the plan and is released when the request ends.

        Raises:
            UnknownAdapterError: a name not in the pool (nothing is pinned).
        """
        with self._lock:
            self.check_names(names)
            futures: dict[str, Future] = {}
            for name in dict.fromkeys(names):
                if name in self._adapters:
                    futures[name] = _done(self._adapters[name])
                    continue
                self.host_cache.pin(name)
                self.device_cache.pin(name)
                futures[name] = self._fetch(name, background=True)
            return AdapterHold(self, list(futures), futures)

    def _unpin(self, names: list[str]) -> None:
        with self._lock:
            for name in names:
                if name not in self._adapters:
                    self.host_cache.unpin(name)
                    self.device_cache.unpin(name)

    def _cache_for_use(self) -> AdapterCache | None:
        """The device cache, when the model is not on the CPU (on the CPU the host cache serves)."""
        return self.device_cache if self._placement[0].type != "cpu" else None

    def _fetch(self, name: str, background: bool = False) -> Future:
        """A future of ``name`` on the model's device: done at once on a cache hit, else the load
        under way or a new one (on the loader thread when ``background``, else here)."""
        device_cache = self._cache_for_use()
        cached = (device_cache if device_cache is not None else self.host_cache).get(name)
        if cached is not None:
            return _done(cached)
        if name in self._loading:
            return self._loading[name]
        future: Future = Future()
        self._loading[name] = future
        if background:
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-loader")
            self._loader.submit(self._load_into, name, future)
        else:
            self._lock.release()  # the file is read without the lock; the future waits for it
            try:
                self._load_into(name, future)
            finally:
                self._lock.acquire()
        return future

    def _load_into(self, name: str, future: Future) -> None:
        try:
            future.set_result(self._load(name))
        except BaseException as error:
            future.set_exception(error)
        finally:
            with self._lock:
                self._loading.pop(name, None)

    def _load(self, name: str) -> LoraAdapter:
        """Loads ``name`` into the host cache (from disk on a miss) and, for a model on another
        device, the device cache; a file that fails its checks takes the adapter out of the pool."""
        with self._lock:
            stored = self._stored.get(name)
            host = self.host_cache.peek(name) if stored is not None else None
        if stored is None:
            raise UnknownAdapterError(f"adapter {name!r} left the pool before it was loaded.")
        if host is None:
            started = time.perf_counter()
            try:
                host = self._read(stored)
            except AdapterError as error:
                self._drop_broken(name, stored, error)
                raise
            with self._lock:
                self.loads += 1
                self.recent_load_seconds.append(time.perf_counter() - started)
                if self._stored.get(name) is stored:
                    self.host_cache.put(name, host)
        device_cache = self._cache_for_use()
        if device_cache is None:
            return host
        on_device = host.to(self._placement[0], host.dtype)
        with self._lock:
            if self._stored.get(name) is stored:
                device_cache.put(name, on_device)
        return on_device

    def _read(self, stored: StoredAdapter) -> LoraAdapter:
        """The adapter's weights from its file, checked with the config read when it was registered."""
        check_file_size(stored.weights_file, self.max_adapter_bytes)
        adapter = LoraAdapter.from_state_dict(
            stored.name,
            stored.config,
            read_safetensors(stored.weights_file),
            self.model,
            source=str(stored.directory),
            device="cpu",
            linear_layers=self._linear_layers,
        )
        if not stored.identity.startswith("file:") and adapter.digest != stored.identity:
            raise AdapterError(
                f"adapter {stored.name!r}: {str(stored.weights_file)!r} changed on disk since it was added "
                f"(digest {adapter.digest}, was {stored.identity}). Fix: add it again under a new name."
            )
        return adapter

    def _drop_broken(self, name: str, stored: StoredAdapter, error: AdapterError) -> None:
        with self._lock:
            if self._stored.get(name) is not stored:
                return
            del self._stored[name]
            self._version += 1
        self._notify("removed", name)
        for listener in self._load_error_listeners:
            listener(name, error)

    # -- changing ----------------------------------------------------------------------------
    def add(
        self,
        source: str | Path,
        name: str | None = None,
        *,
        allow_pickle: bool = False,
        revision: str | None = None,
    ) -> str:
        """Adds a PEFT LoRA adapter from a local directory or a Hugging Face hub id, checking its
        weights now (kept on disk and cached as any stored adapter; a pickle is held in memory).

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
        directory = resolve_source(source, revision=revision)
        name = name if name is not None else Path(str(source).rstrip("/")).name
        self._check_free(name)
        if not (directory / SAFETENSORS_FILE).is_file():  # a pickle (or nothing): read and held in memory
            config, state_dict = read_adapter_files(
                directory, allow_pickle=allow_pickle, max_bytes=self.max_adapter_bytes
            )
            weight = next(self.model.parameters())
            adapter = LoraAdapter.from_state_dict(
                name, config, state_dict, self.model, source=str(source), dtype=weight.dtype, device=weight.device
            )
            return self.add_adapter(adapter)
        stored = self._describe(directory, name)
        adapter = self._read(stored)
        stored = dataclasses.replace(stored, identity=adapter.digest)
        with self._lock:
            self._check_free(name)
            self._stored[name] = stored
            self.host_cache.put(name, adapter)
            self._version += 1
        self._notify("added", name)
        return name

    def register(self, directory: str | Path, name: str | None = None) -> str:
        """Adds a stored adapter reading only its config and safetensors header (names, shapes):
        its weights are read and checked at their first use, and if they fail then, the adapter
        leaves the pool (listeners of :meth:`on_load_error` are told).

        Raises:
            AdapterError: a name already taken, a missing or unreadable config or header, or
                shapes that do not fit the model.
        """
        directory = Path(directory).expanduser()
        name = name if name is not None else directory.name
        self._check_free(name)
        stored = self._describe(directory, name)
        with self._lock:
            self._check_free(name)
            self._stored[name] = stored
            self._version += 1
        self._notify("added", name)
        return name

    def _describe(self, directory: Path, name: str) -> StoredAdapter:
        """The disk entry of an adapter directory, its config and shapes checked against the model."""
        config = read_adapter_config(directory)
        weights = directory / SAFETENSORS_FILE
        if not weights.is_file():
            raise AdapterError(f"{str(directory)!r} has no {SAFETENSORS_FILE}. Fix: save the adapter with PEFT.")
        check_file_size(weights, self.max_adapter_bytes)
        stat = weights.stat()
        header = read_safetensors_header(weights)
        shapes = {k: v[1] for k, v in header.items()}
        check_layout(f"adapter {name!r} ({directory})", config, shapes, self.model, self._linear_layers)
        signature = f"file:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
        return StoredAdapter(name, directory, config, sum(v[2] for v in header.values()), signature)

    def add_state_dict(self, name: str, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> str:
        """Adds an adapter from a PEFT config dict and state dict already in memory (held in
        memory, in the model's dtype).

        Example:
            >>> from peft import get_peft_model_state_dict  # doctest: +SKIP
            >>> pool.add_state_dict("mine", peft_model.peft_config["default"].to_dict(),
            ...                     get_peft_model_state_dict(peft_model))  # doctest: +SKIP
        """
        self._check_free(name)
        weight = next(self.model.parameters())
        return self.add_adapter(
            LoraAdapter.from_state_dict(name, config, state_dict, self.model, dtype=weight.dtype, device=weight.device)
        )

    def add_adapter(self, adapter: LoraAdapter) -> str:
        """Registers an already validated adapter (held in memory)."""
        with self._lock:
            self._check_free(adapter.name)
            self._adapters[adapter.name] = adapter
            self._version += 1
        self._notify("added", adapter.name)
        return adapter.name

    def remove(self, name: str) -> LoraAdapter | StoredAdapter:
        """Removes an adapter and returns it (a stored one's disk entry); :class:`UnknownAdapterError`
        if there is none of that name. Requests holding it keep it until they end."""
        with self._lock:
            if name in self._stored:
                removed: LoraAdapter | StoredAdapter = self._stored.pop(name)
                self.host_cache.drop(name)
                self.device_cache.drop(name)
            else:
                removed = self._adapters.pop(name, None)
                if removed is None:
                    raise UnknownAdapterError(self._unknown(name))
            self._version += 1
        self._notify("removed", name)
        return removed

    def subscribe(self, listener: PoolListener) -> None:
        """Calls ``listener(event, name)`` after each add or remove (e.g. to update an index)."""
        self._listeners.append(listener)

    def on_load_error(self, listener: LoadErrorListener) -> None:
        """Calls ``listener(name, error)`` when a stored adapter fails its first load (e.g. to
        quarantine its files); the adapter has left the pool by then."""
        self._load_error_listeners.append(listener)

    def close(self) -> None:
        """Stops the background loader (loads under way finish first)."""
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None

    # -- internals ---------------------------------------------------------------------------
    def _check_free(self, name: str) -> None:
        check_adapter_name(name)
        if name in self:
            raise AdapterExistsError(
                f"an adapter named {name!r} is already in the pool. Fix: pass another name=, or "
                f"remove({name!r}) first to replace it."
            )

    def _notify(self, event: str, name: str) -> None:
        for listener in self._listeners:
            listener(event, name)

    def _unknown(self, name: str) -> str:
        names = self.names
        known = ", ".join(names[:10]) or "none"
        return f"no adapter named {name!r} in the pool (it has {len(names)}: {known})"


def _done(adapter: LoraAdapter) -> Future:
    future: Future = Future()
    future.set_result(adapter)
    return future
