"""Running the choices of one request and turning them into SSE frames.

A request with ``n`` choices is ``n`` engine sequences; their events are merged into one stream tagged
with the choice index.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from engines.engine import Engine
from engines.errors import EngineError
from engines.generation import GenerationEvent, GenerationRequest
from engines.pool import Lease
from gateway.errors import from_engine
from gateway.protocol import system_fingerprint

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
DONE = "[DONE]"


def sse_data(payload: dict[str, Any]) -> str:
    """The ``data:`` payload of one event (sse-starlette adds the framing)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def event_stream(frames: AsyncGenerator[str, None], lease: Lease) -> Response:
    """An SSE response: ``data: <payload>\n\n`` per item, no-store, unbuffered by proxies.

    The stream always ends with ``[DONE]``; an engine error after the stream started is sent as an
    ``{"error": ...}`` frame first (the status line is long gone), and the lease is released at the end,
    also when the client disconnects.
    """
    from sse_starlette import EventSourceResponse

    return EventSourceResponse(_finished(frames, lease), headers=SSE_HEADERS, sep="\n", ping=15)


async def _finished(frames: AsyncGenerator[str, None], lease: Lease) -> AsyncIterator[str]:
    try:
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame
        yield DONE
    except EngineError as exc:
        yield sse_data(from_engine(exc).body())
        yield DONE
    finally:
        lease.release()


def chunk_writer(
    kind: str, completion_id: str, created: int, model: str, include_usage: bool
) -> Callable[..., str]:
    """Builds the ``data:`` payload of each chunk; with ``include_usage`` every chunk carries ``usage``."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = envelope(kind, completion_id, created, model, choices)
        if include_usage:
            payload["usage"] = None
        payload.update(extra)
        return sse_data(payload)

    return chunk


async def run_choices(
    engine: Engine, lease: Lease, requests: list[GenerationRequest]
) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Events of all choices, as they come, each tagged with its choice index."""
    if len(requests) == 1:
        async with contextlib.aclosing(engine.generate(lease, requests[0])) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException]] = asyncio.Queue()

    async def pump(index: int, request: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(engine.generate(lease, request)) as events:
                async for event in events:
                    await queue.put((index, event))
        except Exception as exc:  # surfaced to the consumer below
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, request)) for i, request in enumerate(requests)]
    try:
        remaining = len(requests)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            if item.done:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def envelope(
    kind: str, completion_id: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """The fields every completion object and chunk shares, chat or text."""
    return {
        "id": completion_id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": system_fingerprint(model),
        "choices": choices,
        **extra,
    }


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def logprob_entries(event: GenerationEvent) -> list[dict[str, Any]]:
    """OpenAI chat ``logprobs.content`` entries for an event's tokens."""
    return [
        {
            "token": entry.token,
            "logprob": entry.logprob,
            "bytes": list(entry.bytes),
            "top_logprobs": [
                {"token": token, "logprob": logprob, "bytes": list(raw)} for token, raw, logprob in entry.top
            ],
        }
        for entry in event.logprobs
    ]
