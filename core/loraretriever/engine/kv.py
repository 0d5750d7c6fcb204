"""KV caches of the engine's batches: a prefill batch (left padding, filled in chunks) and the
running batch (rows that join and leave between decoding steps).

The running batch is a persistent batch (as vLLM's): rows are slots of preallocated buffers, the
active rows first; a row that leaves is replaced by the last row, newcomers are written after the
last row, so a join or a leave copies only the rows that change. Its rows are left-aligned: row
``i`` holds its ``lengths[i]`` tokens in columns ``[0, lengths[i])`` and a decoding step writes
each row's new token at its own column, so rows of any history length sit together without
shifting anyone; the attention mask hides the columns past each row's length. Buffers grow by
a quarter at a time in columns and double in rows, up to the batch's row limit, so one long
prompt alone holds one row's worth, not the limit's (memory is rows x the longest row: the price
of one dense attention call).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["PrefillKV", "RunningKV", "move_rows", "swap_moves"]


def _grown(columns: int, needed: int) -> int:
    """Buffer columns for ``needed``: a quarter more than now at least, so growth is rare."""
    return max(needed + 64, columns + columns // 4)


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


def move_rows(
    buffers: Iterable[torch.Tensor | None], destinations: list[int], sources: list[int], columns: int | None = None
) -> None:
    """Applies the moves of :func:`swap_moves` to every buffer (rows on dim 0; with ``columns``,
    only the first ``columns`` entries of dim 2 are copied)."""
    if not destinations:
        return
    moved = [b for b in buffers if b is not None]
    if not moved:
        return
    dst = torch.tensor(destinations, device=moved[0].device)
    src = torch.tensor(sources, device=moved[0].device)
    for buffer in moved:
        if columns is None:
            buffer[dst] = buffer[src]
        else:
            buffer[dst, :, :columns] = buffer[src, :, :columns]


class _SlotLayer(DynamicLayer):
    """One decoder layer's view of a KV batch: writes new tokens in place, returns views.

    It refers to its batch weakly: the batch holds its layers, and a cycle would leave every
    finished batch's buffers to Python's cycle collector, which runs too rarely for tensors (the
    resident memory of a long run grew without bound, gigabytes per minute of long prompts)."""

    def __init__(self, owner: PrefillKV | RunningKV, index: int) -> None:
        super().__init__()
        self._owner, self.index = weakref.ref(owner), index
        self.is_initialized = True

    @property
    def owner(self) -> PrefillKV | RunningKV:
        return self._owner()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # pragma: no cover
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = self.owner._write(self.index, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.end

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.end + query_length, 0


def _stack_rows(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], row: int, columns) -> torch.Tensor:
    """One row's KV at ``columns`` of every layer: ``(2, layers, heads, len(columns), dim)``."""
    return torch.stack(
        [torch.stack([k[row, :, columns] for k in keys]), torch.stack([v[row, :, columns] for v in values])]
    )


class PrefillKV:
    """The cache of requests being prefilled together: prompts left-padded to ``columns``, filled
    chunk by chunk (each chunk's real tokens right-aligned in it).

    A row whose prompt head came from the prefix cache starts with it preloaded
    (:meth:`preload`): the heads fill the first ``start`` columns, left-padded, and the rest of
    each prompt is prefilled after them as usual; a row's two parts may have padding between
    them, which the mask hides and the positions skip.

    Args:
        rows: The requests.
        columns: The padded prompt length.
        num_layers: The model's decoder layers.
        device: The model's device.
    """

    def __init__(self, rows: int, columns: int, num_layers: int, device: torch.device) -> None:
        self.n, self.columns, self.end, self.device = rows, columns, 0, device
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self.mask_buffer = torch.zeros((rows, columns), dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # tokens cached per row
        self.dense = True  # no padded column so far: passes need no explicit mask
        self.start = 0  # columns preloaded from the prefix cache (prefilled columns follow)
        self.cache = Cache(layers=[_SlotLayer(self, i) for i in range(num_layers)])

    def __len__(self) -> int:
        return self.n

    @property
    def done(self) -> int:
        """Prefilled columns (after the preloaded ones)."""
        return self.end - self.start

    def preload(self, heads: Sequence[torch.Tensor | None]) -> None:
        """Writes each row's cached prompt head (``(2, layers, heads, tokens, dim)``, or None for a
        row without one) into the first columns, before anything is prefilled."""
        width = max((h.shape[3] for h in heads if h is not None), default=0)
        if not width:
            return
        for row, head in enumerate(heads):
            if head is None:
                continue
            n = head.shape[3]
            for layer in range(len(self._k)):
                if self._k[layer] is None:
                    shape = (self.n, head.shape[2], self.columns, head.shape[4])
                    self._k[layer], self._v[layer] = head.new_zeros(shape), head.new_zeros(shape)
                self._k[layer][row, :, width - n : width] = head[0, layer]
                self._v[layer][row, :, width - n : width] = head[1, layer]
            self.mask_buffer[row, width - n : width] = 1
            self.positions[row] = n
        self.start = self.end = width
        self.dense = all(h is not None and h.shape[3] == width for h in heads)

    def token_columns(self, row: int) -> slice | torch.Tensor:
        """The columns of ``row``'s tokens so far, in order."""
        columns = self.mask_buffer[row, : self.end].nonzero().squeeze(1)
        if len(columns) and int(columns[-1]) - int(columns[0]) + 1 == len(columns):
            return slice(int(columns[0]), int(columns[-1]) + 1)
        return columns

    def read(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Tokens ``start:stop`` of ``row``: ``(2, layers, heads, stop - start, dim)``."""
        columns = self.token_columns(row)
        if isinstance(columns, slice):
            columns = slice(columns.start + start, columns.start + stop)
        else:
            columns = columns[start:stop]
        return _stack_rows(self._k, self._v, row, columns)

    def step_inputs(self, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask and position ids for the next chunk (``lengths[i]`` real tokens of
        row ``i``, right-aligned in the chunk): ``(rows, end + chunk)`` and ``(rows, chunk)``."""
        new = max(lengths)
        if self.dense and min(lengths) == new:  # no padding anywhere: attention builds its causal mask
            return None, self.positions[: self.n, None] + torch.arange(new, device=self.device)[None, :]
        self.dense = False
        pad = torch.tensor([new - n for n in lengths], device=self.device)
        columns = torch.arange(new, device=self.device)
        real = (columns[None, :] >= pad[:, None]).long()
        positions = self.positions[: self.n, None] + (columns[None, :] - pad[:, None]).clamp(min=0)
        return torch.cat([self.mask_buffer[: self.n, : self.end], real], dim=1), positions

    def advance(self, mask: torch.Tensor | None, width: int) -> None:
        """Counts the ``width`` columns of the pass just made (``mask`` None: all real)."""
        if mask is None:
            self.mask_buffer[: self.n, self.end : self.end + width] = 1
            self.positions[: self.n] += width
        else:
            new = mask[:, self.end :]
            self.mask_buffer[: self.n, self.end : self.end + width] = new
            self.positions[: self.n] += new.sum(1)
        self.end += width

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k[layer] is None:
            shape = (self.n, keys.shape[1], self.columns, keys.shape[3])
            self._k[layer], self._v[layer] = keys.new_zeros(shape), values.new_zeros(shape)
        stop = self.end + keys.shape[-2]
        self._k[layer][: self.n, :, self.end : stop] = keys
        self._v[layer][: self.n, :, self.end : stop] = values
        return self._k[layer][: self.n, :, :stop], self._v[layer][: self.n, :, :stop]

    def remove(self, leaving: Sequence[int]) -> None:
        """Drops rows: the last rows move into the holes (see :func:`swap_moves`)."""
        destinations, sources, self.n = swap_moves(self.n, leaving)
        move_rows([*self._k, *self._v, self.mask_buffer, self.positions], destinations, sources)


class RunningKV:
    """The cache of the running batch: left-aligned rows (see the module docstring).

    Args:
        capacity: Rows to allocate now (the buffers grow if more join).
        num_layers: The model's decoder layers.
        device: The model's device.
        max_rows: The most rows expected at once (the engine's ``max_batch_size``): rows grow by
            doubling up to it, then one join at a time.
    """

    def __init__(self, capacity: int, num_layers: int, device: torch.device, max_rows: int | None = None) -> None:
        self.capacity, self.device, self.n = capacity, device, 0
        self.max_rows = max_rows or capacity
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._columns = 0
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=device)  # tokens cached per row
        self._end = 0  # columns in use: the longest row
        self._uniform = True  # every row is ``_end`` long
        self.cache = Cache(layers=[_SlotLayer(self, i) for i in range(num_layers)])
        self._rows = torch.arange(capacity, device=device)

    def __len__(self) -> int:
        return self.n

    @property
    def end(self) -> int:
        return self._end

    def step_inputs(self, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask and positions of one decoding step (one new token per row)."""
        if any(n != 1 for n in lengths):
            raise ValueError("the running batch decodes one token per row; prefill in a PrefillKV.")
        if self._end + 1 > self._columns:
            self._realloc(self.capacity, _grown(self._columns, self._end + 1))
        own = self.lengths[: self.n]
        if self._uniform:  # no row has a hole: no mask, so attention takes its unmasked kernel
            return None, own[:, None]
        mask = (torch.arange(self._end + 1, device=self.device)[None, :] <= own[:, None]).long()
        return mask, own[:, None]

    def advance(self, mask: torch.Tensor | None, width: int = 1) -> None:
        self.lengths[: self.n] += 1
        self._end += 1

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, columns = self._rows[: self.n], self.lengths[: self.n]
        self._k[layer][rows, :, columns] = keys[:, :, 0]
        self._v[layer][rows, :, columns] = values[:, :, 0]
        stop = self._end + 1
        return self._k[layer][: self.n, :, :stop], self._v[layer][: self.n, :, :stop]

    def remove(self, leaving: Sequence[int]) -> None:
        """Drops rows: the last rows move into the holes (see :func:`swap_moves`)."""
        destinations, sources, n = swap_moves(self.n, leaving)
        move_rows([*self._k, *self._v], destinations, sources, columns=self._end)
        move_rows([self.lengths], destinations, sources)
        self.n = n
        self._settle()

    def extend(self, other: PrefillKV | RunningKV, reserve: int = 0) -> None:
        """Appends the rows of ``other`` (copied), each to the left of its row.

        Args:
            other: The rows to add.
            reserve: Columns the newcomers are expected to reach (prompt and answer); reserved
                now, so the buffers are not regrown while they decode.
        """
        rows_needed = self.n + other.n
        other_lengths = (other.positions if isinstance(other, PrefillKV) else other.lengths)[: other.n].tolist()
        needed = max(max(other_lengths, default=0) + 1, reserve)
        if rows_needed > self.capacity or needed > self._columns:
            rows = self.capacity
            if rows_needed > rows:  # double, up to the batch's limit (then exactly what is needed)
                rows = max(rows_needed, min(2 * rows, self.max_rows))
            self._realloc(rows, max(self._columns, _grown(self._columns, needed)))
        # a prefill row's tokens end at its last column (after a gap if its head was cached); a
        # running row's start at 0
        if isinstance(other, PrefillKV):
            sources = [other.token_columns(j) for j in range(other.n)]
        else:
            sources = [slice(0, length) for length in other_lengths]
        for mine, theirs in ((self._k, other._k), (self._v, other._v)):
            for i, buffer in enumerate(theirs):
                if mine[i] is None:
                    mine[i] = buffer.new_zeros((self.capacity, buffer.shape[1], self._columns, buffer.shape[3]))
                for j, (length, columns) in enumerate(zip(other_lengths, sources, strict=True)):
                    mine[i][self.n + j, :, :length] = buffer[j, :, columns]
        self.lengths[self.n : rows_needed] = torch.tensor(other_lengths, device=self.device)
        self.n = rows_needed
        self._settle()

    def read(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Tokens ``start:stop`` of ``row``: ``(2, layers, heads, stop - start, dim)``."""
        return _stack_rows(self._k, self._v, row, slice(start, stop))

    def take(self, rows: Sequence[int]) -> RunningKV:
        """A new batch holding copies of some rows."""
        out = RunningKV(len(rows), len(self._k), self.device)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        for mine, theirs in ((out._k, self._k), (out._v, self._v)):
            for i, buffer in enumerate(theirs):
                mine[i] = buffer.index_select(0, index)
        out._columns = self._columns
        out.lengths = self.lengths.index_select(0, index)
        out.n = len(rows)
        out._settle()
        return out

    def _settle(self) -> None:
        """The columns in use and whether every row is that long, after rows joined or left."""
        lengths = self.lengths[: self.n]
        self._end = int(lengths.max()) if self.n else 0
        self._uniform = not self.n or int(lengths.min()) == self._end

    def _realloc(self, rows: int, columns: int) -> None:
        for buffers in (self._k, self._v):
            for i, buffer in enumerate(buffers):
                if buffer is None:
                    continue
                grown = buffer.new_zeros((rows, buffer.shape[1], columns, buffer.shape[3]))
                grown[: self.n, :, : self._end] = buffer[: self.n, :, : self._end]
                buffers[i] = grown
        lengths = self.lengths.new_zeros(rows)
        lengths[: self.n] = self.lengths[: self.n]
        self.lengths, self.capacity, self._columns = lengths, rows, columns
        self._rows = torch.arange(rows, device=self.device)
