"""``POST /v1/chat/completions``: validate, lease the model, generate, answer as JSON or SSE."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.engine import Admitted, Engine
from engines.generation import ChatMessage, GenerationRequest
from engines.template_sandbox import RenderLimits
from gateway.cancellation import run_while_connected
from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest
from gateway.requests import (
    cap_tokens,
    check_choices,
    check_limits,
    check_prompt_size,
    off_loop,
    parse_body,
    sampling_params,
)
from gateway.settings import Settings
from gateway.streaming import (
    admit_all,
    chunk_writer,
    envelope,
    event_stream,
    logprob_entries,
    run_choices,
    usage_dict,
)


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Parameters this gateway cannot honour are refused, never silently ignored."""
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(
            400,
            "Only tool_choice 'auto' and 'none' are supported: this gateway renders tools into the prompt "
            "for templates that support them but cannot force a call.",
            param="tool_choice",
            code="unsupported_parameter",
        )
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400,
            f"response_format type '{body.response_format.type}' is not supported; only 'text'.",
            param="response_format",
            code="unsupported_parameter",
        )
    if body.functions:
        raise APIError(
            400,
            "This gateway does not support function calling ('functions').",
            param="functions",
            code="unsupported_parameter",
        )
    if body.function_call not in (None, "none"):
        raise APIError(
            400,
            "This gateway does not support 'function_call'.",
            param="function_call",
            code="unsupported_parameter",
        )
    if body.modalities is not None and "audio" in body.modalities:
        raise APIError(
            400, "Only the 'text' modality is supported.", param="modalities", code="unsupported_parameter"
        )
    unsupported = {
        "audio": body.audio,
        "prediction": body.prediction,
        "reasoning_effort": body.reasoning_effort,
        "verbosity": body.verbosity,
        "web_search_options": body.web_search_options,
    }
    for param, value in unsupported.items():
        if value is not None:
            raise APIError(
                400,
                f"'{param}' is not supported by this gateway's models.",
                param=param,
                code="unsupported_parameter",
            )


async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    refuse_unsupported(body)
    settings: Settings = request.app.state.settings
    engine: Engine = request.app.state.engine
    limit = body.token_limit()
    check_limits(settings, limit, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    check_choices(settings, body.n, "n")
    check_prompt_size(settings, sum(len(m.text() or "") for m in body.messages), "messages")
    lease = await engine.acquire(body.model)
    try:
        messages = [
            ChatMessage(
                role=m.role,
                content=m.text(),
                name=m.name,
                tool_calls=tuple(m.tool_calls or ()),
                tool_call_id=m.tool_call_id,
            )
            for m in body.messages
        ]
        tools = body.tools if body.tool_choice != "none" else None
        top = body.top_logprobs or 0
        limits = RenderLimits(
            seconds=settings.server.prompt_timeout, max_chars=4 * settings.server.max_prompt_chars
        )
        samplings = [
            sampling_params(
                body,
                choice=i,
                logprobs=body.logprobs,
                top_logprobs=top,
                defaults=lease.loaded.sampling_defaults,
            )
            for i in range(body.n)
        ]
        first = await off_loop(
            request,
            lambda: engine.chat_request(
                lease,
                messages,
                max_tokens=limit,
                sampling=samplings[0],
                stop=body.stop_list(),
                request_id=getattr(request.state, "request_id", ""),
                ignore_eos=body.ignore_eos,
                tools=tools,
                limits=limits,
            ),
        )
        # The prompt is the same for every choice: render it once, vary only the sampling.
        requests = [dataclasses.replace(first, sampling=sampling) for sampling in samplings]
        if requests[0].max_tokens > settings.server.max_tokens_limit:
            requests = [cap_tokens(r, settings.server.max_tokens_limit) for r in requests]
        admitted = admit_all(engine, lease, requests)
    except BaseException:
        lease.release()
        raise
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _stream(admitted, requests, body.model, completion_id, created, include_usage)
        return event_stream(frames, lease, admitted, shutdown_grace=settings.server.shutdown_grace)
    try:
        return await run_while_connected(
            request,
            _complete(admitted, requests, body, completion_id, created),
            timeout=settings.server.request_timeout,
        )
    finally:
        for generation in admitted:
            generation.cancel()
        lease.release()


async def _complete(
    admitted: list[Admitted],
    requests: list[GenerationRequest],
    body: ChatCompletionRequest,
    completion_id: str,
    created: int,
) -> Response:
    texts = [""] * len(requests)
    logprobs: list[list[dict[str, Any]]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    completion_tokens = [0] * len(requests)
    prompt_tokens = len(requests[0].prompt_ids)
    async for index, event in run_choices(admitted):
        if event.error is not None:
            raise event.error
        texts[index] += event.text
        logprobs[index].extend(logprob_entries(event))
        completion_tokens[index] = event.completion_tokens
        if event.finish_reason:
            finish[index] = event.finish_reason
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i], "refusal": None},
            "logprobs": {"content": logprobs[i], "refusal": None} if body.logprobs else None,
            "finish_reason": finish[i],
        }
        for i in range(len(requests))
    ]
    usage = usage_dict(prompt_tokens, sum(completion_tokens))
    return JSONResponse(envelope("chat.completion", completion_id, created, body.model, choices, usage=usage))


async def _stream(
    admitted: list[Admitted],
    requests: list[GenerationRequest],
    model: str,
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    """SSE payloads: role chunk per choice, content chunks, finish chunk, optional usage."""

    chunk = chunk_writer("chat.completion.chunk", completion_id, created, model, include_usage)
    want_logprobs = requests[0].sampling.logprobs
    completion_tokens = [0] * len(requests)
    for index in range(len(requests)):
        yield chunk(
            [{"index": index, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]
        )
    async for index, event in run_choices(admitted):
        if event.error is not None:
            raise event.error
        completion_tokens[index] = event.completion_tokens
        entries = {"content": logprob_entries(event), "refusal": None} if want_logprobs else None
        if event.text or (entries and entries["content"]):
            yield chunk(
                [
                    {
                        "index": index,
                        "delta": {"content": event.text},
                        "logprobs": entries,
                        "finish_reason": None,
                    }
                ]
            )
        if event.finish_reason:
            yield chunk(
                [{"index": index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}]
            )
    if include_usage:
        yield chunk([], usage=usage_dict(len(requests[0].prompt_ids), sum(completion_tokens)))
