"""``POST /v1/chat/completions``: validate, lease the model, generate, answer as JSON or SSE."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.engine import Admitted, AnyEngine, EngineLease
from engines.generation import ChatMessage, GenerationRequest
from engines.template_sandbox import RenderLimits
from engines.toolcalls import ContentDelta, ToolCallStream
from gateway.constraints import ToolPlan, plan
from gateway.errors import APIError
from gateway.generate import Prepared, serve_generation
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
    chunk_writer,
    envelope,
    logprob_entries,
    run_choices,
    usage_dict,
)


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Parameters this gateway cannot honour are refused, never silently ignored."""
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
    limit = body.token_limit()
    check_limits(settings, limit, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    check_choices(settings, body.n, "n")
    check_prompt_size(settings, sum(len(m.text() or "") for m in body.messages), "messages")

    async def prepare(engine: AnyEngine, lease: EngineLease) -> Prepared:
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
        constraint, tool_plan = plan(body, settings, lease.loaded)
        if constraint is not None:
            grammar = await engine.compile_grammar(lease, constraint)
            requests = [dataclasses.replace(r, grammar=grammar) for r in requests]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(
            requests,
            frames=lambda admitted, completion_id, created: _stream(
                admitted, requests, body.model, completion_id, created, include_usage, tool_plan
            ),
            complete=lambda admitted, completion_id, created: _complete(
                admitted, requests, body, completion_id, created, tool_plan
            ),
        )

    return await serve_generation(
        request, body.model, stream=body.stream, id_prefix="chatcmpl", prepare=prepare
    )


def _tool_stream(tool_plan: ToolPlan | None) -> ToolCallStream | None:
    if tool_plan is None:
        return None
    return ToolCallStream(tool_plan.fmt, set(tool_plan.names), tool_plan.max_calls)


def _finish_reason(reason: str, parser: ToolCallStream | None) -> str:
    """A choice that made calls (and was not cut by the token limit) finishes with "tool_calls"."""
    return "tool_calls" if parser is not None and parser.calls and reason == "stop" else reason


async def _complete(
    admitted: list[Admitted],
    requests: list[GenerationRequest],
    body: ChatCompletionRequest,
    completion_id: str,
    created: int,
    tool_plan: ToolPlan | None,
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
    choices = []
    for i in range(len(requests)):
        message: dict[str, Any] = {"role": "assistant", "content": texts[i], "refusal": None}
        parser = _tool_stream(tool_plan)
        reason = finish[i]
        if parser is not None:
            events = parser.feed(texts[i]) + parser.finish(cut=reason == "length")
            content = "".join(e.text for e in events if isinstance(e, ContentDelta))
            # What the parser kept is the content; where the model wrote only calls, or markup cut by the
            # token limit, nothing is left and content is null, as OpenAI sends it (and as streamed).
            message["content"] = content or (None if parser.calls or texts[i] else "")
            if parser.calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in parser.calls
                ]
            reason = _finish_reason(reason or "stop", parser)
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": {"content": logprobs[i], "refusal": None} if body.logprobs else None,
                "finish_reason": reason,
            }
        )
    usage = usage_dict(prompt_tokens, sum(completion_tokens))
    return JSONResponse(envelope("chat.completion", completion_id, created, body.model, choices, usage=usage))


def _delta_chunks(index: int, events: list[Any], entries: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Choice entries for parsed output: content deltas (carrying the logprobs) and tool-call deltas."""
    out: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            delta: dict[str, Any] = {"content": event.text}
        elif event.id is not None:
            delta = {
                "tool_calls": [
                    {
                        "index": event.index,
                        "id": event.id,
                        "type": "function",
                        "function": {"name": event.name, "arguments": ""},
                    }
                ]
            }
        else:
            delta = {"tool_calls": [{"index": event.index, "function": {"arguments": event.arguments}}]}
        with_logprobs = entries if isinstance(event, ContentDelta) else None
        out.append({"index": index, "delta": delta, "logprobs": with_logprobs, "finish_reason": None})
        if with_logprobs is not None:
            entries = None  # each token's logprobs travel once
    return out


async def _stream(
    admitted: list[Admitted],
    requests: list[GenerationRequest],
    model: str,
    completion_id: str,
    created: int,
    include_usage: bool,
    tool_plan: ToolPlan | None = None,
) -> AsyncGenerator[str, None]:
    """SSE payloads: role chunk per choice, content and tool-call chunks, finish chunk, optional usage."""

    chunk = chunk_writer("chat.completion.chunk", completion_id, created, model, include_usage)
    want_logprobs = requests[0].sampling.logprobs
    completion_tokens = [0] * len(requests)
    parsers = [_tool_stream(tool_plan) for _ in requests]
    held: list[list[dict[str, Any]]] = [[] for _ in requests]
    for index in range(len(requests)):
        yield chunk(
            [{"index": index, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]
        )
    async for index, event in run_choices(admitted):
        if event.error is not None:
            raise event.error
        completion_tokens[index] = event.completion_tokens
        parser = parsers[index]
        if parser is None:
            entries = {"content": logprob_entries(event), "refusal": None} if want_logprobs else None
            events: list[Any] = (
                [ContentDelta(event.text)] if event.text or (entries and entries["content"]) else []
            )
        else:
            # Tokens held back (maybe call markup) keep their logprobs until their text is released as
            # content; those of markup that became a call are not content and are not reported.
            held[index].extend(logprob_entries(event))
            events = parser.feed(event.text)
            if event.finish_reason:
                events += parser.finish(cut=event.finish_reason == "length")
            entries = {"content": held[index], "refusal": None} if want_logprobs else None
            if events:
                held[index] = []
        for choice in _delta_chunks(index, events, entries):
            yield chunk([choice])
        if event.finish_reason:
            reason = _finish_reason(event.finish_reason, parser)
            yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if include_usage:
        yield chunk([], usage=usage_dict(len(requests[0].prompt_ids), sum(completion_tokens)))
