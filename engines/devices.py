"""What the hardware does natively, to choose a dtype when the config says ``auto``.

bf16 halves the bytes read per token, which is what decode speed is bound by, but on a CPU without
native bf16 instructions torch emulates it and gets slower than fp32; so ``auto`` picks bf16 only where
the CPU advertises ``avx512_bf16`` or ``amx_bf16`` (or on CUDA devices that support it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def auto_dtype_name(device: str) -> str:
    """``bfloat16`` where the device computes it natively, ``float16`` on older GPUs, else ``float32``."""
    import torch

    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


#: Below this many rows a bf16 decode step on CPU runs faster on torch's own matrix-vector kernels than
#: on oneDNN's: measured on the development machine (SmolLM2-135M shape, 2 cores), one row streams the
#: weights at about 22 GB/s instead of 11 (a step took 15 ms instead of 33); the two meet at four rows,
#: and from there oneDNN's batched kernels win (see bench/README.md).
ONEDNN_MIN_ROWS_BF16 = 4


@contextlib.contextmanager
def decode_kernels(dtype: Any, device: Any, rows: int) -> Iterator[None]:
    """Pick the faster CPU matmul kernels for one decode step of ``rows`` rows.

    The switch is process-wide (torch has no per-call choice), so only the engine thread, which runs
    every forward pass, may use it; the previous setting is restored on exit.
    """
    import torch

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
