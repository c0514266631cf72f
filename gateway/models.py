"""``GET /v1/models`` and ``GET /v1/models/{id}``: what can be asked for, and what is loaded."""

from __future__ import annotations

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
        "dtype_reason": info.decisions.dtype_reason if info.decisions else None,
        "adapter_serving": info.decisions.serving if info.decisions else None,
        "adapter_serving_reason": info.decisions.serving_reason if info.decisions else None,
        "max_model_len": info.context_length,
    }


async def list_models(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    return JSONResponse({"object": "list", "data": [model_card(info) for info in engine.models()]})


async def get_model(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    wanted = request.path_params["model"]
    for info in engine.models():
        if info.id == wanted:
            return JSONResponse(model_card(info))
    raise APIError(404, f"The model '{wanted}' does not exist.", param="model", code="model_not_found")
