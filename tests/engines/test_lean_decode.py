"""The lean decode step reproduces transformers' forward pass on the batched KV cache, or stays off."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest
import torch
from transformers import (
    DynamicCache,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from engines.forward.kvcache import BatchKVCache
from engines.forward.layout import fuse_projections, unsupported_reason
from engines.forward.lean import LeanDecoder, rotation_matrices
from engines.forward.multilora import LoraWeights, multilora_for
from engines.forward.run import ONEDNN_MIN_ROWS_BF16, decode_kernels
from engines.loader import tensor_bytes
from engines.testing.tiny import TinyShape

SHAPE: dict[str, Any] = {**asdict(TinyShape()), "vocab_size": 97}


def build(config_class: Any, model_class: Any, **extra: Any) -> Any:
    torch.manual_seed(0)
    model = model_class(config_class(**SHAPE, **extra)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 or name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


def llama(**extra: Any) -> Any:
    return build(LlamaConfig, LlamaForCausalLM, **extra)


def filled_cache(model: Any, prompts: list[list[int]]) -> BatchKVCache:
    """A batch cache holding ``prompts`` prefilled by transformers, rows left-padded to one column."""
    kv = BatchKVCache.for_model(model, rows=2, columns=8)
    for prompt in prompts:
        prefill = DynamicCache()
        model(input_ids=torch.tensor([prompt]), past_key_values=prefill, use_cache=True)
        kv.add_row(prefill)
    return kv


def reference_step(model: Any, kv: BatchKVCache, ids: torch.Tensor) -> torch.Tensor:
    kv.reserve(1)
    logits = model(
        input_ids=ids,
        attention_mask=kv.attention_mask(),
        position_ids=kv.position_ids(),
        past_key_values=kv,
        use_cache=True,
    ).logits[:, -1]
    kv.advance()
    return logits


def lean_step(decoder: LeanDecoder, kv: BatchKVCache, ids: torch.Tensor) -> torch.Tensor:
    kv.reserve(1)
    logits = decoder.step(ids, kv, kv.position_ids())
    kv.advance()
    return logits


PROMPTS = [[5, 9, 14, 3, 7, 7, 21], [40, 2], [11, 12, 13, 14]]


def assert_steps_match(model: Any, prompts: list[list[int]], steps: int = 6, atol: float = 1e-5) -> None:
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None
    with torch.inference_mode():
        expected_kv, lean_kv = filled_cache(model, prompts), filled_cache(model, prompts)
        ids = torch.tensor([[p[-1]] for p in prompts])
        for _ in range(steps):
            expected = reference_step(model, expected_kv, ids)
            actual = lean_step(decoder, lean_kv, ids)
            torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
            assert torch.equal(actual.argmax(-1), expected.argmax(-1))
            ids = expected.argmax(-1, keepdim=True)
        assert (lean_kv.length, lean_kv.starts) == (expected_kv.length, expected_kv.starts)
        written = (slice(0, lean_kv.rows), slice(None), slice(0, lean_kv.length))  # the rest is never read
        for layer in range(model.config.num_hidden_layers):
            for lean, reference in ((lean_kv.keys, expected_kv.keys), (lean_kv.values, expected_kv.values)):
                torch.testing.assert_close(lean[layer][written], reference[layer][written], atol=atol, rtol=0)


def test_lean_step_matches_transformers_on_a_left_padded_llama_batch() -> None:
    assert_steps_match(llama(), PROMPTS, steps=12)  # 12 steps: the cache grows past its 8 columns


def test_lean_step_matches_transformers_for_one_row_without_padding() -> None:
    assert_steps_match(llama(), [PROMPTS[0]])


def test_lean_step_matches_transformers_with_scaled_rope_and_tied_embeddings() -> None:
    model = llama(
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    assert_steps_match(model, PROMPTS)


def test_lean_step_matches_transformers_on_qwen2_with_qkv_biases() -> None:
    model = build(Qwen2Config, Qwen2ForCausalLM)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert_steps_match(model, PROMPTS)


def test_lean_step_matches_transformers_on_mistral_without_sliding_window() -> None:
    assert_steps_match(build(MistralConfig, MistralForCausalLM, sliding_window=None), PROMPTS)


def test_lean_step_in_bf16_stays_within_bf16_rounding_of_transformers_bf16() -> None:
    # Same arithmetic, but the kernels may sum in another order: bounded by a few bf16 ulps of the logits.
    assert_steps_match(llama().to(torch.bfloat16), PROMPTS, atol=0.05)


def test_lean_step_applies_unmerged_multilora_rows() -> None:
    model = llama()
    torch.manual_seed(3)
    module = "model.layers.0.self_attn.q_proj"
    weights = LoraWeights({module: (torch.randn(4, 64) * 0.3, torch.randn(64, 4) * 0.3)})
    registry = multilora_for(model)
    slot = registry.add("a", weights)
    registry.set_rows([slot, 0, slot])
    try:
        assert_steps_match(model, PROMPTS)
    finally:
        registry.set_rows([])
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None
    with torch.inference_mode():  # and the adapter really changed the answer
        with_rows, plain = filled_cache(model, PROMPTS), filled_cache(model, PROMPTS)
        ids = torch.tensor([[p[-1]] for p in PROMPTS])
        registry.set_rows([slot, 0, slot])
        adapted = lean_step(decoder, with_rows, ids)
        registry.set_rows([])
        base = lean_step(decoder, plain, ids)
    assert not torch.allclose(adapted[0], base[0])
    torch.testing.assert_close(adapted[1], base[1])


@pytest.mark.parametrize(
    ("model_factory", "reason"),
    [
        (lambda: build(GemmaConfig, GemmaForCausalLM, head_dim=16), "architecture 'gemma'"),
        (lambda: build(MistralConfig, MistralForCausalLM, sliding_window=4), "sliding-window"),
        (lambda: llama(hidden_act="gelu"), "activation"),
    ],
)
def test_lean_step_stays_off_where_it_would_differ(model_factory: Any, reason: str) -> None:
    model = model_factory()
    assert reason in (unsupported_reason(model) or "")
    assert LeanDecoder.for_model(model) is None


def test_lean_step_stays_off_for_layers_still_wrapped_by_peft() -> None:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "not a plain or int8 linear layer" in (unsupported_reason(wrapped.base_model.model) or "")


def test_decode_kernels_leave_onednn_off_only_for_a_few_bf16_rows_on_cpu() -> None:
    assert torch.backends.mkldnn.enabled
    with decode_kernels(torch.bfloat16, "cpu", 1):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled
    for dtype, rows in [(torch.bfloat16, ONEDNN_MIN_ROWS_BF16), (torch.float32, 1)]:
        with decode_kernels(dtype, "cpu", rows):
            assert torch.backends.mkldnn.enabled


def test_decode_kernels_restore_onednn_after_an_error() -> None:
    with pytest.raises(RuntimeError), decode_kernels(torch.bfloat16, "cpu", 2):
        raise RuntimeError("forward failed")
    assert torch.backends.mkldnn.enabled


def test_fused_projections_keep_memory_and_logits_and_fuse_the_lean_step() -> None:
    model = llama()
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    bytes_before = tensor_bytes(model)
    assert fuse_projections(model) == model.config.num_hidden_layers
    assert tensor_bytes(model) == bytes_before
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None
    assert all(layer.qkv is not None and layer.gate_up is not None for layer in decoder.layers)
    assert_steps_match(model, PROMPTS)


def test_fused_projections_with_qkv_biases_match_transformers() -> None:
    model = build(Qwen2Config, Qwen2ForCausalLM)
    fuse_projections(model)
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None and decoder.layers[0].qkv is not None
    assert decoder.layers[0].qkv.bias is not None  # the biases are fused too
    assert_steps_match(model, PROMPTS)


def test_a_layer_whose_weight_was_replaced_falls_back_to_separate_projections() -> None:
    model = llama()
    fuse_projections(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = torch.nn.Parameter(q_proj.weight.detach() * 1.5, requires_grad=False)  # a merged LoRA
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None
    assert decoder.layers[0].qkv is None and decoder.layers[1].qkv is not None
    assert_steps_match(model, PROMPTS)


def test_float32_products_use_onednn_where_the_build_has_it() -> None:
    from engines.forward.lean import ONEDNN_FLOAT32, dense_linear

    assert torch.backends.mkldnn.is_available() == ONEDNN_FLOAT32
    x, weight, bias = torch.randn(8, 1, 64), torch.randn(96, 64), torch.randn(96)
    fused_member = weight[32:]  # a view into a fused group's buffer, as the lean step passes them
    torch.testing.assert_close(dense_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    torch.testing.assert_close(dense_linear(x, fused_member, None), x @ fused_member.T)
    half = dense_linear(x.bfloat16(), weight.bfloat16(), None)  # other dtypes keep F.linear
    assert torch.equal(half, torch.nn.functional.linear(x.bfloat16(), weight.bfloat16()))


def test_rotation_matrices_rotate_like_transformers_rotary_embedding() -> None:
    from transformers.models.llama.modeling_llama import rotate_half

    torch.manual_seed(0)
    angles = torch.rand(3, 8) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    heads = torch.randn(3, 5, 16)
    expected = heads * cos[:, None] + rotate_half(heads) * sin[:, None]
    torch.testing.assert_close(torch.bmm(heads, rotation_matrices(cos, sin)), expected, atol=1e-6, rtol=0)
