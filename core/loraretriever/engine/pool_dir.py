"""A pool directory on disk, the source of truth of a pool.

::

    POOL_DIR/
      adapters/<name>/adapter_config.json, adapter_model.safetensors   (PEFT's own format)
      cards/<name>.json                                               (loraretriever.retrieval.cards)
      index/                                                          (Chroma, rebuilt from the cards)
      pool.json                   (the manifest: base model and its fingerprint, embedder, prompt format)
      .generation, .pool.lock                                         (changes across processes)
      .intents/<name>.json                                            (a change under way)

Adapters are copied in through a temporary directory renamed into place, so a crash never leaves
a half-written adapter under its name. Several processes may share a pool directory: each change
holds ``.pool.lock`` (:func:`pool_change`) and then bumps ``.generation``, which the others poll
(:func:`generation`) to pick up what changed.

A change that spans files (an adapter and its card) first records its intent
(:func:`record_intent`) and clears it when done. A process killed in between leaves the intent,
and whoever opens the pool next undoes the change whole (``loraretriever.serving.adapters.recover``),
with the staging and trash directories it left (:func:`leftovers`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from loraretriever.engine.adapter import CONFIG_FILE, SAFETENSORS_FILE, AdapterError, check_adapter_name
from loraretriever.engine.base_model import model_fingerprint, model_source
from loraretriever.engine.home import with_umask
from loraretriever.engine.pool import LoraPool

__all__ = [
    "ADAPTERS_DIR",
    "SETTINGS_FILE",
    "PoolMismatchError",
    "adapter_dirs",
    "check_pool_model",
    "clear_intent",
    "delete_adapter",
    "generation",
    "intents",
    "leftovers",
    "load_adapters",
    "pool_change",
    "prompt_format",
    "read_manifest",
    "record_intent",
    "record_pool_model",
    "record_prompt_format",
    "recorded_model",
    "store_adapter",
    "update_manifest",
]

logger = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
SETTINGS_FILE = "pool.json"
MANIFEST_FORMAT = 1
INTENTS_DIR = ".intents"
PROMPT_FORMATS = ("chat", "plain")
GENERATION_FILE = ".generation"
LOCK_FILE = ".pool.lock"
LOCK_NOTICE_S = 2.0  # a writer waiting longer says so
LOCK_WAIT_S = 120  # and gives up after this


@functools.cache
def _lock(root: Path) -> FileLock:
    # one instance per directory, so that a thread holding it may take it again (nested changes)
    return FileLock(root / LOCK_FILE)


@contextmanager
def pool_change(pool_dir: str | Path) -> Iterator[None]:
    """Holds the pool directory's lock (across processes and threads) for one change, then bumps
    its :func:`generation` so that other processes pick the change up. Nested uses are one change."""
    root = Path(pool_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    lock = _lock(root)
    _acquire(lock, root)
    try:
        yield
    finally:
        try:
            if lock.lock_counter == 1:  # the outermost change
                _bump(root)
        finally:
            lock.release()


def _acquire(lock: FileLock, root: Path) -> None:
    """Waits its turn: another writer holds a change for a second or two (a copy and a card), so a
    short-lived command waits rather than fails, saying so after a while, within a bound."""
    try:
        lock.acquire(timeout=LOCK_NOTICE_S)
        return
    except Timeout:
        logger.warning("waiting for another process's change of the pool %s (up to %d s)", root, LOCK_WAIT_S)
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise AdapterError(
            f"the pool {str(root)!r} has been locked by another process for over {LOCK_WAIT_S} s. Fix: let that "
            "process finish, or stop it (a lock dies with its process)."
        ) from None


def generation(pool_dir: str | Path) -> int:
    """How many changes the pool directory has seen (0 for a new one); cheap enough to poll."""
    try:
        return int((Path(pool_dir).expanduser() / GENERATION_FILE).read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _bump(root: Path) -> None:
    staging = root / f"{GENERATION_FILE}.{os.getpid()}.tmp"
    staging.write_text(str(generation(root) + 1))
    staging.replace(root / GENERATION_FILE)


def adapter_dirs(pool_dir: str | Path) -> dict[str, Path]:
    """The stored adapters of a pool directory, by name (temporary and hidden entries skipped)."""
    root = Path(pool_dir).expanduser() / ADAPTERS_DIR
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def load_adapters(pool: LoraPool, pool_dir: str | Path) -> list[str]:
    """Adds every stored adapter of ``pool_dir`` to ``pool``; returns the names added.

    Raises:
        AdapterError: a stored adapter is broken, naming it (the pool keeps those added before).
    """
    return [pool.add(path, name=name) for name, path in adapter_dirs(pool_dir).items() if name not in pool]


def store_adapter(pool_dir: str | Path, source: str | Path, name: str) -> Path:
    """Copies a PEFT adapter directory into ``POOL_DIR/adapters/<name>`` and returns the new path.

    Raises:
        AdapterError: a bad name, a name already stored, or a source without PEFT's files.
    """
    check_adapter_name(name)
    source = Path(source).expanduser()
    target = Path(pool_dir).expanduser() / ADAPTERS_DIR / name
    if target.exists():
        raise AdapterError(f"{str(target)!r} already exists. Fix: remove adapter {name!r} first, or pick another name.")
    missing = [f for f in (CONFIG_FILE, SAFETENSORS_FILE) if not (source / f).is_file()]
    if missing:
        raise AdapterError(f"{str(source)!r} lacks {missing}; save the adapter with PEFT's save_pretrained.")
    with pool_change(pool_dir):
        if target.exists():  # stored by another process meanwhile
            raise AdapterError(
                f"{str(target)!r} already exists. Fix: remove adapter {name!r} first, or pick another name."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            for file in (CONFIG_FILE, SAFETENSORS_FILE):
                shutil.copy2(source / file, staging / file)
            with_umask(staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def delete_adapter(pool_dir: str | Path, name: str) -> None:
    """Removes ``POOL_DIR/adapters/<name>`` (renamed aside first, so it vanishes at once)."""
    check_adapter_name(name)
    target = Path(pool_dir).expanduser() / ADAPTERS_DIR / name
    if not target.is_dir():
        raise KeyError(f"no stored adapter named {name!r} in {str(target.parent)!r}.")
    with pool_change(pool_dir):
        trash = target.with_name(f".{name}.deleting")
        if trash.exists():  # left by a delete that was killed: finish it first
            shutil.rmtree(trash)
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def record_intent(pool_dir: str | Path, op: str, name: str) -> None:
    """Records (durably) that ``op`` ("add" / "remove") of adapter ``name`` is under way."""
    root = Path(pool_dir).expanduser() / INTENTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{name}-", dir=root)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"op": op, "name": name}, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(staging, root / f"{name}.json")


def clear_intent(pool_dir: str | Path, name: str) -> None:
    """Marks the change of ``name`` done."""
    with contextlib.suppress(FileNotFoundError):
        (Path(pool_dir).expanduser() / INTENTS_DIR / f"{name}.json").unlink()


def intents(pool_dir: str | Path) -> dict[str, str]:
    """The changes under way or interrupted: ``{adapter name: op}`` (an unreadable record is "unknown")."""
    root = Path(pool_dir).expanduser() / INTENTS_DIR
    found: dict[str, str] = {}
    for path in sorted(root.glob("*.json")) if root.is_dir() else ():
        try:
            found[path.stem] = str(json.loads(path.read_text(encoding="utf-8"))["op"])
        except (ValueError, KeyError, TypeError):  # killed mid-write cannot happen (os.replace); be safe
            found[path.stem] = "unknown"
    return found


def leftovers(pool_dir: str | Path) -> list[Path]:
    """What interrupted writes leave behind: staging and trash directories of adapters, staging
    files of intents and settings (hidden names, never read as pool entries)."""
    root = Path(pool_dir).expanduser()
    found = [p for p in (root / ADAPTERS_DIR).glob(".*")] if (root / ADAPTERS_DIR).is_dir() else []
    found += [p for p in (root / INTENTS_DIR).glob(".*")] if (root / INTENTS_DIR).is_dir() else []
    found += list(root.glob(f".{SETTINGS_FILE}-*"))
    return sorted(found)


def read_manifest(pool_dir: str | Path) -> dict[str, Any]:
    """The pool's manifest (``pool.json``): what it belongs to and how its LoRAs were trained;
    ``{}`` for a pool that has none yet.

    Raises:
        AdapterError: a ``pool.json`` that is not a JSON object, or of a newer format (names the fix).
    """
    path = Path(pool_dir).expanduser() / SETTINGS_FILE
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
        fd, staging = tempfile.mkstemp(prefix=f".{SETTINGS_FILE}-", dir=root)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(manifest, out, indent=1)
            out.write("\n")
        with_umask(staging)
        os.replace(staging, root / SETTINGS_FILE)
    return manifest


class PoolMismatchError(AdapterError):
    """The pool belongs to another base model; nothing in it was touched."""


def _describe(fingerprint: dict[str, Any]) -> str:
    return f"{fingerprint.get('architecture')}, {fingerprint.get('layers')} layers, hidden size {fingerprint.get('hidden_size')}"


def recorded_model(pool_dir: str | Path) -> str | None:
    """The base model the pool's manifest records (a hub id, a path, or the packaged default's
    name), or None."""
    return (read_manifest(pool_dir).get("base_model") or {}).get("id")


def check_pool_model(pool_dir: str | Path, model: torch.nn.Module) -> bool:
    """Whether the pool records its base model; refuses ``model`` if it is another one.

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
            f"({_describe(recorded['fingerprint'])}), not to {model_source(model)!r} ({_describe(found)}); its "
            f"adapters do not fit it. Fix: open it with {recorded.get('id')!r} (the default when no model is "
            "given), or use another pool directory for this model."
        )
    if recorded.get("id") != model_source(model):
        logger.info(
            "the pool %s records %r; opened with %r (the same shapes)",
            pool_dir,
            recorded.get("id"),
            model_source(model),
        )
    return True


def record_pool_model(pool_dir: str | Path, model: torch.nn.Module) -> None:
    """Records ``model`` as the pool's base model in its manifest (a pool without one gets it on
    its first open with a model)."""
    update_manifest(pool_dir, base_model={"id": model_source(model), "fingerprint": model_fingerprint(model)})
    logger.warning("recorded base model %r in %s", model_source(model), Path(pool_dir) / SETTINGS_FILE)


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
