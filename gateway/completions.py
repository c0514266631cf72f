"""``POST /v1/completions``: the legacy text-completion API, streaming and not.

A list of prompts gives ``len(prompts) * n`` choices, indexed prompt-major as OpenAI does; ``echo``
prepends the prompt; ``logprobs`` is an integer (top alternatives) in the legacy shape, and with ``echo``
covers the prompt's own tokens too (the first one ``null``), as lm-eval's loglikelihood requests need.
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.engine import Admitted, AnyEngine, EngineLease
from engines.generation import GenerationEvent, GenerationRequest, PromptLogprobs, TokenLogprob
from engines.prompts import skipped_token_texts, token_bytes
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


def shown_token(text: str, raw: Sequence[int]) -> str:
    """A token as the legacy logprobs show it: its text, or ``bytes:\\xNN...`` if it holds part of a character.

    A byte-level token can be one byte of a multi-byte character, whose text alone is U+FFFD: that says
    nothing, and different such tokens would collide as ``top_logprobs`` keys. OpenAI's legacy API shows
    them by their escaped bytes instead.
    """
    try:
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)
    return text


class CompletionOffsets:
    """``text_offset`` of generated tokens: the character of the returned text where each one starts.

    Offsets follow the tokens' bytes through a UTF-8 decoder, because several byte-level tokens can make
    one character: a token holding part of a character gets the offset where that character starts, and
    the token that completes it advances by the characters it completes (counting a token's text length
    instead ran past the text, one offset per byte). Special tokens, which generated text leaves out,
    advance nothing. Generation continues from ``start``: the end of the echoed prompt.
    """

    def __init__(self, start: int, skipped: frozenset[str]) -> None:
        self.chars = start
        self._skipped = skipped
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def place(self, entry: TokenLogprob) -> int:
        if entry.token in self._skipped:
            return self.chars
        raw = bytes(entry.bytes)
        offset = self.chars
        pending = self._utf8.getstate()[0]
        if pending and raw and not _continues(pending, raw[0]):
            offset += 1  # the unfinished character before it becomes one U+FFFD; this token starts after
        self.chars += len(self._utf8.decode(raw))
        return offset


def _continues(pending: bytes, byte: int) -> bool:
    """Whether ``byte`` can follow the start of a character, ``pending``, in valid UTF-8."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(pending + bytes([byte]))
    except UnicodeDecodeError:
        return False
    return True


def prompt_offsets(pieces: Sequence[bytes], echo: str) -> list[int]:
    """``text_offset`` of the prompt's tokens, found by matching each token's bytes in the echoed text.

    The echo is the prompt as sent (or its ids decoded), so matching against it, rather than adding up
    token lengths, keeps every offset on the echo's characters: a token the tokenizer added (a BOS) is
    not in it and takes no width, a special token the client wrote is, and a token inside a multi-byte
    character gets that character's start. A SentencePiece token's bytes lack the space its ``▁`` stands
    for, so whitespace just before a token is counted as the token's own.
    """
    text = echo.encode("utf-8")
    char_at = [index for index, char in enumerate(echo) for _ in char.encode("utf-8")]
    char_at.append(len(echo))
    offsets: list[int] = []
    cursor = 0
    for raw in pieces:
        offsets.append(char_at[cursor])
        if not raw:
            continue
        if text.startswith(raw, cursor):
            cursor += len(raw)
        elif raw.startswith(text[cursor:]):  # the echo ends inside this token
            cursor = len(text)
        else:
            spaced = len(text) - len(text[cursor:].lstrip())
            if spaced > cursor and text.startswith(raw, spaced):
                cursor = spaced + len(raw)
    return offsets


def _top(entry: TokenLogprob) -> dict[str, float]:
    return {shown_token(token, raw): logprob for token, raw, logprob in entry.top}


def _legacy_logprobs(event: GenerationEvent, offsets: CompletionOffsets) -> dict[str, Any]:
    return {
        "tokens": [shown_token(entry.token, entry.bytes) for entry in event.logprobs],
        "token_logprobs": [entry.logprob for entry in event.logprobs],
        "top_logprobs": [_top(entry) for entry in event.logprobs],
        "text_offset": [offsets.place(entry) for entry in event.logprobs],
    }


def _legacy_prompt_logprobs(
    scores: PromptLogprobs, echo: str, first_bytes: tuple[int, ...]
) -> dict[str, Any]:
    """The echoed prompt's part of the legacy logprobs: its first token has no logprob (``null``).

    ``first_bytes`` are the first token's bytes, which ``PromptLogprobs`` keeps as text only.
    """
    pieces = [bytes(first_bytes), *(bytes(entry.bytes) for entry in scores.scored)]
    return {
        "tokens": [
            shown_token(scores.first_token, first_bytes),
            *(shown_token(entry.token, entry.bytes) for entry in scores.scored),
        ],
        "token_logprobs": [None, *(entry.logprob for entry in scores.scored)],
        "top_logprobs": [None, *(_top(entry) for entry in scores.scored)],
        "text_offset": prompt_offsets(pieces, echo),
    }


@dataclass(frozen=True)
class _Tokens:
    """What the legacy logprobs need of the tokenizer, read once per request.

    ``skipped``: the special tokens that generated text leaves out; ``first_bytes``: per choice, the
    bytes of its prompt's first token (for ``echo``).
    """

    skipped: frozenset[str] = frozenset()
    first_bytes: tuple[tuple[int, ...], ...] = ()

    def first(self, index: int) -> tuple[int, ...]:
        return self.first_bytes[index] if index < len(self.first_bytes) else ()


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
        tokens = _Tokens()
        if want_logprobs:
            tokenizer = lease.loaded.tokenizer
            tokens = _Tokens(
                skipped=skipped_token_texts(tokenizer),
                first_bytes=tuple(
                    token_bytes(tokenizer, r.prompt_ids[0])[1] if body.echo and r.prompt_ids else ()
                    for r in requests
                ),
            )
        prompt_tokens = sum(len(r.prompt_ids) for r in requests[:: body.n])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(
            requests,
            frames=lambda admitted, completion_id, created: _stream(
                admitted,
                requests,
                body.model,
                completion_id,
                created,
                include_usage,
                echoes,
                prompt_tokens,
                tokens,
            ),
            complete=lambda admitted, completion_id, created: _complete(
                admitted, requests, body, completion_id, created, echoes, tokens
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
    tokens: _Tokens,
) -> Response:
    texts = list(echoes)
    logprobs: list[dict[str, Any]] = [{} for _ in requests]
    offsets = [CompletionOffsets(len(echo), tokens.skipped) for echo in echoes]
    finish: list[str | None] = [None] * len(requests)
    completion_tokens = [0] * len(requests)
    async for index, event in run_choices(admitted):
        if event.error is not None:
            raise event.error
        if event.prompt_logprobs is not None:
            prompt_part = _legacy_prompt_logprobs(event.prompt_logprobs, echoes[index], tokens.first(index))
            _merge_logprobs(logprobs[index], prompt_part)
        if body.logprobs is not None:
            _merge_logprobs(logprobs[index], _legacy_logprobs(event, offsets[index]))
        texts[index] += event.text
        completion_tokens[index] = event.completion_tokens
        if event.finish_reason:
            finish[index] = event.finish_reason
    for index, choice_logprobs in enumerate(logprobs):
        # Tokens past a stop string (or the bytes of an unfinished last character) are not in the text.
        if "text_offset" in choice_logprobs:
            end = len(texts[index])
            choice_logprobs["text_offset"] = [min(o, end) for o in choice_logprobs["text_offset"]]
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
    tokens: _Tokens,
) -> AsyncGenerator[str, None]:
    chunk = chunk_writer("text_completion", completion_id, created, model, include_usage)
    want_logprobs = requests[0].sampling.logprobs
    scored = requests[0].prompt_logprobs is not None
    completion_tokens = [0] * len(requests)
    offsets = [CompletionOffsets(len(echo), tokens.skipped) for echo in echoes]
    sent = [len(echo) for echo in echoes]
    for index, echo in enumerate(echoes):
        if echo and not scored:  # a scored echo waits for its logprobs (the prefill's first event)
            yield chunk([{"index": index, "text": echo, "logprobs": None, "finish_reason": None}])
    async for index, event in run_choices(admitted):
        if event.error is not None:
            raise event.error
        if event.prompt_logprobs is not None:
            prompt_part = _legacy_prompt_logprobs(event.prompt_logprobs, echoes[index], tokens.first(index))
            yield chunk(
                [{"index": index, "text": echoes[index], "logprobs": prompt_part, "finish_reason": None}]
            )
        completion_tokens[index] = event.completion_tokens
        if event.text or event.logprobs or event.finish_reason:
            logprobs = _legacy_logprobs(event, offsets[index]) if want_logprobs else None
            sent[index] += len(event.text)
            if logprobs is not None and event.finish_reason:
                # The text is complete: tokens past a stop string start at its end, as without streaming.
                logprobs["text_offset"] = [min(o, sent[index]) for o in logprobs["text_offset"]]
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
