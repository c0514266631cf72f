"""Reuse of the KV cache of a shared prompt prefix (a system prompt, the earlier turns of a chat).

Keys and values of a token depend only on the tokens before it, so a prompt that starts with tokens
already prefilled for an earlier request can start from a copy of that cache and compute only the rest.
Each loaded model (base or merged variant) has its own ``PrefixCache``: a variant's KV differs from the
base's, so entries are never shared between adapters. Memory is bounded; the least recently used entry
goes first. Only the engine thread touches it, so it needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

#: Prompts shorter than this are cheap to recompute and not worth an entry.
MIN_PREFIX_TOKENS = 32


class PrefixCache:
    """Prompt token tuples -> per-layer (keys, values) of shape ``[kv_heads, tokens, head_dim]``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self._entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _size(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)

    def lookup(self, prompt: tuple[int, ...]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest cached prefix of ``prompt`` (leaving at least one token to compute)."""
        best_length, best_key = 0, None
        limit = len(prompt) - 1
        for key in self._entries:
            length = _common_prefix(key, prompt, limit)
            if length > best_length:
                best_length, best_key = length, key
        if best_key is None or best_length < MIN_PREFIX_TOKENS:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best_length
        return best_length, self._entries[best_key]

    def store(self, prompt: tuple[int, ...], cache: Any) -> None:
        """Keep a copy of a batch-1 ``DynamicCache`` holding exactly ``prompt``'s KV."""
        if len(prompt) < MIN_PREFIX_TOKENS or self.max_bytes <= 0 or prompt in self._entries:
            return
        layers = [(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers]
        size = self._size(layers)
        if size > self.max_bytes:
            return
        # An entry that is a prefix of the new one is now redundant.
        for key in [k for k in self._entries if len(k) < len(prompt) and prompt[: len(k)] == k]:
            self._drop(key)
        while self._entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[prompt] = layers
        self.bytes += size

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= self._size(self._entries.pop(key))

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...], limit: int) -> int:
    length = min(len(a), len(b), limit)
    if a[:length] == b[:length]:
        return length
    low, high = 0, length  # binary search on the first mismatch
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def cache_from_prefix(layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> Any:
    """A fresh batch-1 ``DynamicCache`` holding the first ``length`` tokens of a cached prefix."""
    from transformers import DynamicCache

    data = [(k[:, :length].unsqueeze(0).clone(), v[:, :length].unsqueeze(0).clone()) for k, v in layers]
    return DynamicCache(data)


@dataclass(frozen=True)
class _LayerView:
    keys: torch.Tensor
    values: torch.Tensor


class PrefixView:
    """The first ``length`` tokens of a cached prefix, read in place: what ``BatchKVCache.add_row`` reads.

    A row that joins its batch straight from the prefix cache is copied into the batch's buffers once;
    building a ``DynamicCache`` first would copy the prefix twice, through a prompt-sized temporary.
    """

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.layers = [_LayerView(k[:, :length].unsqueeze(0), v[:, :length].unsqueeze(0)) for k, v in layers]
        self._length = length

    def get_seq_length(self) -> int:
        return self._length
