"""The seed's real-size decisions, proven at small scale with budgets set to force them.

A 7B base, its all-projection adapter and a full-context KV cache cannot fit in CI, so each test gives
the pool a budget sized from the tiny model's own numbers: a base that does not fit, a merged copy
that does not fit, a KV cache that does not fit, and a load whose peak is measured in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import engines.devices
from engines.adapters.variants import estimate_merge_bytes
from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.engine import Engine, EngineLimits
from engines.errors import InsufficientMemory
from engines.forward.kernels import NativeKernels
from engines.loader import BasePlan, LoadedModel, load_base, plan_base_load
from engines.memory import MemoryBudget, MemoryBudgets
from engines.names import ModelName
from engines.pool import ModelPool
from engines.sampling import SamplingParams
from engines.testing.shaped import LlamaShape, write_llama_checkpoint, write_pickle_lora
from tests.conftest import TinyModels
from tests.engines.test_scheduler import PROMPTS, generate

GREEDY = SamplingParams(temperature=0.0)


def tiny_catalog(models: TinyModels, mode: str = "merge", dtype: str = "float32") -> Catalog:
    return Catalog(
        bases=(
            BaseSpec(
                name="tiny",
                source=str(models.base),
                dtype=dtype,
                context_length=256,
                adapter_mode=mode,
                aliases=("test-org/tiny-base",),
            ),
        ),
        adapters=(AdapterSpec(alias="lora", source=str(models.adapter), base="tiny"),),
        policy=AdapterPolicy(adapter_dirs=(models.adapter_dirs,)),
    )


def base_bytes(models: TinyModels) -> int:
    return plan_base_load(tiny_catalog(models).bases[0], None).peak_bytes


def test_default_budget_comes_from_the_machine_minus_headroom() -> None:
    budget = MemoryBudget.for_device("cpu")
    assert budget.total > 0 and "headroom" in budget.source
    assert MemoryBudget.for_device("cpu", configured=123).total == 123


def test_a_base_larger_than_the_budget_is_refused_before_loading_and_says_what_to_change(
    tiny_models: TinyModels,
) -> None:
    loads: list[str] = []

    def loader(spec: BaseSpec, plan: BasePlan) -> LoadedModel:
        loads.append(spec.name)
        return load_base(spec, plan)

    budgets = MemoryBudgets(configured=base_bytes(tiny_models) // 2)
    pool = ModelPool(tiny_catalog(tiny_models), budgets=budgets, base_loader=loader)
    with pytest.raises(InsufficientMemory) as refused:
        asyncio.run(pool.acquire(ModelName.parse("tiny")))
    message = str(refused.value)
    for hint in ("needs about", "budget", "dtype", "adapter_mode", "max_memory"):
        assert hint in message
    assert loads == [] and pool.entries() == []


def test_auto_dtype_is_float32_only_where_it_is_faster_and_fits(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tiny_catalog(tiny_models, dtype="auto").bases[0]
    monkeypatch.setattr(engines.devices, "cpu_has_native_bf16", lambda: False)
    roomy = plan_base_load(spec, 2**40)
    assert roomy.dtype == "float32" and "fits" in roomy.dtype_reason
    tight = plan_base_load(spec, roomy.resident_bytes)  # the weights fit, but no room to serve
    assert tight.dtype == "bfloat16" and "budget" in tight.dtype_reason
    assert tight.resident_bytes * 2 == roomy.resident_bytes
    monkeypatch.setattr(engines.devices, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(NativeKernels, "load", lambda: object())
    # Native bf16, but the compiled float32 step is there: float32, where it fits.
    native = plan_base_load(spec, 2**40)
    assert native.dtype == "float32" and "compiled float32 step" in native.dtype_reason
    assert plan_base_load(spec, roomy.resident_bytes).dtype == "bfloat16"
    monkeypatch.setattr(NativeKernels, "load", lambda: None)  # no compiler: torch's bf16 kernels are faster
    without = plan_base_load(spec, 2**40)
    assert without.dtype == "bfloat16" and "native bf16" in without.dtype_reason


def test_the_dtype_choice_and_its_reason_are_kept_on_the_loaded_model(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines.devices, "cpu_has_native_bf16", lambda: False)
    budgets = MemoryBudgets(configured=int(base_bytes(tiny_models) * 1.2))
    pool = ModelPool(tiny_catalog(tiny_models, dtype="auto"), budgets=budgets)

    async def scenario() -> None:
        lease = await pool.acquire(ModelName.parse("tiny"))
        assert lease.loaded.dtype == "bfloat16" and "budget" in lease.loaded.dtype_reason
        lease.release()

    asyncio.run(scenario())


def test_a_merged_copy_that_does_not_fit_is_served_unmerged_with_the_same_logits(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    import torch

    ids = torch.tensor([[5, 17, 99, 3, 42]])

    async def variant(pool: ModelPool) -> tuple[LoadedModel, torch.Tensor]:
        lease = await pool.acquire(ModelName.parse("tiny+lora"))
        loaded = lease.loaded
        with torch.inference_mode():
            if loaded.multilora is not None:
                with loaded.multilora.lock:
                    loaded.multilora.set_rows([loaded.adapter_slot])
                    logits = loaded.model(input_ids=ids).logits
                    loaded.multilora.set_rows([])
            else:
                logits = loaded.model(input_ids=ids).logits
        lease.release()
        return loaded, logits

    from engines.testing.shaped import LLAMA_PROJECTIONS
    from engines.testing.tiny import save_tiny_adapter

    # Every projection: the merged copy is most of the model, as FlagAlpha's adapter is on Llama-2-7B.
    everywhere = save_tiny_adapter(
        tiny_models.base,
        tmp_path / "all-projections",
        target_modules=LLAMA_PROJECTIONS,
        base_model_name_or_path="test-org/tiny-base",
    )
    catalog = tiny_catalog(tiny_models)
    catalog = Catalog(catalog.bases, (AdapterSpec(alias="lora", source=str(everywhere), base="tiny"),))
    roomy = ModelPool(catalog)
    merged, expected = asyncio.run(variant(roomy))
    assert merged.serving == "merged"
    merge_need = estimate_merge_bytes_for(roomy, everywhere)
    budget = base_bytes(tiny_models) + merge_need // 2
    tight = ModelPool(catalog, budgets=MemoryBudgets(configured=budget))
    unmerged, logits = asyncio.run(variant(tight))
    assert unmerged.serving == "unmerged" and "merged copy needs" in unmerged.serving_reason
    assert torch.allclose(logits, expected, atol=1e-5)
    assert tight.bytes_held <= budget


def estimate_merge_bytes_for(pool: ModelPool, adapter: Path) -> int:
    from engines.adapters.files import AdapterRef, read_adapter_files

    base = next(e.loaded for e in pool.entries() if e.base_key is None)
    ref = AdapterRef(kind="local", source=str(adapter))
    return estimate_merge_bytes(read_adapter_files(ref, adapter, AdapterPolicy()), base)


def test_a_pickle_only_adapter_is_served_unmerged_in_multi_mode(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "adapters" / "pickled"
    folder.parent.mkdir()
    import shutil

    shutil.copytree(tiny_models.adapter, folder)
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    catalog = tiny_catalog(tiny_models, mode="multi")
    catalog = Catalog(catalog.bases, catalog.adapters, AdapterPolicy(adapter_dirs=(folder.parent,)))
    engine = Engine(catalog, EngineLimits(prefix_cache_bytes=0))
    try:
        pickled = asyncio.run(generate(engine, "tiny+pickled", PROMPTS[0]))
        safe = asyncio.run(generate(engine, "tiny+lora", PROMPTS[0]))
        assert pickled == safe
        assert {e.loaded.serving for e in engine.pool.entries() if e.base_key} == {"unmerged"}
    finally:
        engine.close()


def test_a_kv_cache_that_can_never_fit_is_refused_with_what_to_change(tiny_models: TinyModels) -> None:
    limits = EngineLimits(prefix_cache_bytes=0, max_memory_bytes=base_bytes(tiny_models) + 4096)
    engine = Engine(tiny_catalog(tiny_models), limits)

    async def scenario() -> None:
        lease = await engine.acquire("tiny")
        try:
            request = engine.text_request(lease, PROMPTS[1], max_tokens=200, sampling=GREEDY)
            events = [event async for event in engine.generate(lease, request)]
        finally:
            lease.release()
        error = events[-1].error
        assert isinstance(error, InsufficientMemory)
        assert "KV cache" in str(error) and "max_tokens" in str(error)

    try:
        asyncio.run(scenario())
        assert engine.budgets.for_device("cpu").kv == 0
    finally:
        engine.close()


def test_requests_whose_kv_caches_fit_only_one_at_a_time_wait_and_all_finish(tiny_models: TinyModels) -> None:
    roomy = Engine(tiny_catalog(tiny_models), EngineLimits(prefix_cache_bytes=0))
    try:
        expected = [asyncio.run(generate(roomy, "tiny", p, n=40)) for p in PROMPTS[:3]]
    finally:
        roomy.close()
    from engines.kv_budget import batch_bound, kv_bytes_per_token

    probe = Engine(tiny_catalog(tiny_models), EngineLimits())
    lease = asyncio.run(probe.acquire("tiny"))
    per_token = kv_bytes_per_token(lease.loaded.model)
    layers = lease.loaded.model.config.num_hidden_layers
    lease.release()
    probe.close()
    one = batch_bound(per_token, layers, 1, 300, 257) + per_token * 40
    limits = EngineLimits(prefix_cache_bytes=0, max_memory_bytes=base_bytes(tiny_models) + int(one * 1.5))
    engine = Engine(tiny_catalog(tiny_models), limits)
    budget = engine.budgets.for_device("cpu")
    seen: list[int] = []
    original = budget.try_set_kv

    def recording(nbytes: int) -> bool:
        taken = original(nbytes)
        seen.append(budget.weights + budget.kv)
        return taken

    budget.try_set_kv = recording  # type: ignore[method-assign]
    try:

        async def together() -> list[str]:
            return await asyncio.gather(*(generate(engine, "tiny", p, n=40) for p in PROMPTS[:3]))

        assert asyncio.run(together()) == expected
        assert max(seen) <= budget.total
    finally:
        engine.close()


@pytest.mark.slow
def test_load_peak_stays_within_its_estimate_and_1_15x_the_weights(tmp_path: Path) -> None:
    folder = _load_test_checkpoint(tmp_path)
    for dtype in ("bfloat16", "float32"):
        result = _measure_load(folder, dtype, "none")
        grown = result["peak"] - result["before"]
        assert result["estimate_resident"] <= result["resident"] <= 1.01 * result["estimate_resident"]
        # Module objects and the tokenizer cost a few tens of MB whatever the size: the headroom's share.
        assert grown <= result["estimate_peak"] + 64 * 2**20, result
        assert grown <= 1.15 * result["resident"], result


@pytest.mark.slow
def test_an_int8_load_never_holds_the_full_precision_model(tmp_path: Path) -> None:
    folder = _load_test_checkpoint(tmp_path)
    half = _measure_load(folder, "bfloat16", "none")
    result = _measure_load(folder, "float32", "int8")
    grown = result["peak"] - result["before"]
    # What the budget counts is what the int8 model holds: a quarter of float32, half of bf16.
    assert result["resident"] <= 1.01 * result["estimate_resident"], result
    assert result["resident"] <= 0.55 * half["resident"], (result, half)
    # The peak: the int8 weights, one tensor read in its stored dtype and a block of rows in float32.
    # Holding the bf16 model at any point would add its whole size to the int8 one.
    assert grown <= result["estimate_peak"] + 64 * 2**20, result
    assert grown < result["resident"] + 0.5 * half["resident"], (result, half)


def _load_test_checkpoint(tmp_path: Path) -> Path:
    shape = LlamaShape(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8000,  # layers dominate, as at 7B, where one tensor's cast temporary is 1% of the weights
    )
    # An unpadded tokenizer: 32k added tokens would cost the test more memory than the weights' slack.
    return write_llama_checkpoint(tmp_path / "base", shape, shard_bytes=64 * 2**20, pad_tokenizer=False)


def _measure_load(folder: Path, dtype: str, quantization: str) -> dict[str, int]:
    completed = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, str(folder), dtype, quantization],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, int] = json.loads(completed.stdout.splitlines()[-1])
    return result


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large pytest process would
# start from the parent's peak.
PEAK_PROBE = """
import json, sys
from transformers import AutoTokenizer
from engines.catalog import BaseSpec
from engines.loader import load_base, plan_base_load
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
folder, dtype, quantization = sys.argv[1], sys.argv[2], sys.argv[3]
spec = BaseSpec(name='m', source=folder, dtype=dtype, quantization=quantization)
plan = plan_base_load(spec, None)
AutoTokenizer.from_pretrained(folder)
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # imports before the baseline
before = rss()
loaded = load_base(spec, plan)
peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
print(json.dumps({'before': before, 'peak': peak, 'resident': loaded.nbytes,
                  'estimate_resident': plan.resident_bytes, 'estimate_peak': plan.peak_bytes}))
"""


def test_a_flagalpha_shaped_pickle_adapter_passes_every_check(tmp_path: Path) -> None:
    shape = LlamaShape(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=300,
    )
    folder = write_pickle_lora(tmp_path / "a", shape)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 32 and len(config["target_modules"]) == 7
    assert not (folder / "adapter_model.safetensors").exists()
    import torch

    # Through the pool's real checks (config, weights-only unpickling, strict base match against the
    # name it declares, tensor ranks and shapes against a base of its shape), merged and unmerged.
    base = write_llama_checkpoint(tmp_path / "base", shape, dtype="float32", pad_tokenizer=False)
    spec = BaseSpec(
        name="llama", source=str(base), dtype="float32", aliases=("meta-llama/Llama-2-7b-chat-hf",)
    )
    adapter = AdapterSpec(alias="flagalpha", source=str(folder), base="llama")
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    logits = {}
    for mode in ("merge", "multi"):
        catalog = Catalog((replace(spec, adapter_mode=mode),), (adapter,), AdapterPolicy(base_match="strict"))
        pool = ModelPool(catalog)
        for name in ("llama", "llama+flagalpha"):
            logits[mode, name] = asyncio.run(_logits(pool, name, ids))
        served = {e.loaded.serving for e in pool.entries() if e.base_key}
        assert served == {"merged" if mode == "merge" else "unmerged"}
    assert torch.equal(logits["merge", "llama"], logits["multi", "llama"])
    assert not torch.allclose(logits["merge", "llama+flagalpha"], logits["merge", "llama"], atol=1e-4)
    assert torch.allclose(logits["merge", "llama+flagalpha"], logits["multi", "llama+flagalpha"], atol=1e-4)


async def _logits(pool: ModelPool, name: str, ids: Any) -> Any:
    """The logits of ``ids`` through ``name`` as the pool serves it (its adapter slot set if unmerged)."""
    import torch

    lease = await pool.acquire(ModelName.parse(name))
    loaded = lease.loaded
    try:
        with torch.inference_mode():
            if loaded.multilora is None:
                return loaded.model(input_ids=ids).logits
            with loaded.multilora.lock:
                loaded.multilora.set_rows([loaded.adapter_slot])
                try:
                    return loaded.model(input_ids=ids).logits
                finally:
                    loaded.multilora.set_rows([])
    finally:
        lease.release()
