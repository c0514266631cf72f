"""Loading safetensors checkpoints straight into their final buffers, one tensor at a time.

``from_pretrained`` peaks well above the weights it loads, more so when it casts to fp32 (figures in
bench/README.md): it memory-maps the shards, casts into new tensors and leaves the later q/k/v fusion
to copy every attention and MLP weight once more. At 7B in bf16 that is the difference between fitting
a 24 GB machine and being OOM-killed. Here the model is built with its parameters on the ``meta``
device, every parameter (fused groups included) is allocated once in its final dtype and device, and
each tensor is read from the file with plain reads into that memory. The page cache holds the file,
not the process, and a cast needs one tensor's temporary.

Anything this path does not understand (``.bin`` checkpoints, keys that are not parameter names,
parameters the checkpoint lacks) makes ``load_streaming`` return ``None`` so the caller can fall back
to ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from engines.checkpoint import CheckpointError, StoredTensor, checkpoint_tensors
from engines.forward.int8 import convert_to_int8, quantize_rows_into
from engines.forward.layout import projection_groups

log = logging.getLogger("peft_gateway.weights")


def read_into(stored: StoredTensor, destination: torch.Tensor, handle: Any) -> None:
    """Fill ``destination`` from the file, casting through a one-tensor temporary where dtypes differ."""
    if tuple(destination.shape) != stored.shape:
        raise CheckpointError(
            f"{stored.file.name}: shape {stored.shape} does not match the model's {tuple(destination.shape)}"
        )
    direct = destination.dtype == stored.dtype and destination.is_contiguous() and destination.is_cpu
    target = destination if direct else torch.empty(stored.shape, dtype=stored.dtype)
    buffer = target.view(-1).view(torch.uint8).numpy() if target.numel() else None
    if buffer is not None:
        handle.seek(stored.start)
        if handle.readinto(memoryview(cast(Any, buffer))) != stored.nbytes:
            raise CheckpointError(f"{stored.file.name}: ended early (truncated?)")
    if not direct:
        destination.copy_(target)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on ``meta`` and their buffers real (rotary tables included)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = param.to("meta")
            module._parameters[name] = type(param)(meta, requires_grad=False)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def materialize(model: torch.nn.Module, device: str, groups: list[tuple[torch.nn.Linear, ...]]) -> None:
    """Give every meta parameter real, uninitialised memory; each group's weights share one buffer.

    Tied parameters (one object under two names) stay one object.
    """
    replaced: dict[int, torch.nn.Parameter] = {}
    for group in groups:
        rows = sum(layer.weight.shape[0] for layer in group)
        first = group[0].weight
        weight = torch.empty((rows, *first.shape[1:]), dtype=first.dtype, device=device)
        has_bias = all(layer.bias is not None for layer in group)
        bias = torch.empty(rows, dtype=first.dtype, device=device) if has_bias else None
        start = 0
        for layer in group:
            end = start + layer.weight.shape[0]
            replaced[id(layer.weight)] = torch.nn.Parameter(weight[start:end], requires_grad=False)
            if bias is not None and layer.bias is not None:
                replaced[id(layer.bias)] = torch.nn.Parameter(bias[start:end], requires_grad=False)
            start = end
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or (param.device.type != "meta" and id(param) not in replaced):
                continue
            new = replaced.get(id(param))
            if new is None:
                data = torch.empty(param.shape, dtype=param.dtype, device=device)
                new = replaced[id(param)] = torch.nn.Parameter(data, requires_grad=False)
            module._parameters[name] = new


def load_streaming(
    folder: Path,
    config: Any,
    dtype: torch.dtype,
    device: str,
    trust_remote_code: bool,
    *,
    quantization: str = "none",
) -> Any:
    """The model in ``folder`` loaded with a peak of its weights plus one tensor, or ``None`` (see module).

    ``quantization = "int8"`` builds int8 layers (``engines.forward.int8``) before anything is allocated and
    quantizes each matrix as it is read, so the full-precision model never exists in memory.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if not any(folder.glob("*.safetensors")):
        return None
    stored = checkpoint_tensors(folder)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    groups = projection_groups(model)
    quantized = convert_to_int8(model, groups, device, dtype) if quantization == "int8" else {}
    parameters: dict[str, torch.nn.Parameter] = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(stored) - set(parameters) - set(dict(model.named_buffers())) - set(quantized))
    if unknown:
        log.info("checkpoint keys %s are not parameter names: loading with from_pretrained", unknown[:3])
        return None
    loaded_ids = {id(parameters[name]) for name in stored if name in parameters}
    missing = sorted(name for name, param in parameters.items() if id(param) not in loaded_ids)
    loaded_tables = {quantized[name].qweight.data_ptr() for name in stored if name in quantized}
    missing += sorted(
        name for name, layer in quantized.items() if layer.qweight.data_ptr() not in loaded_tables
    )
    if missing:
        log.info("checkpoint lacks %s: loading with from_pretrained", missing[:3])
        return None
    materialize(model, device, [] if quantized else groups)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    handles: dict[Path, Any] = {}
    try:
        for name, where in sorted(stored.items(), key=lambda item: (item[1].file, item[1].start)):
            handle = handles.get(where.file)
            if handle is None:
                handle = handles[where.file] = where.file.open("rb", buffering=0)
            layer = quantized.get(name)
            if layer is not None:
                # One tensor's temporary in its stored dtype, quantized a block of rows at a time.
                temporary = torch.empty(where.shape, dtype=where.dtype)
                read_into(where, temporary, handle)
                quantize_rows_into(temporary, layer.qweight, layer.scales)
                del temporary
                continue
            read_into(where, parameters[name] if name in parameters else buffers[name], handle)
    finally:
        for handle in handles.values():
            handle.close()
    if (folder / "generation_config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(folder)
    return model
