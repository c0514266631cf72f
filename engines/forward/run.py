"""The scheduler's one door into a forward pass: a prompt chunk, or one decode step for a batch.

It takes plain arguments (the model, its cache, the rows' adapter slots through ``AdapterRow``), so
nothing here knows about sequences or batches, and the device-specific choices of a step (which CPU
matrix kernels, which adapter rows, the lean step or transformers' forward) are made in one place.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from engines.forward.kvcache import BatchKVCache
from engines.forward.lean import LeanDecoder


class ServedModel(Protocol):
    """What a row's model says about its adapter: the base's multi-LoRA registry and its slot in it."""

    multilora: Any
    adapter_slot: int


class AdapterRow(Protocol):
    """A row of a forward pass, as far as adapters go (a sequence is one)."""

    @property
    def model(self) -> ServedModel: ...


#: Below this many rows a bf16 decode step on CPU runs faster on torch's own matrix-vector kernels than
#: on oneDNN's: measured on the development machine (SmolLM2-135M shape, 2 cores), one row streams the
#: weights much faster; the two meet at four rows, and from there oneDNN's batched kernels win
#: (figures in bench/README.md).
ONEDNN_MIN_ROWS_BF16 = 4


@contextlib.contextmanager
def decode_kernels(dtype: Any, device: Any, rows: int) -> Iterator[None]:
    """Pick the faster CPU matmul kernels for one decode step of ``rows`` rows.

    The switch is process-wide (torch has no per-call choice), so only the engine thread, which runs
    every forward pass, may use it; the previous setting is restored on exit.
    """
    if rows >= ONEDNN_MIN_ROWS_BF16 or dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        yield
        return
    backend = torch.backends.mkldnn
    previous = bool(backend.enabled)
    setattr(backend, "enabled", False)  # noqa: B010 (a ContextProp: mypy does not see its setter)
    try:
        yield
    finally:
        setattr(backend, "enabled", previous)  # noqa: B010


def cache_kwarg(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    model_type: Any = type(model)
    return _cache_kwarg_for(model_type)


@functools.lru_cache(maxsize=64)
def _cache_kwarg_for(model_type: Any) -> str:
    parameters = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@contextlib.contextmanager
def adapter_rows(rows: Sequence[AdapterRow]) -> Iterator[None]:
    """Tell the base's multi-LoRA hooks which adapter each row uses, for one forward pass."""
    registry = next((s.model.multilora for s in rows if s.model.multilora is not None), None)
    if registry is None:
        yield
        return
    with registry.lock:
        registry.set_rows([s.model.adapter_slot for s in rows])
        try:
            yield
        finally:
            registry.set_rows([])


def prefill(rows: Sequence[AdapterRow], model: Any, ids: Any, cache: Any, last: Any) -> Any:
    """transformers' forward over a prompt chunk into ``cache``; logits at ``last`` (``0``: every position)."""
    with adapter_rows(rows):
        return model(input_ids=ids, use_cache=True, logits_to_keep=last, **{cache_kwarg(model): cache})


def decode(
    rows: Sequence[AdapterRow],
    model: Any,
    decoder: LeanDecoder | None,
    kv: BatchKVCache,
    ids: Any,
    positions: Any,
    *,
    deterministic: bool = False,
) -> Any:
    """Logits ``[rows, vocab]`` for one new token per row, by the lean step where the model has one.

    float32 and int8 steps are batch-invariant as they are (the compiled products sum each row in one
    order at any row count). torch's bf16 kernels are not: with ``deterministic``, a bf16 (or float16)
    step of the lean architectures runs row by row instead (``_each_row_alone``).
    """
    if deterministic and decoder is not None and kv.dtype not in (torch.float32, torch.float64):
        return _each_row_alone(rows, decoder, kv, ids, positions)
    with adapter_rows(rows), decode_kernels(kv.dtype, kv.device, len(rows)):
        if decoder is not None:
            return decoder.step(ids, kv, positions)
        output = model(
            input_ids=ids,
            attention_mask=kv.attention_mask(),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg(model): kv},
        )
        return output.logits[:, -1]


def _each_row_alone(
    rows: Sequence[AdapterRow], decoder: LeanDecoder, kv: BatchKVCache, ids: Any, positions: Any
) -> Any:
    """The step one row at a time, each on its own columns of the cache (no padding before it): every
    row is computed exactly as it would be alone, whatever shares its batch, at the price of reading
    the weights once per row (the figures are in bench/README.md)."""
    logits = []
    for row, sequence in enumerate(rows):
        start = kv.starts[row]
        keys = [layer[row : row + 1, :, start:] for layer in kv.keys]
        values = [layer[row : row + 1, :, start:] for layer in kv.values]
        with adapter_rows([sequence]), decode_kernels(kv.dtype, kv.device, 1):
            logits.append(
                decoder.forward(
                    ids[row : row + 1], positions[row : row + 1], None, kv.length - start, keys, values
                )
            )
    return torch.cat(logits)
