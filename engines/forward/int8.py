"""Weight-only int8 bases on CPU: per-channel int8 weights, multiplied without dequantizing them.

A decode step reads every weight once, so on a CPU its speed is the bytes it reads: int8 weights are a
quarter of float32's and half of bf16's. Each output channel (row) keeps one scale,
``W ~ q * scale[:, None]`` with ``scale = max|W_row| / 127``, and the product runs in torch's own
``_weight_int8pack_mm``, which reads the int8 matrix directly and never builds its dequantized copy.

Why that kernel (measured on a 2-core AVX2 CPU without native bf16, a 22016x4096 matrix at 1 and 8
rows; figures in bench/README.md): torch's ``_weight_int8pack_mm`` with bf16 activations beat float32
weights through oneDNN (what the lean step uses for float32) and through MKL, and was many times faster
than dequantize-then-``F.linear``, torchao ``Int8WeightOnlyConfig`` (eager) and bitsandbytes' CPU
``Linear8bitLt``. The same kernel with float32 activations takes a much slower scalar path, so
activations enter it as bf16 and its output is cast back to the model's dtype; fbgemm's dynamic int8
linear is faster still at 8 rows but quantizes the activations of the whole batch with one scale, so a
row's answer would depend on the other requests in its batch.

On an x86 CPU with AVX2 and a C compiler, float32 activations go through ``engines.forward.kernels``'s kernel
instead, built at first use: the same int8 weights, read channel by channel and accumulated in float32,
faster than ``_weight_int8pack_mm`` on a small model's matrices (and so the whole int8 decode step, at
one row and at eight) and without its bf16 rounding of the activations (figures in bench/README.md).
torch's kernel stays the path everywhere else.

Adapters are never merged into these weights: ``engines.forward.multilora`` hooks add their low-rank terms to
the int8 product, in the model's dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from engines.forward.kernels import NativeKernels

#: Rows quantized at a time: a few float32 temporaries of 256 rows (34 MiB at 11008 columns), not the matrix.
_CHUNK_ROWS = 256


def quantize_rows_into(weight: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    """Quantize ``weight [out, in]`` per row into ``qweight`` (int8) and ``scales``, chunk by chunk."""
    if tuple(weight.shape) != tuple(qweight.shape) or weight.shape[0] != scales.shape[0]:
        raise ValueError(
            f"shape {tuple(weight.shape)} does not match the int8 layer's {tuple(qweight.shape)}"
        )
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        rows = weight[start : start + _CHUNK_ROWS].to(torch.float32)
        scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        # The kernel multiplies by the scale as stored (bf16): quantize against that rounded value.
        stored = scale.to(scales.dtype)
        quantized = torch.round(rows / stored.to(torch.float32)[:, None]).clamp_(-127, 127)
        qweight[start : start + _CHUNK_ROWS] = quantized.to(torch.int8)
        scales[start : start + _CHUNK_ROWS] = stored


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T`` in ``x``'s dtype, never dequantizing the matrix.

    float32 activations on an AVX2 CPU go through the compiled kernel (``engines.forward.kernels``: float32
    all through); anything else through torch's kernel, with bf16 activations inside.
    """
    flat = x.dim() == 2  # the lean decode step's activations need no reshapes
    rows = x if flat else x.reshape(-1, x.shape[-1])
    kernels = NativeKernels.load()
    out: torch.Tensor
    if kernels is not None and kernels.takes_int8(rows, qweight, scales):
        out = kernels.int8(rows, qweight, scales)
    else:
        out = torch.ops.aten._weight_int8pack_mm(rows.to(scales.dtype), qweight, scales).to(x.dtype)
    return out if flat else out.reshape(*x.shape[:-1], qweight.shape[0])


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear`` for int8 weights: one layer's, or a fused group's (the lean step's)."""
    out = int8_matmul(x, qweight, scales)
    return out + bias if bias is not None else out


def dequantize(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 matrix int8 rows stand for (tests and references; never per step)."""
    return qweight.to(torch.float32) * scales.to(torch.float32)[:, None]


class Int8Linear(torch.nn.Module):
    """A linear layer whose weight is int8 with one scale per output channel.

    ``qweight`` and ``scales`` are buffers (nothing here trains); ``compute_dtype`` is the dtype its
    input and output have (the model's), which adapters' low-rank terms use too.
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        compute_dtype: torch.dtype,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scales, self.bias)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(torch.nn.Module):
    """An embedding table stored as int8 rows with one scale each; a lookup dequantizes only its rows.

    A tied LM head (``tie_word_embeddings``) is an ``Int8Linear`` over the same buffers: the table's row
    scales are the head's per-output-channel scales.
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        compute_dtype: torch.dtype,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids].to(torch.float32) * self.scales[ids].to(torch.float32).unsqueeze(-1)
        return rows.to(self.compute_dtype)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales)


#: The scales' dtype: the kernel takes activations and scales in one dtype, and bf16 is its fast path.
SCALE_DTYPE = torch.bfloat16


def compute_dtype_of(layer: Any) -> torch.dtype:
    """The dtype a (plain or int8) linear layer takes and returns."""
    if isinstance(layer, Int8Linear):
        return layer.compute_dtype
    dtype: torch.dtype = layer.weight.dtype
    return dtype


def device_of(layer: Any) -> torch.device:
    tensor = layer.qweight if isinstance(layer, Int8Linear) else layer.weight
    device: torch.device = tensor.device
    return device


def convert_to_int8(
    model: torch.nn.Module,
    groups: list[tuple[torch.nn.Linear, ...]],
    device: str,
    compute_dtype: torch.dtype,
) -> dict[str, Int8Linear | Int8Embedding]:
    """Replace every linear layer and the input embedding by int8 modules with fresh, empty buffers.

    Returns the checkpoint names (``<module>.weight``) whose values must be quantized into them. Works
    on a model whose parameters are still on ``meta`` (the streaming loader) as on a loaded one. Each
    group (q/k/v, gate/up) gets one int8 buffer and one scale buffer, its layers views of them, so the
    lean decode step multiplies a group at once. A tied LM head shares the embedding's buffers.
    """
    replacements: dict[int, Int8Linear | Int8Embedding] = {}
    for group in groups:
        rows = sum(layer.out_features for layer in group)
        qweight = torch.empty(rows, group[0].in_features, dtype=torch.int8, device=device)
        scales = torch.empty(rows, dtype=SCALE_DTYPE, device=device)
        has_bias = all(layer.bias is not None for layer in group)
        bias = torch.empty(rows, dtype=compute_dtype, device=device) if has_bias else None
        start = 0
        for layer in group:
            end = start + layer.out_features
            replacements[id(layer)] = Int8Linear(
                layer.in_features,
                layer.out_features,
                compute_dtype=compute_dtype,
                qweight=qweight[start:end],
                scales=scales[start:end],
                bias=bias[start:end] if bias is not None else _empty_bias(layer, compute_dtype, device),
            )
            start = end
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding: Any = get_embeddings() if callable(get_embeddings) else None
    embedding_weight = getattr(embedding, "weight", None)
    table: Int8Embedding | None = None
    if type(embedding) is torch.nn.Embedding:
        table = Int8Embedding(
            embedding.num_embeddings,
            embedding.embedding_dim,
            compute_dtype=compute_dtype,
            qweight=torch.empty(embedding.weight.shape, dtype=torch.int8, device=device),
            scales=torch.empty(embedding.num_embeddings, dtype=SCALE_DTYPE, device=device),
            padding_idx=embedding.padding_idx,
        )
        replacements[id(embedding)] = table
    names: dict[str, Int8Linear | Int8Embedding] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = replacements.get(id(child))
            if new is None and type(child) is torch.nn.Linear:
                shared = table if table is not None and child.weight is embedding_weight else None
                new = _int8_linear_like(child, shared, compute_dtype, device)
                replacements[id(child)] = new
            if new is not None:
                parent._modules[child_name] = new
                names[f"{full}.weight"] = new
    return names


def _int8_linear_like(
    layer: torch.nn.Linear, tied: Int8Embedding | None, compute_dtype: torch.dtype, device: str
) -> Int8Linear:
    """An int8 layer shaped like ``layer``: fresh buffers, or a tied embedding's table and scales."""
    if tied is not None:
        qweight, scales = tied.qweight, tied.scales
    else:
        qweight = torch.empty(layer.weight.shape, dtype=torch.int8, device=device)
        scales = torch.empty(layer.out_features, dtype=SCALE_DTYPE, device=device)
    return Int8Linear(
        layer.in_features,
        layer.out_features,
        compute_dtype=compute_dtype,
        qweight=qweight,
        scales=scales,
        bias=_empty_bias(layer, compute_dtype, device),
    )


def _empty_bias(layer: torch.nn.Linear, dtype: torch.dtype, device: str) -> torch.Tensor | None:
    return torch.empty(layer.out_features, dtype=dtype, device=device) if layer.bias is not None else None


def quantize_loaded(model: torch.nn.Module, groups: list[tuple[torch.nn.Linear, ...]], device: str) -> None:
    """Convert an already loaded full-precision model to int8 in place (the fallback loading path).

    Peaks at the full-precision model plus its int8 copy; the streaming loader quantizes tensor by
    tensor instead and never holds the full-precision model.
    """
    originals = dict(model.state_dict(keep_vars=True))
    compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    names = convert_to_int8(model, groups, device, compute_dtype)
    with torch.no_grad():
        for name, module in names.items():
            weight = originals.pop(name, None)
            if weight is None:
                continue  # a tied head: quantized through the embedding's name
            quantize_rows_into(weight.detach(), module.qweight, module.scales)
            bias = originals.pop(name.removesuffix("weight") + "bias", None)
            if bias is not None and isinstance(module, Int8Linear) and module.bias is not None:
                module.bias.copy_(bias.detach())
