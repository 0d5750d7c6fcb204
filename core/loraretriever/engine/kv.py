"""The KV cache of a batch of requests that join and leave between decoding steps.

Rows are slots of preallocated buffers (as vLLM's persistent batch): the active rows are always
the first ``n``, a request that leaves is replaced by the last row (one row copied), newcomers
are written after the last row (only their rows copied). Every row's tokens end at the same
column (padding on the left), so a decoding step is one forward pass of ``n x 1`` tokens with a
2-D attention mask that hides each row's padding, and positions counted per row. The buffers are
reallocated only when they run out of rows or columns, or a newcomer's history is longer than
the batch's (everyone shifts right).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["BatchKV", "swap_moves"]

_GROWTH = 64  # spare columns added when the buffers are full


def swap_moves(rows: int, leaving: Sequence[int]) -> tuple[list[int], list[int], int]:
    """How to remove ``leaving`` from ``rows`` rows by moving the last rows into the holes:
    ``(destinations, sources, rows left)``; apply ``x[destinations] = x[sources]`` then keep ``x[:rows left]``.

    Example:
        >>> swap_moves(5, [1, 4])
        ([1], [3], 3)
    """
    order, n = list(range(rows)), rows
    for row in sorted(set(leaving), reverse=True):
        n -= 1
        order[row] = order[n]
    # sources are original rows, so the moves can be applied at once (reads happen before writes)
    moved = [(i, order[i]) for i in range(n) if order[i] != i]
    return [d for d, _ in moved], [s for _, s in moved], n


class _SlotLayer(DynamicLayer):
    """One decoder layer's view of a :class:`BatchKV`: writes new tokens in place, returns views."""

    def __init__(self, owner: BatchKV, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # pragma: no cover
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = self.owner._write(self.index, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.end

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.end + query_length, 0


class BatchKV:
    """The KV cache, attention mask and next positions of up to ``capacity`` rows.

    Args:
        capacity: Rows to allocate (the buffers grow if more join).
        num_layers: The model's decoder layers.
        device: Where the mask and positions live (the model's device).
        rows: Rows present from the start, with nothing cached yet (a batch about to be prefilled).
    """

    def __init__(self, capacity: int, num_layers: int, device: torch.device, rows: int = 0) -> None:
        self.capacity, self.device, self.n, self.end = max(capacity, rows), device, rows, 0
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._columns = 0
        self._mask = torch.zeros((self.capacity, 0), dtype=torch.long, device=device)
        self._positions = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.cache = Cache(layers=[_SlotLayer(self, i) for i in range(num_layers)])

    def __len__(self) -> int:
        return self.n

    @property
    def length(self) -> int:
        """Columns of the cache (padding included)."""
        return self.end

    @property
    def mask(self) -> torch.Tensor:
        return self._mask[: self.n, : self.end]

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[: self.n]

    # -- a forward pass ----------------------------------------------------------------------
    def step_inputs(self, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask and position ids for appending ``lengths[i]`` tokens to row ``i``,
        left-padded to the longest: ``(rows, length + new)`` and ``(rows, new)``."""
        new = max(lengths)
        self._reserve(self.capacity, self.end + new)
        pad = torch.tensor([new - n for n in lengths], device=self.device)
        columns = torch.arange(new, device=self.device)
        real = (columns[None, :] >= pad[:, None]).long()
        positions = self.positions[:, None] + (columns[None, :] - pad[:, None]).clamp(min=0)
        return torch.cat([self.mask, real], dim=1), positions

    def advance(self, mask: torch.Tensor) -> None:
        """Records a forward pass made with ``mask`` (from :meth:`step_inputs`)."""
        new = mask[:, self.end :]
        self._mask[: self.n, self.end : self.end + new.shape[1]] = new
        self._positions[: self.n] += new.sum(1)
        self.end += new.shape[1]

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k[layer] is None:
            shape = (self.capacity, keys.shape[1], self._columns, keys.shape[3])
            self._k[layer], self._v[layer] = keys.new_zeros(shape), values.new_zeros(shape)
        end = self.end + keys.shape[-2]
        self._k[layer][: self.n, :, self.end : end] = keys
        self._v[layer][: self.n, :, self.end : end] = values
        return self._k[layer][: self.n, :, :end], self._v[layer][: self.n, :, :end]

    # -- rows joining and leaving ------------------------------------------------------------
    def remove(self, leaving: Sequence[int]) -> None:
        """Drops rows: the last rows move into the holes (see :func:`swap_moves`)."""
        destinations, sources, n = swap_moves(self.n, leaving)
        if destinations:
            dst = torch.tensor(destinations, device=self.device)
            src = torch.tensor(sources, device=self.device)
            for buffers in (self._k, self._v):
                for buffer in buffers:
                    if buffer is not None:
                        buffer[dst, :, : self.end] = buffer[src, :, : self.end]
            self._mask[dst] = self._mask[src]
            self._positions[dst] = self._positions[src]
        self.n = n

    def extend(self, other: BatchKV) -> None:
        """Appends the rows of ``other`` (copied), right-aligned with these rows."""
        if other.end > self.end:  # the newcomers' history is longer: shift these rows right
            self._shift(other.end - self.end)
        rows = slice(self.n, self.n + other.n)
        self._reserve(max(self.capacity, self.n + other.n), self.end)
        start = self.end - other.end
        for mine, theirs in ((self._k, other._k), (self._v, other._v)):
            for i, buffer in enumerate(theirs):
                if buffer is None:
                    continue
                if mine[i] is None:
                    mine[i] = buffer.new_zeros((self.capacity, buffer.shape[1], self._columns, buffer.shape[3]))
                mine[i][rows, :, start : self.end] = buffer[: other.n, :, : other.end]
        self._mask[rows] = 0
        self._mask[rows, start : self.end] = other._mask[: other.n, : other.end]
        self._positions[rows] = other._positions[: other.n]
        self.n += other.n

    def take(self, rows: Sequence[int]) -> BatchKV:
        """A new batch holding copies of some rows."""
        out = BatchKV(len(rows), len(self._k), self.device)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        out._reserve(len(rows), self.end)
        for mine, theirs in ((out._k, self._k), (out._v, self._v)):
            for i, buffer in enumerate(theirs):
                if buffer is not None:
                    mine[i] = buffer.index_select(0, index)
        out._columns = self._columns
        out._mask = self._mask.index_select(0, index)
        out._positions = self._positions.index_select(0, index)
        out.n, out.end = len(rows), self.end
        return out

    def _shift(self, columns: int) -> None:
        self._reserve(self.capacity, self.end + columns, shift=columns)
        self.end += columns

    def _reserve(self, rows: int, columns: int, shift: int = 0) -> None:
        """Makes room for ``rows`` x ``columns``; with ``shift``, moves the content right."""
        if rows <= self.capacity and columns <= self._columns and not shift:
            return
        rows = max(rows, self.capacity)
        new_columns = max(columns, self._columns) + (_GROWTH if columns > self._columns else 0)
        for buffers in (self._k, self._v):
            for i, buffer in enumerate(buffers):
                if buffer is None:
                    continue
                grown = buffer.new_zeros((rows, buffer.shape[1], new_columns, buffer.shape[3]))
                grown[: self.n, :, shift : shift + self.end] = buffer[: self.n, :, : self.end]
                buffers[i] = grown
        mask = self._mask.new_zeros((rows, new_columns))
        mask[: self.n, shift : shift + self.end] = self._mask[: self.n, : self.end]
        positions = self._positions.new_zeros(rows)
        positions[: self.n] = self._positions[: self.n]
        self._mask, self._positions, self.capacity, self._columns = mask, positions, rows, new_columns
