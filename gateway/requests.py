"""Steps every generation route shares: body parsing, limits, sampling parameters."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from engines.generation import GenerationRequest
from engines.sampling import SamplingParams
from gateway.errors import APIError, from_validation, parse_json
from gateway.protocol import SamplingFields
from gateway.settings import Settings

Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")


async def parse_body(request: Request, schema: type[Body]) -> Body:
    """The JSON body validated against ``schema``; 400 naming the first bad field otherwise.

    The body must be declared ``application/json``: a browser page on another site can send a
    ``text/plain`` POST without asking first (no CORS preflight), and such a request must not act.
    """
    require_json(request)
    payload = await parse_json(request)
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if isinstance(payload.get("model"), str):
        request.state.model = payload["model"]
    messages = payload.get("messages")
    if isinstance(messages, list):  # before validation, which itself takes time per message
        check_message_count(request.app.state.settings, len(messages))
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise from_validation(exc) from exc


def require_json(request: Request) -> None:
    """415 unless the request says its body is JSON (``application/json``, parameters allowed)."""
    declared = request.headers.get("content-type", "")
    media_type = declared.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        shown = f"'{declared[:100]}'" if declared else "none"
        raise APIError(
            415,
            f"This route takes a JSON body: send 'Content-Type: application/json' (got {shown}).",
            code="unsupported_media_type",
        )


def cap_tokens(request: GenerationRequest, limit: int) -> GenerationRequest:
    """An open-ended request ("up to the context") still stops at the gateway's token limit."""
    return dataclasses.replace(request, max_tokens=min(request.max_tokens, limit))


def sampling_params(
    body: SamplingFields,
    *,
    choice: int,
    logprobs: bool,
    top_logprobs: int,
    defaults: Mapping[str, float] | None = None,
) -> SamplingParams:
    """Engine sampling parameters for choice ``choice`` (its seed offset so choices differ).

    Fields the request leaves out come from the model's generation_config (``defaults``), then from
    OpenAI's defaults: a model published for greedy decoding stays greedy unless the client asks.
    """
    defaults = defaults or {}
    seed = None if body.seed is None else (body.seed + choice) % 2**63
    return SamplingParams(
        temperature=body.temperature if body.temperature is not None else defaults.get("temperature", 1.0),
        top_p=body.top_p if body.top_p is not None else defaults.get("top_p", 1.0),
        top_k=max(body.top_k if body.top_k is not None else int(defaults.get("top_k", 0)), 0),
        seed=seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty or defaults.get("repetition_penalty", 1.0),
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def check_limits(settings: Settings, limit: int | None, param: str) -> None:
    if limit is not None and limit > settings.server.max_tokens_limit:
        raise APIError(
            400,
            f"'{param}' is {limit}, above this gateway's limit of {settings.server.max_tokens_limit}.",
            param=param,
            code="invalid_value",
        )


def check_choices(settings: Settings, count: int, param: str) -> None:
    """A request with more sequences than the engine can ever hold at once is a 400, not a 503.

    A 503 tells the client to retry, and this request would be refused every time.
    """
    capacity = settings.engine.max_batch + settings.engine.max_waiting
    if count > capacity:
        raise APIError(
            400,
            f"This request asks for {count} sequences ('n' times the number of prompts); this gateway "
            f"runs at most {capacity} at once.",
            param=param,
            code="invalid_value",
        )


def check_message_count(settings: Settings, count: int) -> None:
    limit = settings.server.max_messages
    if count > limit:
        raise APIError(
            400,
            f"This request has {count} messages; this gateway takes at most {limit} per request.",
            param="messages",
            code="too_many_messages",
        )


def check_prompt_size(settings: Settings, size: int, param: str) -> None:
    """400 for prompt text beyond ``[server] max_prompt_chars`` (characters, or token ids)."""
    limit = settings.server.max_prompt_chars
    if size > limit:
        raise APIError(
            400,
            f"The prompt text of this request is {size} characters long; this gateway takes at most {limit}.",
            param=param,
            code="prompt_too_large",
        )


async def off_loop(request: Request, work: Callable[[], T]) -> T:
    """Run blocking prompt work (chat template, tokenization) on the prompt workers, within a deadline.

    The event loop stays free for every other client meanwhile. The template sandbox stops a render at
    ``[server] prompt_timeout`` by itself; the wait here is only the backstop for work that cannot be
    interrupted (one long tokenizer call), whose thread is then left to finish alone.
    """
    settings: Settings = request.app.state.settings
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(request.app.state.prompt_workers, work)
    timeout = settings.server.prompt_timeout
    try:
        return await asyncio.wait_for(future, timeout=timeout + 1.0)
    except TimeoutError as exc:
        raise APIError(
            400,
            f"Preparing this request's prompt took longer than {timeout:g} seconds; send a shorter prompt.",
            param="messages",
            code="prompt_timeout",
        ) from exc
