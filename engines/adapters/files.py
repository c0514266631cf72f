"""Finding an adapter's files and checking them before any weight is touched.

Every refusal here happens on the small ``adapter_config.json`` (and a directory listing), so a bad
adapter costs no model memory and leaves the loaded base untouched. The adapters already in the local
HF cache are listed here too (``cached_adapters``), offline, for ``/v1/models``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from engines import hub
from engines.adapters.config import load_adapter_config
from engines.adapters.pickle_weights import safetensors_copy
from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.checkpoint import CheckpointError, read_header
from engines.errors import AdapterRejected, InvalidModelName, ModelNotFound, public_text
from engines.forward.multilora import declared_rank
from engines.names import is_hub_id, looks_like_path

log = logging.getLogger("peft_gateway.adapters")

#: A silent Hub must not hold a request (and the single-flight load behind it) forever; adapters are
#: small, so a few minutes is generous. Bases get no fixed limit: they can be many GB.
#: The default of ``[hub] fetch_timeout``; the engine's :class:`~engines.hub.HubFetcher` carries the value.
ADAPTER_FETCH_TIMEOUT = 300.0


@dataclass(frozen=True)
class AdapterRef:
    """Where an adapter comes from, before anything is fetched."""

    kind: str  # "local" or "hub"
    source: str  # absolute folder for "local", repo id for "hub"
    revision: str | None = None
    token: str | None = None
    alias: str | None = None
    #: What the client called a local adapter (relative to its adapter root), for messages.
    name: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """Identity of the adapter's weights: the same key means the same merged variant."""
        return f"{self.source}@{self.revision}" if self.revision else self.source

    @property
    def label(self) -> str:
        """The adapter's public name for messages: alias, the name the client used, or the Hub id.

        Never a server path: ``key`` of a local adapter is its absolute folder, which only the log sees.
        """
        if self.kind == "local":
            return self.alias or self.name or Path(self.source).name
        return self.alias or self.key


@dataclass(frozen=True)
class AdapterFiles:
    """A local folder holding an adapter whose config passed the checks that need no base weights."""

    ref: AdapterRef
    folder: Path
    config: dict[str, Any]
    #: Always safetensors: a pickle-only adapter's weights are read once, safely, and converted.
    weights_file: Path

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    @property
    def target_modules(self) -> list[str] | str:
        targets = self.config.get("target_modules") or []
        return targets if isinstance(targets, str) else list(targets)


def resolve_adapter_ref(catalog: Catalog, base: BaseSpec, adapter: str, revision: str | None) -> AdapterRef:
    """Turn the adapter part of a model name into a reference: alias, local folder, or Hub id."""
    spec = catalog.adapter_alias(adapter)
    if spec is not None:
        return _ref_from_alias(catalog.policy, base, spec, revision)
    local = local_adapter_folder(catalog.policy, adapter)
    if local is not None:
        return AdapterRef(kind="local", source=str(local), alias=None, name=adapter)
    if looks_like_path(adapter):
        log.info("adapter folder %r not found under %s", adapter, _roots_text(catalog.policy))
        raise ModelNotFound(f"Adapter folder '{adapter}' was not found under any configured adapter folder.")
    if is_hub_id(adapter):
        return AdapterRef(kind="hub", source=adapter, revision=revision, token=base.token)
    known = ", ".join(sorted(a.alias for a in catalog.adapters)) or "none configured"
    raise ModelNotFound(
        f"Adapter '{adapter}' is not a configured alias ({known}), a folder under the adapter folders, "
        "or a Hub id of the form 'org/name'."
    )


def _ref_from_alias(
    policy: AdapterPolicy, base: BaseSpec, spec: AdapterSpec, revision: str | None
) -> AdapterRef:
    if spec.base and spec.base != base.name and spec.base not in base.aliases:
        raise AdapterRejected(
            f"Adapter '{spec.alias}' is configured for base '{spec.base}', not '{base.name}'; "
            f"use '{spec.base}+{spec.alias}'."
        )
    if is_hub_id(spec.source) and not Path(spec.source).is_dir():
        return AdapterRef(
            kind="hub",
            source=spec.source,
            revision=revision or spec.revision,
            token=spec.token or base.token,
            alias=spec.alias,
        )
    folder = Path(spec.source).expanduser().resolve()
    if not folder.is_dir():
        log.warning("adapter alias %s points to %r, which is not a folder", spec.alias, spec.source)
        raise ModelNotFound(f"Adapter '{spec.alias}' points to a folder that does not exist on the server.")
    return AdapterRef(kind="local", source=str(folder), alias=spec.alias)


def _roots_text(policy: AdapterPolicy) -> str:
    return ", ".join(str(root) for root in policy.adapter_dirs) or "none configured"


def local_adapter_folder(policy: AdapterPolicy, text: str) -> Path | None:
    """The real folder ``text`` names inside one of the adapter roots, or ``None``.

    Paths are resolved (symlinks included) before the containment check, so neither ``..`` nor a
    symlink can lead outside the roots; an absolute path outside them is refused rather than read.
    """
    if "\x00" in text:
        raise InvalidModelName("Adapter path contains a NUL character.")
    # Refused outright, whether or not the target exists, so the answer reveals nothing about the disk.
    if ".." in text.replace("\\", "/").split("/"):
        raise InvalidModelName(f"Adapter path '{text}' must not contain '..' components.")
    path = PurePath(os.path.expanduser(text))
    roots = [root.expanduser().resolve() for root in policy.adapter_dirs]
    candidates = [Path(path)] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        real = candidate.resolve()
        inside = any(real == root or root in real.parents for root in roots)
        if not inside:
            if path.is_absolute() or text.startswith("~"):
                log.info("adapter path %r is outside the adapter folders %s", text, _roots_text(policy))
                raise InvalidModelName(f"Adapter path '{text}' is outside the configured adapter folders.")
            if candidate.exists():
                raise InvalidModelName(
                    f"Adapter path '{text}' leads outside the configured adapter folders (symlink?)."
                )
            continue
        if real.is_dir() and (real / "adapter_config.json").is_file():
            return real
    return None


def fetch_adapter(ref: AdapterRef, fetcher: hub.HubFetcher | None = None) -> Path:
    """The local folder holding the adapter's files, downloading only adapter files from the Hub.

    ``fetcher`` is the engine's (its deadline, negative cache and shutdown cancellation); without one, a
    fresh fetcher with the default deadline is used (``peft-gateway pull``).
    """
    if ref.kind == "local":
        return Path(ref.source)
    fetcher = fetcher or hub.HubFetcher(timeout=ADAPTER_FETCH_TIMEOUT)
    return fetcher.snapshot(
        ref.source, revision=ref.revision, allow_patterns=hub.ADAPTER_FILES, token=ref.token, what="adapter"
    )


def read_adapter_files(ref: AdapterRef, folder: Path, policy: AdapterPolicy) -> AdapterFiles:
    """Read and check ``adapter_config.json`` and find the weights file, refusing what cannot work."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterRejected(f"Adapter '{ref.label}' has no adapter_config.json: it is not a PEFT adapter.")
    config = load_adapter_config(config_path, ref.label, max_rank=policy.max_rank)
    safetensors = folder / "adapter_model.safetensors"
    pickle = folder / "adapter_model.bin"
    if safetensors.is_file():
        weights = safetensors
    elif pickle.is_file():
        if not policy.allow_pickle:
            raise AdapterRejected(
                f"Adapter '{ref.label}' ships its weights only as pickle (adapter_model.bin), and this "
                "gateway is configured with allow_pickle = false."
            )
        weights = safetensors_copy(pickle, config, ref.label)
    else:
        raise AdapterRejected(f"Adapter '{ref.label}' has no adapter_model.safetensors weights file.")
    return AdapterFiles(ref=ref, folder=folder, config=config, weights_file=weights)


def check_tensor_ranks(files: AdapterFiles, policy: AdapterPolicy) -> None:
    """Ranks come from the tensors, not the config: both must agree and stay within ``max_rank``.

    A config saying ``r = 8`` over rank-4096 matrices would otherwise pass every check, and unmerged
    serving pads every adapter of a base to the largest rank it holds.
    """
    try:
        tensors = read_header(files.weights_file)
    except (OSError, CheckpointError) as exc:
        raise AdapterRejected(
            f"Adapter '{files.ref.label}' has a corrupt weights file: {public_text(exc)}"
        ) from exc
    for key, stored in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None or len(stored.shape) != 2:
            continue
        module, which = match.group(1), match.group(2)
        rank = stored.shape[0] if which == "lora_A" else stored.shape[1]
        declared = declared_rank(files.config, module)
        if rank > policy.max_rank:
            raise AdapterRejected(
                f"Adapter '{files.ref.label}' has LoRA rank {rank} in '{module}', above this gateway's "
                f"maximum of {policy.max_rank} (max_rank)."
            )
        if rank != declared:
            raise AdapterRejected(
                f"Adapter '{files.ref.label}': '{module}' {which} has rank {rank} but adapter_config.json "
                f"declares {declared}; the config does not describe these weights."
            )


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def check_base_match(files: AdapterFiles, base: BaseSpec, policy: AdapterPolicy) -> None:
    """Refuse (or, in ``warn`` mode, log) an adapter trained for a different base model."""
    declared = files.config.get("base_model_name_or_path")
    if not declared:
        return
    if same_model(str(declared), base.known_names()):
        return
    message = (
        f"Adapter '{files.ref.label}' was trained for base '{declared}', but the requested base is "
        f"'{base.name}'{_public_source(base)}. Use an adapter made for '{base.name}', add '{declared}' to the "
        f'base\'s aliases if they are the same model, or set base_match = "warn".'
    )
    if policy.base_match == "warn":
        log.warning("%s Serving it anyway (base_match = warn).", message)
        return
    raise AdapterRejected(message)


def _public_source(base: BaseSpec) -> str:
    """`` (org/name)`` for a base from the Hub; nothing for a local folder, a server path."""
    return f" ({base.source})" if is_hub_id(base.source) and not Path(base.source).exists() else ""


def same_model(declared: str, names: tuple[str, ...]) -> bool:
    """Hub ids and local copies of them name the same model when their last components agree."""

    def norm(text: str) -> str:
        return text.rstrip("/").lower()

    declared_norm = norm(declared)
    tails = {norm(name).rsplit("/", 1)[-1] for name in names}
    return declared_norm in {norm(name) for name in names} or declared_norm.rsplit("/", 1)[-1] in tails


@dataclass(frozen=True)
class CachedAdapter:
    """A LoRA adapter already in the local HF cache, usable offline."""

    repo_id: str
    folder: Path
    base_model: str | None


def cached_adapters(cache_dir: str | Path | None = None) -> list[CachedAdapter]:
    """Adapters found in the HF cache (one entry per repo: its newest snapshot), without any network.

    One bad folder (a config that is hostile, unreadable, or a link whose blob is gone) is skipped and
    logged: it must never make the whole listing fail.
    """
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE)
    candidates: list[tuple[float, Path]] = []
    for config in root.glob("models--*/snapshots/*/adapter_config.json"):
        try:
            candidates.append((config.stat().st_mtime, config))
        except OSError:
            continue  # a snapshot link whose blob was removed
    found: dict[str, CachedAdapter] = {}
    for _mtime, config in sorted(candidates):
        repo_folder = config.parents[2].name  # models--org--name
        repo_id = repo_folder.removeprefix("models--").replace("--", "/", 1)
        try:
            data = load_adapter_config(config, repo_id)
        except AdapterRejected as exc:
            log.warning("skipping cached adapter %s (%s): %s", repo_id, config.parent, exc.message)
            continue
        base = data.get("base_model_name_or_path")
        found[repo_id] = CachedAdapter(
            repo_id=repo_id, folder=config.parent, base_model=str(base) if base else None
        )
    return list(found.values())
