"""A byte-budgeted LRU cache of loaded adapters (the pool's host and device tiers); pinned
entries, those running requests hold, are never evicted."""

from __future__ import annotations

from collections import Counter, OrderedDict

from loraretriever.pool.adapter import LoraAdapter

__all__ = ["AdapterCache"]


class AdapterCache:
    """Loaded adapters under a byte budget, least recently used first out. Pinned names (adapters
    a request holds) are never evicted; while pins alone exceed the budget it is exceeded.

    Args:
        budget_bytes: The most bytes to hold (None: no limit).
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"a cache budget of {budget_bytes} bytes is negative; pass a size >= 0, or None.")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> LoraAdapter | None:
        """The cached adapter (now the most recently used), or None; counts a hit or a miss."""
        adapter = self._entries.get(name)
        if adapter is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(name)
        return adapter

    def peek(self, name: str) -> LoraAdapter | None:
        """The cached adapter or None, counting nothing and changing no order."""
        return self._entries.get(name)

    def put(self, name: str, adapter: LoraAdapter) -> None:
        self.drop(name)
        self._entries[name] = adapter
        self.nbytes += adapter.nbytes
        self._evict()

    def drop(self, name: str) -> None:
        adapter = self._entries.pop(name, None)
        if adapter is not None:
            self.nbytes -= adapter.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def pin(self, name: str) -> None:
        self._pins[name] += 1

    def unpin(self, name: str) -> None:
        self._pins[name] -= 1
        if self._pins[name] <= 0:
            del self._pins[name]
            self._evict()

    def _evict(self) -> None:
        if self.budget_bytes is None:
            return
        for name in list(self._entries):
            if self.nbytes <= self.budget_bytes:
                return
            if not self._pins[name]:
                self.drop(name)
                self.evictions += 1

    def stats(self) -> dict[str, float]:
        lookups = self.hits + self.misses
        return {
            "adapters": len(self._entries),
            "bytes": self.nbytes,
            "budget_bytes": self.budget_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / lookups, 4) if lookups else None,
            "evictions": self.evictions,
        }
