"""What the gateway is configured to serve, as plain dataclasses the engine layer can use.

The gateway's settings (pydantic) are converted into these at start, so that the engine never depends on
the HTTP layer's request or settings models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engines.errors import ModelNotFound

QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BaseSpec:
    """A configured base model."""

    name: str
    source: str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str = "none"
    context_length: int | None = None
    aliases: tuple[str, ...] = ()
    trust_remote_code: bool = False
    token: str | None = None
    #: "merge": one merged variant per adapter; "multi": adapters stay unmerged and share batches;
    #: "auto": multi, with the busiest adapters promoted to merged variants.
    adapter_mode: str = "merge"

    def known_names(self) -> tuple[str, ...]:
        """Every name an adapter's ``base_model_name_or_path`` may use to mean this base."""
        return (self.name, self.source, *self.aliases)


@dataclass(frozen=True)
class AdapterSpec:
    """A configured adapter alias: ``source`` is a Hub id or a local folder."""

    alias: str
    source: str
    base: str
    revision: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class AdapterPolicy:
    """Rules adapters must pass before their weights are touched."""

    adapter_dirs: tuple[Path, ...] = ()
    allow_pickle: bool = True  # adapter_model.bin via torch's weights-only unpickler; False refuses it
    max_rank: int = 256
    base_match: str = "strict"  # "strict" refuses a mismatching base_model_name_or_path, "warn" logs it


@dataclass(frozen=True)
class Catalog:
    """Configured bases and adapter aliases, looked up by name or alias."""

    bases: tuple[BaseSpec, ...] = ()
    adapters: tuple[AdapterSpec, ...] = ()
    policy: AdapterPolicy = field(default_factory=AdapterPolicy)

    def base(self, name: str) -> BaseSpec:
        """The base configured under ``name`` or one of its aliases; 404 with the list otherwise."""
        for spec in self.bases:
            if name == spec.name or name in spec.aliases:
                return spec
        known = ", ".join(sorted(spec.name for spec in self.bases)) or "none configured"
        raise ModelNotFound(f"The model '{name}' does not exist. Configured base models: {known}.")

    def adapter_alias(self, alias: str) -> AdapterSpec | None:
        for spec in self.adapters:
            if spec.alias == alias:
                return spec
        return None

    def with_adapter(self, spec: AdapterSpec) -> Catalog:
        """A catalog with ``spec`` added, replacing an alias of the same name (runtime registration)."""
        others = tuple(a for a in self.adapters if a.alias != spec.alias)
        return Catalog(self.bases, (*others, spec), self.policy)

    def without_adapter(self, alias: str) -> Catalog:
        return Catalog(self.bases, tuple(a for a in self.adapters if a.alias != alias), self.policy)
