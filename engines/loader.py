"""Loading base models and building merged base+adapter variants that share the base's tensors.

A merged variant is a *shallow clone* of the base's module tree: every module object is new, but every
parameter it does not target is the base's own tensor. Only the modules the adapter targets get new
weights (W' = W + scale * B @ A, computed by peft's own merge in fp32 and cast once), so a q/v adapter
costs a fraction of the base instead of a full copy, and the base stays unmerged and usable.
"""

from __future__ import annotations

import copy
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from engines import hub
from engines.adapters import AdapterFiles
from engines.catalog import BaseSpec
from engines.devices import auto_dtype_name
from engines.errors import AdapterRejected, ModelLoadFailed

log = logging.getLogger("peft_gateway.loader")


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer and the facts the server needs about them."""

    name: str
    model: Any
    tokenizer: Any
    dtype: str
    device: str
    context_length: int
    eos_token_ids: frozenset[int]
    nbytes: int
    load_seconds: float
    parent: str | None = None
    root: str | None = None
    #: KV of recently prefilled prompts, owned by the engine thread (see ``engines.prefix_cache``).
    prefix_cache: Any = None
    #: Sampling defaults from the model's own generation_config.json, for fields a request leaves out.
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    #: Unmerged multi-adapter serving: the base's registry and this model's slot in it (0: no adapter).
    multilora: Any = None
    adapter_slot: int = 0


def resolve_dtype(spec: BaseSpec) -> Any:
    """The torch dtype for ``spec.dtype``; ``auto`` means bf16 where the device has it natively."""
    import torch

    name = spec.dtype if spec.dtype != "auto" else auto_dtype_name(spec.device)
    if spec.dtype == "auto":
        log.info("dtype auto for %s on %s: %s", spec.name, spec.device, name)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def base_folder(spec: BaseSpec) -> Path:
    """The local folder of a base: the configured folder, or a Hub snapshot in the HF cache."""
    local = Path(spec.source).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or spec.source.startswith((".", "~")):
        raise ModelLoadFailed(f"Base model folder '{spec.source}' of '{spec.name}' does not exist.")
    return hub.snapshot(
        spec.source, revision=spec.revision, allow_patterns=hub.BASE_FILES, token=spec.token, what="model"
    )


def load_base(spec: BaseSpec) -> LoadedModel:
    """Load tokenizer and weights of a configured base; safetensors are preferred over pickle."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engines.lean_decode import fuse_projections

    started = time.perf_counter()
    folder = base_folder(spec)
    dtype = resolve_dtype(spec)
    has_safetensors = any(folder.glob("*.safetensors"))
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": has_safetensors,
    }
    if spec.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(spec)
        kwargs["device_map"] = spec.device
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError, KeyError, SafetensorError) as exc:
        # SafetensorError (a corrupt or truncated .safetensors file) derives from none of the others.
        raise ModelLoadFailed(f"Could not load base model '{spec.name}' from '{folder}': {exc}") from exc
    if spec.quantization == "none":
        model = cast(Any, model).to(spec.device)
        fuse_projections(model)
    model.eval()
    model.requires_grad_(False)
    context = spec.context_length or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    loaded = LoadedModel(
        name=spec.name,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype_name(dtype),
        device=spec.device,
        context_length=context,
        eos_token_ids=_eos_ids(model, tokenizer),
        nbytes=tensor_bytes(model),
        load_seconds=time.perf_counter() - started,
        root=spec.source,
        sampling_defaults=read_sampling_defaults(folder),
    )
    log.info(
        "loaded base %s (%s, %s, %.1f MiB) in %.2fs",
        spec.name,
        loaded.dtype,
        spec.device,
        loaded.nbytes / 2**20,
        loaded.load_seconds,
    )
    return loaded


def read_sampling_defaults(folder: Path) -> dict[str, float]:
    """The sampling fields a model's authors set explicitly in generation_config.json (as vLLM does).

    Only explicit keys count: transformers' own defaults (``do_sample=False``) would otherwise make every
    model greedy, unlike OpenAI's temperature 1. ``do_sample: false`` means temperature 0.
    """
    import json

    try:
        config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    defaults: dict[str, float] = {}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            defaults[key] = float(value)
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def _quantization_config(spec: BaseSpec) -> Any:
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - depends on the transformers build
        raise ModelLoadFailed("This transformers build has no bitsandbytes support.") from exc
    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def tensor_bytes(model: Any, exclude: set[int] | None = None) -> int:
    """Bytes held by the model's parameters and buffers, skipping storages listed in ``exclude``."""
    seen: set[int] = set(exclude or ())
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        total += tensor.untyped_storage().nbytes()
    return total


def storage_pointers(model: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


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
                f"Adapter '{files.ref.key}' targets modules matching '{targets}', but base "
                f"'{base.name}' has none."
            )
    else:
        missing = sorted(t for t in targets if t not in leaf_names and t not in modules)
        if missing and missing != ["all-linear"]:
            raise AdapterRejected(
                f"Adapter '{files.ref.key}' targets modules {missing} that base '{base.name}' does not "
                f"have (it has e.g. {sorted(leaf_names)[:12]})."
            )
    if files.weights_file.suffix == ".safetensors":
        _check_shapes(files, base, modules)


def _check_shapes(files: AdapterFiles, base: LoadedModel, modules: dict[str, Any]) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(files.weights_file), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterRejected(f"Adapter '{files.ref.key}' has a corrupt weights file: {exc}") from exc
    for key, shape in shapes.items():
        match = re.match(r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
        if not match or len(shape) != 2:
            continue
        module_path, which = match.group(1), match.group(2)
        module = modules.get(module_path)
        if module is None:
            raise AdapterRejected(
                f"Adapter '{files.ref.key}' has weights for '{module_path}', which base '{base.name}' "
                "does not have: it was made for a different architecture."
            )
        in_features = getattr(module, "in_features", None) or getattr(module, "num_embeddings", None)
        out_features = getattr(module, "out_features", None) or getattr(module, "embedding_dim", None)
        got, want = (shape[1], in_features) if which == "lora_A" else (shape[0], out_features)
        if which == "lora_A" and hasattr(module, "num_embeddings"):
            got = shape[1]
        if want is not None and got != want:
            raise AdapterRejected(
                f"Adapter '{files.ref.key}' does not fit base '{base.name}': '{module_path}' has "
                f"{which} size {got} where the base has {want}. It was made for a different model size."
            )


def build_variant(base: LoadedModel, files: AdapterFiles, name: str) -> LoadedModel:
    """Merge ``files`` into a shallow clone of ``base``; only targeted weights get new memory."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    started = time.perf_counter()
    clone = shallow_clone(base.model)
    target_dtype = next(base.model.parameters()).dtype
    try:
        with warnings.catch_warnings():
            # peft asks transformers 5 for ``is_gradient_checkpointing``, which answers with a FutureWarning
            # (renamed ``is_activation_checkpointing``) on every first load: peft's, not the user's, to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(clone, str(files.folder), is_trainable=False)
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
    except AdapterRejected:
        raise
    except Exception as exc:
        # The files are untrusted input: safetensors and torch's weights-only unpickler raise many types
        # (SafetensorError, UnpicklingError, IndexError, EOFError...) for a corrupt file.
        log.warning("merging adapter %s failed", files.ref.key, exc_info=True)
        raise AdapterRejected(f"Adapter '{files.ref.key}' could not be merged: {exc}") from exc
    merged.eval()
    merged.requires_grad_(False)
    tokenizer = adapter_tokenizer(files.folder, base.tokenizer)
    variant = LoadedModel(
        name=name,
        model=merged,
        tokenizer=tokenizer,
        dtype=base.dtype,
        device=base.device,
        context_length=base.context_length,
        eos_token_ids=base.eos_token_ids,
        sampling_defaults=base.sampling_defaults,
        nbytes=tensor_bytes(merged, exclude=storage_pointers(base.model)),
        load_seconds=time.perf_counter() - started,
        parent=base.name,
        root=files.ref.source,
    )
    log.info(
        "merged adapter %s into %s (+%.1f MiB, %.2fs)",
        files.ref.key,
        base.name,
        variant.nbytes / 2**20,
        variant.load_seconds,
    )
    return variant


_SAVED_LORA_KEY_RE = re.compile(r"^base_model\.model\.(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def _saved_lora_matrices(weights_file: Path) -> set[tuple[str, str]]:
    """``(module path, "lora_A" | "lora_B")`` for every LoRA matrix the weights file holds."""
    if weights_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights_file), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        import torch

        keys = list(torch.load(weights_file, map_location="meta", weights_only=True))
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
            f"Adapter '{files.ref.key}' targets {len(missing)} LoRA matrices its weights file does not "
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
            f"Adapter in '{folder}' ships a tokenizer with {len(tokenizer)} tokens but the base has "
            f"{len(base_tokenizer)}; adapters that resize the vocabulary are not supported."
        )
    return tokenizer


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def estimate_base_bytes(spec: BaseSpec) -> int:
    """Bytes a base will take once loaded, from its weight files (0 when not on disk yet).

    Used to make room, or refuse with 503, before loading instead of after: a model that cannot fit must
    not be read into memory first.
    """
    import json

    folder = Path(spec.source).expanduser()
    if not folder.is_dir():
        return 0
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    size = sum(path.stat().st_size for path in files)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        stored = _DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), 4)
    except (OSError, ValueError):
        stored = 4
    target = _DTYPE_BYTES.get(dtype_name(resolve_dtype(spec)), 4)
    return size * target // stored


def estimate_variant_bytes(files: AdapterFiles, base: LoadedModel, *, unmerged: bool) -> int:
    """Bytes a variant adds: its own LoRA weights when unmerged, else a copy of every targeted weight."""
    if unmerged:
        return files.weights_file.stat().st_size
    targets = files.target_modules
    total = 0
    for name, module in base.model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(weight, "element_size"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        hit = (
            re.fullmatch(targets, name) if isinstance(targets, str) else (leaf in targets or name in targets)
        )
        if hit:
            total += weight.numel() * weight.element_size()
    return total
