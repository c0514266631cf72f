"""Loading base models and building merged base+adapter variants that share the base's tensors.

A merged variant is a *shallow clone* of the base's module tree: every module object is new, but every
parameter it does not target is the base's own tensor. Only the modules the adapter targets get new
weights (W' = W + scale * B @ A, computed by peft's own merge in fp32 and cast once), so a q/v adapter
costs a fraction of the base instead of a full copy, and the base stays unmerged and usable.
"""

from __future__ import annotations

import copy
import logging
import math
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
from engines.errors import AdapterRejected, ModelLoadFailed, public_text
from engines.vocabulary import CountsVocabulary

log = logging.getLogger("peft_gateway.loader")

#: Quantizations done by bitsandbytes (CUDA); "int8" is the engine's own CPU format (``engines.int8``).
BITSANDBYTES = frozenset({"8bit", "4bit"})


@dataclass
class LoadedModel(CountsVocabulary):
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
    #: Why this dtype was chosen (``dtype = "auto"`` weighs speed against the memory budget).
    dtype_reason: str = ""
    #: For an adapter variant: "merged" or "unmerged", and why (a merged copy must fit the budget).
    serving: str | None = None
    serving_reason: str = ""
    #: "int8" for the engine's int8 weights (adapters then only unmerged), else as configured.
    quantization: str = "none"


@dataclass(frozen=True)
class BasePlan:
    """What loading a base will take, decided before any weight is read."""

    folder: Path
    dtype: str
    dtype_reason: str
    #: Bytes the weights hold once loaded in ``dtype``.
    resident_bytes: int
    #: The most the load holds at once: the weights plus one tensor's cast temporary.
    peak_bytes: int


def plan_base_load(spec: BaseSpec, room: int | None) -> BasePlan:
    """Find the base's files and choose its dtype for ``room`` bytes of budget (``None``: unlimited).

    ``auto`` picks float32 only where it is faster here (no native bf16 on this CPU) *and* fits with
    room to serve (a full-context KV cache and 10% beside the weights); otherwise the checkpoint's own
    half precision (bf16 for a float32 checkpoint). The reason is kept for the log and ``/v1/models``.
    """
    folder = base_folder(spec)
    try:
        facts = checkpoint_facts(folder)
    except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
        raise ModelLoadFailed(f"Could not read the weights of base model '{spec.name}': {exc}") from exc
    half = facts.stored_dtype if facts.stored_dtype in ("bfloat16", "float16") else "bfloat16"
    if spec.quantization == "int8":
        return _plan_int8_load(spec, folder, facts)
    if spec.dtype != "auto":
        name, reason = spec.dtype, "configured"
    elif spec.device.startswith("cuda"):
        name = auto_dtype_name(spec.device)
        reason = f"{name} is native on {spec.device}"
    elif auto_dtype_name(spec.device) == "bfloat16":
        name, reason = "bfloat16", "this CPU has native bf16 (avx512_bf16/amx_bf16)"
    else:
        fp32_bytes = facts.parameters * 4
        serving = fp32_bytes // 10 + facts.kv_bytes_per_token(4) * (spec.context_length or facts.context)
        if room is None or fp32_bytes + serving <= room:
            name, reason = "float32", "no native bf16 on this CPU, and float32 fits the memory budget"
        else:
            name = half
            reason = (
                f"float32 would need {fp32_bytes / 2**30:.1f} GiB plus {serving / 2**30:.1f} GiB to serve, "
                f"more than the {room / 2**30:.1f} GiB budget free: using the checkpoint's {half}"
            )
    element = _DTYPE_BYTES[name]
    resident = facts.parameters * element
    transient = facts.largest_tensor * max(element, _DTYPE_BYTES.get(facts.stored_dtype, 4))
    return BasePlan(folder, name, reason, resident, resident + transient)


def _plan_int8_load(spec: BaseSpec, folder: Path, facts: CheckpointFacts) -> BasePlan:
    """int8 weights; the dtype chosen here is the activations' and the KV cache's (and norms').

    ``auto`` takes float32 wherever the compiled kernels load, native bf16 or not: the bytes a step
    reads are the int8 weights either way, and only float32 activations reach the compiled int8
    product and whole decode step (1.3-2.8x torch's bf16 int8 kernel per product, and a step without
    the interpreter between layers); the price is a float32 KV cache, which the budget counts.
    """
    from engines.native import NativeKernels

    if spec.dtype != "auto":
        name, why = spec.dtype, "configured"
    elif NativeKernels.load() is not None:
        name, why = "float32", "the compiled int8 kernels take float32 activations"
    elif auto_dtype_name(spec.device) == "bfloat16":
        name, why = "bfloat16", "this CPU has native bf16"
    else:
        name, why = "float32", "no native bf16 on this CPU"
    reason = f"int8 weights (per-channel scales); activations and KV cache in {name}: {why}"
    resident = facts.int8_bytes(_DTYPE_BYTES[name])
    # One matrix read in its stored dtype, plus a block of rows quantized in float32.
    transient = facts.largest_tensor * _DTYPE_BYTES.get(facts.stored_dtype, 4) + 64 * 2**20
    return BasePlan(folder, name, reason, resident, resident + transient)


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def base_folder(spec: BaseSpec) -> Path:
    """The local folder of a base: the configured folder, or a Hub snapshot in the HF cache."""
    local = Path(spec.source).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or spec.source.startswith((".", "~")):
        log.error("base model folder %r of %s does not exist", spec.source, spec.name)
        raise ModelLoadFailed(f"The folder configured for base model '{spec.name}' does not exist.")
    return hub.snapshot(
        spec.source, revision=spec.revision, allow_patterns=hub.BASE_FILES, token=spec.token, what="model"
    )


def load_base(spec: BaseSpec, plan: BasePlan | None = None) -> LoadedModel:
    """Load tokenizer and weights of a configured base; safetensors are preferred over pickle.

    ``plan`` (from ``plan_base_load``) carries the dtype chosen against the memory budget.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engines.int8 import quantize_loaded
    from engines.lean_decode import fuse_projections, projection_groups
    from engines.weights import load_streaming

    started = time.perf_counter()
    plan = plan or plan_base_load(spec, None)
    folder = plan.folder
    dtype = torch_dtype(plan.dtype)
    log.info("loading %s as %s: %s", spec.name, plan.dtype, plan.dtype_reason)
    has_safetensors = any(folder.glob("*.safetensors"))
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": has_safetensors,
    }
    if spec.quantization in BITSANDBYTES:
        kwargs["quantization_config"] = _quantization_config(spec)
        kwargs["device_map"] = spec.device
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        model = None
        if spec.quantization not in BITSANDBYTES:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
            model = load_streaming(
                folder, config, dtype, spec.device, spec.trust_remote_code, quantization=spec.quantization
            )
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
            if spec.quantization == "int8":
                log.warning(
                    "%s: quantizing to int8 after a full-precision load (no usable safetensors shards), "
                    "so this load peaks at the full-precision size",
                    spec.name,
                )
                quantize_loaded(model, projection_groups(model), spec.device)
    except (OSError, ValueError, RuntimeError, ImportError, KeyError, SafetensorError) as exc:
        # SafetensorError (a corrupt or truncated .safetensors file) derives from none of the others.
        log.error("could not load base model %s from %s", spec.name, folder, exc_info=True)
        raise ModelLoadFailed(f"Could not load base model '{spec.name}': {public_text(exc)}") from exc
    if spec.quantization not in BITSANDBYTES:
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
        dtype_reason=plan.dtype_reason,
        quantization=spec.quantization,
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
    from engines.weights import CheckpointError, read_header

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
    from engines.multilora import unsupported_reason

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
    variant = LoadedModel(
        name=name,
        model=merged,
        tokenizer=adapter_tokenizer(files.folder, base.tokenizer),
        dtype=base.dtype,
        device=base.device,
        context_length=base.context_length,
        eos_token_ids=base.eos_token_ids,
        sampling_defaults=base.sampling_defaults,
        nbytes=tensor_bytes(merged, exclude=storage_pointers(base.model)),
        load_seconds=time.perf_counter() - started,
        parent=base.name,
        root=files.ref.source,
        dtype_reason=base.dtype_reason,
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

    from engines.multilora import load_lora_weights

    clone = shallow_clone(base.model)
    layers = targeted_linears(clone, files)
    device = next(base.model.parameters()).device
    weights = load_lora_weights(files.weights_file, files.config, torch.float32, "cpu")
    missing = sorted(set(layers) - set(weights.modules))
    if missing:
        raise AdapterRejected(
            f"Adapter '{files.ref.key}' targets {len(missing)} layers its weights file does not hold "
            f"(e.g. {missing[:3]}): the file is incomplete or was saved for a different model."
        )
    with torch.no_grad():
        for module_name, (a, b) in weights.modules.items():
            layer = layers.get(module_name)
            if layer is None:
                raise AdapterRejected(
                    f"Adapter '{files.ref.key}' has weights for '{module_name}', which is not a layer it "
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
    from engines.weights import read_header

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


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint's files say about its size, read without loading a weight."""

    parameters: int
    largest_tensor: int  # elements
    stored_dtype: str
    layers: int
    kv_width: int  # key (or value) elements per token per layer
    context: int
    #: Elements and rows of the 2-D tensors (linear weights and embeddings): what int8 quantizes.
    matrix_parameters: int = 0
    matrix_rows: int = 0

    def kv_bytes_per_token(self, element: int) -> int:
        return 2 * self.layers * self.kv_width * element

    def int8_bytes(self, element: int) -> int:
        """Resident bytes once quantized: int8 matrices, a bf16 scale per row, the rest in ``element``."""
        return (
            self.matrix_parameters
            + 2 * self.matrix_rows
            + (self.parameters - self.matrix_parameters) * element
        )


def checkpoint_facts(folder: Path) -> CheckpointFacts:
    """Parameter count from the safetensors headers (or the size of pickle files), and the config."""
    import json

    from engines.weights import checkpoint_tensors

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    stored = stored if stored in _DTYPE_BYTES else "float32"
    tensors = checkpoint_tensors(folder)
    matrices = [t.shape for t in tensors.values() if len(t.shape) == 2]
    if tensors:
        sizes = [math.prod(t.shape) for t in tensors.values()]
    else:
        files = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        sizes = [path.stat().st_size // _DTYPE_BYTES[stored] for path in files]
    heads = int(text.get("num_attention_heads") or 1)
    hidden = int(text.get("hidden_size") or 0)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    return CheckpointFacts(
        parameters=sum(sizes),
        largest_tensor=max(sizes, default=0),
        stored_dtype=stored,
        layers=int(text.get("num_hidden_layers") or 0),
        kv_width=int(text.get("num_key_value_heads") or heads) * head_dim,
        context=int(text.get("max_position_embeddings") or 2048),
        # Without safetensors headers (pickle checkpoints) every weight counts as a matrix.
        matrix_parameters=sum(rows * cols for rows, cols in matrices) if tensors else sum(sizes),
        matrix_rows=sum(rows for rows, _cols in matrices),
    )


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
