"""Many LoRA adapters on one unmerged base, in one forward pass: each batch row picks its adapter.

The base's targeted linear layers get a forward hook that adds ``(x @ A_row.T) @ B_row.T`` for every
row, where ``A_row``/``B_row`` are gathered from stacks holding every registered adapter (slot 0 is
all zeros: rows without an adapter). Two batched matmuls per layer serve any mix of adapters, so eight
clients on eight adapters share one decode step instead of taking turns, and N adapters cost the base
plus their own small weights rather than N merged copies.

The engine thread holds ``lock`` around ``set_rows`` and the forward pass that uses it; registering or
removing an adapter (from a loader thread) takes the same lock, so a forward never sees half a change.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines.checkpoint import read_header
from engines.errors import AdapterRejected
from engines.forward.int8 import Int8Linear, compute_dtype_of, device_of

log = logging.getLogger("peft_gateway.multilora")

_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B)(?:\.default)?\.weight$")


@dataclass
class LoraWeights:
    """One adapter as per-module (A, B * scale) pairs in the base's dtype."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values()
        )


def unsupported_reason(config: dict[str, Any]) -> str | None:
    """Why an adapter cannot be served unmerged by this module (``None`` when it can)."""
    if config.get("fan_in_fan_out"):
        return "fan_in_fan_out layers"
    if config.get("modules_to_save"):
        return "modules_to_save (fully trained extra layers)"
    if config.get("target_parameters"):
        return "target_parameters"
    if config.get("bias") not in (None, "none"):
        return "trained biases"
    return None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


def declared_rank(config: dict[str, Any], module: str) -> int:
    """The rank ``adapter_config.json`` gives ``module`` (``rank_pattern`` first, then ``r``)."""
    return int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 0)))


def _named(adapter: str | None) -> str:
    """How a message names the adapter: by its public name (never a server path), when it has one."""
    return f"Adapter '{adapter}'" if adapter else "The adapter"


def load_lora_weights(
    weights_file: Path, config: dict[str, Any], dtype: torch.dtype, device: Any, adapter: str | None = None
) -> LoraWeights:
    """Read A/B matrices from safetensors and fold each module's scale into B.

    ``adapter`` is the adapter's public name, for the messages of a refusal.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(weights_file), device="cpu")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterRejected(
                f"{_named(adapter)}: the weights for '{module}' are incomplete (need lora_A and lora_B)."
            )
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        rank = a.shape[0]
        alpha = float(
            _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        )
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = (a.to(dtype=dtype, device=device), (b * scale).to(dtype=dtype, device=device))
    if not modules:
        raise AdapterRejected(f"{_named(adapter)}: its weights file holds no LoRA matrices.")
    return LoraWeights(modules)


class _Stack:
    """Per-module stacks ``A [slots, r, in]`` and ``B [slots, out, r]``, rank padded with zeros."""

    def __init__(self, layer: torch.nn.Linear | Int8Linear) -> None:
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.dtype = compute_dtype_of(layer)
        self.device = device_of(layer)
        self.rank = 0
        self.a = torch.zeros(1, 0, self.in_features, dtype=self.dtype, device=self.device)
        self.b = torch.zeros(1, self.out_features, 0, dtype=self.dtype, device=self.device)

    def ensure(self, slots: int, rank: int) -> None:
        if slots <= self.a.shape[0] and rank <= self.rank:
            return
        slots, rank = max(slots, self.a.shape[0]), max(rank, self.rank)
        a = torch.zeros(slots, rank, self.in_features, dtype=self.dtype, device=self.device)
        b = torch.zeros(slots, self.out_features, rank, dtype=self.dtype, device=self.device)
        a[: self.a.shape[0], : self.rank] = self.a
        b[: self.b.shape[0], :, : self.rank] = self.b
        self.a, self.b, self.rank = a, b, rank

    def put(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        if pair is not None:
            a, b = pair
            self.a[slot, : a.shape[0]] = a
            self.b[slot, :, : b.shape[1]] = b


class MultiLora:
    """The adapters registered on one base model and the hooks that apply them per row."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._modules = dict(model.named_modules())
        self._stacks: dict[str, _Stack] = {}
        self._hooks: dict[str, Any] = {}
        self._slots: dict[int, str] = {}  # slot -> adapter key
        self._free: list[int] = []
        self._next = 1
        self._rows: torch.Tensor | None = None
        self._uniform: int | None = None
        self.lock = threading.RLock()
        #: Bumped whenever a stack may have moved (an adapter added or removed): what the compiled
        #: decode step's table of stack addresses is keyed by.
        self.version = 0

    @property
    def adapters(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        """What the stacks hold, every slot padded to the largest rank: what the budget must count."""
        return sum(stack.a.nbytes + stack.b.nbytes for stack in self._stacks.values())

    def added_bytes(self, config: dict[str, Any], weights_file: Path) -> int:
        """How much registering this adapter would grow the stacks (its slot, and any re-padding)."""

        ranks: dict[str, int] = {}
        for key, stored in read_header(weights_file).items():
            match = _KEY.match(key)
            if match and match.group(2) == "lora_A" and len(stored.shape) == 2:
                ranks[match.group(1)] = stored.shape[0]
        slots = (self._next + 1) if not self._free else self._next
        total = 0
        modules = set(self._stacks) | set(ranks)
        for module in modules:
            layer = self._modules.get(module)
            if not isinstance(layer, torch.nn.Linear | Int8Linear):
                continue
            stack = self._stacks.get(module)
            rank = max(stack.rank if stack else 0, ranks.get(module, 0))
            element = compute_dtype_of(layer).itemsize
            total += (
                max(slots, stack.a.shape[0] if stack else 0)
                * rank
                * (layer.in_features + layer.out_features)
                * element
            )
        return max(0, total - self.nbytes)

    def add(self, key: str, weights: LoraWeights, label: str | None = None) -> int:
        """Register an adapter; returns its slot (rows use it to select the adapter).

        ``key`` identifies the weights (a local adapter's is its folder); ``label`` is its public name,
        the one a refusal's message uses.
        """
        with self.lock:
            return self._add(key, weights, label)

    def _add(self, key: str, weights: LoraWeights, label: str | None) -> int:
        self.version += 1
        for module in weights.modules:
            layer = self._modules.get(module)
            if not isinstance(layer, torch.nn.Linear | Int8Linear):
                raise AdapterRejected(
                    f"{_named(label)} targets '{module}', which is not a linear layer of this base."
                )
        slot = self._free.pop() if self._free else self._next
        self._next = max(self._next, slot + 1)
        self._slots[slot] = key
        for module, pair in weights.modules.items():
            stack = self._stacks.get(module)
            if stack is None:
                stack = self._stacks[module] = _Stack(self._modules[module])
                layer = self._modules[module]
                self._hooks[module] = layer.register_forward_hook(LoraHook(self, stack, layer))
            stack.ensure(self._next, pair[0].shape[0])
            stack.put(slot, pair)
        for module, stack in self._stacks.items():
            stack.ensure(self._next, stack.rank)
            if module not in weights.modules:
                stack.put(slot, None)
        return slot

    def remove(self, slot: int) -> None:
        """Forget an adapter; its slot is zeroed and reused."""
        with self.lock:
            if self._slots.pop(slot, None) is None:
                return
            self.version += 1
            for stack in self._stacks.values():
                if slot < stack.a.shape[0]:
                    stack.put(slot, None)
            self._free.append(slot)

    def set_rows(self, slots: list[int]) -> None:
        """Which adapter each row of the next forward pass uses (0: none)."""
        if not self._slots or not any(slots):
            self._rows = None
            return
        device = next(iter(self._stacks.values())).device
        self._rows = torch.tensor(slots, dtype=torch.long, device=device)
        # One adapter for every row (the usual case): its matrices are used as views, two products
        # and an add per layer instead of two gathers and two batched products.
        self._uniform = slots[0] if all(slot == slots[0] for slot in slots) else None


class LoraHook:
    """The forward hook that adds each row's adapter term to one base layer's output.

    A class rather than a closure so that ``idle_for`` can tell the lean step when it changes nothing
    (no adapter row in the batch, or a merged variant's shallow clone sharing the hook dict): the
    step then keeps its fused and compiled paths.
    """

    def __init__(self, owner: MultiLora, stack: _Stack, layer: torch.nn.Module) -> None:
        self.owner, self.stack, self.layer = owner, stack, layer

    def idle_for(self, module: torch.nn.Module) -> bool:
        return self.owner._rows is None or module is not self.layer

    def row_slots(self) -> torch.Tensor | None:
        """Each row's adapter slot for this forward pass (0: none); ``None`` outside one."""
        return self.owner._rows

    def __call__(
        self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        rows, stack, owner = self.owner._rows, self.stack, self.owner
        # A merged variant's shallow clone shares this hook dict; only the base's own layer applies it.
        if rows is None or module is not self.layer or rows.shape[0] != output.shape[0]:
            return None
        x = inputs[0]
        if owner._uniform is not None:
            slot = owner._uniform
            return output + (x @ stack.a[slot].T) @ stack.b[slot].T
        a = stack.a.index_select(0, rows)  # [rows, r, in]
        b = stack.b.index_select(0, rows)  # [rows, out, r]
        flat = x.dim() == 2  # the lean decode step: one position per row, [rows, in]
        delta = torch.bmm(torch.bmm(x.unsqueeze(1) if flat else x, a.transpose(1, 2)), b.transpose(1, 2))
        return output + (delta.squeeze(1) if flat else delta)


def multilora_for(model: torch.nn.Module) -> MultiLora:
    """The model's ``MultiLora``, created on first use (kept on the model object itself)."""
    existing = getattr(model, "_peft_gateway_multilora", None)
    if isinstance(existing, MultiLora) and existing.model is model:
        return existing
    created = MultiLora(model)
    model._peft_gateway_multilora = created  # type: ignore[assignment]
    return created
