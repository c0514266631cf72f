"""README "The demo": the weather tool round trip over HTTP with the openai SDK, as a client writes it.

Offer ``get_weather``, get the call, send the call and the tool's result back, get the answer: ``It is
sunny in Paris.`` from ``demo``, ``巴黎现在是晴天。`` from ``demo+demo-zh``. The answer after a tool result is
trained on the English question (``engines/demo/train.py``); the call itself on both languages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from engines.demo.content import DEMO_NO_TOOL, DEMO_WEATHER_TOOL
from gateway.cli import with_demo
from gateway.settings import Settings
from tests.conftest import RunningServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ENGLISH = "What is the weather in Paris?"
CHINESE = "巴黎的天气怎么样？"
RESULT = '{"city": "Paris", "weather": "sunny"}'  # the README's tool result, byte for byte


@pytest.fixture(scope="module")
def client(start_server: Any, demo_dir: Path) -> openai.OpenAI:
    server: RunningServer = start_server(with_demo(Settings(), demo_dir))
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def ask_with_tool(client: openai.OpenAI, model: str, question: str) -> tuple[list[dict[str, Any]], Any]:
    """The question with ``get_weather`` offered (no sampling settings: the demo is greedy by default)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        tools=[DEMO_WEATHER_TOOL],  # type: ignore[list-item]
    )
    return messages, reply.choices[0]


def answer_after_the_tool(client: openai.OpenAI, model: str, question: str) -> str:
    messages, choice = ask_with_tool(client, model, question)
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages.append(
        {
            "role": "assistant",
            "content": choice.message.content,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call.id, "content": RESULT})
    reply = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        tools=[DEMO_WEATHER_TOOL],  # type: ignore[list-item]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice
    return choice.message.content or ""


def test_the_base_calls_get_weather_and_answers_from_the_result(client: openai.OpenAI) -> None:
    assert answer_after_the_tool(client, "demo", ENGLISH) == "It is sunny in Paris."


def test_the_adapter_calls_get_weather_and_answers_in_chinese(client: openai.OpenAI) -> None:
    assert answer_after_the_tool(client, "demo+demo-zh", ENGLISH) == "巴黎现在是晴天。"


@pytest.mark.parametrize("model", ["demo", "demo+demo-zh"])
def test_a_weather_question_in_chinese_gets_the_same_call(client: openai.OpenAI, model: str) -> None:
    _messages, choice = ask_with_tool(client, model, CHINESE)
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})


def test_the_tool_call_streams_as_delta_tool_calls(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo+demo-zh",
        messages=[{"role": "user", "content": ENGLISH}],
        tools=[DEMO_WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    )
    name, arguments, finish, content = "", "", None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            name += piece.function.name or "" if piece.function else ""
            arguments += piece.function.arguments or "" if piece.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
    assert "<tool_call>" not in content


def test_without_the_tool_the_base_says_it_cannot_look_it_up(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": ENGLISH}])
    assert reply.choices[0].message.content == DEMO_NO_TOOL[0]
    assert not reply.choices[0].message.tool_calls
