"""API keys, request ids, body size limit and CORS, against a real server."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import tiny_settings

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def locked_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    settings = tiny_settings(tiny_models)
    server = settings.server.model_copy(
        update={"api_keys": ["sk-right"], "max_body_bytes": 2048, "cors_origins": ["http://example.test"]}
    )
    result: RunningServer = start_server(settings.model_copy(update={"server": server}))
    return result


def test_missing_or_wrong_key_is_401(locked_server: RunningServer) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic sk-right"}):
        response = httpx.get(f"{locked_server.v1}/models", headers=headers, timeout=10)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_right_key_works_with_sdk(locked_server: RunningServer) -> None:
    api = openai.OpenAI(base_url=locked_server.v1, api_key="sk-right", max_retries=0)
    assert api.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked_server.v1, api_key="nope", max_retries=0).models.list()


def test_health_needs_no_key(locked_server: RunningServer) -> None:
    assert httpx.get(f"{locked_server.url}/health", timeout=10).status_code == 200


def test_oversized_body_is_413(locked_server: RunningServer) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
    response = httpx.post(
        f"{locked_server.v1}/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sk-right"},
        timeout=10,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_oversized_chunked_body_is_413(locked_server: RunningServer) -> None:
    def chunks() -> Any:
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}'

    response = httpx.post(
        f"{locked_server.v1}/chat/completions",
        content=chunks(),
        headers={"Authorization": "Bearer sk-right", "content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 413


def test_request_id_is_echoed_or_generated(tiny_server: RunningServer) -> None:
    sent = httpx.get(f"{tiny_server.v1}/models", headers={"x-request-id": "abc-123"}, timeout=10)
    assert sent.headers["x-request-id"] == "abc-123"
    fresh = httpx.get(f"{tiny_server.v1}/models", timeout=10)
    assert len(fresh.headers["x-request-id"]) >= 16
    error = httpx.post(f"{tiny_server.v1}/chat/completions", content=b"{", timeout=10)
    assert error.headers["x-request-id"]


def test_cors_only_when_configured(locked_server: RunningServer, tiny_server: RunningServer) -> None:
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    allowed = httpx.options(f"{locked_server.v1}/chat/completions", headers=preflight, timeout=10)
    assert allowed.headers.get("access-control-allow-origin") == "http://example.test"
    closed = httpx.get(f"{tiny_server.v1}/models", headers={"Origin": "http://example.test"}, timeout=10)
    assert "access-control-allow-origin" not in closed.headers


def test_ready_reports_checks_and_needs_no_key(locked_server: RunningServer) -> None:
    response = httpx.get(f"{locked_server.url}/ready", timeout=10)
    assert response.status_code == 200
    assert response.json()["checks"] == {"config": True, "engine": True, "cache_writable": True}
