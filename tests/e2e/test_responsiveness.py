"""One hostile request cannot freeze the server, and a full engine answers 503 before any stream starts."""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import EngineSettings, ModelSettings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN, tiny_settings

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]
RUNAWAY = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def server(
    start_server: Any, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    hostile = tmp_path_factory.mktemp("hostile") / "base"
    shutil.copytree(tiny_models.base, hostile)
    (hostile / "chat_template.jinja").write_text(RUNAWAY)
    settings = tiny_settings(tiny_models)
    models = {
        "tiny": settings.models["tiny"],
        "hostile": ModelSettings(source=str(hostile), dtype="float32", context_length=256),
    }
    server_settings = settings.server.model_copy(
        update={"prompt_timeout": 1.0, "max_messages": 50, "max_prompt_chars": 2_000_000}
    )
    result: RunningServer = start_server(
        settings.model_copy(update={"models": models, "server": server_settings})
    )
    return result


def health_latencies(server: RunningServer, busy: threading.Thread) -> list[float]:
    latencies = []
    while busy.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    return latencies


def in_background(work: Any) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.update(response=work()))
    thread.start()
    return thread, result


def test_a_runaway_chat_template_gets_400_while_health_answers(server: RunningServer) -> None:
    loaded = httpx.post(f"{server.v1}/load_model", json={"model": "hostile"}, headers=ADMIN, timeout=60)
    assert loaded.status_code == 200, loaded.text
    thread, result = in_background(
        lambda: httpx.post(
            f"{server.v1}/chat/completions",
            json={"model": "hostile", "messages": HELLO, "max_tokens": 2},
            timeout=60,
        )
    )
    time.sleep(0.1)
    latencies = health_latencies(server, thread)
    response = result["response"]
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "chat_template_limit"
    assert latencies and max(latencies) < 1.0, latencies
    ok = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200


def test_a_huge_completions_prompt_is_tokenized_off_the_event_loop(server: RunningServer) -> None:
    prompt = "hello world, this is a long prompt. " * 30_000  # about 1 MB
    thread, result = in_background(
        lambda: httpx.post(
            f"{server.v1}/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}, timeout=120
        )
    )
    time.sleep(0.1)
    latencies = health_latencies(server, thread)
    assert result["response"].status_code == 400  # longer than the context: refused after tokenizing
    assert latencies and max(latencies) < 1.5, latencies


def test_too_many_messages_and_too_long_prompts_are_400(server: RunningServer) -> None:
    many = httpx.post(
        f"{server.v1}/chat/completions", json={"model": "tiny", "messages": HELLO * 51}, timeout=30
    )
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_messages"
    assert many.json()["error"]["param"] == "messages"
    long = httpx.post(
        f"{server.v1}/completions",
        json={"model": "tiny", "prompt": ["x" * 1_500_000, "y" * 600_000]},
        timeout=30,
    )
    assert long.status_code in (400, 413)
    long_chat = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "z" * 2_100_000}]},
        timeout=30,
    )
    assert long_chat.status_code in (400, 413)


@pytest.fixture(scope="module")
def full_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    settings = tiny_settings(tiny_models)
    result: RunningServer = start_server(
        settings.model_copy(update={"engine": EngineSettings(max_batch=1, max_waiting=0)})
    )
    return result


def test_a_stream_at_capacity_gets_503_with_retry_after_before_any_chunk(full_server: RunningServer) -> None:
    api = openai.OpenAI(base_url=full_server.v1, api_key="x", max_retries=0)
    busy = api.chat.completions.create(
        model="tiny",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=200,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    try:
        next(iter(busy))  # admitted and running
        with httpx.stream(
            "POST",
            f"{full_server.v1}/chat/completions",
            json={"model": "tiny", "messages": HELLO, "max_tokens": 2, "stream": True},
            timeout=30,
        ) as refused:
            refused.read()
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "overloaded"
        with pytest.raises(openai.APIStatusError) as raised:
            api.completions.create(model="tiny", prompt="Hi", max_tokens=2, stream=True)
        assert raised.value.status_code == 503
    finally:
        busy.close()
