"""``ReplicaHeader``: a streamed response's headers wait for the replica's name; others pass through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.cluster.header import CURRENT_REPLICA, REPLICA_HEADER, ReplicaHeader


async def streamed(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"role,"  # sent before the replica is known, as the chat route's first chunk is
        note = CURRENT_REPLICA.get()
        assert note is not None
        await note.record("SERVE_REPLICA::app#EngineReplica#abc")
        await note.record("another")  # the first name wins (n > 1 choices)
        yield b"token"

    return StreamingResponse(body())


async def described(request: Request) -> Response:
    note = CURRENT_REPLICA.get()
    assert note is not None
    note.described = "SERVE_REPLICA::app#EngineReplica#xyz"
    return JSONResponse({"loaded": True})


async def local(request: Request) -> Response:
    return JSONResponse({"ok": True})


def app() -> Starlette:
    routes = [Route("/stream", streamed), Route("/described", described), Route("/local", local)]
    application = Starlette(routes=routes)
    application.add_middleware(ReplicaHeader)
    return application


def get(path: str) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    return asyncio.run(run())


def test_stream_headers_name_the_replica_that_streamed() -> None:
    response = get("/stream")
    assert response.headers[REPLICA_HEADER] == "SERVE_REPLICA::app#EngineReplica#abc"
    assert response.text == "role,token"


def test_a_response_without_a_stream_names_the_replica_that_loaded_the_model() -> None:
    assert get("/described").headers[REPLICA_HEADER] == "SERVE_REPLICA::app#EngineReplica#xyz"


def test_responses_no_replica_served_have_no_replica_header() -> None:
    response = get("/local")
    assert REPLICA_HEADER not in response.headers and response.json() == {"ok": True}
