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

from engines.engine import Admitted, AnyEngine, EngineLease
from engines.errors import EngineError
from engines.generation import GenerationEvent, GenerationRequest
from gateway.errors import APIError, from_engine
from gateway.protocol import system_fingerprint

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
DONE = "[DONE]"


def sse_data(payload: dict[str, Any]) -> str:
    """The ``data:`` payload of one event (sse-starlette adds the framing)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def event_stream(
    frames: AsyncGenerator[str, None],
    lease: EngineLease,
    admitted: list[Admitted],
    *,
    shutdown_grace: float = 30.0,
) -> Response:
    """An SSE response: ``data: <payload>\n\n`` per item, no-store, unbuffered by proxies.

    The stream always ends with ``[DONE]``; an engine error after the stream started is sent as an
    ``{"error": ...}`` frame first (the status line is long gone), and the lease is released at the end,
    also when the client disconnects. When the server is told to stop (SIGTERM), the stream may go on for
    ``shutdown_grace`` seconds and is then ended the same way, with an error frame and ``[DONE]``.
    """
    import anyio
    from sse_starlette import EventSourceResponse
    from starlette.background import BackgroundTask

    async def cleanup() -> None:  # async: runs on the event loop, not in a thread
        """Also runs if the stream was torn down before its generator ever started (its ``finally``
        would then never run): the queued sequences are dropped and the model is released."""
        for generation in admitted:
            generation.cancel()
        lease.release()

    shutdown = anyio.Event()
    return EventSourceResponse(
        _finished(frames, lease, admitted, shutdown, shutdown_grace),
        background=BackgroundTask(cleanup),
        headers=SSE_HEADERS,
        sep="\n",
        ping=15,
        shutdown_event=shutdown,
        # sse-starlette cuts the stream this long after shutdown starts; ours ends it cleanly before.
        shutdown_grace_period=shutdown_grace + 5,
    )


class _Drained(Exception):
    """The shutdown grace period ran out while the stream was still going."""


async def _finished(
    frames: AsyncGenerator[str, None],
    lease: EngineLease,
    admitted: list[Admitted],
    shutdown: Any,
    grace: float,
) -> AsyncIterator[str]:
    try:
        async with contextlib.aclosing(frames):
            async for frame in _until_drained(frames, shutdown, grace):
                yield frame
        yield DONE
    except EngineError as exc:
        yield sse_data(from_engine(exc).body())
        yield DONE
    except _Drained:
        error = APIError(
            503,
            "The server is shutting down; this stream was ended before it finished. Retry the request.",
            code="server_shutting_down",
        )
        yield sse_data(error.body())
        yield DONE
    finally:
        for generation in admitted:
            generation.cancel()
        lease.release()


async def _until_drained(
    frames: AsyncGenerator[str, None], shutdown: Any, grace: float
) -> AsyncIterator[str]:
    """``frames`` as they come, until ``grace`` seconds after ``shutdown`` is set (then ``_Drained``)."""

    async def drain_deadline() -> None:
        await shutdown.wait()
        await asyncio.sleep(grace)

    deadline: asyncio.Future[None] = asyncio.ensure_future(drain_deadline())
    step: asyncio.Future[str] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(frames))
            waiting: set[asyncio.Future[Any]] = {step, deadline}
            done, _pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                raise _Drained()
            try:
                frame = step.result()
            except StopAsyncIteration:
                return
            yield frame
    finally:
        deadline.cancel()
        if step is not None and not step.done():
            # Stop the pending read before anyone closes ``frames`` (it cannot be closed mid-read).
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)


def admit_all(engine: AnyEngine, lease: EngineLease, requests: list[GenerationRequest]) -> list[Admitted]:
    """Queue every choice now, or none: ``Overloaded`` (503) comes before any status line is sent."""
    admitted: list[Admitted] = []
    try:
        for request in requests:
            admitted.append(engine.admit(lease, request))
    except BaseException:
        for generation in admitted:
            generation.cancel()
        raise
    return admitted


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


async def run_choices(admitted: list[Admitted]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Events of all (already admitted) choices, as they come, each tagged with its choice index."""
    if len(admitted) == 1:
        async with contextlib.aclosing(admitted[0].events) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException]] = asyncio.Queue()

    async def pump(index: int, generation: Admitted) -> None:
        try:
            async with contextlib.aclosing(generation.events) as events:
                async for event in events:
                    await queue.put((index, event))
        except Exception as exc:  # surfaced to the consumer below
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, generation)) for i, generation in enumerate(admitted)]
    try:
        remaining = len(admitted)
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
        for generation in admitted:
            generation.cancel()


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
