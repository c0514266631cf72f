"""``POST /v1/responses``: OpenAI's Responses API, stateless, served by the chat-completions route.

The request is translated into a chat-completions body (``responses_input``) and handed to
``chat_completions`` itself, in-process: tools, ``response_format``, sampling, limits, cancellation and
errors are the chat path's, so whatever chat learns (tool-call parsing, constrained decoding) the
Responses API has too. The chat answer, whole or as SSE chunks, is translated back into a Response
object or Responses stream events (``responses_output``). Chat's errors are re-labelled with the
Responses field they are about.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message

from engines.errors import EngineError
from gateway.chat import chat_completions
from gateway.errors import APIError, from_engine
from gateway.requests import parse_body
from gateway.responses.input import refuse_unsupported, to_chat
from gateway.responses.output import ResponseTranslator, completion_as_chunk, new_id
from gateway.responses.protocol import ResponsesRequest
from gateway.streaming import SSE_HEADERS


async def create_response(request: Request) -> Response:
    body = await parse_body(request, ResponsesRequest)
    refuse_unsupported(body)
    translation = to_chat(body)
    try:
        answer = await chat_completions(_chat_request(request, translation.body))
    except APIError as exc:
        raise translation.remap(exc) from exc
    except EngineError as exc:
        raise translation.remap(from_engine(exc)) from exc
    translator = ResponseTranslator(skeleton(body))
    if not body.stream:
        if not isinstance(answer, JSONResponse):  # chat answers JSON unless asked to stream
            return answer
        completion = json.loads(bytes(answer.body))
        translator.start()
        translator.feed(completion_as_chunk(completion))
        final = translator.finish()[-1]["response"]
        return JSONResponse(final)
    from sse_starlette import EventSourceResponse

    chunks = getattr(answer, "body_iterator", None)
    if chunks is None:
        return answer
    return EventSourceResponse(_events(chunks, translator), headers=SSE_HEADERS, sep="\n", ping=15)


def _chat_request(request: Request, body: dict[str, Any]) -> Request:
    """A request for the chat route with ``body``, sharing this one's state and connection.

    Its ``receive`` first hands over the translated body, then the client's own channel, so the chat
    route still notices a disconnect and cancels the generation.
    """
    payload = json.dumps(body).encode("utf-8")
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        return await request.receive()

    scope = dict(request.scope)
    scope["path"] = "/v1/chat/completions"
    return Request(scope, receive)


async def _events(chunks: Any, translator: ResponseTranslator) -> AsyncIterator[dict[str, str]]:
    """Chat SSE payloads in, Responses events out (closing the chat stream releases its lease)."""

    def sse(events: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [{"event": event["type"], "data": json.dumps(event, ensure_ascii=False)} for event in events]

    for frame in sse(translator.start()):
        yield frame
    async with contextlib.aclosing(chunks):
        async for payload in chunks:
            text = payload if isinstance(payload, str) else getattr(payload, "data", "")
            if text == "[DONE]":
                break
            chunk = json.loads(text)
            if "error" in chunk:
                for frame in sse(translator.fail(chunk["error"])):
                    yield frame
                return
            for frame in sse(translator.feed(chunk)):
                yield frame
    for frame in sse(translator.finish()):
        yield frame


def skeleton(body: ResponsesRequest) -> dict[str, Any]:
    """The Response object before any output: what the request asked for, echoed as OpenAI does."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else {"type": "text"}
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None,
        "metadata": body.metadata or {},
        "model": body.model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": None,
        "reasoning": None,
        "service_tier": "default",
        "store": False,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": fmt},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": [_response_tool(tool) for tool in body.tools or ()],
        "top_logprobs": body.top_logprobs or 0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": body.user,
    }


def _response_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }
