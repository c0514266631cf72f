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


def _chat_part(kind: Any) -> tuple[str, dict[str, Any]]:
    return "chat/completions", {"messages": [{"role": "user", "content": [{"type": kind, "text": "hi"}]}]}


def _responses_part(kind: Any) -> tuple[str, dict[str, Any]]:
    return "responses", {"input": [{"role": "user", "content": [{"type": kind, "text": "hi"}]}]}


def _responses_output_part(kind: Any) -> tuple[str, dict[str, Any]]:
    item = {"type": "function_call_output", "call_id": "call_1", "output": [{"type": kind, "text": "42"}]}
    return "responses", {"input": [item]}


def _responses_item(kind: Any) -> tuple[str, dict[str, Any]]:
    return "responses", {"input": [{"type": kind, "role": "user", "content": "hi"}]}


@pytest.mark.parametrize("kind", [{}, [], {"text": "x"}, ["text"]], ids=["object", "list", "dict", "strings"])
@pytest.mark.parametrize(
    ("where", "param"),
    [
        (_chat_part, "messages[0].content[0].type"),
        (_responses_part, "input[0].content[0].type"),
        (_responses_output_part, "input[0].output[0].type"),
        (_responses_item, "input[0].type"),
    ],
    ids=["chat-part", "responses-part", "function-call-output-part", "responses-item"],
)
def test_a_type_that_is_an_object_or_list_is_a_400_naming_the_field(
    tiny_server: RunningServer, kind: Any, where: Any, param: str
) -> None:
    path, body = where(kind)
    response = httpx.post(f"{tiny_server.v1}/{path}", json={"model": "tiny", **body}, timeout=60)
    error = assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
    assert f"'{param}'" in error["message"]
