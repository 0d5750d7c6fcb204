"""Prefix caching keyed by routing: the KV of prompt prefixes, kept after a request ends and
reused by any later request with the same composition and the same tokens.

An agent re-sends its whole conversation on every call, and RAG chains share long system prompts;
recomputing their KV is most of a call's time on a long prompt. vLLM (automatic prefix caching)
and SGLang (RadixAttention) reuse it; with LoRAs on the attention projections a cached prefix is
valid only under the same adapters, weights and composition, so here the key of every block
starts with the routing's :func:`composition_key`.

The cache holds blocks of ``block_tokens`` tokens. A block's key is a hash chain (as vLLM's block
hashes): the composition, then every token up to the block's end, so a block is found only
after all the blocks before it. A block is one tensor ``(2, layers, kv_heads, block_tokens,
head_dim)`` on the model's device. Blocks are copied into a request's own KV rows when its prefill
starts (the engine's batches are dense, not paged), so a running request never uses a cached block
and evicting one never touches a running request. Blocks are written only from complete KV: a
whole prompt once its prefill finished, and a request's prompt and answer once it ends, so a
request cancelled or failed mid-prefill leaves nothing behind. Eviction is least recently used,
leaves first: a hit refreshes its blocks from the last to the first, so a chain's first blocks
(shared by more prompts) outlive its tails, and a budget never keeps a tail whose head is gone.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraretriever.engine.routing import Routing

__all__ = ["BLOCK_TOKENS", "PrefixCache", "PrefixStats", "composition_key"]

BLOCK_TOKENS = 32  # tokens per cached block: a miss re-prefills at most this many tokens of a shared prefix


def composition_key(routing: Routing, digests: Mapping[str, str], gate_version: int | None = None) -> str:
    """What a prefix's KV depends on besides its tokens: the adapters' weights (by content digest,
    so an adapter replaced under the same name never matches), their weights, the mode, the
    fusion and its density, and the gate (by name and registration).

    Args:
        routing: The request's routing.
        digests: Content digest of each adapter the routing names (and of a meteora gate's).
        gate_version: The gate's registration number (a gate replaced under its name differs).

    Example:
        >>> composition_key(Routing.base(), {})
        'base'
        >>> composition_key(Routing.pinned(["a"]), {"a": "7f3c"})
        'mixture|a@7f3c:1|gate=None|linear'
    """
    if routing.is_base:
        return "base"
    pairs = ",".join(f"{name}@{digests[name]}:{weight!r}" for name, weight in routing.effective())
    if routing.mode == "meteora":
        pairs = ",".join(f"{name}@{digests[name]}" for name in sorted(digests))
    fusion = routing.fusion if routing.fusion == "linear" else f"{routing.fusion}:{routing.density!r}"
    gate = None if routing.gate is None else f"{routing.gate}#{gate_version}"
    return f"{routing.mode}|{pairs}|gate={gate}|{fusion}"


@dataclass
class PrefixStats:
    """Counters since the cache was made (read by metrics; tokens, not blocks)."""

    queried_tokens: int = 0  # prompt tokens of requests that looked up the cache
    hit_tokens: int = 0  # of those, tokens whose KV came from the cache (prefill saved)
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """Blocks of prompt KV under a byte budget, least recently used out first.

    Args:
        budget_bytes: The most bytes the blocks may take (0 keeps nothing).
        block_tokens: Tokens per block.

    Example:
        >>> cache = PrefixCache(budget_bytes=1 << 20, block_tokens=2)
        >>> chain = cache.chain("base", [5, 6, 7, 8, 9])
        >>> len(chain)  # full blocks only
        2
        >>> cache.store(chain, torch.zeros(2, 1, 1, 4, 8))
        >>> cache.lookup(chain).shape[3], cache.lookup(cache.chain("mixture|a@1:1|gate=None|linear", [5, 6]))
        (4, None)
    """

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens={block_tokens!r} must be a positive integer.")
        self.budget_bytes = int(budget_bytes)
        self.block_tokens = block_tokens
        self.stats = PrefixStats()
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()  # the step thread writes; metrics and tests read

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def chain(self, key: str, tokens: Sequence[int]) -> list[bytes]:
        """The hashes of the full blocks of ``tokens`` under the composition ``key``: the ``i``-th
        covers the key and ``tokens[: (i + 1) * block_tokens]``."""
        data = np.asarray(tokens, dtype=np.int64).tobytes()
        step = 8 * self.block_tokens
        hashes, previous = [], hashlib.blake2b(key.encode(), digest_size=16).digest()
        for start in range(0, len(tokens) // self.block_tokens * step, step):
            previous = hashlib.blake2b(previous + data[start : start + step], digest_size=16).digest()
            hashes.append(previous)
        return hashes

    def match(self, chain: Sequence[bytes]) -> int:
        """How many leading blocks of ``chain`` are cached (touches nothing)."""
        with self._lock:
            count = 0
            for block in chain:
                if block not in self._blocks:
                    break
                count += 1
            return count

    def lookup(self, chain: Sequence[bytes]) -> torch.Tensor | None:
        """The KV of the longest cached head of ``chain``, ``(2, layers, heads, tokens, dim)`` (a
        copy), or None; refreshes the blocks found, the last first (see the module docstring)."""
        with self._lock:
            found = []
            for block in chain:
                tensor = self._blocks.get(block)
                if tensor is None:
                    break
                found.append(block)
            for block in reversed(found):
                self._blocks.move_to_end(block)
            return torch.cat([self._blocks[b] for b in found], dim=3) if found else None

    def count(self, queried: int, hit: int) -> None:
        """Records one request's lookup: its prompt tokens and those served from the cache."""
        with self._lock:
            self.stats.queried_tokens += queried
            self.stats.hit_tokens += hit

    def store(self, chain: Sequence[bytes], kv: torch.Tensor, first: int = 0) -> None:
        """Keeps blocks ``first ..`` of ``chain`` from ``kv`` (their KV in order, ``(2, layers,
        heads, tokens, dim)``, ``tokens`` a multiple of ``block_tokens``); blocks already cached
        are refreshed. Stops at the first block the budget cannot hold: a block is useless
        without those before it. Blocks of ``chain`` are never evicted to make room."""
        size = self.block_tokens
        with self._lock:
            protected = set(chain[: first + kv.shape[3] // size])
            for i in range(kv.shape[3] // size):
                block = chain[first + i]
                if block in self._blocks:
                    continue
                tensor = kv[:, :, :, i * size : (i + 1) * size].clone()
                if not self._make_room(tensor.nbytes, protected):
                    break
                self._blocks[block] = tensor
                self._bytes += tensor.nbytes
                self.stats.stored_blocks += 1
            for block in reversed(chain[: first + kv.shape[3] // size]):
                if block in self._blocks:
                    self._blocks.move_to_end(block)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0

    def _make_room(self, nbytes: int, protected: set[bytes]) -> bool:
        if nbytes > self.budget_bytes:
            return False
        while self._bytes + nbytes > self.budget_bytes:
            victim = next((b for b in self._blocks if b not in protected), None)
            if victim is None:
                return False
            self._bytes -= self._blocks.pop(victim).nbytes
            self.stats.evicted_blocks += 1
        return True
