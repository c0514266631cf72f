"""The Starlette application: routes, error handlers, and the engine's lifetime on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engines.engine import AnyEngine, Engine, EngineLimits
from gateway.admin import load_lora_adapter, load_model, unload_lora_adapter
from gateway.cancellation import ClientDisconnected, handle_client_disconnected
from gateway.chat import chat_completions
from gateway.completions import completions
from gateway.errors import EXCEPTION_HANDLERS
from gateway.metrics import GatewayMetrics, metrics_endpoint
from gateway.middleware import ApiKeyAuth, BodySizeLimit, RequestContext
from gateway.models import get_model, list_models
from gateway.playground import playground
from gateway.responses.route import create_response
from gateway.settings import Settings

log = logging.getLogger("peft_gateway.app")

#: Threads preparing prompts at once; more would only compete with the engine for the same cores.
PROMPT_WORKERS = 4


async def health(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness: config loaded, engine thread alive, HF cache writable (downloads would fail otherwise)."""
    engine: AnyEngine = request.app.state.engine
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


async def client_gone_mid_body(request: Request, exc: Exception) -> Response:
    """A client that hangs up while sending its body: one quiet log line, not an unhandled 500."""
    log.info("client disconnected while sending the request body: %s %s", request.method, request.url.path)
    return Response(status_code=499)


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
        deterministic=settings.engine.deterministic,
        fetch_timeout=settings.hub.fetch_timeout,
        negative_cache_seconds=settings.hub.negative_cache_seconds,
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
    # An admin key also works as an API key; the admin routes themselves check for an admin key.
    keys = [*server.api_keys, *server.admin_keys] if server.api_keys else []
    stack.append(Middleware(ApiKeyAuth, keys=keys))
    return stack


#: Makes the app's engine and hooks it to the app's metrics: the in-process ``Engine`` by default, or an
#: engine-like client of engine replicas elsewhere (``gateway.cluster.engine``), so the routes stay the same.
EngineFactory = Callable[[Settings, GatewayMetrics], AnyEngine]


def local_engine(settings: Settings, metrics: GatewayMetrics) -> Engine:
    engine = Engine(settings.catalog(), engine_limits(settings))
    metrics.attach(engine)
    return engine


def exit_requested(app: Starlette) -> bool:
    """Whether the server running ``app`` has been told to stop (SIGTERM, SIGINT).

    ``peft-gateway serve`` puts its ``uvicorn.Server`` on ``app.state.server`` (``gateway.serving.serve``),
    whose ``should_exit`` uvicorn's own signal handler sets. sse-starlette's ``AppStatus.should_exit``
    alone is not enough: only sse-starlette's patch of ``uvicorn.Server.handle_exit`` sets it, and that
    patch is installed when ``sse_starlette.sse`` is first imported, which here happens lazily, after
    uvicorn has bound the unpatched handler to the signals. SIGTERM then never set it, and a request
    waiting on a stalled Hub held shutdown until uvicorn's backstop (``timeout_graceful_shutdown``, 40 s
    with the default grace), which cut it with a bare 500. It is still honoured for hosts that set it.
    """
    from sse_starlette.sse import AppStatus

    server = getattr(app.state, "server", None)
    return bool(AppStatus.should_exit or getattr(server, "should_exit", False))


async def cancel_fetches_on_exit(
    engine: AnyEngine, exit_requested: Callable[[], bool], poll: float = 0.1
) -> None:
    """As soon as ``exit_requested()``, stop waiting on the Hub.

    uvicorn runs the lifespan's shutdown only after connections drain, and a request waiting on a
    stalled Hub fetch would hold that for up to ``[hub] fetch_timeout``; cancelling the fetches answers
    it at once (503 ``fetch_cancelled``), so the process exits long before ``[server] shutdown_grace``.
    """
    while not exit_requested():
        await asyncio.sleep(poll)
    engine.cancel_fetches()


def create_app(settings: Settings, engine_factory: EngineFactory = local_engine) -> Starlette:
    """A gateway for ``settings``; nothing is loaded until the first request names a model."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = engine_factory(settings, app.state.metrics)
        app.state.engine = engine
        # Chat templating and tokenization run here, off the event loop (see gateway.requests.off_loop).
        prompt_workers = ThreadPoolExecutor(
            max_workers=PROMPT_WORKERS, thread_name_prefix="peft-gateway-prompt"
        )
        app.state.prompt_workers = prompt_workers
        watcher = asyncio.ensure_future(cancel_fetches_on_exit(engine, lambda: exit_requested(app)))
        try:
            yield
        finally:
            watcher.cancel()
            prompt_workers.shutdown(wait=False, cancel_futures=True)
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
        exception_handlers={
            ClientDisconnected: handle_client_disconnected,
            ClientDisconnect: client_gone_mid_body,
            **EXCEPTION_HANDLERS,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics()
    return app
