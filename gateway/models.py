"""``GET /v1/models`` and ``GET /v1/models/{id}``: what can be asked for, and what is loaded."""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.engine import Engine, ModelInfo
from gateway.errors import APIError


def model_card(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": info.owned_by,
        "parent": info.parent,
        "root": info.root,
        "loaded": info.loaded,
        "cached": info.cached or info.loaded,
        "dtype": info.dtype,
        "max_model_len": info.context_length,
    }


def with_aliases(engine: Engine) -> list[ModelInfo]:
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
    engine: Engine = request.app.state.engine
    return JSONResponse({"object": "list", "data": [model_card(info) for info in with_aliases(engine)]})


async def get_model(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    wanted = request.path_params["model"]
    for info in with_aliases(engine):
        if info.id == wanted:
            return JSONResponse(model_card(info))
    raise APIError(404, f"The model '{wanted}' does not exist.", param="model", code="model_not_found")
