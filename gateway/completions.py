"""``POST /v1/completions``: the legacy text-completion API, streaming and not.

A list of prompts gives ``len(prompts) * n`` choices, indexed prompt-major as OpenAI does; ``echo``
prepends the prompt; ``logprobs`` is an integer (top alternatives) in the legacy shape, and with ``echo``
covers the prompt's own tokens too (the first one ``null``), as lm-eval's loglikelihood requests need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.engine import Admitted, AnyEngine, EngineLease
from engines.generation import GenerationEvent, GenerationRequest, PromptLogprobs
from gateway.errors import APIError
from gateway.generate import Prepared, serve_generation
from gateway.protocol import CompletionRequest
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
from gateway.streaming import chunk_writer, envelope, run_choices, usage_dict


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "'prompt' must not be empty.", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def refuse_unsupported(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError(
            400,
            "'suffix' (fill-in-the-middle) is not supported.",
            param="suffix",
            code="unsupported_parameter",
        )
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(
            400, "'best_of' other than 'n' is not supported.", param="best_of", code="unsupported_parameter"
        )


def _legacy_logprobs(event: GenerationEvent, offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in event.logprobs:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        top.append({token: logprob for token, _raw, logprob in entry.top})
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _legacy_prompt_logprobs(scores: PromptLogprobs) -> dict[str, Any]:
    """The echoed prompt's part of the legacy logprobs: its first token has no logprob (``null``)."""
    tokens = [scores.first_token, *(entry.token for entry in scores.scored)]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None, *(entry.logprob for entry in scores.scored)],
        "top_logprobs": [None, *({t: lp for t, _raw, lp in entry.top} for entry in scores.scored)],
        "text_offset": offsets,
    }


def _merge_logprobs(into: dict[str, Any], more: dict[str, Any]) -> None:
    for key, values in more.items():
        into.setdefault(key, []).extend(values)


async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    refuse_unsupported(body)
    settings: Settings = request.app.state.settings
    check_limits(settings, body.max_tokens, "max_tokens")
    prompts = _prompts(body)
    check_choices(settings, len(prompts) * body.n, "n" if body.n > 1 else "prompt")
    check_prompt_size(settings, sum(len(p) for p in prompts), "prompt")

    async def prepare(engine: AnyEngine, lease: EngineLease) -> Prepared:
        want_logprobs = body.logprobs is not None
        request_id = getattr(request.state, "request_id", "")

        def build() -> list[GenerationRequest]:
            """Tokenize each prompt once (on a prompt worker); its choices differ only in sampling."""
            built: list[GenerationRequest] = []
            for prompt in prompts:
                samplings = [
                    sampling_params(
                        body,
                        choice=choice,
                        logprobs=want_logprobs,
                        top_logprobs=body.logprobs or 0,
                        defaults=lease.loaded.sampling_defaults,
                    )
                    for choice in range(body.n)
                ]
                first = engine.text_request(
                    lease,
                    prompt,
                    max_tokens=body.max_tokens,
                    sampling=samplings[0],
                    stop=body.stop_list(),
                    request_id=request_id,
                    ignore_eos=body.ignore_eos,
                    prompt_logprobs=body.logprobs if body.echo else None,
                )
                for sampling in samplings:
                    generation = dataclasses.replace(first, sampling=sampling)
                    built.append(cap_tokens(generation, settings.server.max_tokens_limit))
            return built

        requests = await off_loop(request, build)
        echoes = [_prompt_text(lease, p) if body.echo else "" for p in prompts for _ in range(body.n)]
        prompt_tokens = sum(len(r.prompt_ids) for r in requests[:: body.n])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(
            requests,
            frames=lambda admitted, completion_id, created: _stream(
                admitted, requests, body.model, completion_id, created, include_usage, echoes, prompt_tokens
            ),
            complete=lambda admitted, completion_id, created: _complete(
                admitted, requests, body, completion_id, created, echoes
            ),
        )

    return await serve_generation(request, body.model, stream=body.stream, id_prefix="cmpl", prepare=prepare)


def _prompt_text(lease: EngineLease, prompt: str | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return str(lease.loaded.tokenizer.decode(prompt, skip_special_tokens=False))


async def _complete(
    admitted: list[Admitted],
    requests: list[GenerationRequest],
    body: CompletionRequest,
    completion_id: str,
    created: int,
    echoes: list[str],
) -> Response:
    texts = list(echoes)
    logprobs: list[dict[str, Any]] = [{} for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    completion_tokens = [0] * len(requests)
    async for index, event in run_choices(admitted):
        if event.error is not None:
            raise event.error
        if event.prompt_logprobs is not None:
            _merge_logprobs(logprobs[index], _legacy_prompt_logprobs(event.prompt_logprobs))
        if body.logprobs is not None:
            _merge_logprobs(logprobs[index], _legacy_logprobs(event, len(texts[index])))
        texts[index] += event.text
        completion_tokens[index] = event.completion_tokens
        if event.finish_reason:
            finish[index] = event.finish_reason
    prompt_tokens = sum(len(r.prompt_ids) for r in requests[:: body.n])
    choices = [
        {
            "index": i,
            "text": texts[i],
            "logprobs": logprobs[i] if body.logprobs is not None else None,
            "finish_reason": finish[i],
        }
        for i in range(len(requests))
    ]
    usage = usage_dict(prompt_tokens, sum(completion_tokens))
    return JSONResponse(envelope("text_completion", completion_id, created, body.model, choices, usage=usage))


async def _stream(
    admitted: list[Admitted],
    requests: list[GenerationRequest],
    model: str,
    completion_id: str,
    created: int,
    include_usage: bool,
    echoes: list[str],
    prompt_tokens: int,
) -> AsyncGenerator[str, None]:
    chunk = chunk_writer("text_completion", completion_id, created, model, include_usage)
    want_logprobs = requests[0].sampling.logprobs
    scored = requests[0].prompt_logprobs is not None
    completion_tokens = [0] * len(requests)
    offsets = [len(echo) for echo in echoes]
    for index, echo in enumerate(echoes):
        if echo and not scored:  # a scored echo waits for its logprobs (the prefill's first event)
            yield chunk([{"index": index, "text": echo, "logprobs": None, "finish_reason": None}])
    async for index, event in run_choices(admitted):
        if event.error is not None:
            raise event.error
        if event.prompt_logprobs is not None:
            prompt_part = _legacy_prompt_logprobs(event.prompt_logprobs)
            yield chunk(
                [{"index": index, "text": echoes[index], "logprobs": prompt_part, "finish_reason": None}]
            )
        completion_tokens[index] = event.completion_tokens
        if event.text or event.logprobs or event.finish_reason:
            logprobs = _legacy_logprobs(event, offsets[index]) if want_logprobs else None
            offsets[index] += len(event.text)
            yield chunk(
                [
                    {
                        "index": index,
                        "text": event.text,
                        "logprobs": logprobs,
                        "finish_reason": event.finish_reason,
                    }
                ]
            )
    if include_usage:
        yield chunk([], usage=usage_dict(prompt_tokens, sum(completion_tokens)))
