"""What the hardware does natively, to choose a dtype when the config says ``auto``.

bf16 halves the bytes read per token, which is what decode speed is bound by, but on a CPU without
native bf16 instructions torch emulates it and gets slower than fp32; so ``auto`` picks bf16 only where
the CPU advertises ``avx512_bf16`` or ``amx_bf16`` (or on CUDA devices that support it).
"""

from __future__ import annotations

import functools
from pathlib import Path

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
