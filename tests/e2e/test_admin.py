"""Runtime adapter registration (vLLM-compatible endpoints) and the metrics they move."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN, tiny_settings

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    settings = tiny_settings(tiny_models)
    result: RunningServer = start_server(
        settings.model_copy(update={"models": {"tiny": settings.models["tiny"]}})
    )
    return result


def test_load_lora_adapter_registers_and_preloads(server: RunningServer, tiny_models: TinyModels) -> None:
    response = httpx.post(
        f"{server.v1}/load_lora_adapter",
        json={"lora_name": "runtime", "lora_path": "tiny-lora"},
        timeout=60,
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "tiny+runtime"
    models = {m["id"]: m for m in httpx.get(f"{server.v1}/models", timeout=10).json()["data"]}
    assert models["tiny+runtime"]["loaded"] is True and models["tiny+runtime"]["parent"] == "tiny"
    api = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    assert api.chat.completions.create(model="runtime", messages=HELLO, max_tokens=2).choices  # type: ignore[arg-type]
    assert api.chat.completions.create(model="tiny+runtime", messages=HELLO, max_tokens=2).choices  # type: ignore[arg-type]


def test_load_refused_adapter_leaves_no_alias(server: RunningServer) -> None:
    response = httpx.post(
        f"{server.v1}/load_lora_adapter",
        json={"lora_name": "bad", "lora_path": "other-base-lora"},
        timeout=60,
        headers=ADMIN,
    )
    assert response.status_code == 400
    ids = {m["id"] for m in httpx.get(f"{server.v1}/models", timeout=10).json()["data"]}
    assert "tiny+bad" not in ids
    outside = httpx.post(
        f"{server.v1}/load_lora_adapter",
        json={"lora_name": "evil", "lora_path": "/etc"},
        timeout=60,
        headers=ADMIN,
    )
    assert outside.status_code == 400


def test_unload_lora_adapter_removes_alias(server: RunningServer) -> None:
    httpx.post(
        f"{server.v1}/load_lora_adapter",
        json={"lora_name": "temp", "lora_path": "tiny-lora"},
        timeout=60,
        headers=ADMIN,
    )
    response = httpx.post(
        f"{server.v1}/unload_lora_adapter", json={"lora_name": "temp"}, timeout=10, headers=ADMIN
    )
    assert response.status_code == 200 and response.json()["unloaded"] is True
    missing = httpx.post(
        f"{server.v1}/chat/completions", json={"model": "tiny+temp", "messages": HELLO}, timeout=10
    )
    assert missing.status_code == 404
    again = httpx.post(
        f"{server.v1}/unload_lora_adapter", json={"lora_name": "temp"}, timeout=10, headers=ADMIN
    )
    assert again.status_code == 404


def test_metrics_move_after_traffic(server: RunningServer) -> None:
    api = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
    text = httpx.get(f"{server.url}/metrics", timeout=10).text

    def value(prefix: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        assert lines, f"no metric {prefix}"
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    assert value('peft_gateway_requests_total{path="/v1/chat/completions",status="200"}') >= 1
    assert value('peft_gateway_model_loads_total{model="tiny"}') == 1
    assert value('peft_gateway_cache_hits_total{model="tiny"}') >= 1
    assert value('peft_gateway_tokens_total{kind="prompt",model="tiny"}') > 0
    assert value('peft_gateway_time_to_first_token_seconds_count{model="tiny"}') >= 1
    assert value("peft_gateway_cache_bytes") > 0
