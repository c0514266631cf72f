"""Memory decisions seen from a client: what /v1/models says, and the error when nothing can fit."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from gateway.settings import CacheSettings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import tiny_settings

pytestmark = pytest.mark.e2e


def test_models_show_the_dtype_and_merge_decisions_with_their_reasons(
    tiny_server: RunningServer, start_server: Any, tiny_models: TinyModels
) -> None:
    api = openai.OpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0)
    api.chat.completions.create(
        model="tiny+tiny-lora", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    base = httpx.get(f"{tiny_server.v1}/models/tiny").json()
    assert base["dtype"] == "float32" and base["dtype_reason"] == "configured"
    variant = httpx.get(f"{tiny_server.v1}/models/tiny+tiny-lora").json()
    assert variant["adapter_serving"] == "merged"
    assert variant["dtype"] == "float32" and variant["dtype_reason"] == "configured"  # its base's

    # A base left to choose its dtype, serving adapters unmerged: both decisions come with their reason.
    settings = tiny_settings(tiny_models)
    chosen = settings.models["tiny"].model_copy(update={"dtype": "auto", "adapter_mode": "multi"})
    server: RunningServer = start_server(settings.model_copy(update={"models": {"tiny": chosen}}))
    loaded = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "tiny+tiny-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert loaded.status_code == 200, loaded.text
    base = httpx.get(f"{server.v1}/models/tiny").json()
    dtype_reasons = {
        "float32": "float32 fits the memory budget and ",
        "bfloat16": "this CPU has native bf16",
    }
    assert base["dtype"] in dtype_reasons and base["dtype_reason"].startswith(dtype_reasons[base["dtype"]])
    variant = httpx.get(f"{server.v1}/models/tiny+tiny-lora").json()
    assert variant["adapter_serving"] == "unmerged"
    assert variant["adapter_serving_reason"] == "adapter_mode = 'multi'"
    assert variant["dtype_reason"] == base["dtype_reason"]


def test_a_model_that_can_never_fit_gets_a_503_that_says_why_and_not_to_retry(
    start_server: Any, tiny_models: TinyModels
) -> None:
    server: RunningServer = start_server(tiny_settings(tiny_models, cache=CacheSettings(max_memory=4096)))
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 503
    assert response.headers["x-should-retry"] == "false" and "retry-after" not in response.headers
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert "max_memory" in error["message"] and "dtype" in error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200
