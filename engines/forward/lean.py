"""A lean one-token decode step for Llama-family models, straight onto the engine's batched KV cache.

A decode step reads every weight once and does little arithmetic, so on a CPU the time that is not
spent streaming weights is interpreter and dispatch overhead: transformers' forward pass builds masks,
position embeddings, cache-update calls and output objects for every layer of every token. This step
does the same arithmetic in the same dtypes (so it gives the same logits, to rounding) with about a
third of the operator calls: one embedding lookup, per layer two RMS norms (one fused call each in
float32), the projections (q/k/v and gate/up fused into one product each), the rotary embedding of
every query and key head as one batched product with a per-row rotation matrix, an in-place write of
the new K/V column into ``BatchKVCache`` and one ``scaled_dot_product_attention`` with grouped KV heads.

In float32 on a CPU where ``engines.forward.kernels`` could build its kernels, the whole step is one call of
compiled code (``engines.forward.compiled``: products of up to 16 rows, norms, rotary embedding with the K/V
write, attention, the SiLU gate and unmerged adapter rows' terms), where its weights allow
(``StepPlan.build``); otherwise each of those is one compiled call from the loop below. On a 2-core
CPU every small torch operator after a weight-streaming product pays for the caches the product
evicted, torch's products stream well below the memory's speed at few rows, and the interpreter
between the calls was a large share of a small int8 model's step (figures in bench/README.md).

It covers the architectures whose decoder layer is exactly that (``ARCHITECTURES``); anything else,
or any layer that is neither a plain ``nn.Linear`` nor the engine's ``Int8Linear`` (bitsandbytes-
quantized, or still wrapped by peft), keeps the transformers forward. Projections with forward hooks
(unmerged multi-LoRA rows) are called as modules so the hooks still apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engines.forward.compiled import (
    LORA_PROJECTIONS,
    LayerWeights,
    LoraStack,
    Product,
    StepAdapters,
    StepPlan,
    StepSizes,
)
from engines.forward.int8 import Int8Linear, int8_linear
from engines.forward.kernels import NativeKernels
from engines.forward.kvcache import BatchKVCache
from engines.forward.layout import FusedWeights, Projection, fused_weights, unsupported_reason
from engines.forward.multilora import LoraHook

log = logging.getLogger("peft_gateway.lean_decode")


def _onednn_float32_available() -> bool:
    """Whether oneDNN's linear op is in this torch build and agrees with ``F.linear`` on float32."""
    try:
        x, weight, bias = torch.randn(3, 1, 16), torch.randn(8, 16), torch.randn(8)
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
        return bool(torch.allclose(out, F.linear(x, weight, bias), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


#: float32 products on CPU go through oneDNN, with the model's own (plain, unpacked) weights: MKL's
#: sgemm, which ``F.linear`` uses, is several times slower for a few rows on some CPUs (measured on a
#: 2-core AMD EPYC; figures in bench/README.md). Same precision, summed in another order (differences
#: ~1e-6 relative).
ONEDNN_FLOAT32 = _onednn_float32_available()


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A float (not int8) projection of the step's ``[rows, hidden]`` activations.

    float32 on CPU: the compiled kernel (``engines.forward.kernels``, any number of rows: one kernel
    whatever the batch, so a row's result does not depend on it), else oneDNN (no compiler or AVX2).
    """
    kernels = NativeKernels.load()
    if kernels is not None and kernels.takes_dense(x, weight):
        product = kernels.dense(x, weight)
        return product.add_(bias) if bias is not None else product
    if ONEDNN_FLOAT32 and weight.dtype == torch.float32 and x.dtype == torch.float32 and x.is_cpu:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
        return out
    return F.linear(x, weight, bias)


class _Fused(FusedWeights):
    """A fused group's one product."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return dense_linear(x, self.weight, self.bias)
        return int8_linear(x, self.weight, self.scales, self.bias)


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.nn.Module
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    post_norm: torch.nn.Module
    gate: Projection
    up: Projection
    down: Projection
    #: ``[q; k; v]`` and ``[gate; up]`` as one matrix each, where the model's weights are consecutive
    #: slices of one buffer (``fuse_projections``, or the loaders); ``None`` otherwise.
    qkv: _Fused | None = None
    gate_up: _Fused | None = None


def _fused_view(layers: tuple[Projection, ...]) -> _Fused | None:
    """The group's one product, where the layers' weights are consecutive slices of one buffer."""
    fused = fused_weights(layers)
    return _Fused(fused.weight, fused.bias, fused.scales) if fused is not None else None


def _active_hooks(layer: Projection) -> list[Any]:
    """The layer's forward hooks that may change its output in this step.

    Unmerged-adapter hooks (``engines.forward.multilora``) that say they are idle for the layer are left out:
    no adapter row in the batch, or a merged variant's layer sharing the base's hook dict.
    """
    active = []
    for hook in layer._forward_hooks.values():
        idle_for = getattr(hook, "idle_for", None)
        if idle_for is None or not idle_for(layer):
            active.append(hook)
    return active


def _hooks_idle(*layers: Projection) -> bool:
    """Whether no forward hook would change these layers' outputs in this step: then the fused and
    compiled paths serve, as for a base that never had an adapter."""
    return not any(_active_hooks(layer) for layer in layers)


def _with_hooks(layer: Projection, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Apply the layer's forward hooks (unmerged multi-LoRA rows add their delta there) to ``out``."""
    for hook in layer._forward_hooks.values():
        result = hook(layer, (x,), out)
        if result is not None:
            out = result
    return out


def _project(layer: Projection, x: torch.Tensor) -> torch.Tensor:
    # ``forward`` rather than ``__call__``: hooks are applied here, once, with the same input.
    out = (
        dense_linear(x, layer.weight, layer.bias) if isinstance(layer, torch.nn.Linear) else layer.forward(x)
    )
    return _with_hooks(layer, x, out)


def _project_onto(
    kernels: NativeKernels | None, layer: Projection, x: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """``residual + layer(x)``: with the compiled kernels, the add happens as the product is stored.

    The same values as the separate add (the product rounded to float32, then added). A hooked layer
    (unmerged adapter rows) keeps the separate add, so its hooks see the product alone.
    """
    if kernels is not None and getattr(layer, "bias", None) is None and _hooks_idle(layer):
        if type(layer) is torch.nn.Linear and kernels.takes_dense(x, layer.weight):
            return kernels.dense(x, layer.weight, add=residual)
        if isinstance(layer, Int8Linear) and kernels.takes_int8(x, layer.qweight, layer.scales):
            return kernels.int8(x, layer.qweight, layer.scales, add=residual)
    return residual + _project(layer, x)


def _project_together(
    fused: _Fused | None,
    layers: tuple[Projection, ...],
    x: torch.Tensor,
) -> list[torch.Tensor]:
    """Several projections of ``x``: one matrix product where their weights are fused.

    Hooks still apply per projection, so unmerged adapters keep the fused product (one weight read)
    and add only their small low-rank terms.
    """
    if fused is None:
        return [_project(layer, x) for layer in layers]
    sizes = [layer.out_features for layer in layers]
    outputs = fused(x).split(sizes, dim=-1)
    return [_with_hooks(layer, x, out) for layer, out in zip(layers, outputs, strict=True)]


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale in the model's dtype.

    In float32 that is exactly ``F.rms_norm``, one operator call instead of seven, or one call of the
    compiled kernel (``engines.forward.kernels``), which skips torch's dispatch of the seven.
    """
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        kernels = NativeKernels.load()
        if kernels is not None and kernels.takes_rms_norm(x, norm.weight):
            return kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    out: torch.Tensor = norm.weight * h.to(dtype)
    return out


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[rows, D, D]`` matrices ``R`` with ``x @ R == x * cos + rotate_half(x) * sin`` for each row.

    A decode step has one position per row, so the rotary embedding is one fixed linear map per row:
    built once per step, it rotates every query and key head of a layer in one batched product, where
    the element-wise form takes seven operator calls per tensor. Same values; the two products of each
    output are summed with one rounding instead of two.
    """
    half = cos.shape[-1] // 2
    matrices = torch.diag_embed(cos)
    # rotate_half(x) = [-x[half:], x[:half]]: output i < half takes -x[i + half], i >= half takes x[i - half].
    matrices[:, half:, :half].diagonal(dim1=1, dim2=2).copy_(-sin[:, :half])
    matrices[:, :half, half:].diagonal(dim1=1, dim2=2).copy_(sin[:, half:])
    return matrices


class LeanDecoder:
    """Built once per model object; ``step`` advances every row of a ``BatchKVCache`` by one token."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.embed = model.model.embed_tokens
        self.rotary = model.model.rotary_emb
        self.final_norm = model.model.norm
        self.lm_head = model.lm_head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm,
                q=layer.self_attn.q_proj,
                k=layer.self_attn.k_proj,
                v=layer.self_attn.v_proj,
                o=layer.self_attn.o_proj,
                post_norm=layer.post_attention_layernorm,
                gate=layer.mlp.gate_proj,
                up=layer.mlp.up_proj,
                down=layer.mlp.down_proj,
                qkv=_fused_view((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                gate_up=_fused_view((layer.mlp.gate_proj, layer.mlp.up_proj)),
            )
            for layer in model.model.layers
        ]
        self.projections: list[Projection] = [
            projection
            for layer in self.layers
            for projection in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
        ]
        self.projections.append(self.lm_head)
        #: The whole float32 step as one compiled call, where the kernels are built and the weights fit.
        self.plan = self._compiled_plan()
        self._adapter_layers: tuple[tuple[int, ...], list[tuple[LoraStack | None, ...]]] | None = None
        if self.plan is not None:
            log.info("decode steps of %s run as one compiled call", type(model).__name__)

    def _compiled_plan(self) -> StepPlan | None:
        kernels = NativeKernels.load()
        norms = [norm for layer in self.layers for norm in (layer.input_norm, layer.post_norm)]
        epsilons = {float(norm.variance_epsilon) for norm in [*norms, self.final_norm]}
        lm_head = _plain_product(self.lm_head)
        if kernels is None or len(epsilons) != 1 or lm_head is None:
            return None
        weights = []
        for layer in self.layers:
            o, down = _plain_product(layer.o), _plain_product(layer.down)
            qkv, gate_up = layer.qkv, layer.gate_up
            if o is None or down is None or qkv is None or gate_up is None:
                return None
            if qkv.bias is not None or gate_up.bias is not None:
                return None
            weights.append(
                LayerWeights(
                    input_norm=_norm_weight(layer.input_norm),
                    post_norm=_norm_weight(layer.post_norm),
                    qkv=Product(qkv.weight.detach(), qkv.scales),
                    o=o,
                    gate_up=Product(gate_up.weight.detach(), gate_up.scales),
                    down=down,
                )
            )
        sizes = StepSizes(
            hidden=self.layers[0].o.out_features,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            intermediate=self.layers[0].gate.out_features,
            vocab=self.lm_head.out_features,
            eps=epsilons.pop(),
        )
        return StepPlan.build(kernels, weights, _norm_weight(self.final_norm), lm_head, sizes)

    @classmethod
    def for_model(cls, model: Any) -> LeanDecoder | None:
        """The lean step for ``model``, or ``None`` (with the reason logged) where it would differ."""
        reason = unsupported_reason(model)
        if reason is not None:
            log.info("lean decode off for %s: %s", type(model).__name__, reason)
            return None
        return cls(model)

    def step(self, ids: torch.Tensor, kv: BatchKVCache, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, vocab]`` for ``ids [rows, 1]``; writes K/V at column ``kv.length``.

        The caller reserves the column first (``kv.reserve(1)``) and advances the cache afterwards.
        """
        rows = ids.shape[0]
        starts = torch.tensor(kv.starts, dtype=torch.long) if kv.device.type == "cpu" else None
        plan = self.plan
        if starts is not None and plan is not None and plan.takes_rows(rows):
            compiled, adapters = self._compiled_adapters()
            if compiled:
                x = self.embed(ids.view(rows))
                cos, sin = self.rotary(x, positions)
                cos, sin = cos.reshape(rows, self.head_dim), sin.reshape(rows, self.head_dim)
                logits = plan.run(
                    x, cos.contiguous(), sin.contiguous(), starts, kv.keys, kv.values, kv.length, adapters
                )
                if logits is not None:
                    return logits
        mask = _padding_mask(kv, kv.length + 1, ids.device)
        return self.forward(ids, positions, mask, kv.length, kv.keys, kv.values, starts)

    def _compiled_adapters(self) -> tuple[bool, StepAdapters | None]:
        """Whether the compiled step can run with this step's hooks, and the adapter rows it must add.

        Hooks that change nothing this step are skipped; unmerged-adapter hooks of one registry on the
        layers' projections become the step's ``StepAdapters`` (the stacks' addresses are re-read only
        when the registry's ``version`` moved). Any other hook, or one on the LM head, keeps the
        separate calls, where hooks run as they are.
        """
        active: list[LoraHook | None] = []
        for layer in self.projections:
            applied = _active_hooks(layer)
            if len(applied) > 1 or (applied and not isinstance(applied[0], LoraHook)):
                return False, None
            active.append(applied[0] if applied else None)
        hooks = [hook for hook in active if hook is not None]
        if not hooks:
            self._adapter_layers = None  # no reference to stacks an adapter's arrival may since have replaced
            return True, None
        owner = hooks[0].owner
        slots = hooks[0].row_slots()
        if active[-1] is not None or slots is None or any(hook.owner is not owner for hook in hooks):
            return False, None
        key = (id(owner), owner.version, *(hook is not None for hook in active))
        if self._adapter_layers is None or self._adapter_layers[0] != key:
            stacks = [LoraStack(hook.stack.a, hook.stack.b) if hook else None for hook in active[:-1]]
            width = len(LORA_PROJECTIONS)
            layers = [tuple(stacks[i : i + width]) for i in range(0, len(stacks), width)]
            self._adapter_layers = (key, layers)
        return True, StepAdapters(slots, self._adapter_layers[1], key)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        column: int,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step on plain tensors (so that ``torch.compile`` can trace it): K/V buffers per layer.

        Activations are ``[rows, hidden]`` (one position per row), so no product reshapes its input.
        With ``starts`` (each row's first cache column) and the compiled kernels, float32 attention is
        one kernel call per layer instead of ``scaled_dot_product_attention`` and its reshapes.
        """
        kernels = NativeKernels.load() if starts is not None else None
        rows = ids.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids.view(rows))
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.view(rows, head_dim), sin.view(rows, head_dim)
        rotation: torch.Tensor | None = None  # built on first use: the compiled path needs none
        # One query position per row: the query heads that share a KV head are laid out as that KV
        # head's "query positions", so attention runs on the cache as stored, without repeating K/V.
        group = heads // kv_heads
        qk_width = (heads + kv_heads) * head_dim
        for layer, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            h = _rms_norm(layer.input_norm, x)
            # Hooked layers (unmerged adapter rows) need each projection's own output: no fused product.
            qkv = layer.qkv(h) if layer.qkv is not None and _hooks_idle(layer.q, layer.k, layer.v) else None
            if (
                qkv is not None
                and kernels is not None
                and kernels.takes_rotary(qkv, cos, layer_keys, layer_values, column)
            ):
                q = kernels.rotary_kv(qkv, cos, sin, layer_keys, layer_values, column, heads)
            else:
                if rotation is None:
                    rotation = rotation_matrices(cos, sin)
                if qkv is not None:
                    # q and k are adjacent in the fused output: one product rotates both.
                    qk = torch.bmm(qkv[:, :qk_width].view(rows, heads + kv_heads, head_dim), rotation)
                    q, k = qk[:, :heads], qk[:, heads:]
                    v = qkv[:, qk_width:]
                else:
                    q, k, v = _project_together(layer.qkv, (layer.q, layer.k, layer.v), h)
                    q = torch.bmm(q.reshape(rows, heads, head_dim), rotation)
                    k = torch.bmm(k.reshape(rows, kv_heads, head_dim), rotation)
                layer_keys[:rows, :, column] = k.view(rows, kv_heads, head_dim)
                layer_values[:rows, :, column] = v.view(rows, kv_heads, head_dim)
            if (
                kernels is not None
                and starts is not None
                and kernels.takes_attention(q, layer_keys, layer_values)
            ):
                attended = kernels.attention(q, layer_keys, layer_values, starts, column + 1)
            else:
                attended = F.scaled_dot_product_attention(
                    q.reshape(rows, kv_heads, group, head_dim),
                    layer_keys[:rows, :, : column + 1],
                    layer_values[:rows, :, : column + 1],
                    attn_mask=mask,
                ).reshape(rows, heads * head_dim)
            x = _project_onto(kernels, layer.o, attended, x)
            h = _rms_norm(layer.post_norm, x)
            gate_up = (
                layer.gate_up(h) if layer.gate_up is not None and _hooks_idle(layer.gate, layer.up) else None
            )
            if kernels is not None and gate_up is not None and kernels.takes_silu_mul(gate_up):
                activation = kernels.silu_mul(gate_up)
            else:
                sizes = [layer.gate.out_features, layer.up.out_features]
                gate, up = (
                    gate_up.split(sizes, dim=-1)
                    if gate_up is not None
                    else _project_together(layer.gate_up, (layer.gate, layer.up), h)
                )
                activation = F.silu(gate) * up
            x = _project_onto(kernels, layer.down, activation, x)
        return _project(self.lm_head, _rms_norm(self.final_norm, x))


def _plain_product(layer: Projection) -> Product | None:
    """A projection's weights for the compiled step: float32 or int8, no bias, no other kind."""
    if layer.bias is not None:
        return None
    if isinstance(layer, Int8Linear):
        return Product(layer.qweight, layer.scales)
    if type(layer) is torch.nn.Linear:  # not a subclass whose forward may differ
        return Product(layer.weight.detach())
    return None


def _norm_weight(norm: torch.nn.Module) -> torch.Tensor:
    weight: torch.Tensor = norm.weight  # type: ignore[assignment]
    return weight.detach()


def _padding_mask(kv: BatchKVCache, columns: int, device: Any) -> torch.Tensor | None:
    """``[rows, 1, 1, columns]``: True where a row may attend; ``None`` when no row has padding."""
    if not any(kv.starts):
        return None
    starts = torch.tensor(kv.starts, device=device).view(-1, 1, 1, 1)
    return torch.arange(columns, device=device).view(1, 1, 1, -1) >= starts
