"""The official openai SDK (sync and async, streaming and not) and plain ``curl -N`` against the server."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from typing import Any

import openai
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hello, who are you?"}]
MODEL = "tiny+tiny-lora"


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def async_client(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)


# ------------------------------------------------------------------------------------------------ sync SDK


def test_sync_chat_response_is_fully_typed(tiny_server: RunningServer) -> None:
    reply = client(tiny_server).chat.completions.create(
        model=MODEL, messages=HELLO, max_completion_tokens=6, temperature=0
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    assert isinstance(reply.created, int) and reply.created > 0
    assert len(reply.choices) == 1 and reply.choices[0].index == 0
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].logprobs is None
    usage = reply.usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Nothing the server sent was outside the SDK's model of a chat completion.
    assert not reply.model_extra and not reply.choices[0].model_extra


def test_sync_chat_stream_matches_whole(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    whole = api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    with api.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0, stream=True
    ) as stream:
        chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {chunks[0].created}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_sdk_stream_helper_accumulates_the_completion(tiny_server: RunningServer) -> None:
    """``client.chat.completions.stream`` rebuilds a ChatCompletion from the chunks and checks them."""
    api = client(tiny_server)
    # The helper refuses a completion cut by the length limit, so end this one with a stop string.
    long = api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    text = long.choices[0].message.content or ""
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].isascii())
    expected = text[: text.index(stop)]
    with api.chat.completions.stream(
        model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stop=stop
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(deltas) == expected
    assert final.choices[0].message.content == expected
    assert final.choices[0].finish_reason == "stop"


def test_sync_text_completion_and_stream(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    whole = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.model == MODEL and whole.choices[0].index == 0
    chunks = list(
        api.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.id for c in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_with_raw_response_exposes_headers(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    raw = api.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=2)
    assert raw.http_request.url.path.endswith("/chat/completions")
    assert raw.status_code == 200
    assert raw.headers["x-request-id"]
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.parse().choices[0].message.role == "assistant"

    sent = api.completions.with_raw_response.create(
        model="tiny", prompt="x", max_tokens=2, extra_headers={"X-Request-Id": "trace-me-123"}
    )
    assert sent.headers["x-request-id"] == "trace-me-123"
    assert sent.parse().object == "text_completion"


def test_with_streaming_response_has_sse_headers(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    with api.chat.completions.with_streaming_response.create(
        model="tiny", messages=HELLO, max_tokens=3, stream=True
    ) as response:
        assert response.headers["x-request-id"]
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_sdk_errors_keep_the_request_id(tiny_server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(tiny_server).chat.completions.create(model="nope", messages=HELLO)  # type: ignore[arg-type]
    assert info.value.response.headers["x-request-id"]
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert info.value.type == "invalid_request_error"


def test_models_endpoints_through_sdk(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    listed = {m.id: m for m in api.models.list()}
    assert "tiny" in listed and MODEL in listed
    assert api.models.retrieve("tiny").id == "tiny"


# ----------------------------------------------------------------------------------------------- async SDK


def test_async_chat_and_completions_streaming_and_not(tiny_server: RunningServer) -> None:
    async def scenario() -> None:
        async with async_client(tiny_server) as api:
            whole, text = await asyncio.gather(
                api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0),
                api.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0),
            )
            stream = await api.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
                whole.choices[0].message.content
            )
            assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage
            text_stream = await api.completions.create(
                model=MODEL, prompt="abc", max_tokens=6, temperature=0, stream=True
            )
            parts = [chunk.choices[0].text async for chunk in text_stream]
            assert "".join(parts) == text.choices[0].text

    asyncio.run(scenario())


def test_async_concurrent_streams_do_not_mix(tiny_server: RunningServer) -> None:
    prompts = ["first question", "second, different question", "a third one"]

    async def one(api: openai.AsyncOpenAI, prompt: str, stream: bool) -> str:
        messages: Any = [{"role": "user", "content": prompt}]
        if not stream:
            reply = await api.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=8, temperature=0
            )
            return reply.choices[0].message.content or ""
        chunks = await api.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks])

    async def scenario() -> tuple[list[str], list[str]]:
        async with async_client(tiny_server) as api:
            alone = [await one(api, p, stream=False) for p in prompts]
            together = await asyncio.gather(*(one(api, p, stream=True) for p in prompts))
            return alone, list(together)

    alone, together = asyncio.run(scenario())
    assert together == alone


def test_async_with_raw_response(tiny_server: RunningServer) -> None:
    async def scenario() -> None:
        async with async_client(tiny_server) as api:
            raw = await api.chat.completions.with_raw_response.create(
                model="tiny", messages=HELLO, max_tokens=2
            )
            assert raw.headers["x-request-id"]
            assert raw.parse().object == "chat.completion"

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- curl -N


def curl_or_skip() -> str:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    return curl


def curl_sse(server: RunningServer, path: str, body: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """POST with ``curl -sN`` (no buffering); the response headers and the raw ``data:`` payloads."""
    curl = curl_or_skip()
    done = subprocess.run(
        [
            curl,
            "-sN",
            "--max-time",
            "60",
            "-D",
            "-",
            f"{server.v1}{path}",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Authorization: Bearer unused",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        check=True,
        timeout=90,
    )
    raw = done.stdout.decode()
    head, _, stream = raw.partition("\r\n\r\n")
    status, *header_lines = head.split("\r\n")
    assert " 200" in status, raw
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    events = [event for event in stream.split("\n\n") if event.strip()]
    payloads = []
    for event in events:
        lines = [line for line in event.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue  # a keep-alive comment
        assert len(lines) == 1 and lines[0].startswith("data: "), repr(event)
        payloads.append(lines[0][len("data: ") :])
    assert stream.endswith("data: [DONE]\n\n"), repr(stream[-80:])
    return headers, payloads


def test_curl_chat_stream_frames(tiny_server: RunningServer) -> None:
    headers, payloads = curl_sse(
        tiny_server,
        "/chat/completions",
        {
            "model": MODEL,
            "messages": HELLO,
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-store" and headers["x-accel-buffering"] == "no"
    assert headers["x-request-id"]
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {MODEL}

    first, *middle, finish, usage = chunks
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
    ]
    for chunk in middle:
        (choice,) = chunk["choices"]
        assert set(choice["delta"]) == {"content"} and choice["finish_reason"] is None
    (last,) = finish["choices"]
    assert last["finish_reason"] in {"stop", "length"} and last["delta"] == {}
    assert usage["choices"] == []
    assert set(usage["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert 0 < usage["usage"]["completion_tokens"] <= 6
    # Only the usage chunk carries a usage value; the others say null, as OpenAI does.
    assert all(c["usage"] is None for c in chunks[:-1])

    whole = client(tiny_server).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0
    )
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == whole.choices[0].message.content
    assert usage["usage"] == whole.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]


def test_curl_completion_stream_frames(tiny_server: RunningServer) -> None:
    _, payloads = curl_sse(
        tiny_server,
        "/completions",
        {
            "model": "tiny",
            "prompt": "Once upon",
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("cmpl-")
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert {c["object"] for c in chunks} == {"text_completion"}
    *text_chunks, usage = chunks
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] in {"stop", "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 5


def test_curl_stream_with_n_and_no_usage(tiny_server: RunningServer) -> None:
    _, payloads = curl_sse(
        tiny_server,
        "/chat/completions",
        {"model": "tiny", "messages": HELLO, "max_tokens": 3, "n": 2, "seed": 1, "stream": True},
    )
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c for c in chunks)
    assert all(len(c["choices"]) == 1 for c in chunks)
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks:
        by_index[chunk["choices"][0]["index"]].append(chunk["choices"][0])
    for choices in by_index.values():
        assert choices[0]["delta"] == {"role": "assistant"}
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == [choices[-1]["finish_reason"]]


def test_curl_error_is_plain_json_not_sse(tiny_server: RunningServer) -> None:
    curl = curl_or_skip()
    done = subprocess.run(
        [
            curl,
            "-sN",
            "-w",
            "\n%{http_code}",
            f"{tiny_server.v1}/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"model": "nope", "messages": HELLO, "stream": True}),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    body, _, status = done.stdout.decode().rpartition("\n")
    assert status == "404"
    assert json.loads(body)["error"]["code"] == "model_not_found"
