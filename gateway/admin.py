"""Adapter management, vLLM-compatible: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Loading registers an alias at runtime and preloads the merged variant, so the first real request is
already fast; unloading removes the alias and frees the variant as soon as no request is using it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.adapters import resolve_adapter_ref
from engines.catalog import AdapterSpec
from engines.engine import Engine
from engines.names import ModelName
from gateway.errors import APIError
from gateway.requests import parse_body


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    lora_path: str = Field(min_length=1, max_length=1024)
    base_model_name: str | None = None
    revision: str | None = None
    load_inplace: bool = False


class LoadModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """``lora_name`` (vLLM) unregisters an alias; ``model`` unloads any loaded base or variant."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    lora_name: str | None = None
    model: str | None = None


def _base_for(engine: Engine, requested: str | None) -> str:
    if requested:
        return engine.catalog.base(requested).name
    if len(engine.catalog.bases) == 1:
        return engine.catalog.bases[0].name
    names = ", ".join(base.name for base in engine.catalog.bases)
    raise APIError(
        400,
        f"Several base models are configured ({names}); say which one with 'base_model_name'.",
        param="base_model_name",
    )


async def load_lora_adapter(request: Request) -> Response:
    body = await parse_body(request, LoadAdapterRequest)
    engine: Engine = request.app.state.engine
    base = _base_for(engine, body.base_model_name)
    existing = engine.catalog.adapter_alias(body.lora_name)
    if existing is not None and not body.load_inplace and existing.source != body.lora_path:
        raise APIError(
            400,
            f"An adapter named '{body.lora_name}' already exists (source '{existing.source}'); unload it first "
            "or pass load_inplace=true.",
            param="lora_name",
            code="adapter_exists",
        )
    # The path obeys the same rules as in a model name: a Hub id, or a folder under adapter_dirs.
    name = ModelName.parse(f"{base}+{body.lora_path}" + (f"@{body.revision}" if body.revision else ""))
    assert name.adapter is not None
    ref = resolve_adapter_ref(engine.catalog, engine.catalog.base(base), name.adapter, name.revision)
    spec = AdapterSpec(alias=body.lora_name, source=ref.source, base=base, revision=ref.revision)
    previous = engine.catalog
    engine.catalog = previous.with_adapter(spec)
    try:
        lease = await engine.acquire(f"{base}+{body.lora_name}")
    except BaseException:
        engine.catalog = previous  # a refused adapter leaves no alias behind
        raise
    lease.release()
    return JSONResponse(_card(lease.model_id, base, ref.source))


def _card(model_id: str, base: str, root: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "parent": base, "root": root, "loaded": True}


async def unload_lora_adapter(request: Request) -> Response:
    body = await parse_body(request, UnloadAdapterRequest)
    engine: Engine = request.app.state.engine
    if body.lora_name:
        spec = engine.catalog.adapter_alias(body.lora_name)
        if spec is None:
            raise APIError(
                404,
                f"No adapter named '{body.lora_name}' is registered.",
                param="lora_name",
                code="model_not_found",
            )
        key = engine.pool.variant_key(spec.base, spec.alias, spec.revision)
        engine.catalog = engine.catalog.without_adapter(body.lora_name)
        freed = engine.pool.unload(key)
        return JSONResponse({"id": f"{spec.base}+{spec.alias}", "unloaded": True, "freed": freed})
    if body.model:
        name = ModelName.parse(body.model)
        base = engine.catalog.base(name.base).name
        key = base if name.adapter is None else engine.pool.variant_key(base, name.adapter, name.revision)
        if key not in {entry.key for entry in engine.pool.entries()}:
            raise APIError(
                404, f"The model '{body.model}' is not loaded.", param="model", code="model_not_found"
            )
        freed = engine.pool.unload(key)
        if not freed:
            holders = sorted(e.loaded.name for e in engine.pool.entries() if e.base_key == key)
            reason = (
                f"its loaded variants {', '.join(holders)} share its weights; unload them first"
                if holders
                else "requests are running on it"
            )
            raise APIError(
                409,
                f"The model '{body.model}' is in use: {reason}. It stays loaded for now.",
                param="model",
                code="model_in_use",
            )
        return JSONResponse({"id": body.model, "unloaded": True, "freed": True})
    raise APIError(
        400, "Send 'lora_name' (an adapter alias) or 'model' (a loaded model) to unload.", param="lora_name"
    )


async def load_model(request: Request) -> Response:
    """Preload a base or ``base+adapter`` (what ``peft-gateway launch`` calls)."""
    body = await parse_body(request, LoadModelRequest)
    engine: Engine = request.app.state.engine
    lease = await engine.acquire(body.model)
    lease.release()
    loaded = lease.loaded
    return JSONResponse(
        {
            "id": body.model,
            "object": "model",
            "parent": loaded.parent,
            "root": loaded.root,
            "loaded": True,
            "dtype": loaded.dtype,
            "max_model_len": loaded.context_length,
            "load_seconds": round(loaded.load_seconds, 3),
        }
    )
