"""Tools are rendered into the prompt by templates that support them, and refused for the rest."""

from __future__ import annotations

import shutil
from typing import Any

import httpx
import pytest

from gateway.settings import ModelSettings, Settings
from tests.conftest import RunningServer, TinyModels

pytestmark = pytest.mark.e2e

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for tool in tools %}{{ tool['function']['name'] }} "
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    }
]
HELLO = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(
    start_server: Any, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    folder = tmp_path_factory.mktemp("tools") / "tiny-tools"
    shutil.copytree(tiny_models.base, folder)
    (folder / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    settings = Settings(
        models={
            "with-tools": ModelSettings(source=str(folder), dtype="float32"),
            "plain": ModelSettings(source=str(tiny_models.base), dtype="float32"),
        }
    )
    result: RunningServer = start_server(settings)
    return result


def chat(server: RunningServer, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/chat/completions", json={"messages": HELLO, "max_tokens": 2, **body}, timeout=60
    )


def test_tools_are_rendered_into_the_prompt_when_the_template_supports_them(server: RunningServer) -> None:
    without = chat(server, model="with-tools")
    with_tools = chat(server, model="with-tools", tools=TOOLS)
    assert without.status_code == with_tools.status_code == 200
    extra = with_tools.json()["usage"]["prompt_tokens"] - without.json()["usage"]["prompt_tokens"]
    assert extra >= len("Tools: get_weather ")
    none = chat(server, model="with-tools", tools=TOOLS, tool_choice="none")  # "none": tools stay out
    assert none.json()["usage"]["prompt_tokens"] == without.json()["usage"]["prompt_tokens"]


def test_tools_are_refused_for_a_template_without_tool_support(server: RunningServer) -> None:
    response = chat(server, model="plain", tools=TOOLS)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


def test_a_forced_call_uses_the_hermes_format_when_the_template_shows_none(server: RunningServer) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        response = chat(
            server,
            model="with-tools",
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=120,
            parallel_tool_calls=False,
        )
        assert response.status_code == 200, response.text
        result = response.json()["choices"][0]
        assert result["finish_reason"] == "tool_calls", result
        assert result["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_tool_results_in_the_history_are_passed_to_the_template(
    server: RunningServer, tiny_models: TinyModels
) -> None:
    from transformers import AutoTokenizer

    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        ],
    }

    def prompt_tokens(*turns: dict[str, Any]) -> int:
        response = httpx.post(
            f"{server.v1}/chat/completions",
            json={"model": "with-tools", "messages": [*HELLO, *turns], "tools": TOOLS, "max_tokens": 2},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return int(response.json()["usage"]["prompt_tokens"])

    without = prompt_tokens(call)
    with_result = prompt_tokens(call, {"role": "tool", "tool_call_id": "c1", "content": "sunny"})
    # The template renders the tool turn like any other: exactly its tokens were added to the prompt.
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.base)
    turn = tokenizer.encode("<|im_start|>tool\nsunny<|im_end|>\n", add_special_tokens=False)
    assert with_result - without == len(turn)
