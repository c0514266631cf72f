"""The memory budget: how many bytes the gateway may hold, and the ledger every allocation is checked against.

A 24 GB machine holds one 7B model in half precision and little else, and the kernel's OOM killer
takes the whole server (every model, every stream) when a load or a KV cache overshoots. So the budget
exists by default, derived from the machine when the gateway starts (available RAM, within any cgroup
limit, or the GPU's free memory, minus headroom for the interpreter and activations), and every load,
merge and KV-cache growth is estimated and checked against it *before* it allocates.

The ledger has two parts: weights (bases, merged variants' own tensors, unmerged adapter slots), set
by the pool on the event loop, and KV caches, set by the engine thread. The lock makes each
check-and-take atomic across the two threads.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("peft_gateway.memory")

GiB = 2**30

#: Left free for the interpreter, tokenizers, activations and the allocator's slack.
HEADROOM_FRACTION = 0.10
MIN_HEADROOM = 1 * GiB


def mib(nbytes: int | float) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), or ``None`` without a limit."""
    candidates = [
        (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
        (
            Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ),
    ]
    for limit_file, usage_file in candidates:
        try:
            limit_text = limit_file.read_text(encoding="ascii").strip()
            usage = int(usage_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 2**60:
            return None
        return max(0, int(limit_text) - usage)
    return None


def available_bytes(device: str) -> tuple[int, str]:
    """Memory free for new allocations on ``device`` now, and where the figure came from."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), f"free memory of {device}"
    available = _meminfo_available()
    cgroup = _cgroup_free()
    if cgroup is not None and (available is None or cgroup < available):
        return cgroup, "free memory under the cgroup limit"
    if available is not None:
        return available, "available RAM"
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free RAM"


@dataclass
class MemoryBudget:
    """Bytes the gateway may hold on one device, and what it holds now (thread-safe)."""

    total: int
    source: str
    weights: int = 0
    kv: int = 0
    #: No limit at all: only for callers (tests, tools) that build a pool without a budget.
    unlimited: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    @classmethod
    def for_device(cls, device: str, configured: int | None = None) -> MemoryBudget:
        """``configured`` (``[cache] max_memory``) when set, else what the device has free minus headroom."""
        if configured is not None:
            return cls(total=configured, source="[cache] max_memory")
        free, where = available_bytes(device)
        headroom = max(MIN_HEADROOM, int(free * HEADROOM_FRACTION))
        budget = cls(total=max(0, free - headroom), source=f"{where} at start minus {mib(headroom)} headroom")
        log.info("memory budget for %s: %s (%s)", device, mib(budget.total), budget.source)
        return budget

    @property
    def free(self) -> int:
        return self.total - self.weights - self.kv

    def set_weights(self, nbytes: int) -> None:
        with self._lock:
            self.weights = nbytes

    def try_set_kv(self, nbytes: int) -> bool:
        """Take ``nbytes`` as the KV caches' total if it fits beside the weights (shrinking always does)."""
        with self._lock:
            if not self.unlimited and nbytes > self.kv and self.weights + nbytes > self.total:
                return False
            self.kv = nbytes
            return True

    def describe(self) -> str:
        return (
            f"budget {mib(self.total)} ({self.source}); weights hold {mib(self.weights)}, "
            f"KV caches {mib(self.kv)}, free {mib(self.free)}"
        )


class MemoryBudgets:
    """One budget per device, measured when the device is first used (``[cache] max_memory`` overrides)."""

    def __init__(self, configured: int | None = None, *, unlimited: bool = False) -> None:
        self.configured = configured
        self.unlimited = unlimited and configured is None
        self._budgets: dict[str, MemoryBudget] = {}
        self._lock = threading.Lock()

    def for_device(self, device: str) -> MemoryBudget:
        key = "cpu" if device == "cpu" else (device if ":" in device else f"{device}:0")
        with self._lock:
            budget = self._budgets.get(key)
            if budget is None:
                if self.unlimited:
                    budget = MemoryBudget(total=2**62, source="unlimited", unlimited=True)
                else:
                    budget = MemoryBudget.for_device(key, self.configured)
                self._budgets[key] = budget
            return budget
