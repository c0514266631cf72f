"""The one route skeleton that chat completions and completions share.

Both endpoints hold a model, build their generation requests, admit every choice at once (so a full
engine is a 503 before any status line), then either stream SSE frames or wait for the whole answer
while watching for the client to go away; the model is released however that ends. What differs (how
requests are built from the body, how events become chunks or a response) is the route's ``prepare``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from engines.engine import Admitted, AnyEngine, EngineLease
from engines.generation import GenerationRequest
from gateway.cancellation import run_while_connected
from gateway.settings import Settings
from gateway.streaming import admit_all, event_stream


@dataclass(frozen=True)
class Prepared:
    """A route's requests for one body, and how their admitted choices become the answer."""

    requests: list[GenerationRequest]
    #: SSE payloads for ``(admitted, completion_id, created)``.
    frames: Callable[[list[Admitted], str, int], AsyncGenerator[str, None]]
    #: The whole response for ``(admitted, completion_id, created)``.
    complete: Callable[[list[Admitted], str, int], Awaitable[Response]]


async def serve_generation(
    request: Request,
    model: str,
    *,
    stream: bool,
    id_prefix: str,
    prepare: Callable[[AnyEngine, EngineLease], Awaitable[Prepared]],
) -> Response:
    """Acquire ``model``, prepare and admit the choices, then stream them or wait for them."""
    settings: Settings = request.app.state.settings
    engine: AnyEngine = request.app.state.engine
    lease = await engine.acquire(model)
    try:
        prepared = await prepare(engine, lease)
        admitted = admit_all(engine, lease, prepared.requests)
    except BaseException:
        lease.release()
        raise
    completion_id = f"{id_prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    if stream:
        frames = prepared.frames(admitted, completion_id, created)
        return event_stream(frames, lease, admitted, shutdown_grace=settings.server.shutdown_grace)
    try:
        return await run_while_connected(
            request,
            prepared.complete(admitted, completion_id, created),
            timeout=settings.server.request_timeout,
        )
    finally:
        for generation in admitted:
            generation.cancel()
        lease.release()
