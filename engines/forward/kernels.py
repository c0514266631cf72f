"""The decode step's matrix products in ``engines/forward/gemm.c``, built with the machine's C compiler.

On a CPU, a decode step's time is its matrix products streaming the weights, and torch's kernels leave
much of the memory's speed unused on the small matrices a step is made of (measured on a 2-core AVX2
EPYC; figures in bench/README.md): its weight-only int8 kernel (``_weight_int8pack_mm``) streams a
fraction of it on 576-column matrices and rounds activations to bf16, and oneDNN's float32 product
falls short too, further at eight rows than at one. The C kernels read each output channel's weights
front to back (int8 converted to float32 in registers) and accumulate in float32: faster on those
matrices, and int8 products ~1e-7 from the dequantized product instead of ~3e-3.

Building needs only ``cc`` (``$CC``) with AVX2/FMA/OpenMP: about a second, once per machine, into
``<cache home>/native`` (a file named by the source's and flags' hash, written atomically so concurrent
processes never load a half-written library). Anything that fails (no compiler, a CPU without AVX2, a
read-only cache, ``PEFT_GATEWAY_NATIVE_KERNELS=0``) leaves ``NativeKernels.load`` returning ``None``,
logged once, and torch's kernels serve: the same answers, to bf16 rounding for int8.

The whole-step entry point (``decode_step_f32``) is bound here and driven by ``engines.forward.compiled``.
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
from typing import Any

import torch

from engines.paths import cache_home

log = logging.getLogger("peft_gateway.native")

SOURCE = Path(__file__).resolve().parent / "gemm.c"
#: ``-ffp-contract=off``: the compiler may otherwise fuse a multiply and an add into one FMA in some
#: instantiations of a kernel and not in others (the residual add after a 2-row block but not after a
#: 1-row one), and a row's result would depend on how many rows share the product. The intrinsics'
#: FMAs are explicit and unaffected.
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
LIBRARIES = ("-lm",)
#: Set to ``0`` to keep torch's kernels (comparisons, or a machine where the build misbehaves).
SWITCH = "PEFT_GATEWAY_NATIVE_KERNELS"


def is_float32_on_cpu(tensor: torch.Tensor, shape: tuple[int, ...] | None = None) -> bool:
    """A contiguous float32 CPU tensor (of exactly ``shape`` where given): what a kernel may read
    through its bare address."""
    return (
        tensor.dtype == torch.float32
        and tensor.is_cpu
        and tensor.is_contiguous()
        and (shape is None or tuple(tensor.shape) == shape)
    )


def check_starts(starts: torch.Tensor, rows: int) -> None:
    """Raise unless ``starts`` is one int64 first-column index per row, as the attention kernel reads it."""
    if (
        starts.dtype != torch.long
        or not starts.is_cpu
        or not starts.is_contiguous()
        or starts.numel() != rows
    ):
        raise ValueError("starts must be one int64 column index per row, on the CPU")


def _plain(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Operands the kernels take: 2-D, contiguous, on the CPU, float32 activations, 8 | columns."""
    return (
        x.dim() == 2
        and x.dtype == torch.float32
        and x.is_cpu
        and weight.is_cpu
        and x.is_contiguous()
        and weight.is_contiguous()
        and weight.dim() == 2
        and weight.shape[1] == x.shape[1]
        and weight.shape[1] % 8 == 0
    )


def _bind(library: ctypes.CDLL, name: str, *argtypes: Any) -> Any:
    """``library.name`` with its C argument types declared (every kernel returns nothing)."""
    function = getattr(library, name)
    function.argtypes = list(argtypes)
    function.restype = None
    return function


class NativeKernels:
    """The compiled kernels: products (``int8`` with bf16 scales, ``dense`` float32, each optionally
    adding the residual), and the float32 decode step's ``rms_norm``, ``rotary_kv``, ``attention`` and
    ``silu_mul``. Each has a ``takes_*`` check that the caller runs first; what it refuses goes to torch.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, size, real, count = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
        self._int8 = _bind(library, "int8_gemm_f32", *[pointer] * 5, size, size, size, count)
        self._dense = _bind(library, "f32_gemm", *[pointer] * 4, size, size, size, count)
        self._silu_mul = _bind(library, "silu_mul_f32", pointer, size, pointer, size, size)
        self._rms_norm = _bind(library, "rms_norm_f32", pointer, pointer, pointer, size, size, real)
        self._attention = _bind(
            library,
            "decode_attention_f32",
            *(pointer, size, pointer, pointer, size, size, pointer, size, pointer, pointer),
            *(size, size, size, size, real, count),
        )
        self._rotary = _bind(
            library,
            "rotary_kv_write_f32",
            *(pointer, size, pointer, pointer, pointer, pointer, pointer),
            *(size, size, size, size, size, size, size),
        )
        # The whole step (engines.forward.compiled builds its operands): table, layers, K/V addresses, final
        # norm, LM head and its scales, sizes, x, cos, sin, starts, work, logits, adapter table, slots,
        # adapter scratch, threads.
        self.decode_step = _bind(library, "decode_step_f32", pointer, size, *[pointer] * 15, count)
        self.decode_step_work_floats = _bind(library, "decode_step_work_floats", pointer)
        self.decode_step_work_floats.restype = size

    @staticmethod
    def takes_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
        """Whether ``int8`` computes this product (else the caller uses torch's kernel)."""
        return (
            _plain(x, qweight)
            and qweight.dtype == torch.int8
            and scales.dtype == torch.bfloat16
            and scales.is_contiguous()
            and tuple(scales.shape) == (qweight.shape[0],)  # the kernel reads one scale per channel
        )

    @staticmethod
    def takes_dense(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``dense`` computes this product (else the caller uses oneDNN or ``F.linear``)."""
        return _plain(x, weight) and weight.dtype == torch.float32

    @staticmethod
    def takes_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``rms_norm`` computes this norm: float32 rows and weight, 8 | width."""
        return (
            x.dim() == 2
            and x.shape[1] % 8 == 0
            and is_float32_on_cpu(x)
            and is_float32_on_cpu(weight, (x.shape[1],))
        )

    @staticmethod
    def takes_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether ``attention`` computes this step: float32 on the CPU, heads of a multiple of 8 floats."""
        head_dim = keys.shape[-1] if keys.dim() == 4 else 0
        return (
            q.dim() == 3
            and keys.dim() == 4
            and all(t.dtype == torch.float32 and t.is_cpu for t in (q, keys, values))
            and keys.is_contiguous()
            and values.is_contiguous()
            and keys.shape == values.shape
            and head_dim % 8 == 0
            and q.shape[2] == head_dim
            and q.stride(2) == 1
            and q.stride(1) == head_dim
            and q.shape[1] % keys.shape[1] == 0
        )

    @staticmethod
    def takes_rotary(
        qkv: torch.Tensor, cos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, column: int
    ) -> bool:
        """Whether ``rotary_kv`` does this step: float32 on the CPU, a column inside the cache."""
        return (
            qkv.dim() == 2
            and cos.dim() == 2
            and keys.dim() == 4
            and all(t.dtype == torch.float32 and t.is_cpu for t in (qkv, cos, keys, values))
            and qkv.stride(1) == 1
            and cos.is_contiguous()
            and keys.is_contiguous()
            and values.is_contiguous()
            and keys.shape == values.shape
            and cos.shape == (qkv.shape[0], keys.shape[3])
            and qkv.shape[0] <= keys.shape[0]
            and 0 <= column < keys.shape[2]
        )

    # ctypes releases the GIL for each call: the HTTP thread keeps serving meanwhile.
    def int8(
        self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ (qweight * scales[:, None]).T`` in float32, plus ``add`` (the residual) if given."""
        out, add_pointer = self._output(x.shape[0], qweight.shape[0], add)
        threads = torch.get_num_threads()
        self._int8(
            x.data_ptr(),
            qweight.data_ptr(),
            scales.data_ptr(),
            add_pointer,
            out.data_ptr(),
            *out.shape,
            x.shape[1],
            threads,
        )
        return out

    def dense(self, x: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T`` in float32, plus ``add`` (the residual) if given."""
        out, add_pointer = self._output(x.shape[0], weight.shape[0], add)
        threads = torch.get_num_threads()
        self._dense(
            x.data_ptr(), weight.data_ptr(), add_pointer, out.data_ptr(), *out.shape, x.shape[1], threads
        )
        return out

    @staticmethod
    def _output(rows: int, channels: int, add: torch.Tensor | None) -> tuple[torch.Tensor, int | None]:
        if add is not None and not is_float32_on_cpu(add, (rows, channels)):
            raise ValueError(f"the residual must be a contiguous float32 [{rows}, {channels}] CPU tensor")
        return torch.empty(rows, channels, dtype=torch.float32), add.data_ptr() if add is not None else None

    @staticmethod
    def takes_silu_mul(gate_up: torch.Tensor) -> bool:
        """Whether ``silu_mul`` computes this activation: a float32 ``[rows, 2 * intermediate]`` CPU product."""
        return (
            gate_up.dim() == 2
            and gate_up.dtype == torch.float32
            and gate_up.is_cpu
            and gate_up.stride(1) == 1
            and gate_up.shape[1] % 2 == 0
        )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` from the fused ``[rows, 2 * intermediate]`` gate/up product (float32)."""
        if not self.takes_silu_mul(gate_up):
            raise ValueError("silu_mul takes a float32 [rows, 2 * intermediate] CPU product")
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=torch.float32)
        self._silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), rows, width // 2)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' float32 ``LlamaRMSNorm``: ``x / sqrt(mean(x**2) + eps) * weight`` per row."""
        out = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def rotary_kv(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        column: int,
        heads: int,
    ) -> torch.Tensor:
        """The rotated queries ``[rows, heads, head_dim]``; rotated keys and values written to ``column``.

        ``qkv`` is the fused q/k/v product of one new position per row; ``cos``/``sin`` ``[rows,
        head_dim]`` that position's rotary factors. Rows, heads and the column are the caller's
        checked ``takes_rotary`` operands: the widths must add up to ``(heads + 2 * kv_heads)``.
        """
        rows, head_dim, kv_heads = qkv.shape[0], keys.shape[3], keys.shape[1]
        if (
            qkv.shape[1] != (heads + 2 * kv_heads) * head_dim
            or sin.shape != cos.shape
            or not sin.is_contiguous()
        ):
            raise ValueError(f"q/k/v of width {qkv.shape[1]} is not {heads}+2x{kv_heads} heads of {head_dim}")
        q = torch.empty(rows, heads, head_dim, dtype=torch.float32)
        self._rotary(
            qkv.data_ptr(),
            qkv.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            q.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(0),
            keys.stride(1),
            column,
            rows,
            heads,
            kv_heads,
            head_dim,
        )
        return q

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, length: int
    ) -> torch.Tensor:
        """``[rows, heads * head_dim]``: each row's query heads over its cache columns ``[starts[row], length)``.

        ``q`` is ``[rows, heads, head_dim]``; ``keys``/``values`` the batch cache's whole buffers
        ``[row capacity, kv heads, column capacity, head_dim]``; scaled by ``1/sqrt(head_dim)`` as
        ``scaled_dot_product_attention`` does by default.
        """
        rows, heads, head_dim = q.shape
        check_starts(starts, rows)
        if not 0 < length <= keys.shape[2] or rows > keys.shape[0]:
            raise ValueError(f"{rows} rows x {length} columns exceed the cache's {tuple(keys.shape[:3])}")
        kv_heads = keys.shape[1]
        group = heads // kv_heads
        out = torch.empty(rows, heads * head_dim, dtype=torch.float32)
        scratch = torch.empty(rows * heads * length, dtype=torch.float32)
        self._attention(
            q.data_ptr(),
            q.stride(0),
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(0),
            keys.stride(1),
            starts.data_ptr(),
            length,
            out.data_ptr(),
            scratch.data_ptr(),
            rows,
            kv_heads,
            group,
            head_dim,
            head_dim**-0.5,
            torch.get_num_threads(),
        )
        return out

    @staticmethod
    @functools.cache
    def load() -> NativeKernels | None:
        """The kernels, built on first call (once per process; the library is process-wide, like a torch op)."""
        if os.environ.get(SWITCH, "1") == "0":
            log.info("native kernels off (%s=0): torch's kernels serve", SWITCH)
            return None
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            log.info("native kernels off: the CPU lacks AVX2")
            return None
        try:
            return NativeKernels(ctypes.CDLL(str(build(cache_home() / "native"))))
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("native kernels unavailable, torch's kernels serve: %s", exc)
            return None


def build(folder: Path) -> Path:
    """The compiled library in ``folder``, compiling it first where it is not there yet."""
    compiler = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS, *LIBRARIES)).encode()).hexdigest()[:16]
    library = folder / f"gemm-{digest}.so"
    if library.exists():
        _check_owned(library)
        return library
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler!r}; set CC)")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = Path(scratch) / library.name
        result = subprocess.run(
            [compiler, *FLAGS, "-o", str(partial), str(SOURCE), *LIBRARIES],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-400:]}")
        partial.chmod(0o755)  # whatever the umask: writable by this user only, as loading requires
        os.replace(partial, library)  # atomic: a concurrent process sees no file or a whole one
    return library


def _check_owned(library: Path) -> None:
    """Refuse a library another user could have written: loading it runs its code in this process."""
    status = library.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        raise OSError(f"{library} is not owned by this user or is writable by others; not loading it")
