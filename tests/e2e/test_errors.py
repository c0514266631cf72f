"""Every bad request gets an OpenAI-shaped 4xx, and the server keeps serving afterwards."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]


def post(server: RunningServer, body: Any, *, raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(
            f"{server.v1}/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=60,
        )
    return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return dict(error)


def assert_still_serving(server: RunningServer) -> None:
    ok = post(server, {"model": "tiny", "messages": HELLO, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_malformed_json_is_400(tiny_server: RunningServer) -> None:
    error = assert_openai_error(post(tiny_server, None, raw=b'{"model": "tiny", '), 400)
    assert error["code"] == "invalid_json"
    assert_still_serving(tiny_server)


def test_non_object_body_is_400(tiny_server: RunningServer) -> None:
    assert_openai_error(post(tiny_server, None, raw=b"[1, 2]"), 400)
    assert_openai_error(post(tiny_server, None, raw=b""), 400)
    assert_openai_error(post(tiny_server, None, raw=b"\xff\xfe"), 400)


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"frobnicate": True}, "frobnicate"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"store": True}, "store"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_invalid_parameters_are_400_naming_the_param(
    tiny_server: RunningServer, patch: dict[str, Any], param: str | None
) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 2, **patch}
    error = assert_openai_error(post(tiny_server, body), 400, param)
    assert "Value error" not in error["message"]


def test_missing_model_is_400(tiny_server: RunningServer) -> None:
    assert_openai_error(post(tiny_server, {"messages": HELLO}), 400, "model")


@pytest.mark.parametrize("model", ["nope", "nope+tiny-lora", "tiny+no-such-alias", "tiny+./missing/folder"])
def test_unknown_base_or_adapter_is_404(tiny_server: RunningServer, model: str) -> None:
    error = assert_openai_error(post(tiny_server, {"model": model, "messages": HELLO}), 404, "model")
    assert error["code"] == "model_not_found"
    assert_still_serving(tiny_server)


@pytest.mark.parametrize(
    "model", ["tiny+../../etc", "tiny+/etc/passwd", "tiny+a+b", "tiny+", "tiny+x@..", "ti ny"]
)
def test_unsafe_or_malformed_model_names_are_400(tiny_server: RunningServer, model: str) -> None:
    assert_openai_error(post(tiny_server, {"model": model, "messages": HELLO}), 400, "model")


def test_adapter_for_another_base_is_refused_naming_both(tiny_server: RunningServer) -> None:
    error = assert_openai_error(
        post(tiny_server, {"model": "tiny+other-base-lora", "messages": HELLO}), 400, "model"
    )
    assert "other-org/other-model" in error["message"] and "tiny" in error["message"]
    assert_still_serving(tiny_server)


def test_adapter_on_quantized_base_is_refused(tiny_server: RunningServer) -> None:
    error = assert_openai_error(post(tiny_server, {"model": "tiny-8bit+tiny-lora", "messages": HELLO}), 400)
    assert "bitsandbytes" in error["message"] and '"int8"' in error["message"]


def test_prompt_beyond_context_is_context_length_exceeded(tiny_server: RunningServer) -> None:
    long = [{"role": "user", "content": "x" * 400}]
    error = assert_openai_error(post(tiny_server, {"model": "tiny", "messages": long}), 400)
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(
        post(tiny_server, {"model": "tiny", "messages": HELLO, "max_completion_tokens": 300}), 400
    )
    assert error["code"] == "context_length_exceeded" and "256" in error["message"]


def test_unknown_route_is_openai_shaped_404(tiny_server: RunningServer) -> None:
    assert_openai_error(httpx.get(f"{tiny_server.v1}/nothing-here", timeout=10), 404)
    assert_openai_error(httpx.get(f"{tiny_server.v1}/models/nope", timeout=10), 404)


def test_sdk_raises_typed_errors(tiny_server: RunningServer) -> None:
    api = openai.OpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=HELLO)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="tiny", messages=HELLO, temperature=-1)  # type: ignore[arg-type]
    assert info.value.param == "temperature"  # type: ignore[attr-defined]
