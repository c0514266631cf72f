"""A pre-allocated, left-padded KV cache for a batch of sequences that join and leave at any step.

Rows are right-aligned: every row's newest token sits in the same column, so one decode step appends
one column for the whole batch with a single in-place write per layer, and nothing is re-allocated per
step (``DynamicCache`` concatenates, copying the whole cache every token). Each row remembers the
column its own tokens start at; the attention mask hides the padding to its left.

Joining copies the new sequence's prefill cache into a free row; leaving moves the last row into the
gap; running out of columns first drops columns that are padding for every row, then grows the buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One layer's view of the shared buffers; ``update`` writes at the batch's current column."""

    is_compileable = False

    def __init__(self, owner: BatchKVCache, index: int) -> None:
        super().__init__()
        self._owner = owner
        self._index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self._owner
        rows, width = key_states.shape[0], key_states.shape[-2]
        start = owner.length
        keys, values = owner.keys[self._index], owner.values[self._index]
        keys[:rows, :, start : start + width] = key_states
        values[:rows, :, start : start + width] = value_states
        return keys[:rows, :, : start + width], values[:rows, :, : start + width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_max_length(self) -> int:
        return -1


class BatchKVCache(Cache):
    """Shared K/V buffers ``[rows, kv_heads, columns, head_dim]`` per layer, plus per-row start columns."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        rows: int = 4,
        columns: int = 256,
        max_columns: int = 1 << 30,
    ) -> None:
        self.length = 0  # columns in use; the next token of every row is written here
        self.starts: list[int] = []  # first valid column of each row
        self.max_columns = max_columns
        self._shape = (kv_heads, head_dim)
        self._dtype = dtype
        self._device = device
        self.keys = [self._empty(rows, columns) for _ in range(layers)]
        self.values = [self._empty(rows, columns) for _ in range(layers)]
        super().__init__(layers=[_SlotLayer(self, i) for i in range(layers)])

    @classmethod
    def for_model(
        cls, model: Any, *, rows: int = 4, columns: int = 256, max_columns: int = 1 << 30
    ) -> BatchKVCache:
        """Buffers shaped for ``model``'s layers and KV heads, in its dtype and on its device."""
        config = model.config
        heads = int(config.num_attention_heads)
        parameter = next(model.parameters())
        return cls(
            layers=int(config.num_hidden_layers),
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            dtype=parameter.dtype,
            device=parameter.device,
            rows=rows,
            columns=columns,
            max_columns=max_columns,
        )

    def _empty(self, rows: int, columns: int) -> torch.Tensor:
        """Uninitialised: zeroing touches every page of a buffer mostly never read.

        On a CPU, zeroing a small model's first cache cost each lone request milliseconds of its time to
        first token, mostly page faults (figures in bench/README.md).

        Nothing reads a cell before it is written: attention covers rows ``[0, rows)`` and columns
        ``[0, length)``, and each such cell holds a row's K/V (``add_row``, every step's column) or
        zeroed left padding (``add_row``, ``_shift``); growing, shifting and moving rows copy those cells.
        """
        return torch.empty(
            rows, self._shape[0], columns, self._shape[1], dtype=self._dtype, device=self._device
        )

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device(self._device)

    @property
    def rows(self) -> int:
        return len(self.starts)

    @property
    def row_capacity(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def column_capacity(self) -> int:
        return int(self.keys[0].shape[2])

    def row_lengths(self) -> list[int]:
        return [self.length - start for start in self.starts]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])

    def _resize(self, rows: int, columns: int) -> None:
        keep_rows, keep_cols = self.rows, self.length
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = self._empty(rows, columns)
                new[:keep_rows, :, :keep_cols] = old[:keep_rows, :, :keep_cols]
                buffers[i] = new

    def _shift(self, offset: int) -> None:
        """Move every row's data ``offset`` columns right (positive) or left (negative)."""
        if offset == 0 or self.length == 0:
            self.length += offset
            self.starts = [start + offset for start in self.starts]
            return
        rows, length = self.rows, self.length
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                if offset > 0:
                    buffer[:rows, :, offset : offset + length] = buffer[:rows, :, :length].clone()
                    buffer[:rows, :, :offset] = 0  # the rows' new left padding
                else:
                    buffer[:rows, :, : length + offset] = buffer[:rows, :, -offset:length].clone()
        self.length += offset
        self.starts = [start + offset for start in self.starts]

    def _fit(self, columns: int) -> None:
        """Grow the column capacity to at least ``columns`` (doubling, to amortise the copies)."""
        if columns > self.column_capacity:
            self._resize(self.row_capacity, max(min(self.column_capacity * 2, self.max_columns), columns))

    def reserve(self, columns_needed: int) -> None:
        """Make room for ``columns_needed`` more columns: drop shared padding, then grow."""
        if self.length + columns_needed <= self.column_capacity:
            return
        shared_padding = min(self.starts, default=self.length)
        if shared_padding:
            self._shift(-shared_padding)
        self._fit(self.length + columns_needed)

    def add_row(self, prefill: Any) -> int:
        """Append a row holding the K/V of a prefilled ``DynamicCache`` (batch size 1); its index."""
        prompt_length = prefill.get_seq_length()
        if self.rows == self.row_capacity:
            self._resize(max(self.row_capacity * 2, 1), self.column_capacity)
        if not self.rows:
            self.length = 0
        elif max(prompt_length, self.length) + 1 > self.column_capacity and min(self.starts):
            self._shift(-min(self.starts))
        self._fit(max(prompt_length, self.length) + 1)
        if prompt_length > self.length:
            self._shift(prompt_length - self.length)
        row = self.rows
        start = self.length - prompt_length
        for i, layer in enumerate(prefill.layers):
            self.keys[i][row, :, start : self.length] = layer.keys[0]
            self.values[i][row, :, start : self.length] = layer.values[0]
            self.keys[i][row, :, :start] = 0
            self.values[i][row, :, :start] = 0
        self.starts.append(start)
        return row

    def remove_row(self, row: int) -> None:
        """Drop ``row``; the last row moves into its place (callers re-index their sequences)."""
        last = self.rows - 1
        if row != last:
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[row, :, : self.length] = buffer[last, :, : self.length]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        if not self.starts:
            self.length = 0

    def attention_mask(self, new_columns: int = 1) -> torch.Tensor:
        """``[rows, length + new_columns]``: 1 for each row's own tokens, 0 for its left padding."""
        columns = torch.arange(self.length + new_columns, device=self._device)
        starts = torch.tensor(self.starts, device=self._device).unsqueeze(1)
        return (columns.unsqueeze(0) >= starts).to(torch.long)

    def position_ids(self) -> torch.Tensor:
        """``[rows, 1]``: each row's next position is its own length, not the padded column."""
        return torch.tensor(self.row_lengths(), device=self._device).unsqueeze(1)

    def advance(self, columns: int = 1) -> None:
        self.length += columns
