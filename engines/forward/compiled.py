"""The whole float32 decode step of a Llama-family model as one call of compiled code (``decode_step_f32``).

The lean step's kernels (``engines.forward.kernels``) left the interpreter between them as the largest cost
they did not cover: on a 2-core EPYC, a large share of a small int8 model's one-row step was Python,
argument conversion and a thread-pool start per call, in every layer (figures in bench/README.md). This
runs the same kernels in the same order in one parallel region, so the logits are the ones the separate
calls give, bit for bit.

``StepPlan`` is built once per model (every weight's address, checked once: dtypes, shapes, contiguity)
and holds references to the tensors, so the addresses stay valid for as long as the plan lives.
Unmerged adapter rows run inside the call (``StepAdapters``). The lean step keeps using the separate
calls where the plan does not apply: biases, unfused q/k/v or gate/up, bf16 activations, a forward
hook other than an adapter's (or any on the LM head), a GPU.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from engines.forward.kernels import NativeKernels, check_starts, is_float32_on_cpu

_LAYER_FIELDS = (
    "input_norm",
    "post_norm",
    "qkv",
    "o",
    "gate_up",
    "down",
    "qkv_scales",
    "o_scales",
    "gate_up_scales",
    "down_scales",
)
_SHAPE_FIELDS = (
    "rows",
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "intermediate",
    "vocab",
    "column",
    "kv_row_stride",
    "kv_head_stride",
)


class _StepLayer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _LAYER_FIELDS]


class _StepShape(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_long) for name in _SHAPE_FIELDS), ("eps", ctypes.c_float)]


class _LoraPair(ctypes.Structure):
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("rank", ctypes.c_long)]


#: The projections of a layer an adapter can target, in ``step_lora``'s order.
LORA_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class _StepLora(ctypes.Structure):
    _fields_ = [(name, _LoraPair) for name in LORA_PROJECTIONS]


@dataclass(frozen=True)
class LoraStack:
    """One projection's unmerged adapters by slot: ``a [slots, rank, in]``, ``b [slots, out, rank]``."""

    a: torch.Tensor
    b: torch.Tensor

    def fits(self, out_features: int, in_features: int) -> bool:
        a, b = self.a, self.b
        return (
            a.dim() == 3
            and b.dim() == 3
            and is_float32_on_cpu(a)
            and is_float32_on_cpu(b)
            and a.shape[2] == in_features
            and tuple(b.shape) == (a.shape[0], out_features, a.shape[1])
        )


@dataclass(frozen=True)
class StepAdapters:
    """A step's unmerged adapter rows: each row's slot (0: none) and each layer's stacks by projection.

    ``layers[i][j]`` is the stack of layer ``i``'s ``LORA_PROJECTIONS[j]``, ``None`` where no adapter
    targets it. ``key`` names these stacks: the same key must mean the same stacks, unmoved (the
    decoder uses its registry's identity and version), so the plan checks them and builds its address
    table once per key and keeps no reference to them.
    """

    slots: torch.Tensor
    layers: list[tuple[LoraStack | None, ...]]
    key: tuple[int, ...]


@dataclass(frozen=True)
class Product:
    """One projection's weights: float32 ``[out, in]``, or int8 with one bf16 scale per output channel."""

    weight: torch.Tensor
    scales: torch.Tensor | None = None

    def fits(self, out_features: int, in_features: int) -> bool:
        weight, scales = self.weight, self.scales
        if (
            tuple(weight.shape) != (out_features, in_features)
            or not weight.is_contiguous()
            or not weight.is_cpu
        ):
            return False
        if scales is None:
            return weight.dtype == torch.float32
        return (
            weight.dtype == torch.int8
            and scales.dtype == torch.bfloat16
            and scales.is_contiguous()
            and tuple(scales.shape) == (out_features,)
        )


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as the compiled step reads it: norms, fused q/k/v and gate/up, o and down."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Product
    o: Product
    gate_up: Product
    down: Product


@dataclass(frozen=True)
class StepSizes:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float


class StepPlan:
    """A model's weights laid out for ``decode_step_f32``; ``None`` from ``build`` where it does not fit."""

    def __init__(
        self,
        kernels: NativeKernels,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: Product,
        sizes: StepSizes,
    ) -> None:
        self._kernels = kernels
        self._layers = layers  # held: the table below points into these tensors
        self._final_norm = final_norm
        self._lm_head = lm_head
        self.sizes = sizes
        self._table = (_StepLayer * len(layers))(*(_layer_struct(layer) for layer in layers))
        self._cache_key: tuple[int, ...] = ()
        self._keys: ctypes.Array[ctypes.c_void_p] | None = None
        self._values: ctypes.Array[ctypes.c_void_p] | None = None
        # The adapter table, the key of the stacks it was built from, the slots of its smallest
        # stack and its largest rank.
        self._lora_key: tuple[int, ...] | None = None
        self._lora: ctypes.Array[_StepLora] | None = None
        self._lora_slots = 0
        self._lora_rank = 0
        # One step at a time: the cached address tables must not change under a running call.
        self._lock = threading.Lock()
        s = sizes
        attended, kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
        #: ``(out, in)`` of each adapter-targetable projection, in ``LORA_PROJECTIONS``' order.
        self._lora_shapes = (
            (attended, s.hidden),
            (kv_width, s.hidden),
            (kv_width, s.hidden),
            (s.hidden, attended),
            (s.intermediate, s.hidden),
            (s.intermediate, s.hidden),
            (s.hidden, s.intermediate),
        )

    @classmethod
    def build(
        cls,
        kernels: NativeKernels,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: Product,
        sizes: StepSizes,
    ) -> StepPlan | None:
        """The plan, or ``None`` where any weight is not what the compiled step reads."""
        s = sizes
        if (
            not layers
            or s.heads % s.kv_heads != 0
            or any(width % 8 for width in (s.hidden, s.head_dim, s.intermediate))
            or not is_float32_on_cpu(final_norm, (s.hidden,))
            or not lm_head.fits(s.vocab, s.hidden)
        ):
            return None
        qkv_width = (s.heads + 2 * s.kv_heads) * s.head_dim
        for layer in layers:
            if not (
                is_float32_on_cpu(layer.input_norm, (s.hidden,))
                and is_float32_on_cpu(layer.post_norm, (s.hidden,))
                and layer.qkv.fits(qkv_width, s.hidden)
                and layer.o.fits(s.hidden, s.heads * s.head_dim)
                and layer.gate_up.fits(2 * s.intermediate, s.hidden)
                and layer.down.fits(s.hidden, s.intermediate)
            ):
                return None
        return cls(kernels, layers, final_norm, lm_head, sizes)

    def takes_rows(self, rows: int) -> bool:
        """A first check, before the caller prepares the step's inputs: any number of rows.

        Every row count goes through the same compiled products, oneDNN's faster float32 products at
        many rows included, so that a row's logits do not depend on how many rows share its step."""
        return rows > 0

    def takes(self, rows: int, keys: list[torch.Tensor], values: list[torch.Tensor], column: int) -> bool:
        """Whether a step of ``rows`` rows on this cache is what the compiled step reads and writes."""
        head = keys[0] if keys else None
        return (
            head is not None
            and self.takes_rows(rows)
            and len(keys) == len(values) == len(self._layers)
            and head.dim() == 4
            and rows <= head.shape[0]
            and 0 <= column < head.shape[2]
            and tuple(head.shape[1::2]) == (self.sizes.kv_heads, self.sizes.head_dim)
            and self._cache_arrays(keys, values)
        )

    def _adapter_table(self, rows: int, adapters: StepAdapters) -> tuple[ctypes.Array[_StepLora], int] | None:
        """The adapters' addresses for the C call and the largest rank; ``None`` where any is unfit.

        The stacks are checked and the table built once per ``adapters.key``; the row slots every
        step, so that no slot indexes past a stack.
        """
        slots = adapters.slots
        if (
            len(adapters.layers) != len(self._layers)
            or any(len(layer) != len(LORA_PROJECTIONS) for layer in adapters.layers)
            or slots.shape != (rows,)
            or slots.dtype != torch.long
            or not slots.is_contiguous()
            or not slots.is_cpu
            or int(slots.min()) < 0
        ):
            return None
        if adapters.key != self._lora_key or self._lora is None:
            stacks = [stack for layer in adapters.layers for stack in layer]
            shapes = self._lora_shapes * len(adapters.layers)
            if any(
                stack is not None and not stack.fits(*shape)
                for stack, shape in zip(stacks, shapes, strict=True)
            ):
                return None
            pairs = [
                _LoraPair(stack.a.data_ptr(), stack.b.data_ptr(), stack.a.shape[1]) if stack else _LoraPair()
                for stack in stacks
            ]
            width = len(LORA_PROJECTIONS)
            self._lora = (_StepLora * len(adapters.layers))(
                *(_StepLora(*pairs[i : i + width]) for i in range(0, len(pairs), width))
            )
            present = [stack for stack in stacks if stack is not None]
            self._lora_key = adapters.key
            self._lora_slots = min((stack.a.shape[0] for stack in present), default=0)
            self._lora_rank = max((stack.a.shape[1] for stack in present), default=0)
        if int(slots.max()) >= self._lora_slots:
            return None
        return self._lora, self._lora_rank

    def _cache_arrays(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> bool:
        """Each layer's K/V addresses for the C call, checked once per set of cache buffers."""
        shape = keys[0].shape
        addresses = tuple(t.data_ptr() for t in keys) + tuple(t.data_ptr() for t in values)
        key = (*shape, *addresses)  # a new buffer set can reuse freed addresses with another shape
        if key == self._cache_key:
            return True
        if not all(is_float32_on_cpu(t, tuple(shape)) for t in (*keys, *values)):
            return False
        pointers = ctypes.c_void_p * len(keys)
        self._keys, self._values = pointers(*addresses[: len(keys)]), pointers(*addresses[len(keys) :])
        self._cache_key = key
        return True

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        starts: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        column: int,
        adapters: StepAdapters | None = None,
    ) -> torch.Tensor | None:
        """Logits ``[rows, vocab]``; ``x`` (the token embeddings) ends as the last hidden state.

        ``cos``/``sin`` are ``[rows, head_dim]`` for each row's new position and ``starts`` each row's
        first cache column (int64); ``adapters`` adds each row's unmerged adapter terms. ``None``
        (nothing run, nothing written) where the cache or the adapters are not what the compiled
        step takes: the caller runs the separate calls.
        """
        rows, s = x.shape[0], self.sizes
        if not is_float32_on_cpu(x, (rows, s.hidden)):
            raise ValueError(f"activations must be contiguous float32 [{rows}, {s.hidden}] on the CPU")
        if not all(is_float32_on_cpu(factor, (rows, s.head_dim)) for factor in (cos, sin)):
            raise ValueError(f"rotary factors must be contiguous float32 [{rows}, {s.head_dim}] on the CPU")
        check_starts(starts, rows)
        if int(starts.min()) < 0 or int(starts.max()) > column:
            raise ValueError(f"each row's first column must be in [0, {column}]")
        with self._lock:  # checked and run under one lock: what was checked is what runs
            if not self.takes(rows, keys, values, column):
                return None
            lora, rank = None, 0
            if adapters is not None:
                table = self._adapter_table(rows, adapters)
                if table is None:
                    return None
                lora, rank = table
            shape = _StepShape(
                rows,
                s.hidden,
                s.heads,
                s.kv_heads,
                s.head_dim,
                s.intermediate,
                s.vocab,
                column,
                keys[0].stride(0),
                keys[0].stride(1),
                s.eps,
            )
            work = torch.empty(
                self._kernels.decode_step_work_floats(ctypes.byref(shape)), dtype=torch.float32
            )
            logits = torch.empty(rows, s.vocab, dtype=torch.float32)
            lm_head = self._lm_head
            slots = adapters.slots if adapters is not None else None
            lora_t = torch.empty(rows * max(rank, 1), dtype=torch.float32) if lora is not None else None
            self._kernels.decode_step(
                self._table,
                len(self._layers),
                self._keys,
                self._values,
                self._final_norm.data_ptr(),
                lm_head.weight.data_ptr(),
                _address(lm_head.scales),
                ctypes.byref(shape),
                x.data_ptr(),
                cos.data_ptr(),
                sin.data_ptr(),
                starts.data_ptr(),
                work.data_ptr(),
                logits.data_ptr(),
                lora,
                _address(slots),
                _address(lora_t),
                torch.get_num_threads(),
            )
            return logits


def _address(tensor: torch.Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


def _layer_struct(layer: LayerWeights) -> _StepLayer:
    products = (layer.qkv, layer.o, layer.gate_up, layer.down)
    return _StepLayer(
        layer.input_norm.data_ptr(),
        layer.post_norm.data_ptr(),
        *(p.weight.data_ptr() for p in products),
        *(_address(p.scales) for p in products),
    )
