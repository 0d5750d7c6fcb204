"""The running batch's KV cache: rows of different lengths, left-aligned with padding, that can
join, leave and be split between decoding steps.

Every row's cached tokens end at the same column (left padding), so one decoding step is one
forward pass of ``rows x 1`` tokens with a 2-D attention mask that hides each row's padding, and
positions counted per row. Joining batches pads the shorter one on the left; when rows leave,
columns that are padding in every remaining row are dropped. Each layer keeps its keys and values
in a buffer with spare capacity and writes new tokens in place, instead of concatenating the whole
cache at every step as ``DynamicLayer`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["BatchKV"]

_GROWTH = 64  # spare columns added when a buffer is full


class _BufferedLayer(DynamicLayer):
    """A DynamicLayer whose ``keys``/``values`` are views of a buffer with spare columns."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (*key_states.shape[:2], 0, key_states.shape[3])
        self._k = key_states.new_zeros(shape)
        self._v = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[3]))
        self._end = 0
        self.keys, self.values = self._k, self._v
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._end + new > self._k.shape[-2]:
            self._reserve(self._end + new + _GROWTH)
        self._k[..., self._end : self._end + new, :] = key_states
        self._v[..., self._end : self._end + new, :] = value_states
        self._end += new
        self.keys, self.values = self._k[..., : self._end, :], self._v[..., : self._end, :]
        return self.keys, self.values

    def _reserve(self, columns: int) -> None:
        k = self._k.new_zeros((*self._k.shape[:2], columns, self._k.shape[3]))
        v = self._v.new_zeros((*self._v.shape[:2], columns, self._v.shape[3]))
        k[..., : self._end, :] = self._k[..., : self._end, :]
        v[..., : self._end, :] = self._v[..., : self._end, :]
        self._k, self._v = k, v

    def get_seq_length(self) -> int:
        return self._end if self.is_initialized else 0

    def set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = _GROWTH) -> None:
        """Replaces the content (``(rows, heads, length, dim)``), leaving ``spare`` free columns."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._end = 0
        self._k, self._v = keys[..., :0, :], values[..., :0, :]
        self._reserve(keys.shape[-2] + spare)
        self._k[..., : keys.shape[-2], :] = keys
        self._v[..., : keys.shape[-2], :] = values
        self._end = keys.shape[-2]
        self.keys, self.values = self._k[..., : self._end, :], self._v[..., : self._end, :]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self._end = max(0, self._end + tokens_to_remove)
            self.keys, self.values = self._k[..., : self._end, :], self._v[..., : self._end, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.set(self.keys.index_select(0, indices), self.values.index_select(0, indices))


class BatchKV:
    """The KV cache, attention mask and next positions of a batch of rows.

    Args:
        rows: How many rows the batch starts with (all empty).
        device: Where the mask and positions live (the model's device).
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self.cache = Cache(layer_class_to_replicate=_BufferedLayer)
        self.mask = torch.zeros((rows, 0), dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # next position of each row
        self.device = device

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """Columns of the cache (padding included)."""
        return self.mask.shape[1]

    def step_inputs(self, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask and position ids for appending ``lengths[i]`` tokens to row ``i``,
        left-padded to the longest: ``(rows, length + new)`` and ``(rows, new)``."""
        new = max(lengths)
        pad = torch.tensor([new - n for n in lengths], device=self.device)
        columns = torch.arange(new, device=self.device)
        real = (columns[None, :] >= pad[:, None]).long()
        positions = self.positions[:, None] + (columns[None, :] - pad[:, None]).clamp(min=0)
        return torch.cat([self.mask, real], dim=1), positions

    def advance(self, mask: torch.Tensor) -> None:
        """Records a forward pass made with ``mask`` (from :meth:`step_inputs`)."""
        self.positions = self.positions + mask[:, self.length :].sum(1)
        self.mask = mask

    def rollback(self, length: int) -> None:
        """Forgets everything after column ``length`` (a forward pass that failed part-way)."""
        for layer in self.cache.layers:
            layer.crop(length - layer.get_seq_length())

    def select(self, rows: Sequence[int]) -> BatchKV:
        """A new batch of some rows (this one is left as it was); all-padding columns are dropped."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        start = _first_used_column(mask)
        out = BatchKV(0, self.device)
        out.mask, out.positions = mask[:, start:], self.positions.index_select(0, index)
        for layer in self.cache.layers:
            moved = _BufferedLayer()
            if layer.is_initialized:
                moved.set(layer.keys.index_select(0, index)[..., start:, :], layer.values.index_select(0, index)[..., start:, :])
            out.cache.layers.append(moved)
        return out

    @staticmethod
    def concat(batches: Sequence[BatchKV]) -> BatchKV:
        """The rows of ``batches`` in order, as one batch (shorter ones padded on the left)."""
        batches = [b for b in batches if len(b)]
        if len(batches) == 1:
            return batches[0]
        length = max(b.length for b in batches)
        out = BatchKV(0, batches[0].device)
        out.mask = torch.cat([torch.nn.functional.pad(b.mask, (length - b.length, 0)) for b in batches])
        out.positions = torch.cat([b.positions for b in batches])
        for i in range(max(len(b.cache.layers) for b in batches)):
            layers = [b.cache.layers[i] for b in batches]
            joined = _BufferedLayer()
            joined.set(
                torch.cat([_left_pad(layer.keys, length) for layer in layers]),
                torch.cat([_left_pad(layer.values, length) for layer in layers]),
            )
            out.cache.layers.append(joined)
        return out


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, 0, length - tensor.shape[-2], 0))


def _first_used_column(mask: torch.Tensor) -> int:
    used = mask.any(dim=0).nonzero()
    return int(used[0]) if len(used) else mask.shape[1]
