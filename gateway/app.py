"""The Starlette application: routes, error handlers, and the engine's lifetime on ``app.state``."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engines.engine import Engine, EngineLimits
from gateway.admin import load_lora_adapter, load_model, unload_lora_adapter
from gateway.cancellation import ClientDisconnected, handle_client_disconnected
from gateway.chat import chat_completions
from gateway.completions import completions
from gateway.errors import EXCEPTION_HANDLERS
from gateway.metrics import GatewayMetrics, metrics_endpoint
from gateway.middleware import ApiKeyAuth, BodySizeLimit, RequestContext
from gateway.models import get_model, list_models
from gateway.playground import playground
from gateway.responses import create_response
from gateway.settings import Settings

log = logging.getLogger("peft_gateway.app")


async def health(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness: config loaded, engine thread alive, HF cache writable (downloads would fail otherwise)."""
    engine: Engine = request.app.state.engine
    checks = {
        "config": True,
        "engine": engine.scheduler.alive,
        "cache_writable": hf_cache_writable(),
    }
    status = 200 if all(checks.values()) else 503
    return JSONResponse(
        {"status": "ready" if status == 200 else "not_ready", "checks": checks}, status_code=status
    )


def hf_cache_writable() -> bool:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-"):
            return True
    except OSError:
        return False


def engine_limits(settings: Settings) -> EngineLimits:
    return EngineLimits(
        max_memory_bytes=int(settings.cache.max_memory) if settings.cache.max_memory else None,
        max_models=settings.cache.max_models,
        max_batch=settings.engine.max_batch,
        max_waiting=settings.engine.max_waiting,
        prefill_chunk=settings.engine.prefill_chunk,
        prefix_cache_bytes=int(settings.engine.prefix_cache),
        threads=settings.engine.threads,
        lean_decode=settings.engine.lean_decode,
    )


def middleware(settings: Settings) -> list[Middleware]:
    """Outermost first: request id and access log, CORS (only if configured), body limit, auth."""
    server = settings.server
    stack = [Middleware(RequestContext)]
    if server.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=server.cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["authorization", "content-type", "x-request-id"],
                expose_headers=["x-request-id"],
            )
        )
    stack.append(Middleware(BodySizeLimit, max_bytes=int(server.max_body_bytes)))
    stack.append(Middleware(ApiKeyAuth, keys=list(server.api_keys)))
    return stack


def create_app(settings: Settings) -> Starlette:
    """A gateway for ``settings``; nothing is loaded until the first request names a model."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = Engine(settings.catalog(), engine_limits(settings))
        app.state.engine = engine
        app.state.metrics.attach(engine)
        try:
            yield
        finally:
            engine.close()

    routes = [
        Route("/", playground, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
        Route("/v1/load_model", load_model, methods=["POST"]),
        Route("/v1/unload_model", unload_lora_adapter, methods=["POST"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware(settings),
        exception_handlers={ClientDisconnected: handle_client_disconnected, **EXCEPTION_HANDLERS},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics()
    return app
