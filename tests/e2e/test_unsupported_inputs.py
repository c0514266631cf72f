"""What these text-only models cannot take is refused by name; ``system_fingerprint`` is always a string."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer
from tests.e2e.test_errors import assert_openai_error

pytestmark = pytest.mark.e2e


def chat_with_parts(server: RunningServer, parts: list[dict[str, Any]]) -> httpx.Response:
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}
    return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize(
    ("part", "says"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image inputs"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio inputs"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "file inputs"),
    ],
)
def test_media_part_names_itself_and_its_position(
    tiny_server: RunningServer, part: dict[str, Any], says: str
) -> None:
    response = chat_with_parts(tiny_server, [{"type": "text", "text": "look"}, part])
    error = assert_openai_error(response, 400, "messages[0].content[1]")
    assert f"{says} are not supported by this model" in error["message"]
    assert "valid string" not in error["message"]


def test_extra_key_in_text_part_is_named(tiny_server: RunningServer) -> None:
    response = chat_with_parts(tiny_server, [{"type": "text", "text": "hi", "cache_control": {}}])
    error = assert_openai_error(response, 400, "messages[0].content[0].cache_control")
    assert "Unrecognized request argument" in error["message"]


def test_text_parts_still_work(tiny_server: RunningServer) -> None:
    response = chat_with_parts(tiny_server, [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert response.status_code == 200, response.text


def test_system_fingerprint_is_a_stable_string_per_model(tiny_server: RunningServer) -> None:
    api = openai.OpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0)
    hello = [{"role": "user", "content": "Hi"}]
    first = api.chat.completions.create(model="tiny", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    again = api.chat.completions.create(model="tiny", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    adapted = api.chat.completions.create(
        model="tiny+tiny-lora",
        messages=hello,  # type: ignore[arg-type]
        max_tokens=2,
    )
    text = api.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert isinstance(first.system_fingerprint, str) and first.system_fingerprint.startswith("fp_")
    assert first.system_fingerprint == again.system_fingerprint == text.system_fingerprint
    assert adapted.system_fingerprint != first.system_fingerprint


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("completions", {"prompt": "Hi"}),
    ],
)
def test_every_stream_chunk_has_a_fingerprint(
    tiny_server: RunningServer, path: str, body: dict[str, Any]
) -> None:
    request = {"model": "tiny", "max_tokens": 3, "stream": True, **body}
    request["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{tiny_server.v1}/{path}", json=request, timeout=60) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line) for line in lines if line != "[DONE]"]
    assert chunks and all(str(chunk["system_fingerprint"]).startswith("fp_") for chunk in chunks)
