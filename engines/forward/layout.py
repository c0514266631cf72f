"""What a model's decoder layers are made of, as the lean step sees them: its architectures, projections
and the groups of projections multiplied as one.

The loader (to allocate fused groups up front), the streaming reader and the int8 converter ask this
module, not the decoder, so none of them imports the forward pass itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engines.forward.int8 import Int8Linear

#: ``model_type`` values whose decoder layer this step reproduces exactly (RMSNorm, rotary embedding,
#: grouped-query attention, SiLU-gated MLP, optional q/k/v biases).
ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})


#: A projection the step multiplies itself: a plain linear layer or an int8 one.
Projection = torch.nn.Linear | Int8Linear


LINEAR_TYPES = (torch.nn.Linear, Int8Linear)


def projection_groups(model: Any) -> list[tuple[torch.nn.Linear, ...]]:
    """Each layer's ``(q, k, v)`` and ``(gate, up)`` projections: the groups the lean step multiplies as one.

    Empty where the lean step does not cover the model. The streaming loader allocates each group as one
    buffer up front, so fusing costs no copy at load.
    """
    if unsupported_reason(model) is not None:
        return []
    groups: list[tuple[torch.nn.Linear, ...]] = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        groups.append((attention.q_proj, attention.k_proj, attention.v_proj))
        groups.append((mlp.gate_proj, mlp.up_proj))
    return groups


def fuse_projections(model: Any) -> int:
    """Store each layer's q/k/v and gate/up weights in one buffer and make the layers views of it.

    Memory stays the same (the separate tensors are freed, one group at a time), transformers' forward
    is unchanged, and the lean step can then run one matrix product where it ran three (or two), a
    measurable part of a bf16 decode step at 2-8 rows (figures in bench/README.md). Groups that already
    share a buffer (the streaming loader allocates them so) are left alone. Returns the number of layers
    whose projections are fused.
    """
    groups = projection_groups(model)
    with torch.no_grad():
        for group in groups:
            if fused_weights(group) is None and all(type(layer) is torch.nn.Linear for layer in group):
                _fuse_group(group)
    return len(groups) // 2


def _fuse_group(layers: tuple[torch.nn.Linear, ...]) -> None:
    weight = torch.cat([layer.weight for layer in layers])
    has_bias = [layer.bias is not None for layer in layers]
    bias = torch.cat([layer.bias for layer in layers if layer.bias is not None]) if all(has_bias) else None
    start = 0
    for layer in layers:
        end = start + layer.out_features
        layer.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
        start = end


@dataclass(frozen=True)
class FusedWeights:
    """Several projections' weights as one matrix (views of one buffer): one product for the group."""

    weight: torch.Tensor  # float weights, or int8 values with ``scales``
    bias: torch.Tensor | None
    scales: torch.Tensor | None = None


def fused_weights(layers: tuple[Projection, ...]) -> FusedWeights | None:
    """The one matrix the layers' weights (and biases) are consecutive slices of, if they are."""
    scales = None
    if all(isinstance(layer, Int8Linear) for layer in layers):
        weights = _consecutive([layer.qweight for layer in layers])
        scales = _consecutive([layer.scales for layer in layers])
        if scales is None:
            return None
    elif all(type(layer) is torch.nn.Linear for layer in layers):
        weights = _consecutive([layer.weight for layer in layers])
    else:
        return None
    if weights is None:
        return None
    if all(layer.bias is None for layer in layers):
        return FusedWeights(weights, None, scales)
    if any(layer.bias is None for layer in layers):
        return None
    biases = _consecutive([layer.bias for layer in layers])
    return FusedWeights(weights, biases, scales) if biases is not None else None


def _consecutive(tensors: list[Any]) -> torch.Tensor | None:
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for tensor in tensors:
        if (
            not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != storage
            or tensor.storage_offset() != offset
            or tensor.dtype != first.dtype
            or tensor.shape[1:] != first.shape[1:]
        ):
            return None
        offset += tensor.numel()
    rows = sum(int(tensor.shape[0]) for tensor in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


def unsupported_reason(model: Any) -> str | None:
    """Why the lean step would not reproduce ``model``'s forward pass (``None`` when it would)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"architecture {model_type!r} is not one of {sorted(ARCHITECTURES)}"
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":
        return f"activation {activation!r}"
    if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types)
    if sliding or (model_type == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    for attribute in ("embed_tokens", "rotary_emb", "norm", "layers"):
        if not hasattr(inner, attribute):
            return f"no model.{attribute}"
    if type(getattr(model, "lm_head", None)) not in LINEAR_TYPES:
        return f"lm_head is a {type(model.lm_head).__name__}"
    for layer in inner.layers:  # type: ignore[union-attr]
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        for projection in projections:
            if type(projection) not in LINEAR_TYPES:
                return f"a projection is a {type(projection).__name__}, not a plain or int8 linear layer"
        for norm in (
            getattr(layer, "input_layernorm", None),
            getattr(layer, "post_attention_layernorm", None),
        ):
            if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                return f"a norm is a {type(norm).__name__}"
    if not type(inner.norm).__name__.endswith("RMSNorm"):  # type: ignore[union-attr]
        return f"the final norm is a {type(inner.norm).__name__}"  # type: ignore[union-attr]
    return None
