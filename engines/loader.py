"""Loading base models: the load planned from the checkpoint's headers, then read in the chosen dtype.

Adapter variants of a loaded base (merged or unmerged) are built in ``engines.adapters.variants``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from engines import hub
from engines.catalog import BaseSpec
from engines.checkpoint import DTYPE_BYTES, CheckpointFacts, checkpoint_facts
from engines.devices import auto_dtype_name
from engines.errors import ModelLoadFailed, public_text
from engines.forward.int8 import quantize_loaded
from engines.forward.kernels import NativeKernels
from engines.forward.layout import fuse_projections, projection_groups
from engines.vocabulary import CountsVocabulary
from engines.weights import load_streaming

log = logging.getLogger("peft_gateway.loader")

#: Quantizations done by bitsandbytes (CUDA); "int8" is the engine's own CPU format (``engines.forward.int8``).
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


def plan_base_load(spec: BaseSpec, room: int | None, fetcher: hub.HubFetcher | None = None) -> BasePlan:
    """Find the base's files and choose its dtype for ``room`` bytes of budget (``None``: unlimited).

    On a CPU, ``auto`` picks float32 wherever it fits with room to serve (a full-context KV cache and
    10% beside the weights) and is the faster choice: on a CPU without native bf16 (bf16 is emulated
    there), or where the compiled float32 step loads. That step serves several clients faster than
    torch's bf16 kernels even on CPUs with native bf16, and its products are exact float32 and
    batch-invariant, so greedy answers do not depend on the batch (bf16's do, unless ``[engine]
    deterministic``). Otherwise bf16 where the CPU has it natively, else the checkpoint's own half
    precision (bf16 for a float32 checkpoint). The reason is kept for the log and ``/v1/models``.
    """
    folder = base_folder(spec, fetcher)
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
    else:
        native_bf16 = auto_dtype_name(spec.device) == "bfloat16"
        compiled = NativeKernels.load() is not None
        fp32_bytes = facts.parameters * 4
        serving = fp32_bytes // 10 + facts.kv_bytes_per_token(4) * (spec.context_length or facts.context)
        budget_text = f"the {room / 2**30:.1f} GiB budget free" if room is not None else "no budget"
        fits = room is None or fp32_bytes + serving <= room
        if fits and (compiled or not native_bf16):
            why = "the compiled float32 step serves it" if compiled else "no native bf16 on this CPU"
            name, reason = "float32", f"float32 fits the memory budget and {why}"
        elif native_bf16:
            name, reason = "bfloat16", "this CPU has native bf16 (avx512_bf16/amx_bf16)"
            if not fits:
                reason += f", and float32 would not fit {budget_text}"
        else:
            name = half
            reason = (
                f"float32 would need {fp32_bytes / 2**30:.1f} GiB plus {serving / 2**30:.1f} GiB to serve, "
                f"more than {budget_text}: using the checkpoint's {half}"
            )
    element = DTYPE_BYTES[name]
    resident = facts.parameters * element
    transient = facts.largest_tensor * max(element, DTYPE_BYTES.get(facts.stored_dtype, 4))
    return BasePlan(folder, name, reason, resident, resident + transient)


def _plan_int8_load(spec: BaseSpec, folder: Path, facts: CheckpointFacts) -> BasePlan:
    """int8 weights; the dtype chosen here is the activations' and the KV cache's (and norms').

    ``auto`` takes float32 wherever the compiled kernels load, native bf16 or not: the bytes a step
    reads are the int8 weights either way, and only float32 activations reach the compiled int8
    product and whole decode step (faster than torch's bf16 int8 kernel per product, and a step without
    the interpreter between layers; figures in bench/README.md); the price is a float32 KV cache, which
    the budget counts.
    """
    if spec.dtype != "auto":
        name, why = spec.dtype, "configured"
    elif NativeKernels.load() is not None:
        name, why = "float32", "the compiled int8 kernels take float32 activations"
    elif auto_dtype_name(spec.device) == "bfloat16":
        name, why = "bfloat16", "this CPU has native bf16"
    else:
        name, why = "float32", "no native bf16 on this CPU"
    reason = f"int8 weights (per-channel scales); activations and KV cache in {name}: {why}"
    resident = facts.int8_bytes(DTYPE_BYTES[name])
    # One matrix read in its stored dtype, plus a block of rows quantized in float32.
    transient = facts.largest_tensor * DTYPE_BYTES.get(facts.stored_dtype, 4) + 64 * 2**20
    return BasePlan(folder, name, reason, resident, resident + transient)


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def base_folder(spec: BaseSpec, fetcher: hub.HubFetcher | None = None) -> Path:
    """The local folder of a base: the configured folder, or a Hub snapshot in the HF cache.

    A base is fetched with no deadline (it can be many GB), through ``fetcher`` where given (the
    engine's, so that shutdown cancels a stalled download), else a one-off fetcher (``pull``).
    """
    local = Path(spec.source).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or spec.source.startswith((".", "~")):
        log.error("base model folder %r of %s does not exist", spec.source, spec.name)
        raise ModelLoadFailed(f"The folder configured for base model '{spec.name}' does not exist.")
    fetch = fetcher or hub.HubFetcher(negative_ttl=0)

    def snapshot(patterns: tuple[str, ...]) -> Path:
        return fetch.snapshot(
            spec.source,
            revision=spec.revision,
            allow_patterns=patterns,
            token=spec.token,
            what="model",
            deadline=False,
        )

    folder = snapshot(hub.BASE_FILES)
    if any(folder.glob("*.safetensors")):
        return folder
    # No safetensors weights: an older checkpoint that ships only pickle ones.
    return snapshot((*hub.BASE_FILES, *hub.BASE_PICKLE_FILES))


def load_base(spec: BaseSpec, plan: BasePlan | None = None) -> LoadedModel:
    """Load tokenizer and weights of a configured base; safetensors are preferred over pickle.

    ``plan`` (from ``plan_base_load``) carries the dtype chosen against the memory budget.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
