"""The Starlette application: routes, error handlers, and the engine's lifetime on ``app.state``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engines.engine import Engine, EngineLimits
from gateway.chat import chat_completions
from gateway.errors import EXCEPTION_HANDLERS
from gateway.models import get_model, list_models
from gateway.settings import Settings

log = logging.getLogger("peft_gateway.app")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def engine_limits(settings: Settings) -> EngineLimits:
    return EngineLimits(
        max_memory_bytes=int(settings.cache.max_memory) if settings.cache.max_memory else None,
        max_models=settings.cache.max_models,
        max_batch=settings.engine.max_batch,
        max_waiting=settings.engine.max_waiting,
    )


def create_app(settings: Settings) -> Starlette:
    """A gateway for ``settings``; nothing is loaded until the first request names a model."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = Engine(settings.catalog(), engine_limits(settings))
        app.state.engine = engine
        try:
            yield
        finally:
            engine.close()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.settings = settings
    return app
