"""The int8 product kernel in ``engines/native/int8_gemm.c``: built with the machine's C compiler at first use.

torch's weight-only int8 kernel (``_weight_int8pack_mm``) is the gateway's portable path, but on a CPU
without native bf16 it is slow on the small matrices a decode step is made of (2-6 GB/s on 576-column
matrices, measured on a 2-core AVX2 EPYC, where the memory gives ~15 GB/s) and it rounds activations
to bf16. The C kernel reads each channel's int8 weights front to back, converts them to float32 in
registers and accumulates in float32: 1.3-2.8x faster on those matrices and ~1e-7 relative error to
the dequantized product instead of ~3e-3.

Building it needs only ``cc`` (``$CC``) with AVX2/FMA/OpenMP support: about a second, once per
machine, into ``<cache home>/native`` (a file named by the source's and flags' hash, written atomically
so concurrent processes cannot load a half-written library). Anything that fails (no compiler, a CPU
without AVX2, a read-only cache, ``PEFT_GATEWAY_NATIVE_KERNELS=0``) leaves ``Int8Kernel.load`` returning
``None``, logged once, and the gateway keeps torch's kernel: the same answers to bf16 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from engines.paths import cache_home

log = logging.getLogger("peft_gateway.native")

SOURCE = Path(__file__).resolve().parent / "native" / "int8_gemm.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
#: Set to ``0`` to keep torch's kernels (comparisons, or a machine where the build misbehaves).
SWITCH = "PEFT_GATEWAY_NATIVE_KERNELS"


class Int8Kernel:
    """``x @ (qweight * scales[:, None]).T`` for float32 ``x`` on the CPU, through the compiled kernel."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._gemm = library.int8_gemm_f32
        self._gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        self._gemm.restype = None

    @staticmethod
    def takes(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
        """Whether the kernel computes this product (else the caller uses torch's)."""
        return (
            x.dim() == 2
            and x.dtype == torch.float32
            and x.is_cpu
            and qweight.is_cpu
            and qweight.dtype == torch.int8
            and scales.dtype == torch.bfloat16
            and x.is_contiguous()
            and qweight.is_contiguous()
            and scales.is_contiguous()
            and qweight.shape[1] == x.shape[1]
            and qweight.shape[1] % 8 == 0
        )

    def __call__(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        rows, columns = x.shape
        channels = qweight.shape[0]
        out = torch.empty(rows, channels, dtype=torch.float32)
        # ctypes releases the GIL for the call: the HTTP thread keeps serving meanwhile.
        self._gemm(
            x.data_ptr(),
            qweight.data_ptr(),
            scales.data_ptr(),
            out.data_ptr(),
            rows,
            channels,
            columns,
            torch.get_num_threads(),
        )
        return out

    @staticmethod
    @functools.cache
    def load() -> Int8Kernel | None:
        """The kernel, built on first call (once per process; the library is process-wide, like a torch op)."""
        if os.environ.get(SWITCH, "1") == "0":
            log.info("native int8 kernel off (%s=0): torch's kernel serves int8 bases", SWITCH)
            return None
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            log.info("native int8 kernel off: the CPU lacks AVX2")
            return None
        try:
            return Int8Kernel(ctypes.CDLL(str(build(cache_home() / "native"))))
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("native int8 kernel unavailable, torch's kernel serves int8 bases: %s", exc)
            return None


def build(folder: Path) -> Path:
    """The compiled library in ``folder``, compiling it first where it is not there yet."""
    compiler = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    library = folder / f"int8_gemm-{digest}.so"
    if library.exists():
        return library
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler!r}; set CC)")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = Path(scratch) / library.name
        result = subprocess.run(
            [compiler, *FLAGS, "-o", str(partial), str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-400:]}")
        os.replace(partial, library)  # atomic: a concurrent process sees no file or a whole one
    return library
