"""An int8 base through the real server: adapters served unmerged on it, and honest refusals."""

from __future__ import annotations

import json
import shutil
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import AdapterSettings, ModelSettings, ServerSettings, Settings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN_KEY

pytestmark = pytest.mark.e2e

HELLO: list[Any] = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def int8_server(
    start_server: Any, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    adapters = tmp_path_factory.mktemp("int8-adapters")
    shutil.copytree(tiny_models.adapter, adapters / "plain")
    needs_merge = shutil.copytree(tiny_models.adapter, adapters / "with-head")
    config = json.loads((needs_merge / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (needs_merge / "adapter_config.json").write_text(json.dumps(config))
    settings = Settings(
        models={
            # merge mode, the default: on an int8 base adapters are still served unmerged.
            "q8": ModelSettings(source=str(tiny_models.base), quantization="int8", context_length=256),
        },
        adapters={"plain-lora": AdapterSettings(source=str(adapters / "plain"), base="q8")},
        adapter_dirs=[adapters],
        base_match="warn",
        server=ServerSettings(admin_keys=[ADMIN_KEY]),
    )
    server: RunningServer = start_server(settings)
    return server


def _answer(server: RunningServer, model: str, max_tokens: int = 12) -> str:
    api = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    reply = api.chat.completions.create(model=model, messages=HELLO, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content or ""


def test_an_adapter_on_an_int8_base_is_served_unmerged_and_changes_the_answer(
    int8_server: RunningServer,
) -> None:
    base = _answer(int8_server, "q8")
    adapted = _answer(int8_server, "q8+plain")
    assert adapted and adapted != base
    assert _answer(int8_server, "plain-lora") == adapted
    card = httpx.get(f"{int8_server.v1}/models/q8").json()
    assert card["quantization"] == "int8" and "int8 weights" in card["dtype_reason"]
    variant = httpx.get(f"{int8_server.v1}/models/q8+plain-lora").json()  # the folder has an alias
    assert variant["adapter_serving"] == "unmerged" and "never merged" in variant["adapter_serving_reason"]
    assert variant["quantization"] == "int8"


def test_int8_streams_through_the_sdk(int8_server: RunningServer) -> None:
    api = openai.OpenAI(base_url=int8_server.v1, api_key="unused", max_retries=0)
    chunks = api.chat.completions.create(
        model="q8+plain", messages=HELLO, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == _answer(int8_server, "q8+plain", max_tokens=8)


def test_an_adapter_that_needs_merging_is_refused_on_int8_with_what_to_do(int8_server: RunningServer) -> None:
    response = httpx.post(
        f"{int8_server.v1}/chat/completions",
        json={"model": "q8+with-head", "messages": HELLO, "max_tokens": 2},
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "modules_to_save" in message and "int8" in message and 'quantization = "none"' in message
    # Nothing was loaded for it, and the int8 base keeps serving.
    assert _answer(int8_server, "q8")
