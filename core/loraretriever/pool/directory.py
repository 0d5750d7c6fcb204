"""A pool directory on disk, the source of truth of a pool (its paths: :class:`PoolLayout`).

Adapters are copied in through a temporary directory renamed into place, so a crash never leaves
a half-written adapter under its name. Several processes may share a pool directory: each change
holds ``.pool.lock`` (:func:`pool_change`) and then bumps ``.generation``, which the others poll
(:func:`generation`) to pick up what changed.

A change that spans files (an adapter and its card) first records its intent
(:func:`record_intent`) and clears it when done. A process killed in between leaves the intent,
and whoever opens the pool next undoes the change whole (:func:`recover`), with the staging and
trash files it left (:func:`leftovers`). An entry that is damaged (unreadable files, not one of
another model) is moved aside with its reason (:func:`quarantine`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from loraretriever.errors import NotFoundError, PoolBusyError
from loraretriever.pool.adapter import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    AdapterError,
    AdapterExistsError,
    check_adapter_name,
)
from loraretriever.pool.home import with_umask
from loraretriever.pool.layout import MANIFEST_FILE, PoolLayout
from loraretriever.pool.lora_pool import LoraPool

__all__ = [
    "adapter_dirs",
    "clear_intent",
    "delete_adapter",
    "generation",
    "intents",
    "leftovers",
    "load_adapters",
    "pool_change",
    "quarantine",
    "quarantined",
    "record_intent",
    "recover",
    "store_adapter",
]

logger = logging.getLogger(__name__)

LOCK_NOTICE_S = 2.0  # a writer waiting longer says so
LOCK_WAIT_S = 120  # and gives up after this


@functools.cache
def _lock(root: Path) -> FileLock:
    # one instance per directory, so that a thread holding it may take it again (nested changes)
    return FileLock(PoolLayout(root).lock)


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
        raise PoolBusyError(
            f"the pool {str(root)!r} has been locked by another process for over {LOCK_WAIT_S} s. Fix: let that "
            "process finish, or stop it (a lock dies with its process)."
        ) from None


def generation(pool_dir: str | Path) -> int:
    """How many changes the pool directory has seen (0 for a new one); cheap enough to poll."""
    try:
        return int(PoolLayout(pool_dir).generation.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _bump(root: Path) -> None:
    target = PoolLayout(root).generation
    staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    staging.write_text(str(generation(root) + 1))
    staging.replace(target)


def adapter_dirs(pool_dir: str | Path) -> dict[str, Path]:
    """The stored adapters of a pool directory, by name (temporary and hidden entries skipped)."""
    root = PoolLayout(pool_dir).adapters
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
    target = PoolLayout(pool_dir).adapter(name)
    if target.exists():
        raise AdapterExistsError(
            f"{str(target)!r} already exists. Fix: remove adapter {name!r} first, or pick another name."
        )
    missing = [f for f in (CONFIG_FILE, SAFETENSORS_FILE) if not (source / f).is_file()]
    if missing:
        raise AdapterError(f"{str(source)!r} lacks {missing}; save the adapter with PEFT's save_pretrained.")
    with pool_change(pool_dir):
        if target.exists():  # stored by another process meanwhile
            raise AdapterExistsError(
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
    target = PoolLayout(pool_dir).adapter(name)
    if not target.is_dir():
        raise NotFoundError(f"no stored adapter named {name!r} in {str(target.parent)!r}.", param="name")
    with pool_change(pool_dir):
        trash = target.with_name(f".{name}.deleting")
        if trash.exists():  # left by a delete that was killed: finish it first
            shutil.rmtree(trash)
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def record_intent(pool_dir: str | Path, op: str, name: str) -> None:
    """Records (durably) that ``op`` ("add" / "remove") of adapter ``name`` is under way."""
    layout = PoolLayout(pool_dir)
    layout.intents.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{name}-", dir=layout.intents)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"op": op, "name": name}, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(staging, layout.intent(name))


def clear_intent(pool_dir: str | Path, name: str) -> None:
    """Marks the change of ``name`` done."""
    with contextlib.suppress(FileNotFoundError):
        PoolLayout(pool_dir).intent(name).unlink()


def intents(pool_dir: str | Path) -> dict[str, str]:
    """The changes under way or interrupted: ``{adapter name: op}`` (an unreadable record is "unknown")."""
    root = PoolLayout(pool_dir).intents
    found: dict[str, str] = {}
    for path in sorted(root.glob("*.json")) if root.is_dir() else ():
        try:
            found[path.stem] = str(json.loads(path.read_text(encoding="utf-8"))["op"])
        except (ValueError, KeyError, TypeError):  # killed mid-write cannot happen (os.replace); be safe
            found[path.stem] = "unknown"
    return found


def leftovers(pool_dir: str | Path) -> list[Path]:
    """What interrupted writes leave behind: staging and trash directories of adapters, staging
    files of intents, cards and the manifest (hidden names, never read as pool entries)."""
    layout = PoolLayout(pool_dir)
    found = list(layout.adapters.glob(".*")) if layout.adapters.is_dir() else []
    found += list(layout.intents.glob(".*")) if layout.intents.is_dir() else []
    found += sorted(layout.cards.glob(".*.tmp")) if layout.cards.is_dir() else []
    found += list(layout.root.glob(f".{MANIFEST_FILE}-*"))
    return sorted(found)


def recover(pool_dir: str | Path) -> dict[str, list[str]]:
    """Undoes what a killed process left half done in ``pool_dir``: each recorded add or remove is
    completed as a removal (its card and stored adapter go; the index drops the vector when it is
    reconciled with the cards), and staging and trash files are deleted. Idempotent; cheap when
    there is nothing to do.

    Returns:
        ``{"undone": [adapter names], "cleaned": [paths]}``.
    """
    layout = PoolLayout(pool_dir)
    if not intents(layout.root) and not leftovers(layout.root):
        return {"undone": [], "cleaned": []}
    with pool_change(layout.root):  # after whoever is changing the pool now has finished
        undone = sorted(intents(layout.root))
        for name in undone:
            layout.card(name).unlink(missing_ok=True)
            if name in adapter_dirs(layout.root):
                delete_adapter(layout.root, name)
            clear_intent(layout.root, name)
        cleaned = leftovers(layout.root)
        for path in cleaned:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    logger.warning("recovered %s: undid the interrupted changes of %s, cleaned %s", layout.root, undone, cleaned)
    return {"undone": undone, "cleaned": [str(p) for p in cleaned]}


def quarantine(pool_dir: str | Path, name: str, reason: str) -> Path:
    """Moves adapter ``name``'s stored files and card out of the pool, into
    ``POOL_DIR/quarantine/<name>/`` with ``reason.txt``; returns that directory. For damage only:
    an adapter of another base model is sound, and opening with that model fixes it."""
    layout = PoolLayout(pool_dir)
    with pool_change(layout.root):
        target = layout.quarantine / name
        if target.exists():  # quarantined before: keep both
            target = target.with_name(f"{name}.{len(list(target.parent.glob(name + '.*'))) + 1}")
        target.mkdir(parents=True)
        stored = adapter_dirs(layout.root).get(name)
        if stored is not None:
            stored.rename(target / "adapter")
        if layout.card(name).is_file():
            layout.card(name).rename(target / "card.json")
        (target / "reason.txt").write_text(reason + "\n", encoding="utf-8")
    logger.warning("quarantined %r in %s: %s", name, target, reason)
    return target


def quarantined(pool_dir: str | Path) -> dict[str, str]:
    """The quarantined entries of a pool directory: ``{directory name: reason}``."""
    root = PoolLayout(pool_dir).quarantine
    if not root.is_dir():
        return {}
    return {
        p.name: (p / "reason.txt").read_text(encoding="utf-8").strip() if (p / "reason.txt").is_file() else "?"
        for p in sorted(root.iterdir())
        if p.is_dir()
    }
