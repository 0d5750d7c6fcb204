"""Keeping a process's pool in step with a pool directory that other processes change too.

Every change to a pool directory bumps its generation (:func:`~loraretriever.pool.directory.generation`);
:meth:`PoolSync.refresh` compares it with the last one seen (one small file read) and, when it
moved, loads the adapters other processes stored and drops those they removed, then calls
``on_change`` (the router's reconcile: the index is a cache of the cards, which writers such as
``loraretriever pool add`` change without opening it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from loraretriever.pool.directory import adapter_dirs, generation
from loraretriever.pool.lora_pool import LoraPool

__all__ = ["PoolSync"]

logger = logging.getLogger(__name__)


class PoolSync:
    """Follows ``pool_dir`` for ``pool``.

    Args:
        pool: The process's pool.
        pool_dir: The shared directory.
        extra: Adapters added to the pool from elsewhere (``adapters=``): never dropped.
        on_change: Called after each change is taken in (the router's reconcile); a failure is
            logged, never raised to the caller that is serving.
    """

    def __init__(
        self,
        pool: LoraPool,
        pool_dir: str | Path,
        extra: Iterable[str] = (),
        on_change: Callable[[], object] | None = None,
    ) -> None:
        self.pool, self.pool_dir, self.extra = pool, Path(pool_dir).expanduser(), set(extra)
        self.on_change = on_change
        self._seen = generation(self.pool_dir)
        self._lock = threading.Lock()

    def refresh(self) -> dict[str, list[str]]:
        """Loads what others stored and drops what they removed, if the directory changed.

        Returns:
            ``{"added": [...], "removed": [...]}``. A stored adapter that fails to load is logged
            and skipped (it stays on disk; the pool is unchanged for it).
        """
        current = generation(self.pool_dir)  # read before listing: a change after it is seen next time
        if current == self._seen:
            return {"added": [], "removed": []}
        with self._lock:
            stored = adapter_dirs(self.pool_dir)
            added = []
            for name, path in stored.items():
                if name in self.pool:
                    continue
                try:
                    self.pool.register(path, name=name)
                    added.append(name)
                except Exception as error:  # a broken file must not stop this process serving
                    logger.error("stored adapter %r could not be loaded (%s); skipped", name, error)
            removed = [n for n in self.pool.names if n not in stored and n not in self.extra]
            for name in removed:
                self.pool.remove(name)
            if self.on_change is not None:
                try:
                    self.on_change()
                except Exception as error:  # the index stays as it was; the next change retries
                    logger.error("could not take the pool directory's change in: %s", error)
            self._seen = current
        if added or removed:
            logger.info("pool directory changed: %d adapters loaded, %d dropped", len(added), len(removed))
        return {"added": added, "removed": removed}
