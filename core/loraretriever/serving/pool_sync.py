"""Keeping a process's pool in step with a pool directory that other processes change too.

Every change to a pool directory bumps its generation (:func:`~loraretriever.engine.pool_dir.generation`);
:meth:`PoolSync.refresh` compares it with the last one seen (one small file read) and, when it
moved, loads the adapters other processes stored and drops those they removed. Cards need no
syncing: the router reads them from the directory, and the index is shared (a Chroma server).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from loraretriever.engine.pool import LoraPool
from loraretriever.engine.pool_dir import adapter_dirs, generation

__all__ = ["PoolSync"]

logger = logging.getLogger(__name__)


class PoolSync:
    """Follows ``pool_dir`` for ``pool``.

    Args:
        pool: The process's pool.
        pool_dir: The shared directory.
        extra: Adapters added to the pool from elsewhere (``adapters=``): never dropped.
    """

    def __init__(self, pool: LoraPool, pool_dir: str | Path, extra: Iterable[str] = ()) -> None:
        self.pool, self.pool_dir, self.extra = pool, Path(pool_dir).expanduser(), set(extra)
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
            self._seen = current
        if added or removed:
            logger.info("pool directory changed: %d adapters loaded, %d dropped", len(added), len(removed))
        return {"added": added, "removed": removed}
