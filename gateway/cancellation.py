"""Stopping work nobody will read: a non-streaming request whose client went away, or that ran too long.

Streaming responses are cancelled by the server when the client disconnects (the SSE generator is
closed, which closes the engine stream, which cancels the sequence). A non-streaming handler would not
notice, so it runs its generation next to a watcher of the ASGI ``receive`` channel and a deadline; the
first to finish decides, and cancelling the generation task releases its batch slot within one step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import APIError

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def until_disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has already been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_while_connected(request: Request, work: Awaitable[T], *, timeout: float) -> T:
    """``await work``, cancelled if the client disconnects or ``timeout`` seconds pass."""
    task: asyncio.Task[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _pending = await asyncio.wait(
            {task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if watcher in done:
        raise ClientDisconnected()
    raise APIError(
        504,
        f"The request did not finish within {timeout:g} seconds and was cancelled; ask for fewer tokens or "
        "stream the response.",
        code="timeout",
        type="timeout_error",
    )


async def handle_client_disconnected(request: Request, exc: Exception) -> Response:
    """Nobody is listening; answer nginx's 499 (client closed request) for the access log only."""
    return Response(status_code=499)
