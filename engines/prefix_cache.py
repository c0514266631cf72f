"""Reuse of the KV cache of a shared prompt prefix (a system prompt, the earlier turns of a chat).

Keys and values of a token depend only on the tokens before it, so a prompt that starts with tokens
already prefilled for an earlier request can start from a copy of that cache and compute only the rest.
Each loaded model (base or merged variant) has its own ``PrefixCache``: a variant's KV differs from the
base's, so entries are never shared between adapters. Memory is bounded; the least recently used entry
goes first. Only the engine thread touches it, so it needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

#: Prompts shorter than this are cheap to recompute and not worth an entry.
MIN_PREFIX_TOKENS = 32


@dataclass
class _Entry:
    """A prompt's KV, the prefill chunk size it was computed with, and its last position's logits."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    chunk: int
    #: Logits of the last position of each prompt this entry holds whole, by prompt length: its own, and
    #: those of the shorter entries it replaced.
    logits: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.layers for t in pair] + list(self.logits.values())
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class PrefixHit:
    """What a prompt can start from: the first ``length`` tokens' KV, and the logits where it is whole."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    #: The last position's logits when the whole prompt is cached (``length == len(prompt)``).
    logits: torch.Tensor | None = None


class PrefixCache:
    """Prompt token tuples -> per-layer (keys, values) of shape ``[kv_heads, tokens, head_dim]``.

    A reused prefix must give the answer a cold prefill gives, bit for bit. A prefill computes each chunk
    of ``chunk`` tokens (from the prompt's start) in one forward pass, and the kernels' sums depend on the
    chunk's shape, so a prefix is reused only up to a chunk boundary (the rest is computed in the very
    chunks a cold prefill would use), and a prompt cached whole is reused with the logits its prefill
    ended on. Entries computed with another chunk size are not reused.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: tuple[int, ...], chunk: int) -> PrefixHit | None:
        """The longest reusable cached prefix of ``prompt`` for prefill chunks of ``chunk`` tokens.

        The whole prompt where an entry holds it with its logits; else the longest cached prefix cut to
        a whole number of chunks, leaving at least one token to compute.
        """
        best: tuple[int, tuple[int, ...]] | None = None
        for key, entry in self._entries.items():
            if entry.chunk != chunk:
                continue
            common = _common_prefix(key, prompt, len(prompt))
            if common == len(prompt) and common in entry.logits:
                best = (common, key)
                break
            usable = min(common, len(prompt) - 1) // chunk * chunk
            if usable > (best[0] if best else 0):
                best = (usable, key)
        if best is None or best[0] < MIN_PREFIX_TOKENS:
            self.misses += 1
            return None
        length, key = best
        self._entries.move_to_end(key)
        entry = self._entries[key]
        self.hits += 1
        self.reused_tokens += length
        logits = entry.logits.get(length) if length == len(prompt) else None
        return PrefixHit(length, entry.layers, logits.clone() if logits is not None else None)

    def store(self, prompt: tuple[int, ...], cache: Any, logits: torch.Tensor, chunk: int) -> None:
        """Keep a copy of a batch-1 ``DynamicCache`` holding exactly ``prompt``'s KV, prefilled in chunks
        of ``chunk`` tokens, and ``logits``, its last position's."""
        if len(prompt) < MIN_PREFIX_TOKENS or self.max_bytes <= 0 or prompt in self._entries:
            return
        layers = [(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers]
        entry = _Entry(layers, chunk, {len(prompt): logits.detach().clone()})
        # An entry that is a prefix of the new one is now redundant; its logits stay reusable.
        redundant = [k for k in self._entries if len(k) < len(prompt) and prompt[: len(k)] == k]
        for key in redundant:
            if self._entries[key].chunk == chunk:
                entry.logits.update(self._entries[key].logits)
        size = entry.nbytes
        if size > self.max_bytes:
            return
        for key in redundant:
            self._drop(key)
        while self._entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[prompt] = entry
        self.bytes += size

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= self._entries.pop(key).nbytes

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
