"""What the engine's KV caches can grow to, so that admission is decided before memory is allocated.

A batch's cache (``BatchKVCache``) is ``rows x columns`` per layer, both grown by doubling: rows to the
next power of two as sequences join, columns from 256 towards the context length as the longest row
needs. A sequence is admitted only if every cache, grown to what its rows may reach (each row's prompt
plus ``max_tokens``), still fits the budget beside the weights. At 7B one token of KV is 512 KiB, so a
full 4096-token context is 2 GiB: far too much to leave to chance on a 24 GB machine.
"""

from __future__ import annotations

from typing import Any

#: ``BatchKVCache``'s first column capacity.
INITIAL_COLUMNS = 256


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of K and V that one token adds across all layers of ``model``."""
    config = getattr(model.config, "text_config", None) or model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    element = next(model.parameters()).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * element


def row_bound(rows: int) -> int:
    """The row capacity a cache reaches holding ``rows`` rows (doubling from one)."""
    capacity = 1
    while capacity < rows:
        capacity *= 2
    return capacity


def column_bound(columns: int, max_columns: int) -> int:
    """The column capacity a cache reaches when its longest row needs ``columns`` columns."""
    capacity = INITIAL_COLUMNS
    while capacity < columns:
        doubled = min(capacity * 2, max_columns)
        capacity = max(doubled, columns)
    return capacity


def batch_bound(per_token: int, layers: int, rows: int, columns: int, max_columns: int) -> int:
    """Bytes of a batch cache of ``rows`` rows whose longest needs ``columns``, plus one layer's copy
    while it grows (``_resize`` replaces one layer's buffers at a time)."""
    cache = per_token * row_bound(rows) * column_bound(columns, max_columns)
    return cache + cache // max(layers, 1)
