"""Adding and removing adapters at run time, across the pool, its directory and the router's index.

Each change is all-or-nothing: a failure at any step undoes the steps already taken, so the
pool, the directory and the index are left as they were. With a pool directory, each change holds
its lock from the first step to the last (:func:`~loraretriever.engine.pool_dir.pool_change`), so
processes that share the directory see whole changes only.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from loraretriever.engine.pool import LoraPool
from loraretriever.engine.pool_dir import adapter_dirs, delete_adapter, pool_change, store_adapter
from loraretriever.retrieval.cards import AdapterCard

__all__ = ["add_adapter", "remove_adapter"]


def add_adapter(
    pool: LoraPool,
    router: Any,
    pool_dir: Path | None,
    source: str | Path,
    card: AdapterCard | dict[str, Any] | None = None,
    *,
    name: str | None = None,
) -> str:
    """Stores (with a pool directory), loads and registers an adapter; returns its name.

    Raises:
        ValueError: a card whose name differs from the adapter's, or a card without a router.
        AdapterError, RetrievalError: from the failed step, after undoing the others.
    """
    if card is not None and not isinstance(card, AdapterCard):
        card = AdapterCard.from_dict({"name": name or Path(str(source)).name, **dict(card)})
    name = name or (card.name if card is not None else Path(str(source).rstrip("/")).name)
    if card is not None and card.name != name:
        raise ValueError(f"the card is named {card.name!r} but the adapter {name!r}; they must match.")
    if card is not None and router is None:
        raise ValueError("a card needs a router; open the RoutedLM with pool_dir= or router=.")
    with _change(pool_dir):
        return _add(pool, router, pool_dir, source, card, name)


def _add(pool: LoraPool, router: Any, pool_dir: Path | None, source: str | Path, card: Any, name: str) -> str:
    stored = store_adapter(pool_dir, source, name) if pool_dir is not None else None
    try:
        pool.add(stored or source, name=name)
    except BaseException:
        if stored is not None:
            delete_adapter(pool_dir, name)
        raise
    if card is not None:
        try:
            router.register(card)
        except BaseException:
            pool.remove(name)
            if stored is not None:
                delete_adapter(pool_dir, name)
            raise
    return name


def remove_adapter(pool: LoraPool, router: Any, pool_dir: Path | None, name: str) -> None:
    """Removes an adapter: its card and index entry first (so it is never routed while missing),
    then the pool entry and the stored files."""
    pool.check_names([name])
    with _change(pool_dir):
        store = getattr(router, "store", None)
        if store is not None and name in store:
            router.unregister(name)
        pool.remove(name)
        if pool_dir is not None and name in adapter_dirs(pool_dir):
            delete_adapter(pool_dir, name)


def _change(pool_dir: Path | None) -> contextlib.AbstractContextManager:
    return pool_change(pool_dir) if pool_dir is not None else contextlib.nullcontext()
