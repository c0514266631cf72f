"""Gateway configuration: a TOML file plus ``PEFT_GATEWAY_*`` environment variables (env wins).

Unknown keys and wrong types fail at start with the key and the file named, because a typo in a config
that is silently ignored (a misspelt ``quantization``, say) becomes a confusing runtime behaviour.
Nested keys come from the environment with ``__``: ``PEFT_GATEWAY_SERVER__PORT=9000``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog

CONFIG_ENV = "PEFT_GATEWAY_CONFIG"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: ByteSize = Field(default=ByteSize(4 * 2**20))
    max_tokens_limit: int = Field(default=32768, ge=1)
    request_timeout: float = Field(default=600.0, gt=0)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Keys for the admin routes (load/unload adapters and models); the admin routes are off when empty.
    admin_keys: list[str] = Field(default_factory=list)
    #: Chat requests with more messages are refused (400) before any templating work.
    max_messages: int = Field(default=2048, ge=1)
    #: Characters of prompt text (all messages, or all completions prompts) a request may carry (400 above).
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    #: Seconds a chat template render plus tokenization may take before the request gets a 400.
    prompt_timeout: float = Field(default=10.0, gt=0)
    #: Seconds running streams may go on after SIGTERM before they are ended with an error frame.
    shutdown_grace: float = Field(default=30.0, ge=0)
    #: Seconds an idle keep-alive connection stays open.
    keep_alive_timeout: float = Field(default=5.0, gt=0)
    #: Seconds a client has to send a request's headers (slowloris guard).
    header_timeout: float = Field(default=10.0, gt=0)
    #: Open connections (plus running requests) above which new ones get 503.
    limit_concurrency: int = Field(default=1024, ge=1)


class ModelSettings(_Strict):
    source: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"
    #: "int8": the engine's own weight-only int8 for CPU (adapters served unmerged on it);
    #: "8bit"/"4bit": bitsandbytes on CUDA (no adapters).
    quantization: Literal["none", "int8", "8bit", "4bit"] = "none"
    context_length: int | None = Field(default=None, ge=1)
    aliases: list[str] = Field(default_factory=list)
    trust_remote_code: bool = False
    token: str | None = None
    adapter_mode: Literal["merge", "multi", "auto"] = "merge"
    #: How tool calls are read from this model's output; "auto": from its chat template.
    tool_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = "auto"

    @model_validator(mode="after")
    def _int8_is_for_cpu(self) -> ModelSettings:
        if self.quantization == "int8" and not self.device.startswith("cpu"):
            raise ValueError(
                f'quantization = "int8" is the CPU weight-only format, but device is {self.device!r}; '
                'on CUDA use quantization = "8bit" (bitsandbytes) or a half-precision dtype'
            )
        return self


class AdapterSettings(_Strict):
    source: str
    base: str
    revision: str | None = None
    token: str | None = None


class CacheSettings(_Strict):
    max_memory: ByteSize | None = None
    max_models: int | None = Field(default=None, ge=1)


class EngineSettings(_Strict):
    max_batch: int = Field(default=16, ge=1, le=256)
    max_waiting: int = Field(default=64, ge=0)
    prefill_chunk: int = Field(default=512, ge=16)
    prefix_cache: ByteSize = Field(default=ByteSize(256 * 2**20))
    threads: int = Field(default=0, ge=0, le=1024)
    lean_decode: bool = True
    #: Greedy answers independent of the batch in bf16 too (float32 and int8 always are): slower batches.
    deterministic: bool = False


class HubSettings(_Strict):
    #: Deadline of one adapter fetch from the Hub; a stalled Hub fails the request after it (503).
    fetch_timeout: float = Field(default=300.0, gt=0)
    #: How long the Hub's "no such adapter" answer is remembered (0: not at all).
    negative_cache_seconds: float = Field(default=60.0, ge=0)


class ClusterSettings(_Strict):
    """Serving on a Ray cluster (``peft-gateway serve --ray``): the engine deployment's shape.

    ``min_replicas``/``max_replicas`` switch on Serve's autoscaling (on queued requests per replica);
    otherwise ``num_replicas`` replicas run. ``max_models_per_replica`` is how many model names Serve
    remembers per replica for routing; it never frees memory (the pool's budget does that).
    """

    ray_address: str | None = None
    num_replicas: int = Field(default=1, ge=1)
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    cpus_per_replica: float = Field(default=1.0, ge=0)
    gpus_per_replica: float = Field(default=0.0, ge=0)
    max_models_per_replica: int = Field(default=16, ge=1)
    health_check_period_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _autoscaling_bounds(self) -> ClusterSettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas (autoscaling) or neither")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class Settings(BaseSettings):
    """Everything the gateway reads at start."""

    model_config = SettingsConfigDict(
        env_prefix="PEFT_GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    adapters: dict[str, AdapterSettings] = Field(default_factory=dict)
    adapter_dirs: list[Path] = Field(default_factory=list)
    allow_pickle: bool = True
    max_rank: int = Field(default=256, ge=1)
    base_match: Literal["strict", "warn"] = "strict"
    cache: CacheSettings = Field(default_factory=CacheSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    demo: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    def catalog(self) -> Catalog:
        """The engine's view of this configuration."""
        bases = tuple(
            BaseSpec(
                name=name,
                source=model.source,
                revision=model.revision,
                dtype=model.dtype,
                device=model.device,
                quantization=model.quantization,
                context_length=model.context_length,
                aliases=tuple(model.aliases),
                trust_remote_code=model.trust_remote_code,
                token=model.token,
                adapter_mode=model.adapter_mode,
            )
            for name, model in self.models.items()
        )
        adapters = tuple(
            AdapterSpec(
                alias=alias,
                source=adapter.source,
                base=adapter.base,
                revision=adapter.revision,
                token=adapter.token,
            )
            for alias, adapter in self.adapters.items()
        )
        policy = AdapterPolicy(
            adapter_dirs=tuple(self.adapter_dirs),
            allow_pickle=self.allow_pickle,
            max_rank=self.max_rank,
            base_match=self.base_match,
        )
        return Catalog(bases=bases, adapters=adapters, policy=policy)


class SettingsError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (or ``$PEFT_GATEWAY_CONFIG``), then the environment, then ``overrides``."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    toml_path = Path(path).expanduser() if path is not None else None
    where = str(toml_path) if toml_path is not None else "environment"
    if toml_path is not None and not toml_path.is_file():
        raise SettingsError(f"{toml_path}: config file not found")
    config = SettingsConfigDict(**{**Settings.model_config, "toml_file": toml_path})
    bound = type("Settings", (Settings,), {"model_config": config})
    try:
        settings: Settings = bound(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise SettingsError(f"{where}: invalid configuration: {problems}") from exc
    except ValueError as exc:  # TOML syntax errors
        raise SettingsError(f"{where}: cannot parse: {exc}") from exc
    _check_references(settings, where)
    return settings


def _check_references(settings: Settings, where: str) -> None:
    names = set(settings.models)
    for model in settings.models.values():
        names.update(model.aliases)
    for alias, adapter in settings.adapters.items():
        if adapter.base not in names:
            raise SettingsError(
                f"{where}: adapters.{alias}.base: '{adapter.base}' is not a configured model "
                f"(configured: {', '.join(sorted(settings.models)) or 'none'})"
            )
        if "+" in alias or "/" in alias:
            raise SettingsError(f"{where}: adapters.{alias}: an alias cannot contain '+' or '/'")
    for name in settings.models:
        if "+" in name:
            raise SettingsError(f"{where}: models.{name}: a model name cannot contain '+'")
