"""Chat completions through a real uvicorn server and the real openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def test_models_list_shows_bases_and_configured_adapters(tiny_server: RunningServer) -> None:
    ids = {m.id for m in client(tiny_server).models.list().data}
    assert {"tiny", "tiny+tiny-lora"} <= ids


def test_adapter_alias_is_listed_and_retrievable_with_its_parent(tiny_server: RunningServer) -> None:
    listed = {row["id"]: row for row in httpx.get(f"{tiny_server.v1}/models", timeout=30).json()["data"]}
    assert listed["tiny-lora"]["parent"] == "tiny"
    assert listed["tiny-lora"]["root"] == listed["tiny+tiny-lora"]["root"]
    card = client(tiny_server).models.retrieve("tiny-lora")
    assert card.id == "tiny-lora"
    assert card.model_extra is not None and card.model_extra["parent"] == "tiny"


def test_adapter_variants_report_their_bases_context_length(tiny_server: RunningServer) -> None:
    listed = {row["id"]: row for row in httpx.get(f"{tiny_server.v1}/models", timeout=30).json()["data"]}
    assert listed["tiny"]["max_model_len"] == 256
    assert listed["tiny+tiny-lora"]["max_model_len"] == 256
    assert listed["tiny-lora"]["max_model_len"] == 256


def test_chat_on_base_returns_text_and_usage(tiny_server: RunningServer) -> None:
    reply = client(tiny_server).chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens <= 8


def test_adapter_changes_greedy_output(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    base = api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    merged = api.chat.completions.create(model="tiny+tiny-lora", messages=HELLO, max_tokens=12, temperature=0)
    assert base.choices[0].message.content != merged.choices[0].message.content


def test_streaming_matches_non_streaming_and_sends_usage(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    whole = api.chat.completions.create(model="tiny+tiny-lora", messages=HELLO, max_tokens=10, temperature=0)
    chunks = list(
        api.chat.completions.create(
            model="tiny+tiny-lora",
            messages=HELLO,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_raw_sse_frames_end_with_done(tiny_server: RunningServer) -> None:
    with httpx.stream(
        "POST",
        f"{tiny_server.v1}/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True},
        timeout=30,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        body = response.read().decode()
    events = [e for e in body.split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
