"""The compiled int8 kernel: float32-exact products where it builds, torch's kernel wherever it cannot."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.forward.int8 import dequantize, int8_matmul
from engines.forward.kernels import SWITCH, NativeKernels, build

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="no C compiler or no AVX2 on this machine",
)


@pytest.fixture
def fresh_kernel() -> Iterator[None]:
    """Each test loads the kernel under its own environment; later tests get the default one back."""
    NativeKernels.load.cache_clear()
    yield
    NativeKernels.load.cache_clear()


def int8_operands(rows: int, channels: int, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows * 1000 + columns)
    x = torch.randn(rows, columns, generator=generator)
    qweight = torch.randint(-127, 128, (channels, columns), dtype=torch.int8, generator=generator)
    scales = (torch.rand(channels, generator=generator) / 50).to(torch.bfloat16)
    return x, qweight, scales


def relative_error(got: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> float:
    want = x @ dequantize(qweight, scales).T
    return float((got - want).abs().max() / want.abs().max())


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("columns", [8, 72, 576])
def test_native_kernel_gives_the_dequantized_product_in_float32(
    fresh_kernel: None, rows: int, columns: int
) -> None:
    kernel = NativeKernels.load()
    assert kernel is not None
    x, qweight, scales = int8_operands(rows, 13, columns)
    assert kernel.takes_int8(x, qweight, scales)
    assert relative_error(kernel.int8(x, qweight, scales), x, qweight, scales) < 1e-6


@needs_compiler
def test_int8_products_keep_float32_activations_where_the_kernel_is_built(fresh_kernel: None) -> None:
    """torch's kernel rounds activations to bf16 (~3e-3 here); the compiled one does not."""
    x, qweight, scales = int8_operands(3, 40, 64)
    assert relative_error(int8_matmul(x, qweight, scales), x, qweight, scales) < 1e-6
    batched = int8_matmul(x.view(1, 3, 64), qweight, scales)  # 3-D input, as transformers' forward gives
    assert relative_error(batched.view(3, 40), x, qweight, scales) < 1e-6


def test_without_a_compiler_int8_products_fall_back_to_torchs_kernel(
    fresh_kernel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PEFT_GATEWAY_HOME", str(tmp_path))
    assert NativeKernels.load() is None
    x, qweight, scales = int8_operands(2, 16, 64)
    error = relative_error(int8_matmul(x, qweight, scales), x, qweight, scales)
    assert 1e-5 < error < 2e-2  # bf16 activations: torch's kernel answered


def test_a_failing_build_leaves_no_library_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.raises(OSError, match="broken compiler"):
        build(tmp_path / "native")
    assert not any(path.suffix == ".so" for path in (tmp_path / "native").rglob("*"))


def test_the_switch_turns_the_kernel_off(fresh_kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWITCH, "0")
    assert NativeKernels.load() is None


@needs_compiler
def test_the_library_is_built_once_and_reused(tmp_path: Path) -> None:
    first = build(tmp_path)
    built_at = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == built_at


@needs_compiler
def test_shapes_the_kernel_does_not_take_go_to_torchs_kernel(fresh_kernel: None) -> None:
    kernel = NativeKernels.load()
    assert kernel is not None
    x, qweight, scales = int8_operands(2, 16, 64)
    strided = torch.cat([x, x], dim=1)[:, :64]  # not contiguous
    assert not kernel.takes_int8(strided, qweight, scales)
    assert not kernel.takes_int8(x.to(torch.bfloat16), qweight, scales)
    assert not kernel.takes_int8(*int8_operands(2, 16, 12))  # 12 columns: not a multiple of 8
    assert not kernel.takes_int8(x, qweight, scales[:8])  # a scale missing: never read past the end
    error = relative_error(int8_matmul(strided, qweight, scales), x, qweight, scales)
    assert 1e-5 < error < 2e-2  # bf16 activations: torch's kernel answered


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_native_dense_kernel_gives_the_float32_product(fresh_kernel: None, rows: int) -> None:
    kernels = NativeKernels.load()
    assert kernels is not None
    x, weight = torch.randn(rows, 96), torch.randn(24, 96)
    assert kernels.takes_dense(x, weight)
    want = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(kernels.dense(x, weight), want, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("kind", ["float32", "int8"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(
    fresh_kernel: None, kind: str, with_residual: bool
) -> None:
    """Bit for bit, whatever block of rows it falls in: greedy answers must not change with the batch."""
    kernels = NativeKernels.load()
    assert kernels is not None
    x, qweight, scales = int8_operands(9, 40, 136)  # 136 columns: the kernel's tail loop runs too
    weight = torch.randn(40, 136, generator=torch.Generator().manual_seed(7))
    residual = torch.randn(9, 40) if with_residual else None

    def product(rows: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
        if kind == "int8":
            return kernels.int8(rows, qweight, scales, add=add)
        return kernels.dense(rows, weight, add=add)

    alone = [
        product(x[r : r + 1].clone(), residual[r : r + 1].clone() if residual is not None else None)[0]
        for r in range(9)
    ]
    for rows in range(1, 10):
        together = product(x[:rows].clone(), residual[:rows].clone() if residual is not None else None)
        for r in range(rows):
            assert torch.equal(together[r], alone[r]), (rows, r)


@needs_compiler
def test_other_dtypes_keep_torchs_dense_products_and_many_rows_take_the_compiled_one(
    fresh_kernel: None,
) -> None:
    kernels = NativeKernels.load()
    assert kernels is not None
    weight = torch.randn(24, 96)
    assert kernels.takes_dense(torch.randn(64, 96), weight)  # one kernel at every batch size
    assert not kernels.takes_dense(torch.randn(2, 96).bfloat16(), weight.bfloat16())
    assert not kernels.takes_dense(torch.randn(2, 1, 96), weight)  # 3-D: transformers' own forward


@needs_compiler
def test_the_lean_step_multiplies_through_the_native_kernels(
    fresh_kernel: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's float32 products go through the compiled kernel and its logits stay transformers'.

    This is the separate-call step (the whole-step call, tested in test_native_step, is turned off),
    which serves where that one does not apply.
    """
    from engines.forward.layout import fuse_projections
    from engines.forward.lean import LeanDecoder
    from tests.engines.test_lean_decode import PROMPTS, assert_steps_match, llama

    calls = {"dense": 0, "rms_norm": 0, "attention": 0, "rotary_kv": 0, "silu_mul": 0}

    def counting(name: str) -> Any:
        kernel = getattr(NativeKernels, name)

        def counted(self: NativeKernels, *args: Any, **options: Any) -> torch.Tensor:
            calls[name] += 1
            return kernel(self, *args, **options)

        return counted

    for name in calls:
        monkeypatch.setattr(NativeKernels, name, counting(name))
    monkeypatch.setattr(LeanDecoder, "_compiled_plan", lambda self: None)
    model = llama()
    fuse_projections(model)  # q/k/v as one product, whose output the rotary kernel reads
    assert_steps_match(model, PROMPTS)  # left-padded rows: the attention kernel's starts matter
    assert all(count > 0 for count in calls.values()), calls


@needs_compiler
def test_native_rms_norm_is_transformers_float32_norm(fresh_kernel: None) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    kernels = NativeKernels.load()
    assert kernels is not None
    norm = LlamaRMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(5, 96) * 3
    assert kernels.takes_rms_norm(x, norm.weight)
    assert not kernels.takes_rms_norm(x[:, :48], norm.weight)  # widths differ
    with torch.no_grad():
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=1e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(2, 3, 16), (4, 1, 128)])  # GQA; Llama-2's heads
def test_native_attention_matches_sdpa_over_left_padded_rows(
    fresh_kernel: None, kv_heads: int, group: int, head_dim: int
) -> None:
    """Rows of different lengths (left padding) and grouped query heads, as the batch cache holds them."""
    kernels = NativeKernels.load()
    assert kernels is not None
    rows, capacity, length = 3, 12, 9
    keys = torch.randn(4, kv_heads, capacity, head_dim)  # more rows and columns than in use
    values = torch.randn(4, kv_heads, capacity, head_dim)
    fused = torch.randn(rows, kv_heads * group + kv_heads, head_dim)
    q = fused[:, : kv_heads * group]  # a view into the fused q/k output, as the lean step passes it
    starts = torch.tensor([0, 4, 8])
    assert kernels.takes_attention(q, keys, values)
    mask = (torch.arange(length).view(1, 1, 1, -1) >= starts.view(-1, 1, 1, 1)).expand(rows, 1, group, length)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(rows, kv_heads, group, head_dim),
        keys[:rows, :, :length],
        values[:rows, :, :length],
        attn_mask=mask,
    ).reshape(rows, -1)
    got = kernels.attention(q, keys, values, starts, length)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        kernels.attention(q, keys, values, starts, capacity + 1)  # never reads past the buffers
    with pytest.raises(ValueError):
        kernels.attention(q, keys, values, starts[:2], length)


@needs_compiler
def test_native_rotary_rotates_like_transformers_and_writes_the_cache_column(fresh_kernel: None) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    kernels = NativeKernels.load()
    assert kernels is not None
    rows, heads, kv_heads, head_dim, column = 3, 4, 2, 8, 5
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim)
    angles = torch.rand(rows, head_dim // 2) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    keys, values = torch.zeros(4, kv_heads, 7, head_dim), torch.zeros(4, kv_heads, 7, head_dim)
    assert kernels.takes_rotary(qkv, cos, keys, values, column)
    assert not kernels.takes_rotary(qkv, cos, keys, values, 7)  # past the cache's last column
    q = kernels.rotary_kv(qkv, cos, sin, keys, values, column, heads)
    split = qkv.view(rows, heads + 2 * kv_heads, head_dim)
    want_q, want_k = apply_rotary_pos_emb(split[:, :heads], split[:, heads : heads + kv_heads], cos, sin)
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(keys[:rows, :, column], want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(values[:rows, :, column], split[:, heads + kv_heads :])
    assert not keys[:, :, :column].any() and not keys[rows:].any()  # nothing else written


@needs_compiler
def test_a_library_others_can_write_is_never_loaded(tmp_path: Path) -> None:
    library = build(tmp_path)
    library.chmod(0o777)
    with pytest.raises(OSError, match="writable by others"):
        build(tmp_path)


@needs_compiler
def test_native_products_add_the_residual_and_silu_mul_gates_like_transformers(fresh_kernel: None) -> None:
    kernels = NativeKernels.load()
    assert kernels is not None
    x, qweight, scales = int8_operands(3, 16, 64)
    residual = torch.randn(3, 16)
    torch.testing.assert_close(
        kernels.int8(x, qweight, scales, add=residual), residual + kernels.int8(x, qweight, scales)
    )
    weight = torch.randn(16, 64)
    torch.testing.assert_close(kernels.dense(x, weight, add=residual), residual + kernels.dense(x, weight))
    with pytest.raises(ValueError):
        kernels.dense(x, weight, add=residual[:2])  # never reads past the residual
    gate_up = torch.randn(3, 2 * 40) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


@needs_compiler
def test_a_fused_bf16_model_keeps_torchs_kernels_beside_the_float32_ones(fresh_kernel: None) -> None:
    """The kernels take float32 only: a bf16 model's fused products must never reach them."""
    from engines.forward.layout import fuse_projections
    from tests.engines.test_lean_decode import PROMPTS, assert_steps_match, llama

    assert NativeKernels.load() is not None
    model = llama().to(torch.bfloat16)
    fuse_projections(model)
    assert_steps_match(model, PROMPTS, atol=0.05)  # bf16 rounding, as the lean step's own bf16 test
    assert not NativeKernels.takes_silu_mul(torch.zeros(2, 8, dtype=torch.bfloat16))
