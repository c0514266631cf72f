"""``GET /v1/models`` and ``GET /v1/models/{id}``: what can be asked for, and what is loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.engine import AnyEngine, ModelInfo
from engines.names import is_hub_id
from gateway.errors import APIError


def public_root(info: ModelInfo) -> str | None:
    """``root`` as clients may see it: a Hub id, else the name the model is asked for by.

    vLLM puts the adapter's path there; here a local base or adapter folder is a server path, which
    clients must not learn, so it shows as the model's public name (alias, or the name relative to its
    adapter root) instead.
    """
    root = info.root
    if root is None:
        return None
    if is_hub_id(root) and not Path(root).expanduser().exists():
        return root
    if info.parent is None:
        return info.id
    adapter = info.id.split("+", 1)[1] if "+" in info.id else info.id
    return adapter.rsplit("@", 1)[0]


def model_card(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": info.owned_by,
        "parent": info.parent,
        "root": public_root(info),
        "loaded": info.loaded,
        "cached": info.cached or info.loaded,
        "dtype": info.dtype,
        "quantization": info.decisions.quantization if info.decisions else None,
        "dtype_reason": info.decisions.dtype_reason if info.decisions else None,
        "adapter_serving": info.decisions.serving if info.decisions else None,
        "adapter_serving_reason": info.decisions.serving_reason if info.decisions else None,
        "max_model_len": info.context_length,
    }


def with_aliases(engine: AnyEngine) -> list[ModelInfo]:
    """``engine.models()`` plus a row for each configured adapter alias, and every variant's context.

    ``demo-zh`` is a model name clients may send (shorthand for ``demo+demo-zh``), so it is listed and
    retrievable under that name too, with its base as ``parent``. A variant's context length is its
    base's, known from the configuration or the loaded base even before the variant itself is loaded.
    """
    rows = engine.models()
    by_id = {row.id: row for row in rows}
    rows = [
        dataclasses.replace(row, context_length=by_id[row.parent].context_length)
        if row.context_length is None and row.parent in by_id
        else row
        for row in rows
    ]
    by_id = {row.id: row for row in rows}
    for adapter in engine.catalog.adapters:
        variant = by_id.get(f"{adapter.base}+{adapter.alias}")
        if variant is not None and adapter.alias not in by_id:
            alias_row = dataclasses.replace(variant, id=adapter.alias)
            rows.append(alias_row)
            by_id[alias_row.id] = alias_row
    return rows


async def list_models(request: Request) -> Response:
    engine: AnyEngine = request.app.state.engine
    return JSONResponse({"object": "list", "data": [model_card(info) for info in with_aliases(engine)]})


async def get_model(request: Request) -> Response:
    engine: AnyEngine = request.app.state.engine
    wanted = request.path_params["model"]
    for info in with_aliases(engine):
        if info.id == wanted:
            return JSONResponse(model_card(info))
    raise APIError(404, f"The model '{wanted}' does not exist.", param="model", code="model_not_found")
