"""The whole decode step as one compiled call: the separate calls' logits bit for bit, or not taken."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from engines.catalog import BaseSpec
from engines.forward.compiled import LoraStack, StepAdapters, StepPlan
from engines.forward.kernels import NativeKernels
from engines.forward.layout import fuse_projections
from engines.forward.lean import LeanDecoder
from engines.forward.multilora import LoraWeights, multilora_for
from engines.loader import load_base
from tests.conftest import TinyModels
from tests.engines.test_lean_decode import PROMPTS, assert_steps_match, build, filled_cache, lean_step, llama
from tests.engines.test_native import needs_compiler

pytestmark = needs_compiler


def fused_llama() -> Any:
    model = llama()
    fuse_projections(model)
    return model


def counting_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets one entry per compiled step run from now on."""
    runs: list[int] = []
    real_run = StepPlan.run

    def run(self: StepPlan, x: torch.Tensor, *args: Any) -> torch.Tensor:
        runs.append(x.shape[0])
        return real_run(self, x, *args)

    monkeypatch.setattr(StepPlan, "run", run)
    return runs


def test_the_compiled_step_matches_transformers_on_left_padded_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = counting_runs(monkeypatch)
    assert_steps_match(fused_llama(), PROMPTS, steps=12)  # 12 steps: the cache grows past its 8 columns
    assert runs == [len(PROMPTS)] * 12


def int8_model(tiny_models: TinyModels) -> Any:
    spec = BaseSpec(name="tiny", source=str(tiny_models.base), quantization="int8", dtype="float32")
    return load_base(spec).model


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_the_compiled_step_gives_the_separate_calls_logits_and_cache_bit_for_bit(
    precision: str, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fused_llama() if precision == "float32" else int8_model(tiny_models)
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None and decoder.plan is not None
    runs = counting_runs(monkeypatch)
    plan = decoder.plan
    with torch.inference_mode():
        compiled_kv, separate_kv = filled_cache(model, PROMPTS), filled_cache(model, PROMPTS)
        ids = torch.tensor([[p[-1]] for p in PROMPTS])
        for _ in range(10):  # past the cache's 8 columns: new buffers at new addresses
            decoder.plan = plan
            compiled = lean_step(decoder, compiled_kv, ids)
            decoder.plan = None
            separate = lean_step(decoder, separate_kv, ids)
            assert torch.equal(compiled, separate)
            ids = compiled.argmax(-1, keepdim=True)
    assert len(runs) == 10
    written = (
        slice(0, compiled_kv.rows),
        slice(None),
        slice(0, compiled_kv.length),
    )  # the rest is never read
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(compiled_kv.keys[layer][written], separate_kv.keys[layer][written])
        assert torch.equal(compiled_kv.values[layer][written], separate_kv.values[layer][written])


def random_adapter(model: Any, rank: int, seed: int) -> LoraWeights:
    """An adapter on all seven projections of every layer, large enough to change the answer."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ):
            a = torch.randn(rank, module.in_features, generator=generator) * 0.3
            modules[name] = (a, torch.randn(module.out_features, rank, generator=generator) * 0.3)
    return LoraWeights(modules)


def steps_three_ways(model: Any, slots: list[int], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One step of PROMPTS: compiled with ``slots``' adapter rows, separate calls with them, and base."""
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None and decoder.plan is not None
    plan, registry = decoder.plan, multilora_for(model)
    ids = torch.tensor([[p[-1]] for p in PROMPTS])
    runs = counting_runs(monkeypatch)
    results: dict[str, Any] = {}
    with torch.inference_mode():
        for name, rows, compiled in [
            ("compiled", slots, True),
            ("separate", slots, False),
            ("base", [], True),
        ]:
            decoder.plan = plan if compiled else None
            registry.set_rows(rows)
            results[name] = lean_step(decoder, filled_cache(model, PROMPTS), ids)
        registry.set_rows([])
    results["runs"] = len(runs)
    return results


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_adapter_rows_get_their_terms_inside_the_compiled_step(
    precision: str, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fused_llama() if precision == "float32" else int8_model(tiny_models)
    registry = multilora_for(model)
    first, second = (
        registry.add("a", random_adapter(model, 4, 1)),
        registry.add("b", random_adapter(model, 2, 2)),
    )
    results = steps_three_ways(model, [first, 0, second], monkeypatch)
    assert results["runs"] == 2  # adapter rows and base rows both ran compiled
    # The hooks' terms, summed in another order: float32 rounding apart.
    torch.testing.assert_close(results["compiled"], results["separate"], atol=1e-5, rtol=0)
    for row in (0, 2):
        assert not torch.allclose(results["compiled"][row], results["base"][row], atol=0.1)
    assert torch.equal(results["compiled"][1], results["base"][1])  # no adapter: nothing added


def model_and_base_step() -> tuple[Any, LeanDecoder, torch.Tensor, torch.Tensor]:
    """A fused model, its lean step, PROMPTS' last tokens and their logits before any hook."""
    model = fused_llama()
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None
    ids = torch.tensor([[p[-1]] for p in PROMPTS])
    with torch.inference_mode():
        return model, decoder, ids, lean_step(decoder, filled_cache(model, PROMPTS), ids)


def test_idle_adapter_hooks_keep_the_compiled_step_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _, before = model_and_base_step()
    multilora_for(model).add("a", random_adapter(model, 4, 1))  # attached, but no row of this batch uses it
    results = steps_three_ways(model, [0, 0, 0], monkeypatch)
    assert results["runs"] == 2
    assert torch.equal(results["compiled"], before)
    assert torch.equal(results["base"], before)


def test_a_hook_the_compiled_step_cannot_apply_keeps_the_separate_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, decoder, ids, before = model_and_base_step()
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda module, inputs, output: output * 2)
    runs = counting_runs(monkeypatch)
    with torch.inference_mode():
        hooked = lean_step(decoder, filled_cache(model, PROMPTS), ids)
    assert runs == []
    assert not torch.allclose(hooked, before)


def qwen2_with_biases() -> Any:
    model = build(Qwen2Config, Qwen2ForCausalLM)
    fuse_projections(model)
    return model


@pytest.mark.parametrize(
    "model_factory",
    [
        llama,  # q/k/v not fused: no one matrix to hand the compiled step
        qwen2_with_biases,  # q/k/v biases
        lambda: fused_llama().to(torch.bfloat16),  # the compiled kernels take float32 only
    ],
    ids=["unfused", "qkv-biases", "bf16"],
)
def test_the_plan_stays_off_for_weights_the_compiled_step_does_not_read(model_factory: Any) -> None:
    decoder = LeanDecoder.for_model(model_factory())  # the lean step itself still serves these
    assert decoder is not None and decoder.plan is None


def test_the_plan_stays_off_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NativeKernels, "load", lambda: None)
    decoder = LeanDecoder.for_model(fused_llama())
    assert decoder is not None and decoder.plan is None


def test_float32_steps_of_many_rows_stay_in_the_compiled_step() -> None:
    """One set of products at every batch size: a row's logits must not change with the batch."""
    model = fused_llama()
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None and decoder.plan is not None
    kv = filled_cache(model, PROMPTS)
    assert decoder.plan.takes(len(PROMPTS), kv.keys, kv.values, kv.length)
    assert decoder.plan.takes_rows(64)


def prepared_step() -> tuple[Any, StepPlan, Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A model, its plan, a cache with a column reserved, and activations, rotary factors and starts."""
    model = fused_llama()
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None and decoder.plan is not None
    kv = filled_cache(model, PROMPTS)
    kv.reserve(1)
    rows = len(kv.starts)
    x, factor = torch.zeros(rows, 64), torch.zeros(rows, decoder.head_dim)
    return model, decoder.plan, kv, x, factor, torch.tensor(kv.starts)


def test_a_step_the_compiled_call_cannot_take_runs_nothing_and_writes_nothing() -> None:
    model, plan, kv, x, factor, starts = prepared_step()
    before = [key.clone() for key in kv.keys]
    full = kv.keys[0].shape[2]
    assert plan.run(x, factor, factor, starts, kv.keys, kv.values, full, None) is None  # no column left
    assert plan.run(x, factor, factor, starts, kv.keys[:1], kv.values[:1], kv.length, None) is None
    odd = [torch.zeros(key.shape[0], key.shape[1], 4, key.shape[3]) for key in kv.keys]  # other layers' shape
    assert plan.run(x, factor, factor, starts, [kv.keys[0], *odd[1:]], kv.values, kv.length, None) is None
    registry = multilora_for(model)
    slot = registry.add("a", random_adapter(model, 2, 1))
    stack = registry._stacks["model.layers.0.mlp.down_proj"]
    beyond = StepAdapters(
        torch.tensor([0, slot + 1, 0]), [(None,) * 6 + (LoraStack(stack.a, stack.b),)] * 2, (0,)
    )
    assert plan.run(x, factor, factor, starts, kv.keys, kv.values, kv.length, beyond) is None
    # Bit for bit, unwritten cells included (compared as integers: an uninitialised NaN equals itself).
    assert all(
        torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(before, kv.keys, strict=True)
    )


def test_operands_the_compiled_step_cannot_read_raise_instead_of_reading_past_them() -> None:
    _, plan, kv, x, factor, starts = prepared_step()
    with pytest.raises(ValueError, match="activations"):
        plan.run(x.to(torch.bfloat16), factor, factor, starts, kv.keys, kv.values, kv.length)
    with pytest.raises(ValueError, match="rotary"):
        plan.run(x, factor[:, :8].contiguous(), factor, starts, kv.keys, kv.values, kv.length)
    with pytest.raises(ValueError, match="starts"):
        plan.run(x, factor, factor, starts[:1], kv.keys, kv.values, kv.length)
    with pytest.raises(ValueError, match="first column"):
        plan.run(x, factor, factor, starts - 1_000, kv.keys, kv.values, kv.length)


def test_an_adapter_added_between_steps_moves_the_stacks_and_the_step_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adding an adapter reallocates the stacks: the next step must read the new ones, and the old
    ones must not stay alive (uncounted memory) behind the decoder's or the plan's caches."""
    import weakref

    model, decoder, ids, _ = model_and_base_step()
    registry = multilora_for(model)
    first = registry.add("a", random_adapter(model, 2, 1))
    with torch.inference_mode():
        registry.set_rows([first, 0, first])
        lean_step(decoder, filled_cache(model, PROMPTS), ids)
        registry.set_rows([0, 0, 0])
        lean_step(decoder, filled_cache(model, PROMPTS), ids)  # a step with no adapter row
    old_stack = weakref.ref(registry._stacks["model.layers.0.mlp.down_proj"].a)
    second = registry.add("b", random_adapter(model, 4, 2))  # a higher rank: every stack reallocated
    assert old_stack() is None
    results = steps_three_ways(model, [second, first, 0], monkeypatch)
    assert results["runs"] == 2
    torch.testing.assert_close(results["compiled"], results["separate"], atol=1e-5, rtol=0)
