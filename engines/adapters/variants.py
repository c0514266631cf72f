"""How an adapter is served on a base: checked against it, then merged into a clone or attached unmerged.

A merged variant is a *shallow clone* of the base's module tree: every module object is new, but every
parameter it does not target is the base's own tensor. Only the modules the adapter targets get new
weights (W' = W + scale * B @ A, computed in fp32 and cast once), so a q/v adapter costs a fraction of the
base instead of a full copy, and the base stays unmerged and usable. An unmerged variant shares the base
model object itself and adds its low-rank terms per row through the base's multi-LoRA hooks
(``engines.forward.multilora``). Both are ``LoadedModel``s made by one constructor, ``_variant``.
"""

from __future__ import annotations

import copy
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

from engines.adapters.files import AdapterFiles
from engines.checkpoint import CheckpointError, read_header
from engines.errors import AdapterRejected, public_text
from engines.forward.multilora import load_lora_weights, multilora_for, unsupported_reason
from engines.loader import LoadedModel, storage_pointers, tensor_bytes

log = logging.getLogger("peft_gateway.loader")


def shallow_clone(module: Any) -> Any:
    """A new module tree whose parameters and buffers are the original's tensors (no copy)."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: shallow_clone(child) for name, child in module._modules.items()}
    return clone


def check_adapter_fits(files: AdapterFiles, base: LoadedModel) -> None:
    """Refuse an adapter whose target modules or weight shapes do not exist in the base."""
    modules = dict(base.model.named_modules())
    targets = files.target_modules
    leaf_names = {name.rsplit(".", 1)[-1] for name in modules}
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in modules):
            raise AdapterRejected(
                f"Adapter '{files.ref.label}' targets modules matching '{targets}', but base "
                f"'{base.name}' has none."
            )
    else:
        missing = sorted(t for t in targets if t not in leaf_names and t not in modules)
        if missing and missing != ["all-linear"]:
            raise AdapterRejected(
                f"Adapter '{files.ref.label}' targets modules {missing} that base '{base.name}' does not "
                f"have (it has e.g. {sorted(leaf_names)[:12]})."
            )
    _check_shapes(files, base, modules)


def _check_shapes(files: AdapterFiles, base: LoadedModel, modules: dict[str, Any]) -> None:
    try:
        shapes = {key: stored.shape for key, stored in read_header(files.weights_file).items()}
    except (OSError, CheckpointError) as exc:
        raise AdapterRejected(
            f"Adapter '{files.ref.label}' has a corrupt weights file: {public_text(exc)}"
        ) from exc
    for key, shape in shapes.items():
        match = re.match(r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
        if not match or len(shape) != 2:
            continue
        module_path, which = match.group(1), match.group(2)
        module = modules.get(module_path)
        if module is None:
            raise AdapterRejected(
                f"Adapter '{files.ref.label}' has weights for '{module_path}', which base '{base.name}' "
                "does not have: it was made for a different architecture."
            )
        in_features = getattr(module, "in_features", None) or getattr(module, "num_embeddings", None)
        out_features = getattr(module, "out_features", None) or getattr(module, "embedding_dim", None)
        got, want = (shape[1], in_features) if which == "lora_A" else (shape[0], out_features)
        if which == "lora_A" and hasattr(module, "num_embeddings"):
            got = shape[1]
        if want is not None and got != want:
            raise AdapterRejected(
                f"Adapter '{files.ref.label}' does not fit base '{base.name}': '{module_path}' has "
                f"{which} size {got} where the base has {want}. It was made for a different model size."
            )


def merges_layer_by_layer(files: AdapterFiles) -> bool:
    """Whether the engine's own merge handles this adapter (plain LoRA on linear layers).

    The rest (trained biases, modules_to_save, fan_in_fan_out, layer filters) goes through peft.
    """
    config = files.config
    filters = ("layers_to_transform", "layers_pattern", "exclude_modules")
    return unsupported_reason(config) is None and not any(config.get(key) for key in filters)


def targeted_linears(model: Any, files: AdapterFiles) -> dict[str, Any]:
    """The linear layers of ``model`` that the adapter's ``target_modules`` name, by module path."""
    import torch

    targets = files.target_modules
    found: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        elif "all-linear" in targets:
            hit = leaf != "lm_head"
        else:
            hit = leaf in targets or name in targets or any(name.endswith(f".{t}") for t in targets)
        if hit:
            found[name] = module
    return found


def build_variant(base: LoadedModel, files: AdapterFiles, name: str) -> LoadedModel:
    """Merge ``files`` into a shallow clone of ``base``; only targeted weights get new memory."""
    started = time.perf_counter()
    try:
        if merges_layer_by_layer(files):
            merged = _merge_layer_by_layer(base, files)
        else:
            merged = _merge_with_peft(base, files)
    except AdapterRejected:
        raise
    except Exception as exc:
        # The files are untrusted input: safetensors raises its own error types for a corrupt file.
        log.warning("merging adapter %s failed", files.ref.key, exc_info=True)
        raise AdapterRejected(f"Adapter '{files.ref.label}' could not be merged: {public_text(exc)}") from exc
    merged.eval()
    merged.requires_grad_(False)
    variant = _variant(
        base,
        files,
        name,
        merged,
        nbytes=tensor_bytes(merged, exclude=storage_pointers(base.model)),
        started=started,
        serving="merged",
    )
    log.info(
        "merged adapter %s into %s (+%.1f MiB, %.2fs)",
        files.ref.key,
        base.name,
        variant.nbytes / 2**20,
        variant.load_seconds,
    )
    return variant


def _merge_layer_by_layer(base: LoadedModel, files: AdapterFiles) -> Any:
    """W' = W + scale * B @ A for each targeted layer in turn, in fp32, cast once into a new tensor.

    The peak beyond the variant's own new weights is one layer's fp32 temporary, so an all-projection
    adapter on a 7B base needs 180 MB to merge, not a float32 copy of every targeted layer at once.
    """
    import torch

    clone = shallow_clone(base.model)
    layers = targeted_linears(clone, files)
    device = next(base.model.parameters()).device
    weights = load_lora_weights(files.weights_file, files.config, torch.float32, "cpu", files.ref.label)
    missing = sorted(set(layers) - set(weights.modules))
    if missing:
        raise AdapterRejected(
            f"Adapter '{files.ref.label}' targets {len(missing)} layers its weights file does not hold "
            f"(e.g. {missing[:3]}): the file is incomplete or was saved for a different model."
        )
    with torch.no_grad():
        for module_name, (a, b) in weights.modules.items():
            layer = layers.get(module_name)
            if layer is None:
                raise AdapterRejected(
                    f"Adapter '{files.ref.label}' has weights for '{module_name}', which is not a layer it "
                    "targets in this base."
                )
            dtype = layer.weight.dtype
            merged = layer.weight.detach().to(torch.float32, copy=True)
            merged.addmm_(b.to(device), a.to(device))
            layer.weight = torch.nn.Parameter(merged.to(dtype), requires_grad=False)
            del merged
    return clone


def _merge_with_peft(base: LoadedModel, files: AdapterFiles) -> Any:
    """peft's own merge for adapters with trained biases, saved modules or layer filters."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    clone = shallow_clone(base.model)
    target_dtype = next(base.model.parameters()).dtype
    with warnings.catch_warnings():
        # peft asks transformers 5 for ``is_gradient_checkpointing``, which answers with a FutureWarning
        # (renamed ``is_activation_checkpointing``) on every first load: peft's, not the user's, to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(clone, str(files.weights_file.parent), is_trainable=False)
    _check_weights_complete(files, peft_model)
    replaced: list[Any] = []
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            layer: Any = module.get_base_layer()
            # Give the targeted layer its own fp32 copy, so the in-place merge neither touches the
            # shared base tensor nor loses precision to bf16 rounding of the delta.
            layer.weight = torch.nn.Parameter(
                layer.weight.detach().to(torch.float32, copy=True), requires_grad=False
            )
            replaced.append(layer)
    merged = peft_model.merge_and_unload()
    for layer in replaced:
        layer.weight = torch.nn.Parameter(layer.weight.detach().to(target_dtype), requires_grad=False)
    return merged


_SAVED_LORA_KEY_RE = re.compile(r"^base_model\.model\.(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def _saved_lora_matrices(weights_file: Path) -> set[tuple[str, str]]:
    """``(module path, "lora_A" | "lora_B")`` for every LoRA matrix the weights file holds."""
    keys = list(read_header(weights_file))
    matches = (_SAVED_LORA_KEY_RE.match(key) for key in keys)
    return {(match.group(1), match.group(2)) for match in matches if match}


def _check_weights_complete(files: AdapterFiles, peft_model: Any) -> None:
    """Refuse an adapter whose file lacks matrices for modules it targets.

    peft only warns about missing keys and leaves those matrices at their initialisation (random with
    ``init_lora_weights=False``, zero B otherwise), so merging would silently serve noise or the base.
    """
    from peft.tuners.lora import LoraLayer

    saved = _saved_lora_matrices(files.weights_file)
    missing = [
        f"{path}.{which}"
        for module_name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and len(module.lora_A)
        for path in [module_name.removeprefix("base_model.model.")]
        for which in ("lora_A", "lora_B")
        if (path, which) not in saved
    ]
    if missing:
        raise AdapterRejected(
            f"Adapter '{files.ref.label}' targets {len(missing)} LoRA matrices its weights file does not "
            f"hold (e.g. {missing[:3]}): the file is incomplete or was saved for a different model."
        )


def adapter_tokenizer(folder: Path, base_tokenizer: Any) -> Any:
    """An adapter may ship its own tokenizer (e.g. a different chat template); otherwise the base's."""
    if not (folder / "tokenizer_config.json").is_file():
        return base_tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        log.warning("adapter tokenizer in %s unusable (%s); using the base's", folder, exc)
        return base_tokenizer
    if len(tokenizer) != len(base_tokenizer):
        raise AdapterRejected(
            f"The adapter ships a tokenizer with {len(tokenizer)} tokens but the base has "
            f"{len(base_tokenizer)}; adapters that resize the vocabulary are not supported."
        )
    return tokenizer


def estimate_merge_bytes(files: AdapterFiles, base: LoadedModel) -> int:
    """Bytes a merged variant adds (a new copy of every targeted weight) plus its merge's peak.

    The engine's own merge works one layer at a time (one fp32 temporary); peft's merge, used for the
    adapters the engine does not merge itself, makes fp32 copies of every targeted layer at once.
    """
    layers = targeted_linears(base.model, files)
    sizes = [layer.weight.numel() for layer in layers.values()]
    own = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers.values())
    temporary = 4 * (max(sizes, default=0) if merges_layer_by_layer(files) else sum(sizes))
    return own + temporary


def attach_unmerged(base: LoadedModel, files: AdapterFiles, model_id: str, reason: str) -> LoadedModel:
    """Register the adapter on the base's multi-LoRA hooks; the result shares the base model object."""
    started = time.perf_counter()
    parameter = next(base.model.parameters())
    weights = load_lora_weights(
        files.weights_file, files.config, parameter.dtype, parameter.device, files.ref.label
    )
    registry = multilora_for(base.model)
    base.multilora = registry
    held_before = registry.nbytes
    slot = registry.add(files.ref.key, weights, files.ref.label)
    log.info(
        "attached adapter %s to %s unmerged (slot %d, %.1f MiB): %s",
        files.ref.key,
        base.name,
        slot,
        (registry.nbytes - held_before) / 2**20,
        reason,
    )
    return _variant(
        base,
        files,
        model_id,
        base.model,
        nbytes=registry.nbytes - held_before,
        started=started,
        serving="unmerged",
        serving_reason=reason,
        multilora=registry,
        adapter_slot=slot,
    )


def _variant(
    base: LoadedModel,
    files: AdapterFiles,
    name: str,
    model: Any,
    *,
    nbytes: int,
    started: float,
    serving: str,
    serving_reason: str = "",
    multilora: Any = None,
    adapter_slot: int = 0,
) -> LoadedModel:
    """A variant of ``base``: its facts (dtype, device, context, end tokens, sampling defaults) and
    ``files``' own tokenizer where the adapter ships one, with what the variant itself holds."""
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=adapter_tokenizer(files.folder, base.tokenizer),
        dtype=base.dtype,
        device=base.device,
        context_length=base.context_length,
        eos_token_ids=base.eos_token_ids,
        sampling_defaults=base.sampling_defaults,
        nbytes=nbytes,
        load_seconds=time.perf_counter() - started,
        parent=base.name,
        root=files.ref.source,
        multilora=multilora,
        adapter_slot=adapter_slot,
        dtype_reason=base.dtype_reason,
        serving=serving,
        serving_reason=serving_reason,
        quantization=base.quantization,
    )
