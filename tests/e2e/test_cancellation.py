"""A client that goes away stops its generation within a step; a request past the deadline gets 504."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from gateway.settings import ModelSettings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import tiny_settings

pytestmark = pytest.mark.e2e

#: The tiny model served with this context: ``LONG`` runs for minutes, longer than any test waits, so a
#: generation that ends while a test watches was cancelled (or timed out), never finished by itself.
CONTEXT = 16384
LONG = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Go on forever"}],
    "max_tokens": CONTEXT - 64,
    "ignore_eos": True,
}


def make_server(start_server: Any, models: TinyModels, **server: Any) -> RunningServer:
    settings = tiny_settings(models)
    long_context = ModelSettings(source=str(models.base), dtype="float32", context_length=CONTEXT)
    settings = settings.model_copy(
        update={"models": {"tiny": long_context}, "server": settings.server.model_copy(update=server)}
    )
    result: RunningServer = start_server(settings)
    return result


@pytest.fixture(scope="module")
def server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    return make_server(start_server, tiny_models)


def engine_idle(server: RunningServer, within: float = 5.0) -> bool:
    engine = server.app.state.engine  # type: ignore[attr-defined]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if engine.scheduler.active_count == 0 and engine.scheduler.queue_depth == 0:
            return True
        time.sleep(0.01)
    return False


def cancelled_count(server: RunningServer) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("peft_gateway_generations_total") and 'reason="cancelled"' in line
    ]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_streaming_client_disconnect_cancels_generation(server: RunningServer) -> None:
    before = cancelled_count(server)
    with httpx.stream(
        "POST", f"{server.v1}/chat/completions", json={**LONG, "stream": True}, timeout=30
    ) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                break  # read one token, then hang up
    assert engine_idle(server)
    assert cancelled_count(server) == before + 1


def test_non_streaming_client_timeout_cancels_generation(server: RunningServer) -> None:
    before = cancelled_count(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/chat/completions", json=LONG, timeout=httpx.Timeout(5, read=0.2))
    assert engine_idle(server)
    assert cancelled_count(server) == before + 1
    ok = httpx.post(f"{server.v1}/chat/completions", json={**LONG, "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200


def test_request_past_the_server_deadline_gets_504(start_server: Any, tiny_models: TinyModels) -> None:
    strict = make_server(start_server, tiny_models, request_timeout=0.2)
    response = httpx.post(f"{strict.v1}/chat/completions", json=LONG, timeout=30)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert engine_idle(strict)
