"""Adapter management, vLLM-compatible: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Loading registers an alias at runtime and preloads the merged variant, so the first real request is
already fast; unloading removes the alias and frees the variant as soon as no request is using it.

These routes change what every client gets for a model name, so they need an admin key
(``[server] admin_keys``) and are off when none is configured. A runtime alias can never take a name
that already means something else (a base, a base alias, a configured alias, a folder under the adapter
roots): otherwise one client could redirect another's traffic.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.adapters.files import local_adapter_folder, resolve_adapter_ref
from engines.catalog import AdapterSpec
from engines.engine import AnyEngine
from engines.names import ModelName
from gateway.errors import APIError
from gateway.requests import parse_body
from gateway.settings import Settings

Handler = Callable[[Request], Awaitable[Response]]


def admin_route(handler: Handler) -> Handler:
    """Only callers holding an admin key reach ``handler``; with no admin key configured, nobody does.

    Checked in the handler itself (not by path in a middleware) so that no spelling of the path can
    skip it, and before the body is read.
    """

    @wraps(handler)
    async def guarded(request: Request) -> Response:
        settings: Settings = request.app.state.settings
        keys = [key.encode() for key in settings.server.admin_keys if key]
        if not keys:
            raise APIError(
                403,
                "Admin routes (loading and unloading adapters and models) are disabled on this gateway: "
                "no admin key is configured. Set [server] admin_keys to enable them.",
                code="admin_disabled",
            )
        header = request.headers.get("authorization", "").encode("latin-1", "replace")
        scheme, _, token = header.partition(b" ")
        matched = False
        for key in keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(token.strip(), key)
        if not (scheme.lower() == b"bearer" and matched):
            raise APIError(
                401 if not header else 403,
                "This route needs an admin key: send 'Authorization: Bearer <admin key>'."
                if not header
                else "This key may not use admin routes; they need one of [server] admin_keys.",
                code="invalid_api_key" if not header else "admin_key_required",
                headers={"WWW-Authenticate": 'Bearer realm="peft-gateway-admin"'} if not header else None,
            )
        return await handler(request)

    return guarded


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


def _base_for(engine: AnyEngine, requested: str | None) -> str:
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


def _refuse_taken_name(request: Request, engine: AnyEngine, body: LoadAdapterRequest) -> AdapterSpec | None:
    """Refuse a ``lora_name`` that already means something; returns the runtime alias it replaces, if any."""
    name = body.lora_name
    for base in engine.catalog.bases:
        if name == base.name or name in base.aliases:
            raise APIError(
                400,
                f"'{name}' is the name of a base model; an adapter cannot take it.",
                param="lora_name",
                code="name_taken",
            )
    if name in _configured_aliases(request):
        raise APIError(
            403,
            f"'{name}' is an adapter alias from the configuration; it cannot be replaced at runtime.",
            param="lora_name",
            code="alias_configured",
        )
    if local_adapter_folder(engine.catalog.policy, name) is not None:
        raise APIError(
            400,
            f"'{name}' is the name of a folder under the adapter folders; an alias cannot hide it.",
            param="lora_name",
            code="name_taken",
        )
    existing = engine.catalog.adapter_alias(name)
    if existing is not None and not body.load_inplace and existing.source != body.lora_path:
        raise APIError(
            400,
            f"An adapter named '{name}' already exists; unload it first or pass load_inplace=true.",
            param="lora_name",
            code="adapter_exists",
        )
    return existing


def _configured_aliases(request: Request) -> set[str]:
    settings: Settings = request.app.state.settings
    return set(settings.adapters)


@admin_route
async def load_lora_adapter(request: Request) -> Response:
    body = await parse_body(request, LoadAdapterRequest)
    engine: AnyEngine = request.app.state.engine
    base = _base_for(engine, body.base_model_name)
    replaced = _refuse_taken_name(request, engine, body)
    # The path obeys the same rules as in a model name: a Hub id, or a folder under adapter_dirs.
    name = ModelName.parse(f"{base}+{body.lora_path}" + (f"@{body.revision}" if body.revision else ""))
    assert name.adapter is not None
    ref = resolve_adapter_ref(engine.catalog, engine.catalog.base(base), name.adapter, name.revision)
    spec = AdapterSpec(alias=body.lora_name, source=ref.source, base=base, revision=ref.revision)
    engine.catalog = engine.catalog.with_adapter(spec)
    try:
        lease = await engine.acquire(f"{base}+{body.lora_name}")
    except BaseException:
        _undo_registration(engine, spec, replaced)
        raise
    lease.release()
    return JSONResponse(_card(lease.model_id, base, ref.source))


def _undo_registration(engine: AnyEngine, spec: AdapterSpec, replaced: AdapterSpec | None) -> None:
    """Take back only this registration: aliases others registered meanwhile stay.

    Runs on the event loop with no ``await`` between the check and the swap, so no other registration
    can slip in between. If someone else has re-registered the name since, theirs stands.
    """
    if engine.catalog.adapter_alias(spec.alias) is not spec:
        return
    if replaced is not None:
        engine.catalog = engine.catalog.with_adapter(replaced)
    else:
        engine.catalog = engine.catalog.without_adapter(spec.alias)


def _card(model_id: str, base: str, root: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "parent": base, "root": root, "loaded": True}


@admin_route
async def unload_lora_adapter(request: Request) -> Response:
    body = await parse_body(request, UnloadAdapterRequest)
    engine: AnyEngine = request.app.state.engine
    if body.lora_name:
        if body.lora_name in _configured_aliases(request):
            raise APIError(
                403,
                f"'{body.lora_name}' is an adapter alias from the configuration; it cannot be removed at "
                "runtime (unload its loaded variant with 'model' instead).",
                param="lora_name",
                code="alias_configured",
            )
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


@admin_route
async def load_model(request: Request) -> Response:
    """Preload a base or ``base+adapter`` (what ``peft-gateway launch`` calls)."""
    body = await parse_body(request, LoadModelRequest)
    engine: AnyEngine = request.app.state.engine
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
