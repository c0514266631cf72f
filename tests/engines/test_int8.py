"""int8 bases on CPU: per-channel quantization, the loaders, the lean step, adapters served unmerged on top.

The reference for every answer is the same model with float32 weights equal to the int8 ones
dequantized (``q * scale``), and for adapters peft's own unmerged ``PeftModel`` on that base. The int8
kernel takes its activations in bf16 and returns bf16, so answers match the reference to bf16's
precision, not exactly: logits within 2% of their largest magnitude (measured: under 0.8%).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import engines.devices
from engines.catalog import BaseSpec
from engines.forward.int8 import Int8Embedding, Int8Linear, int8_matmul, quantize_rows_into
from engines.forward.kernels import NativeKernels
from engines.forward.lean import LeanDecoder
from engines.loader import LoadedModel, load_base, plan_base_load, tensor_bytes
from engines.testing.tiny import TinyShape, save_tiny_adapter, save_tiny_base
from tests.conftest import TinyModels

#: Logits may differ from the dequantized float32 reference by this share of their largest magnitude.
TOLERANCE = 0.02
PROMPTS = ([5, 17, 33, 80, 81, 200], [7, 7, 7, 120, 3], [250, 1, 64, 64, 9, 30, 31, 2])


def _int8_base(folder: Path, **overrides: Any) -> LoadedModel:
    spec = BaseSpec(name="tiny", source=str(folder), quantization="int8", dtype="float32", **overrides)
    return load_base(spec)


def _dequantized_reference(folder: Path, int8_model: Any) -> Any:
    """The float32 model whose weights are exactly what ``int8_model``'s int8 values stand for."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in int8_model.named_modules():
            if isinstance(module, Int8Linear | Int8Embedding):
                modules[name].weight.copy_(module.dequantized())
    return reference


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    limit = TOLERANCE * float(want.abs().max())
    assert float((got - want).abs().max()) <= limit
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_quantization_is_per_row_and_within_half_a_step() -> None:
    weight = torch.randn(40, 24) * torch.linspace(0.01, 3.0, 40)[:, None]
    qweight = torch.empty(40, 24, dtype=torch.int8)
    scales = torch.empty(40, dtype=torch.bfloat16)
    quantize_rows_into(weight, qweight, scales)
    dequantized = qweight.float() * scales.float()[:, None]
    assert int(qweight.abs().max()) <= 127
    assert torch.all((weight - dequantized).abs() <= scales.float()[:, None] * 0.5 + 1e-6)
    # Each row uses its own range: a row of small weights keeps its precision beside a row of large ones.
    assert float(scales[0]) < float(scales[-1]) / 100


def test_int8_matmul_matches_the_dequantized_product() -> None:
    weight = torch.randn(96, 64) * 0.05
    qweight = torch.empty(96, 64, dtype=torch.int8)
    scales = torch.empty(96, dtype=torch.bfloat16)
    quantize_rows_into(weight, qweight, scales)
    x = torch.randn(3, 5, 64)
    want = x @ (qweight.float() * scales.float()[:, None]).T
    got = int8_matmul(x, qweight, scales)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 96)
    assert float((got - want).abs().max()) <= TOLERANCE * float(want.abs().max())


def test_int8_base_holds_int8_weights_with_fused_groups(tiny_models: TinyModels) -> None:
    loaded = _int8_base(tiny_models.base)
    model = loaded.model
    layer = model.model.layers[0]
    assert loaded.quantization == "int8" and loaded.dtype == "float32"
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert isinstance(model.lm_head, Int8Linear)
    for projection in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert isinstance(projection, Int8Linear) and projection.qweight.dtype == torch.int8
    # q/k/v (and gate/up) are views of one buffer, so the lean step multiplies them at once.
    q, k = layer.self_attn.q_proj.qweight, layer.self_attn.k_proj.qweight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in model.parameters())
    plan = plan_base_load(BaseSpec(name="tiny", source=str(tiny_models.base), quantization="int8"), None)
    assert plan.resident_bytes == pytest.approx(tensor_bytes(model), rel=0.02)
    full = plan_base_load(BaseSpec(name="tiny", source=str(tiny_models.base), dtype="float32"), None)
    assert plan.resident_bytes < full.resident_bytes * 0.4


def test_int8_auto_takes_float32_activations_where_the_compiled_kernels_load(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even on a CPU with native bf16: only float32 activations reach the compiled int8 step.
    monkeypatch.setattr(engines.devices, "cpu_has_native_bf16", lambda: True)
    spec = BaseSpec(name="tiny", source=str(tiny_models.base), quantization="int8")
    monkeypatch.setattr(NativeKernels, "load", staticmethod(lambda: object()))
    compiled = plan_base_load(spec, None)
    assert compiled.dtype == "float32" and "compiled" in compiled.dtype_reason
    monkeypatch.setattr(NativeKernels, "load", staticmethod(lambda: None))
    torch_kernel = plan_base_load(spec, None)
    assert torch_kernel.dtype == "bfloat16" and "native bf16" in torch_kernel.dtype_reason
    # The budget counts the activations' dtype: float32 norms and biases cost more than bf16 ones.
    assert compiled.resident_bytes > torch_kernel.resident_bytes


def test_int8_logits_match_the_dequantized_float_model(tiny_models: TinyModels) -> None:
    loaded = _int8_base(tiny_models.base)
    reference = _dequantized_reference(tiny_models.base, loaded.model)
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            _close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_lean_step_on_int8_matches_the_transformers_forward(tiny_models: TinyModels) -> None:
    from transformers import DynamicCache

    from engines.forward.kvcache import BatchKVCache

    loaded = _int8_base(tiny_models.base)
    model = loaded.model
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None and decoder.layers[0].qkv is not None
    prompt = PROMPTS[0]
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, past_key_values=cache)
        kv = BatchKVCache.for_model(model, rows=1, max_columns=64)
        kv.add_row(cache)
        kv.reserve(1)
        lean = decoder.step(torch.tensor([[prompt[-1]]]), kv, kv.position_ids())
        full = model(input_ids=torch.tensor([prompt])).logits[:, -1]
    assert torch.allclose(lean, full, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_share_one_int8_table(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = save_tiny_base(tmp_path / "tied")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder, safe_serialization=True)
    loaded = _int8_base(folder)
    head, table = loaded.model.lm_head, loaded.model.model.embed_tokens
    assert isinstance(head, Int8Linear) and isinstance(table, Int8Embedding)
    assert head.qweight.data_ptr() == table.qweight.data_ptr()
    reference = _dequantized_reference(folder, loaded.model)
    with torch.inference_mode():
        ids = torch.tensor([PROMPTS[1]])
        _close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_fallback_load_quantizes_a_pickle_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = save_tiny_base(tmp_path / "pickled")
    model = AutoModelForCausalLM.from_pretrained(folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(folder, safe_serialization=False)
    loaded = _int8_base(folder)
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, Int8Linear)
    reference = _dequantized_reference(folder, loaded.model)
    with torch.inference_mode():
        ids = torch.tensor([PROMPTS[2]])
        _close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_unmerged_adapter_on_int8_matches_peft_on_the_dequantized_base(tmp_path: Path) -> None:
    from peft import PeftModel

    from engines.forward.multilora import load_lora_weights, multilora_for
    from engines.forward.run import adapter_rows

    base_folder = save_tiny_base(tmp_path / "base", TinyShape(num_hidden_layers=3))
    adapter = save_tiny_adapter(
        base_folder,
        tmp_path / "adapter",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        rank=8,
    )
    loaded = _int8_base(base_folder)
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    registry = multilora_for(loaded.model)
    slot = registry.add(
        "a", load_lora_weights(adapter / "adapter_model.safetensors", config, torch.float32, "cpu")
    )
    reference = PeftModel.from_pretrained(_dequantized_reference(base_folder, loaded.model), adapter).eval()

    class Row:  # what ``adapter_rows`` reads from a sequence
        model = LoadedModel(
            name="a",
            model=loaded.model,
            tokenizer=None,
            dtype="float32",
            device="cpu",
            context_length=64,
            eos_token_ids=frozenset(),
            nbytes=0,
            load_seconds=0.0,
            multilora=registry,
            adapter_slot=slot,
        )

    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            want = reference(input_ids=ids).logits
            with adapter_rows([Row()]):  # type: ignore[list-item]
                got = loaded.model(input_ids=ids).logits
            _close(got, want)
            without = loaded.model(input_ids=ids).logits
            assert float((without - want).abs().max()) > 10 * TOLERANCE * float(want.abs().max())


def _int8_engine(models: TinyModels, mode: str) -> Any:
    from engines.engine import Engine, EngineLimits

    return Engine(_int8_engine_catalog(models, mode), EngineLimits(max_batch=8, prefix_cache_bytes=0))


def _int8_engine_catalog(models: TinyModels, mode: str) -> Any:
    from engines.catalog import AdapterPolicy, AdapterSpec, Catalog

    return Catalog(
        bases=(
            BaseSpec(
                name="tiny",
                source=str(models.base),
                quantization="int8",
                context_length=256,
                adapter_mode=mode,
            ),
        ),
        adapters=(AdapterSpec(alias="lora", source=str(models.adapter), base="tiny"),),
        policy=AdapterPolicy(adapter_dirs=(models.adapter_dirs,), base_match="warn"),
    )


def test_auto_mode_never_promotes_an_adapter_into_int8_weights(
    tiny_models: TinyModels, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from engines.pool import MERGED_SUFFIX
    from tests.engines.test_scheduler import PROMPTS as TEXTS
    from tests.engines.test_scheduler import generate

    def promotions(engine: Any) -> tuple[list[str], list[str]]:
        """Four requests where two make an adapter busy; then every promotion started has settled."""
        engine.pool.merge_after = 2
        caplog.clear()

        async def scenario() -> list[str]:
            answers = [await generate(engine, "tiny+lora", TEXTS[0]) for _ in range(4)]
            # A promotion is decided inline, on the request that makes the adapter busy, and runs as a
            # task of the pool: once none is pending, whatever was started is in the pool's entries.
            pending = list(engine.pool._promotions)
            await asyncio.gather(*pending, return_exceptions=True)
            return answers

        with caplog.at_level(logging.INFO, logger="peft_gateway.pool"):
            answers = asyncio.run(scenario())
        started = [r.getMessage() for r in caplog.records if "promoting busy adapter" in r.getMessage()]
        assert len(set(answers)) == 1
        return started, [entry.key for entry in engine.pool.entries() if entry.key.endswith(MERGED_SUFFIX)]

    # The scenario promotes an unmerged adapter on a float base ...
    float_engine = make_float_engine(tiny_models)
    try:
        started, merged = promotions(float_engine)
        assert started and merged, (started, merged)
    finally:
        float_engine.close()
    # ... and never on an int8 one: no promotion is even started.
    engine = _int8_engine(tiny_models, "auto")
    try:
        assert promotions(engine) == ([], [])
    finally:
        engine.close()


def make_float_engine(models: TinyModels) -> Any:
    """``_int8_engine``'s catalog with float32 weights instead."""
    from dataclasses import replace

    from engines.engine import Engine, EngineLimits

    catalog = _int8_engine_catalog(models, "auto")
    float_base = replace(catalog.bases[0], quantization="none", dtype="float32")
    return Engine(replace(catalog, bases=(float_base,)), EngineLimits(max_batch=8, prefix_cache_bytes=0))


def test_rows_on_different_adapters_share_an_int8_batch_and_answer_as_alone(tiny_models: TinyModels) -> None:
    import asyncio

    from tests.engines.test_scheduler import PROMPTS as TEXTS
    from tests.engines.test_scheduler import generate

    engine = _int8_engine(tiny_models, "multi")
    models = ["tiny", "tiny+lora", "tiny+other-base-lora"]
    try:

        async def scenario() -> tuple[list[str], list[str]]:
            alone = [await generate(engine, model, TEXTS[1]) for model in models]
            together = await asyncio.gather(*(generate(engine, model, TEXTS[1]) for model in models))
            return alone, list(together)

        alone, together = asyncio.run(scenario())
        assert together == alone
        assert len(set(alone)) == 3  # each adapter changes the answer
    finally:
        engine.close()


def test_qkv_biases_stay_float_beside_int8_weights(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engines.testing.tiny import build_byte_tokenizer
    from tests.engines.test_lean_decode import SHAPE, build

    folder = tmp_path / "qwen2"
    model = build(Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=False)
    model.save_pretrained(folder, safe_serialization=True)
    build_byte_tokenizer().save_pretrained(folder)
    loaded = _int8_base(folder)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int8Linear) and q_proj.bias is not None
    assert torch.equal(q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
    assert LeanDecoder.for_model(loaded.model) is not None
    reference = _dequantized_reference(folder, loaded.model)
    with torch.inference_mode():
        ids = torch.tensor([[token % SHAPE["vocab_size"] for token in PROMPTS[0]]])
        _close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)
